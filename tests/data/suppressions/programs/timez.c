#include <stdio.h>
#include <time.h>
#include <stdlib.h>
int main(void){ time_t t = 0; setenv("TZ", "Europe/Paris", 1); tzset(); struct tm *tm = localtime(&t); char b[64]; strftime(b, sizeof b, "%c %Z", tm); printf("%s\n", b);
  return 0; }
