/* churn: N malloc(64)+free pairs, timed internally.
 *
 *   churn [N] [-w] [-o FILE] [-k K] [-t T]
 *     N        pairs (default 1,000,000), in all threads together
 *     -w       wait for one byte (or EOF) on stdin before the loop, so a tracer
 *              can attach to the already-running process first
 *     -o FILE  write the loop's duration to FILE: "WALL_NS CPU_NS\n", wall time
 *              (CLOCK_MONOTONIC) and the loop's thread CPU time
 *              (CLOCK_THREAD_CPUTIME_ID, user + kernel, so uprobe traps count but
 *              time spent waiting for a CPU another process holds does not).
 *              With -t, CPU_NS is the sum of every thread's own loop CPU time,
 *              and each thread's follows on the same line: "WALL CPU T1 ... Tn"
 *     -k K     rotating live set: K blocks are allocated before the loop and kept
 *              live; each iteration frees the oldest of the K and allocates a new
 *              one in its place (K = 0, the default without -t: the LIFO pair,
 *              malloc then free of the same block at once)
 *     -t T     T threads (pthreads, even for T = 1: the process is multi-threaded),
 *              each doing its share of the N pairs with its own live set of K
 *              blocks (default K = 16 with -t); their loops start together (a
 *              barrier, once each has allocated its live set) and the wall time is
 *              from the first thread's loop start to the last one's end
 *
 * Prints nothing. Only the loop is timed (not the live set's first K
 * allocations nor its final frees, nor thread creation), so process start-up
 * and tracer attach costs never reach the per-pair figure.
 * Build: cc -O2 -pthread -o churn churn.c
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64

static long long now_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static pthread_barrier_t start;

/* One loop: n pairs with k blocks live (k = 0: LIFO). Its thread CPU time goes
 * to *cpu_ns, its start and end (CLOCK_MONOTONIC) to *t0_ns and *t1_ns; with
 * `go` (threads), it waits there after allocating its live set, so the threads'
 * loops start together. */
static void loop(long n, long k, pthread_barrier_t *go, long long *cpu_ns, long long *t0_ns,
                 long long *t1_ns)
{
    void **live = NULL;
    if (k > 0) {
        live = calloc((size_t)k, sizeof(void *));
        if (!live)
            exit(4);
        for (long j = 0; j < k; j++)
            live[j] = malloc(64);
    }
    if (go)
        pthread_barrier_wait(go);
    long long c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
    long long t0 = now_ns(CLOCK_MONOTONIC);
    if (k == 0) {
        for (long i = 0; i < n; i++) {
            void *p = malloc(64);
            /* keep the compiler from pairing malloc with free away */
            __asm__ volatile("" : : "r"(p) : "memory");
            free(p);
        }
    } else {
        long j = 0;
        for (long i = 0; i < n; i++) {
            free(live[j]);              /* the oldest of the k */
            void *p = malloc(64);
            __asm__ volatile("" : : "r"(p) : "memory");
            live[j] = p;
            if (++j == k)
                j = 0;
        }
    }
    long long t1 = now_ns(CLOCK_MONOTONIC);
    long long c1 = now_ns(CLOCK_THREAD_CPUTIME_ID);
    *cpu_ns = c1 - c0;
    *t0_ns = t0;
    *t1_ns = t1;
    if (k > 0) {
        for (long m = 0; m < k; m++)
            free(live[m]);
        free(live);
    }
}

struct worker {
    pthread_t th;
    long n, k;
    long long cpu_ns, t0_ns, t1_ns;
};

static void *run_worker(void *arg)
{
    struct worker *w = arg;
    loop(w->n, w->k, &start, &w->cpu_ns, &w->t0_ns, &w->t1_ns);
    return NULL;
}

int main(int argc, char **argv)
{
    long n = 1000000, k = -1, threads = 0;
    int wait = 0;
    const char *out = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-w") == 0)
            wait = 1;
        else if (strcmp(argv[i], "-o") == 0 && i + 1 < argc)
            out = argv[++i];
        else if (strcmp(argv[i], "-k") == 0 && i + 1 < argc)
            k = atol(argv[++i]);
        else if (strcmp(argv[i], "-t") == 0 && i + 1 < argc)
            threads = atol(argv[++i]);
        else
            n = atol(argv[i]);
    }
    if (k < 0)
        k = threads ? 16 : 0;
    if (n < 0 || threads < 0 || threads > MAX_THREADS) {
        fprintf(stderr, "churn: bad arguments (N %ld, -t %ld: 1..%d)\n", n, threads, MAX_THREADS);
        return 1;
    }
    if (wait) {
        char c;
        if (read(0, &c, 1) < 0)
            return 2;
    }
    long long t0, t1, cpu = 0;
    static struct worker w[MAX_THREADS];
    if (threads == 0) {
        loop(n, k, NULL, &cpu, &t0, &t1);
    } else {
        pthread_barrier_init(&start, NULL, (unsigned)threads + 1);
        for (long i = 0; i < threads; i++) {
            /* the N pairs shared out, the remainder to the first threads */
            w[i].n = n / threads + (i < n % threads);
            w[i].k = k;
            if (pthread_create(&w[i].th, NULL, run_worker, &w[i]) != 0)
                return 5;
        }
        pthread_barrier_wait(&start);
        for (long i = 0; i < threads; i++)
            pthread_join(w[i].th, NULL);
        /* from the first thread's start to the last one's end, as the threads saw
         * them (this thread may get a CPU only once a worker is done) */
        t0 = w[0].t0_ns;
        t1 = w[0].t1_ns;
        for (long i = 0; i < threads; i++) {
            cpu += w[i].cpu_ns;
            t0 = w[i].t0_ns < t0 ? w[i].t0_ns : t0;
            t1 = w[i].t1_ns > t1 ? w[i].t1_ns : t1;
        }
    }
    if (out) {
        FILE *f = fopen(out, "w");
        if (!f)
            return 3;
        fprintf(f, "%lld %lld", t1 - t0, cpu);
        for (long i = 0; i < threads; i++)
            fprintf(f, " %lld", w[i].cpu_ns);
        fprintf(f, "\n");
        fclose(f);
    }
    return 0;
}
