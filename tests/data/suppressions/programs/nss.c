#include <stdio.h>
#include <pwd.h>
#include <grp.h>
#include <netdb.h>
#include <string.h>
#include <sys/socket.h>
int main(void){
  struct passwd *p = getpwnam("root");
  struct passwd *q = getpwnam("no-such-user-xyz");
  struct group *g = getgrgid(0);
  struct hostent *h = gethostbyname("localhost");
  struct addrinfo hints, *res = 0; memset(&hints, 0, sizeof hints); hints.ai_family = AF_UNSPEC;
  if (getaddrinfo("localhost", "80", &hints, &res) == 0) freeaddrinfo(res);
  struct servent *s = getservbyname("http", "tcp");
  printf("%p %p %p %p %p\n", (void*)p, (void*)q, (void*)g, (void*)h, (void*)s);
  return 0; }
