#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pwd.h>
#include <grp.h>
#include <wchar.h>
#include <pthread.h>
#include <execinfo.h>
#include <syslog.h>
#include <netdb.h>
#include <signal.h>
#include <time.h>
int main(void){
  struct passwd *pw; setpwent(); while ((pw = getpwent())) {} endpwent();
  struct group *gr; setgrent(); while ((gr = getgrent())) {} endgrent();
  pthread_key_t k; for (int i = 0; i < 40; i++) { pthread_key_create(&k, 0); pthread_setspecific(k, &k); }
  void *bt[8]; int n = backtrace(bt, 8); (void)n;
  openlog("misc", LOG_PID, LOG_USER); syslog(LOG_DEBUG, "hello %d", 1); closelog();
  printf("%s %s\n", strsignal(77), strerror(9999));
  struct protoent *pe = getprotobyname("tcp"); (void)pe;
  char *s = ctime(&(time_t){0}); (void)s;
  return 0; }
