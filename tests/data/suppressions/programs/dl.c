#include <stdio.h>
#include <dlfcn.h>
int main(void){
  void *h = dlopen("libm.so.6", RTLD_NOW); void *f = dlsym(h, "cos"); dlclose(h);
  void *z = dlopen("libz.so.1", RTLD_NOW); (void)dlsym(z, "zlibVersion");
  void *bad = dlopen("libnope.so", RTLD_NOW); (void)bad; (void)dlerror();
  printf("%p\n", f); return 0; }
