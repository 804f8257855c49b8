#include <stdio.h>
#include <dlfcn.h>
int main(void){ void *h = dlopen("/tmp/sp/bin/libtlsmod.so", RTLD_NOW); int *(*f)(void) = (int*(*)(void))dlsym(h, "get"); printf("%d\n", *f()); return 0; }
