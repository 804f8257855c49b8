#include <stdio.h>
#include <pthread.h>
static __thread int tv[100];
static void *run(void *a){ tv[0]++; return a; }
int main(void){ pthread_t t[4]; for (int i=0;i<4;i++) pthread_create(&t[i],0,run,0); for (int i=0;i<4;i++) pthread_join(t[i],0);
  pthread_t d; pthread_create(&d,0,run,0); pthread_detach(d); pthread_exit(0); }
