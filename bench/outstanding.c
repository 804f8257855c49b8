/* outstanding: make N allocations (default 200,000) of distinct sizes from
 * four distinct call stacks, free none of them, and exit: the leak report's
 * worst case for accounting and symbolization.
 * Build: cc -O2 -g -o outstanding outstanding.c
 */
#include <stdlib.h>
#include <string.h>

static void *volatile sink;

__attribute__((noinline)) static void *leak_a(size_t n) { return malloc(n); }
__attribute__((noinline)) static void *leak_b(size_t n) { return calloc(1, n); }
__attribute__((noinline)) static void *leak_c(size_t n) { void *p = malloc(n); return p; }
__attribute__((noinline)) static void *leak_d(size_t n) { return realloc(NULL, n); }

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 200000;
    for (long i = 0; i < n; i++) {
        size_t sz = 16 + (size_t)(i % 4093);
        void *p;
        switch (i & 3) {
        case 0: p = leak_a(sz); break;
        case 1: p = leak_b(sz); break;
        case 2: p = leak_c(sz); break;
        default: p = leak_d(sz); break;
        }
        sink = p;
    }
    return 0;
}
