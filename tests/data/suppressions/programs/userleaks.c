#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <iconv.h>
#include <locale.h>
#include <dirent.h>
#include <netdb.h>
#include <search.h>
static char *keep[64];
__attribute__((noinline)) void leak_strdup(void){ keep[0] = strdup("leaked by strdup"); }
__attribute__((noinline)) void leak_fopen(void){ FILE *f = fopen("/etc/passwd", "r"); char b[8]; fgets(b, 8, f); }
__attribute__((noinline)) void leak_iconv(void){ iconv_open("ISO-8859-15", "UTF-8"); }
__attribute__((noinline)) void leak_newlocale(void){ newlocale(LC_ALL_MASK, "C.UTF-8", (locale_t)0); }
__attribute__((noinline)) void leak_opendir(void){ opendir("/"); }
__attribute__((noinline)) void leak_getline(void){ FILE *f = fopen("/etc/hostname", "r"); char *l = 0; size_t n = 0; getline(&l, &n, f); fclose(f); }
__attribute__((noinline)) void leak_asprintf(void){ char *p; asprintf(&p, "%d", 42); }
__attribute__((noinline)) void leak_getaddrinfo(void){ struct addrinfo *r; getaddrinfo("localhost", "80", 0, &r); }
static int cmp(const void *a, const void *b){ return strcmp(a, b); }
__attribute__((noinline)) void leak_tsearch(void){ static void *root; tsearch("x", &root, cmp); }
__attribute__((noinline)) void leak_malloc(void){ keep[1] = malloc(123); }
__attribute__((noinline)) void leak_realpath(void){ realpath("/etc/../etc/passwd", 0); }
int main(void){ leak_strdup(); leak_fopen(); leak_iconv(); leak_newlocale(); leak_opendir(); leak_getline(); leak_asprintf(); leak_getaddrinfo(); leak_tsearch(); leak_malloc(); leak_realpath(); return 0; }
