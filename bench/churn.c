/* churn: N malloc(64)+free pairs, timed internally.
 *
 *   churn [N] [-w] [-o FILE]
 *     N        pairs (default 1,000,000)
 *     -w       wait for one byte (or EOF) on stdin before the loop, so a tracer
 *              can attach to the already-running process first
 *     -o FILE  write the loop's duration to FILE: "WALL_NS CPU_NS\n", wall time
 *              (CLOCK_MONOTONIC) and this thread's CPU time (CLOCK_THREAD_CPUTIME_ID,
 *              user + kernel, so uprobe traps count but time spent waiting for a
 *              CPU another process holds does not)
 *
 * Prints nothing. Only the loop is timed, so process start-up and tracer
 * attach costs never reach the per-pair figure.
 * Build: cc -O2 -o churn churn.c
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    long n = 1000000;
    int wait = 0;
    const char *out = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-w") == 0)
            wait = 1;
        else if (strcmp(argv[i], "-o") == 0 && i + 1 < argc)
            out = argv[++i];
        else
            n = atol(argv[i]);
    }
    if (wait) {
        char c;
        if (read(0, &c, 1) < 0)
            return 2;
    }
    long long c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
    long long t0 = now_ns(CLOCK_MONOTONIC);
    for (long i = 0; i < n; i++) {
        void *p = malloc(64);
        /* keep the compiler from pairing malloc with free away */
        __asm__ volatile("" : : "r"(p) : "memory");
        free(p);
    }
    long long t1 = now_ns(CLOCK_MONOTONIC);
    long long c1 = now_ns(CLOCK_THREAD_CPUTIME_ID);
    if (out) {
        FILE *f = fopen(out, "w");
        if (!f)
            return 3;
        fprintf(f, "%lld %lld\n", t1 - t0, c1 - c0);
        fclose(f);
    }
    return 0;
}
