/* A ~100 MB heap for the leak-kinds scan benchmark (bench/kinds.py).
 *
 *   kinds_heap CHAINS LOST_EVERY LISTFILE|-
 *
 * Builds CHAINS chains of 10 blocks of 96 bytes (100,000: 1,000,000 blocks,
 * 96 MB), each block's word 0 the start of the next block of its chain, the
 * other words data (never a heap address). A table (one block, 8 bytes per
 * chain, kept in a global) holds each chain's head:
 *   chain % LOST_EVERY == 0  nothing: the head is definitely lost, the rest of the chain indirectly lost;
 *   else chain % 20 == 5     head + 16, an interior pointer: the whole chain possibly lost;
 *   otherwise                the head: the whole chain still reachable.
 * Plus 8 blocks of 1 MiB (mmapped chunks): 4 kept in globals (reachable), 4 lost.
 * With a LISTFILE: writes every block (address, size as two uint64 words) to
 * it, then stops itself with SIGSTOP (the scan runs then) and exits 0 once
 * continued. With "-": just exits (under the plugin, which pauses it). */
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define LEN 10
#define SIZE 96
#define BIG (1u << 20)
#define NBIG 8

void **table;                 /* globals the compiler must keep: the roots */
void *big_kept[NBIG / 2];
static uint64_t *list;
static size_t nlist;

static void note(void *p, size_t n) { if (!list) return; list[2 * nlist] = (uintptr_t)p; list[2 * nlist + 1] = n; nlist++; }

static __attribute__((noinline)) void build(long chains, long lost_every) {
    uint64_t x = 0x9E3779B97F4A7C15ull;
    table = malloc(chains * sizeof *table);
    note(table, chains * sizeof *table);
    for (long c = 0; c < chains; c++) {
        uint64_t *prev = NULL, *head = NULL;
        for (int k = 0; k < LEN; k++) {
            uint64_t *b = malloc(SIZE);
            note(b, SIZE);
            b[0] = 0;
            for (int w = 1; w < SIZE / 8; w++) {   /* data: odd values with the top bit set */
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                b[w] = x | 0x8000000000000001ull;
            }
            if (prev) prev[0] = (uintptr_t)b; else head = b;
            prev = b;
        }
        table[c] = c % lost_every == 0 ? NULL : c % 20 == 5 ? (void *)((char *)head + 16) : (void *)head;
    }
    for (int i = 0; i < NBIG; i++) {
        char *p = malloc(BIG);
        memset(p, 0x11, BIG);
        note(p, BIG);
        if (i % 2 == 0) big_kept[i / 2] = p;
    }
}

static __attribute__((noinline)) void clear_stack(void) {
    volatile char pad[16384];
    memset((char *)pad, 0, sizeof pad);
}

int main(int argc, char **argv) {
    if (argc != 4 || atol(argv[1]) <= 0 || atol(argv[2]) <= 0) {
        fprintf(stderr, "usage: kinds_heap CHAINS LOST_EVERY LISTFILE|-\n");
        return 2;
    }
    long chains = atol(argv[1]), lost_every = atol(argv[2]);
    const char *path = argv[3];
    size_t cap = ((size_t)chains * LEN + NBIG + 1) * 16;
    if (strcmp(path, "-") != 0) {
        list = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (list == MAP_FAILED) return 1;
    }
    build(chains, lost_every);
    if (!list) return 0;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return 1;
    size_t left = nlist * 16;
    char *p = (char *)list;
    while (left) { ssize_t w = write(fd, p, left); if (w <= 0) return 1; p += w; left -= w; }
    close(fd);
    munmap(list, cap);   /* not a root: the list holds every block's address */
    list = NULL;
    clear_stack();       /* no stale block address in the dead frames below main's */
    raise(SIGSTOP);
    return 0;
}
