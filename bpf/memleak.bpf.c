// SPDX-License-Identifier: MIT
// pytest-memleak-ebpf: allocator uprobes + process-lifecycle tracepoints.
//
// One program per pytest session (compiled by BCC). Userspace marks the
// pytest process as a ROOT in `tracked`; every process the root (or a tracked
// process) creates while a test runs is tracked from birth, in the kernel.
// Under pytest-xdist the controller is a SPAWNER: each process it creates (a
// worker) is a ROOT from birth, and the workers share this one program.
//
// Accounting contract, per process image (a new image starts at exec):
//   live blocks  = blocks the process allocated itself since its last exec
//                  and has not freed; keyed by (tgid, address) -- except a
//                  single-threaded image's newest ones, kept in its own
//                  `tracked` entry until pushed out, or it gains a thread, or
//                  it ends (track_t.ring)
//   hand-off     = allocator arguments from entry to return: in a uprobe
//                  session, malloc's and calloc's in the call's own session
//                  cookie; else keyed by (thread, function) so nested calls
//                  and threads never collide
//   stacks       = user stacks captured at the allocator's return, as
//                  build-id + file offset frames (resolvable after exit)
//
// Parameters substituted by the loader (tracer/loading.py): MAX_BLOCKS, MAX_PROCS,
// MAX_STACKS, MAX_HANDOFFS, STACK_DEPTH, RINGBUF_PAGES, EXE_LEN, and
// HAVE_GROUP_DEAD when sched_process_exit has the group_dead field; one of
// ATTACH_SESSION, ATTACH_MULTI, ATTACH_PERF (which allocator programs to build);
// MAX_EXT_PAGES, MAX_ROOTS and SCAN_WORDS for in-process extension attribution;
// MAX_RAWCACHE for the ip-stack -> build-id-stack cache; PIDMAP_WORDS for the
// pid bitmap (pid_max / 64).

/* Only pt_regs: <linux/sched.h> doubled the compile time, and the kernel
 * headers may be another version's: the few task/mm/file/inode members the
 * exec pause reads come as byte offsets from this kernel's BTF
 * (tracer/kernel_offsets.py: OFF_*). */
#include <uapi/linux/ptrace.h>

/* ids, flags, counter indexes and map value layouts shared with userspace */
#include "memleak.h"

#ifndef BPF_F_USER_BUILD_ID
#define BPF_F_USER_BUILD_ID (1ULL << 11)
#endif
#ifndef CLONE_THREAD
#define CLONE_THREAD 0x00010000
#endif
#define O_CLOEXEC_FLAG 02000000
#ifndef CLONE_VFORK
#define CLONE_VFORK 0x00004000
#endif

BPF_F_TABLE("hash", u32, struct track_t, tracked, MAX_PROCS, BPF_F_NO_PREALLOC);
/* the per-process ring (track_t.ring) is for the hash store only: the table
 * costs about as little */
#ifdef BLOCK_TABLE
#define RING_FLAG 0
#else
#define RING_FLAG TF_RING
#endif
BPF_PERCPU_ARRAY(track_scratch, struct track_t, 1);
/* One bit per pid (PIDMAP_WORDS = pid_max / 64): set for every tgid in
 * `tracked`. Probes of processes that are not tracked -- every other process
 * on the machine, and other sessions' (xdist workers') processes -- stop at
 * one array read instead of a hash lookup. A hint only: a pid past the map
 * (pid_max raised later) falls through to the hash. */
BPF_ARRAY(pidmap, u64, PIDMAP_WORDS);
/* One bit per pid, set for the processes a test created (TF_ALLOCS from
 * birth), only by this program and atomically: their allocator entries and
 * frees stop at this bit, no hash lookup. (Roots -- the pytest processes --
 * record only in in-process windows: they take the hash.) A bit may outlive
 * its process's tracking (a process left running at its test's end): its
 * returns then find no entry; it is cleared when that process exits. */
BPF_ARRAY(allocmap, u64, PIDMAP_WORDS);
BPF_F_TABLE("hash", u64, struct proc_t, procs, MAX_PROCS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct block_key_t, struct block_t, blocks, MAX_BLOCKS, BPF_F_NO_PREALLOC);
#ifdef BLOCK_TABLE
#ifndef BPF_F_MMAPABLE
#define BPF_F_MMAPABLE (1U << 10)
#endif
/* The live-block table (memleak.h: bucket_t); TABLE_BUCKETS and
 * TABLE_REGION_BUCKETS are powers of 2 from the loader. */
BPF_F_TABLE("array", u32, struct bucket_t, slots, TABLE_BUCKETS, BPF_F_MMAPABLE);
#define TABLE_REGIONS (TABLE_BUCKETS / TABLE_REGION_BUCKETS)
/* serials of images gone at exec (-> 1): userspace clears their table
 * blocks and deletes the entry */
BPF_F_TABLE("hash", u64, u32, dead, MAX_PROCS, BPF_F_NO_PREALLOC);
#endif
BPF_HASH(handoffs, struct handoff_key_t, struct handoff_t, MAX_HANDOFFS);
BPF_F_TABLE("hash", u64, struct stack_t, stacks, MAX_STACKS, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(scratch, struct stack_t, 1);

struct rawbuf_t {
    u64 ip[STACK_DEPTH];
};
/* (image, hash of its plain-ip stack) -> build-id stack (memleak.h: rawkey_t) */
BPF_TABLE("lru_hash", struct rawkey_t, struct rawval_t, rawcache, MAX_RAWCACHE);
BPF_PERCPU_ARRAY(rawscratch, struct rawbuf_t, 1);
/* In front of rawcache and the stack map, per CPU: (image, hash of its
 * plain-ip stack) -> build-id stack, direct-mapped (SCACHE entries, a power of
 * 2). A hit costs neither the LRU lookup nor the stack map's: it stands for
 * them while the stack's `used` stamp it saw is younger than STACK_STAMP_NS
 * (the stamp is at least that recent, as after a stack map lookup: userspace
 * deletes only stacks stamped more than 2 * STACK_STAMP_NS before its block
 * walk began, so the stack is still there). The mapping itself never goes
 * stale: an image's serial is never reused. */
#define SCACHE 256
struct scache_ent_t {
    u64 serial;
    u64 rawhash;
    u64 h;               /* the build-id stack's hash */
    u64 stamp;           /* the stack's `used` as this CPU last saw or set it */
};
struct scache_t {
    struct scache_ent_t e[SCACHE];
};
BPF_PERCPU_ARRAY(scache, struct scache_t, 1);
BPF_PERCPU_ARRAY(rawval_scratch, struct rawval_t, 1);
BPF_PERCPU_ARRAY(proc_scratch, struct proc_t, 1);
BPF_ARRAY(counters, u64, CTR_NCOUNTERS);
/* The tracer's own event thread (tid) in a root: its allocations (scans of
 * paused processes) are never recorded in an in-process window. */
BPF_ARRAY(quiet, u32, 1);
/* per root (each xdist worker has its own address space) */
BPF_HASH(ext, u32, struct ext_t, MAX_ROOTS);
BPF_HASH(ext_pages, struct ext_page_t, u32, MAX_EXT_PAGES);   /* (root, page number) -> 1 */
struct scanbuf_t {
    u64 w[SCAN_WORDS];
};
BPF_PERCPU_ARRAY(scanbuf, struct scanbuf_t, 1);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

/* ---- the allocator of each exec (exec_allocator) ---- */
#ifndef MAX_RESOLVED
#define MAX_RESOLVED 4096      /* distinct (executable, loader inputs) answers */
#endif
#ifndef MAX_PENDING
#define MAX_PENDING 4096       /* images stopped at exec at once */
#endif
#ifndef ENV_STR_MAX
#define ENV_STR_MAX 4096       /* a longer environment string: the key is not exact */
#endif
#ifndef MAX_ENV_STRINGS
#define MAX_ENV_STRINGS 512    /* more strings: the key is not exact */
#endif
/* (executable, loader inputs) -> userspace's allocator answer id: an exec
 * found here is not paused */
BPF_F_TABLE("hash", struct resolved_key_t, u32, resolved, MAX_RESOLVED, BPF_F_NO_PREALLOC);
/* tgid -> key of an image stopped at exec, until userspace continues it (the
 * watchdog continues every one left here when pytest dies) */
BPF_F_TABLE("hash", u32, struct resolved_key_t, pending, MAX_PENDING, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(rkey_scratch, struct resolved_key_t, 1);
/* tgid -> its registers at its stop at exit (stop_registers below); LRU: an
 * entry userspace never took goes by itself */
BPF_TABLE("lru_hash", u32, struct stop_regs_t, stop_regs, MAX_PENDING);
struct envbuf_t {
    char b[ENV_STR_MAX];
};
BPF_PERCPU_ARRAY(envbuf, struct envbuf_t, 1);
BPF_PERCPU_ARRAY(pause_scratch, struct pause_t, 1);
BPF_PERF_OUTPUT(pauses);

static __always_inline void count(u32 idx)
{
    u64 *c = counters.lookup(&idx);
    if (c)
        __sync_fetch_and_add(c, 1);
}

/* n * sz without overflow; ~0 when it overflows. (The opaque max stops
 * clang from turning the check into a 128-bit multiply BPF lacks.) */
static __always_inline u64 mul_or_max(u64 n, u64 sz)
{
    u64 max = ~0ULL;
    asm volatile("" : "+r"(max));
    if (sz && n > max / sz)
        return ~0ULL;
    return n * sz;
}

/* A unique id for a process image: monotonic time, made unique per CPU
 * (an image is created by one task on one CPU at a time). */
static __always_inline u64 next_serial(void)
{
    return (bpf_ktime_get_ns() << SERIAL_CPU_BITS) | (bpf_get_smp_processor_id() & 0xff);
}

/* The word of a pid bitmap holding `tgid`'s bit, or NULL past the map's end
 * (BCC allows no map call in a macro: one getter per map). */
static __always_inline u64 *pidmap_word(u32 tgid)
{
    u32 w = tgid >> 6;
    return pidmap.lookup(&w);
}

static __always_inline u64 *allocmap_word(u32 tgid)
{
    u32 w = tgid >> 6;
    return allocmap.lookup(&w);
}

static __always_inline u64 pid_bit(u32 tgid)
{
    return 1ULL << (tgid & 63);
}

static __always_inline void bit_set(u64 *m, u32 tgid)
{
    if (m)
        __sync_fetch_and_or(m, pid_bit(tgid));
}

static __always_inline void bit_clear(u64 *m, u32 tgid)
{
    if (m && (*m & pid_bit(tgid)))
        __sync_fetch_and_and(m, ~pid_bit(tgid));
}

/* pidmap is a hint: a pid past it may be tracked (the hash decides) */
static __always_inline int maybe_tracked(u32 tgid)
{
    u64 *m = pidmap_word(tgid);
    return !m || (*m & pid_bit(tgid));
}

static __always_inline int allocmap_test(u32 tgid)
{
    u64 *m = allocmap_word(tgid);
    return m && (*m & pid_bit(tgid));
}

static __always_inline void pidmap_set(u32 tgid)     { bit_set(pidmap_word(tgid), tgid); }
static __always_inline void pidmap_clear(u32 tgid)   { bit_clear(pidmap_word(tgid), tgid); }
static __always_inline void allocmap_set(u32 tgid)   { bit_set(allocmap_word(tgid), tgid); }
static __always_inline void allocmap_clear(u32 tgid) { bit_clear(allocmap_word(tgid), tgid); }

/* A tracked image whose own allocations we record, else NULL (the hash only:
 * for callers that already passed the pid bitmap). */
static __always_inline struct track_t *allocs_lookup(u32 tgid)
{
    struct track_t *t = tracked.lookup(&tgid);
    if (!t || !(t->flags & TF_ALLOCS))
        return NULL;
    /* opaque: clang must not fold the test into `mask & pointer`, which the
     * verifier refuses */
    asm volatile("" : "+r"(t));
    return t;
}

/* The slot of `addr` in the image's ring, or NULL. */
static __always_inline struct ring_ent_t *ring_find(struct track_t *t, u64 addr)
{
    for (int i = 0; i < RING; i++)
        if (t->ring[i].addr == addr)
            return &t->ring[i];
    return NULL;
}

/* A ring slot's block into the block map. Its stack is stamped as used now:
 * userspace's stack collection, which keeps the stacks of the rings it read
 * and of the blocks its map walk saw, could otherwise miss a block that moved
 * from one to the other in between. */
static __always_inline void ring_spill(struct track_t *t, u32 tgid, struct ring_ent_t *e)
{
    struct block_key_t k = {.tgid = tgid, .addr = e->addr};
    struct block_t b = {.size = e->size, .ts = e->ts, .serial = t->serial, .stack = e->stack};
    if (b.stack) {
        struct stack_t *st = stacks.lookup(&b.stack);
        if (st)
            st->used = bpf_ktime_get_ns();
    }
    if (blocks.update(&k, &b) != 0)
        __sync_fetch_and_add(&t->lost_blocks, 1);
    e->addr = 0;
}

/* Every block in the ring into the block map (the image gains a thread, or
 * ends); the ring stays off. */
static __always_inline void ring_flush(struct track_t *t, u32 tgid)
{
    if (!(t->flags & TF_RING))
        return;
    t->flags &= ~TF_RING;
    for (int i = 0; i < RING; i++)
        if (t->ring[i].addr)
            ring_spill(t, tgid, &t->ring[i]);
}

#ifdef BLOCK_TABLE
static __always_inline u32 mix32(u64 x)
{
    return (x * TABLE_MIX) >> 32;
}

/* The bucket index of choice c (0 or 1) of block (serial, addr) */
static __always_inline u32 table_bucket(u64 serial, u64 addr, int c)
{
    u32 r0 = mix32(serial) & (TABLE_REGIONS - 1);
    u32 b0 = mix32(addr) & (TABLE_REGION_BUCKETS - 1);
    if (!c)
        return r0 * TABLE_REGION_BUCKETS + b0;
    u32 r = mix32(serial ^ TABLE_MIX2) & (TABLE_REGIONS - 1);
    u32 b = mix32(addr ^ TABLE_MIX2) & (TABLE_REGION_BUCKETS - 1);
    if (TABLE_REGIONS > 1 && r == r0)
        r ^= 1;
    if (TABLE_REGIONS == 1 && TABLE_REGION_BUCKETS > 1 && b == b0)
        b ^= 1;
    return r * TABLE_REGION_BUCKETS + b;
}

static __always_inline struct bucket_t *table_at(u32 i)
{
    return slots.lookup(&i);
}

/* The slot of (serial, addr) in bucket b, or -1 */
static __always_inline int bucket_find(struct bucket_t *b, u64 serial, u64 addr)
{
#pragma unroll
    for (int i = 0; i < TABLE_WAYS; i++)
        if (b->addr[i] == addr && b->serial[i] == serial)
            return i;
    return -1;
}

/* Slot i of b freed: serial first (userspace reads a slot as a block only
 * while its serial is set), then the address. */
static __always_inline void slot_clear(struct bucket_t *b, int i)
{
    if (i < 0 || i >= TABLE_WAYS)
        return;
    b->serial[i] = 0;
    asm volatile("" ::: "memory");
    b->addr[i] = 0;
}

/* Slot i of b filled; its serial last. */
static __always_inline void slot_fill(struct bucket_t *b, int i, u64 serial, u64 size, u64 ts, u64 stack)
{
    if (i < 0 || i >= TABLE_WAYS)
        return;
    b->size[i] = size;
    b->ts[i] = ts;
    b->stack[i] = stack;
    asm volatile("" ::: "memory");
    b->serial[i] = serial;
}

/* Claim a free slot of b for addr (compare-and-swap of its addr word): its
 * index, or -1 when the bucket is full */
static __always_inline int bucket_claim(struct bucket_t *b, u64 addr)
{
#pragma unroll
    for (int i = 0; i < TABLE_WAYS; i++)
        if (b->addr[i] == 0 && __sync_val_compare_and_swap(&b->addr[i], 0, addr) == 0)
            return i;
    return -1;
}

/* The table slot of block (serial, addr): its bucket (and *slot), or NULL */
static __always_inline struct bucket_t *table_find(u64 serial, u64 addr, int *slot)
{
#pragma unroll
    for (int c = 0; c < 2; c++) {
        struct bucket_t *b = table_at(table_bucket(serial, addr, c));
        if (!b)
            continue;
        int i = bucket_find(b, serial, addr);
        if (i >= 0) {
            *slot = i;
            return b;
        }
    }
    return NULL;
}

/* A free slot for (serial, addr), claimed (its bucket and *slot), or NULL:
 * both choices are full */
static __always_inline struct bucket_t *table_claim(u64 serial, u64 addr, int *slot)
{
#pragma unroll
    for (int c = 0; c < 2; c++) {
        struct bucket_t *b = table_at(table_bucket(serial, addr, c));
        if (!b)
            continue;
        int i = bucket_claim(b, addr);
        if (i >= 0) {
            *slot = i;
            return b;
        }
    }
    return NULL;
}

/* An overflowed block of the image out of the hash (only its own: a block of
 * an image gone at exec may have the same key) */
static __always_inline void overflow_forget(struct track_t *t, u32 tgid, u64 addr, u64 before)
{
    struct block_key_t k = {.tgid = tgid, .addr = addr};
    struct block_t *b = blocks.lookup(&k);
    if (!b || b->ts >= before || b->serial != t->serial)
        return;
    if (blocks.delete(&k) == 0)
        __sync_fetch_and_add(&t->overflowed, -1);
}
#endif

/* Roots (and pids past the bitmaps): the pid bitmap, then the hash. */
static __always_inline struct track_t *allocs_tracked(u32 tgid)
{
    return maybe_tracked(tgid) ? allocs_lookup(tgid) : NULL;
}

/* The entry filter: 1 when this process's allocations are recorded. A test's
 * processes: one bit (no hash lookup). */
static __always_inline int records_allocs(u32 tgid)
{
    return allocmap_test(tgid) || allocs_tracked(tgid);
}

/* The entry of a process whose allocations are recorded, else NULL. */
static __always_inline struct track_t *recording(u32 tgid)
{
    if (allocmap_test(tgid))
        return tracked.lookup(&tgid);   /* a test's process (or was: then NULL) */
    return allocs_tracked(tgid);
}

/* ---- allocator probes ------------------------------------------------- */

#ifdef ATTACH_SESSION
/* Kernel functions (kfuncs) of uprobe sessions. BCC cannot emit kfunc calls:
 * these are calls of placeholder helper ids (memleak.h: KFUNC_*), which the
 * loader (tracer/loading.py) rewrites into calls of the kernel functions, by their BTF ids. The
 * cookie is the kernel's own storage for one call, from its entry to its
 * return: a hand-off that no other call (nested, or of another thread) can
 * touch, without a map. */
static u64 *(*session_cookie)(void) = (void *)KFUNC_SESSION_COOKIE;
static u64 (*session_is_return)(void) = (void *)KFUNC_SESSION_IS_RETURN;   /* a bool */
#define COOKIE_HANDOFF(fn) ((fn) == FN_MALLOC || (fn) == FN_CALLOC)
#else
#define COOKIE_HANDOFF(fn) 0
#endif

/* The tracer's event thread (quiet[0]): its allocations are not recorded. */
static __always_inline int quiet_thread(u64 id)
{
    u32 zero = 0;
    u32 *q = quiet.lookup(&zero);
    return q && *q && *q == (u32)id;
}

/* Returns 1 when the call's return needs no probe (nothing was handed off):
 * a uprobe session then skips the return for this call. */
static __always_inline int gen_entry(u32 fn, u64 a0, u64 a1)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!records_allocs(tgid) || quiet_thread(id))
        return 1;
#ifdef ATTACH_SESSION
    if (COOKIE_HANDOFF(fn)) {
        /* one value (the size; calloc's product folded at entry), no time:
         * malloc and calloc call no other allocator function */
        u64 *c = session_cookie();
        if (!c)
            return 1;
        *c = fn == FN_CALLOC ? mul_or_max(a0, a1) : a0;
        return 0;
    }
#endif
    struct handoff_key_t k = {.tid = (u32)id, .fn = fn};
    /* only calls that may nest compare times (gen_return) */
    u64 ts = (fn == FN_MALLOC || fn == FN_CALLOC) ? 0 : bpf_ktime_get_ns();
    struct handoff_t *hp = handoffs.lookup(&k);
    if (hp) {
        hp->a0 = a0;
        hp->a1 = a1;
        hp->ts = ts;
        hp->live = 1;
        return 0;
    }
    struct handoff_t h = {.a0 = a0, .a1 = a1, .ts = ts, .live = 1};
    if (handoffs.update(&k, &h) != 0) {
        struct track_t *t = tracked.lookup(&tgid);
        if (t)
            __sync_fetch_and_add(&t->lost_handoffs, 1);
        return 1;
    }
    return 0;
}

/* Forget block `addr` if it existed before `before` (a nested call or
 * another thread may already have re-used the address). */
static __always_inline void forget_block(struct track_t *t, u32 tgid, u64 addr, u64 before)
{
#ifdef BLOCK_TABLE
    if (!(t->flags & TF_ROOT)) {
        int i = 0;
        struct bucket_t *tb = table_find(t->serial, addr, &i);
        if (tb) {
            if (tb->ts[i & (TABLE_WAYS - 1)] < before)
                slot_clear(tb, i);
            return;
        }
        if (t->overflowed)
            overflow_forget(t, tgid, addr, before);
        return;
    }
#endif
    if (t->flags & TF_RING) {
        struct ring_ent_t *e = ring_find(t, addr);
        if (e) {
            if (e->ts < before)
                e->addr = 0;
            return;
        }
    }
    struct block_key_t k = {.tgid = tgid, .addr = addr};
    struct block_t *b = blocks.lookup(&k);
    if (!b || b->ts >= before || b->serial != t->serial)
        return;
    blocks.delete(&k);
}

/* Root (pytest) allocations: the interpreter has no frame pointers, so the
 * frame-pointer walk rarely gets past it to the extension that called in.
 * Scan the live stack above rsp for the innermost return address into an
 * extension module's code (pages set by userspace). */
static __always_inline u64 scan_extension_frame(struct pt_regs *ctx, u32 tgid)
{
    u32 zero = 0;
    struct ext_t *e = ext.lookup(&tgid);
    if (!e || e->n == 0)
        return 0;
    u64 lo = e->lo, hi = e->hi;
    struct ext_page_t pk = {.tgid = tgid};
    /* the allocator returns into its caller: that return address is the ip */
    u64 ip = PT_REGS_IP(ctx);
    if (ip >= lo && ip < hi) {
        pk.page = ip >> 12;
        if (ext_pages.lookup(&pk))
            return ip;
    }
    struct scanbuf_t *buf = scanbuf.lookup(&zero);
    if (!buf)
        return 0;
    if (bpf_probe_read_user(buf->w, sizeof(buf->w), (void *)PT_REGS_SP(ctx)) != 0)
        return 0;
    for (int i = 0; i < SCAN_WORDS; i++) {
        u64 w = buf->w[i];
        if (w < lo || w >= hi)
            continue;
        pk.page = w >> 12;
        if (ext_pages.lookup(&pk))
            return w;
    }
    return 0;
}

/* A frame pointer further up than this from the last one ends the walk. */
#define MAX_FRAME_BYTES (4ULL << 20)

/* The user stack as plain ips, by its frame-pointer chain: the ip (at the
 * allocator's return: where its caller resumes), then each frame's return
 * address. The walk ends at a frame pointer that is not 8-byte aligned or not
 * further up the stack than the last one (within MAX_FRAME_BYTES): code built
 * without frame pointers keeps data in that register. The kernel's own walk
 * (bpf_get_stack) reads whatever it holds, and when that points nowhere the
 * read faults: ~1 µs a capture, measured in sqlite3. Returns the number of
 * ips (>= 1). */
static __always_inline u32 walk_stack(struct pt_regs *ctx, u64 *ip)
{
    u64 floor = PT_REGS_SP(ctx), fp = PT_REGS_FP(ctx);
    ip[0] = PT_REGS_IP(ctx);
    u32 n = 1;
    for (int i = 1; i < STACK_DEPTH; i++) {
        if (fp < floor || fp - floor > MAX_FRAME_BYTES || (fp & 7))
            break;
        u64 frame[2];   /* saved frame pointer, return address */
        if (bpf_probe_read_user(frame, sizeof(frame), (void *)fp) != 0 || frame[1] == 0)
            break;
        ip[i] = frame[1];
        n = i + 1;
        floor = fp + sizeof(frame);
        fp = frame[0];
    }
    return n;
}

static __always_inline void scache_fill(struct scache_ent_t *ce, u64 serial, u64 rawhash, u64 h, u64 stamp)
{
    if (!ce)
        return;
    ce->serial = serial;
    ce->rawhash = rawhash;
    ce->h = h;
    ce->stamp = stamp;
}

static __always_inline u64 capture_stack(struct pt_regs *ctx, struct track_t *t, u64 now)
{
    u32 zero = 0;
    struct rawkey_t rk = {.serial = t->serial};
    struct scache_ent_t *ce = NULL;
    u32 rn = 0;
    struct rawbuf_t *rb = rawscratch.lookup(&zero);
    if (rb) {
        rn = walk_stack(ctx, rb->ip);
        u64 rh = FNV_OFFSET ^ rn;
        for (int i = 0; i < STACK_DEPTH; i++) {
            if (i >= rn)
                break;
            rh = (rh ^ rb->ip[i]) * FNV_PRIME;
        }
        rk.rawhash = rh;
        struct scache_t *sc = scache.lookup(&zero);
        if (sc) {
            ce = &sc->e[(rh ^ rk.serial) & (SCACHE - 1)];
            /* (a stamp from another CPU's later clock: no hit) */
            if (ce->rawhash == rh && ce->serial == rk.serial && now - ce->stamp < STACK_STAMP_NS)
                return ce->h;
        }
        struct rawval_t *known = rawcache.lookup(&rk);
        if (known) {
            u64 kh = known->h;
            struct stack_t *ks = stacks.lookup(&kh);
            if (ks) {
                /* a store to a line every thread shares: only when stale
                 * (half the period: the per-CPU entry then lasts at least
                 * the other half) */
                u64 used = ks->used;
                if (now - used > STACK_STAMP_NS / 2) {
                    ks->used = now;
                    used = now;
                }
                scache_fill(ce, rk.serial, rh, kh, used);
                return kh;
            }
        }
    }
    struct stack_t *s = scratch.lookup(&zero);
    if (!s)
        return 0;
    long len = bpf_get_stack(ctx, s->frames, sizeof(s->frames),
                             BPF_F_USER_STACK | BPF_F_USER_BUILD_ID);
    if (len <= 0) {
        __sync_fetch_and_add(&t->lost_stacks, 1);
        return 0;
    }
    u32 n = len / sizeof(struct bpf_stack_build_id);
    if (n > STACK_DEPTH)
        n = STACK_DEPTH;
    /* the kernel's walk goes on past a frame pointer ours stops at: keep the
     * frames ours found (the raw stack this one is cached under) */
    if (rn && n > rn)
        n = rn;
    s->nframes = n;
    u64 h = FNV_OFFSET ^ n;
    for (int i = 0; i < STACK_DEPTH; i++) {
        if (i >= n)
            break;
        u64 *w = (u64 *)&s->frames[i];
        h = (h ^ w[0]) * FNV_PRIME;
        h = (h ^ w[1]) * FNV_PRIME;
        h = (h ^ w[2]) * FNV_PRIME;
        h = (h ^ w[3]) * FNV_PRIME;
    }
    if (h == 0)
        h = 1;
    struct stack_t *old = stacks.lookup(&h);
    if (old) {
        old->used = now;
    } else {
        s->used = now;
        if (stacks.update(&h, s) != 0) {
            __sync_fetch_and_add(&t->lost_stacks, 1);
            count(CTR_LOST_STACKS);
            return 0;
        }
        count(CTR_NEW_STACKS);
    }
    /* The kernel falls back to plain ips for the whole stack when it cannot
     * take the mmap lock (another thread is mapping memory): never cache
     * such a stack; userspace maps it back through rawcache (tracer/collection.py). */
    if (rk.rawhash && rb && s->frames[0].status == BUILD_ID_VALID) {
        struct rawval_t *rv = rawval_scratch.lookup(&zero);
        if (rv) {
            rv->h = h;
            rv->n = rn;
            __builtin_memcpy(rv->ip, rb->ip, sizeof(rv->ip));
            if (rawcache.update(&rk, rv) == 0)
                scache_fill(ce, rk.serial, rk.rawhash, h, now);
        }
    }
    return h;
}

/* Record a new live block returned by an allocator call that began at `since`. */
static __always_inline void record_block(struct pt_regs *ctx, struct track_t *t,
                                         u32 tgid, u64 addr, u64 size, u64 since, int may_nest)
{
    struct block_key_t k = {.tgid = tgid, .addr = addr};
#ifdef BLOCK_TABLE
    if (!(t->flags & TF_ROOT)) {
        /* the same block already here: recorded by a nested allocator call
         * (may_nest), else a free we did not see -- recorded anew in place */
        int i = 0;
        u64 serial = t->serial;
        struct bucket_t *tb = table_find(serial, addr, &i);
        if (tb && may_nest && tb->ts[i & (TABLE_WAYS - 1)] >= since)
            return;
        if (!tb && t->overflowed) {
            struct block_t *old = blocks.lookup(&k);
            if (old && old->serial == serial) {
                if (may_nest && old->ts >= since)
                    return;
                if (blocks.delete(&k) == 0)
                    __sync_fetch_and_add(&t->overflowed, -1);
            }
        }
        u64 now = bpf_ktime_get_ns();
        u64 stack = capture_stack(ctx, t, now);
        if (!tb)
            tb = table_claim(serial, addr, &i);
        if (tb) {
            slot_fill(tb, i, serial, size, now, stack);
        } else {
            /* both choices full: the overflow hash */
            struct block_t b = {.size = size, .ts = now, .serial = serial, .stack = stack};
            if (blocks.update(&k, &b) != 0) {
                __sync_fetch_and_add(&t->lost_blocks, 1);
                return;
            }
            __sync_fetch_and_add(&t->overflowed, 1);
        }
        if (t->nthreads == 1) {   /* never had a second thread: plain stores */
            t->alloc_blocks++;
            t->alloc_bytes += size;
        } else {
            __sync_fetch_and_add(&t->alloc_blocks, 1);
            __sync_fetch_and_add(&t->alloc_bytes, size);
        }
        return;
    }
#endif
    int ring = t->flags & TF_RING;
    if (may_nest) {
        /* already recorded by a nested allocator call? */
        if (ring) {
            struct ring_ent_t *e = ring_find(t, addr);
            if (e && e->ts >= since)
                return;
        } else {
            struct block_t *old = blocks.lookup(&k);
            if (old && old->ts >= since && old->serial == t->serial)
                return;
        }
    }
    u64 now = bpf_ktime_get_ns();
    u64 stack = capture_stack(ctx, t, now);
    if (ring) {
        /* newest in, oldest out to the block map (one thread: plain stores) */
        u32 i = t->ring_head & (RING - 1);
        t->ring_head = i + 1;
        struct ring_ent_t *e = &t->ring[i];
        if (e->addr)
            ring_spill(t, tgid, e);
        e->addr = addr;
        e->size = size;
        e->ts = now;
        e->stack = stack;
    } else {
        struct block_t b = {.size = size, .ts = now, .serial = t->serial, .stack = stack};
        if (t->flags & TF_ROOT)
            b.ext_ip = scan_extension_frame(ctx, tgid);
        if (blocks.update(&k, &b) != 0) {
            __sync_fetch_and_add(&t->lost_blocks, 1);
            return;
        }
    }
    if (ring) {   /* one thread: nothing else writes them */
        t->alloc_blocks++;
        t->alloc_bytes += size;
    } else {
        __sync_fetch_and_add(&t->alloc_blocks, 1);
        __sync_fetch_and_add(&t->alloc_bytes, size);
    }
}

static __always_inline int gen_return(struct pt_regs *ctx, u32 fn)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    struct handoff_t h = {};
#ifdef ATTACH_SESSION
    if (COOKIE_HANDOFF(fn)) {
        /* the entry handed off (it returned 0 only for a tracked process) */
        u64 *c = session_cookie();
        if (!c)
            return 0;
        h.a0 = *c;
    } else
#endif
    {
        if (!maybe_tracked(tgid))
            return 0;
        struct handoff_key_t k = {.tid = (u32)id, .fn = fn};
        struct handoff_t *hp = handoffs.lookup(&k);
        if (!hp || !hp->live)
            return 0;
        h = *hp;
        hp->live = 0;
    }
    struct track_t *t = allocs_lookup(tgid);
    if (!t)
        return 0;
    u64 ret = PT_REGS_RC(ctx);
    u64 addr = 0, size = 0;

    switch (fn & NEST_FN_MASK) {
    case FN_MALLOC:
    case FN_VALLOC:
        addr = ret;
        size = h.a0;
        break;
    case FN_PVALLOC:
        /* glibc rounds the request up to whole pages */
        addr = ret;
        size = (h.a0 + 4095) & ~4095ULL;
        if (size == 0)
            size = 4096;
        break;
    case FN_CALLOC:
        /* the product (~0 when it overflowed) is handed off as a0 when the
         * session cookie carries it, else both factors */
        size = COOKIE_HANDOFF(fn) ? h.a0 : mul_or_max(h.a0, h.a1);
        addr = size != ~0ULL ? ret : 0;
        break;
    case FN_MEMALIGN:
        addr = ret;
        size = h.a1;
        break;
    case FN_REALLOC:
    case FN_REALLOCARRAY:
        /* a0 = old pointer, a1 = new size (overflow folded to ~0) */
        if (ret) {
            if (h.a0)
                forget_block(t, tgid, h.a0, h.ts);
            addr = ret;
            size = h.a1;
        } else if (h.a0 && h.a1 == 0) {
            forget_block(t, tgid, h.a0, h.ts); /* realloc(p, 0) frees */
        }
        /* ret == 0 && size != 0: failed, the old block stays */
        break;
    case FN_POSIX_MEMALIGN:
        /* a0 = void **memptr, a1 = size; returns 0 on success */
        if ((int)ret == 0) {
            u64 p = 0;
            if (bpf_probe_read_user(&p, sizeof(p), (void *)h.a0) == 0)
                addr = p;
            size = h.a1;
        }
        break;
    }
    /* glibc's malloc and calloc call no other allocator function: their
     * returns cannot find a block a nested call recorded (other allocators'
     * sites carry NEST_FN_BIT: fn is then neither) */
    if (addr)
        record_block(ctx, t, tgid, addr, size, h.ts, fn != FN_MALLOC && fn != FN_CALLOC);
    return 0;
}


/* free is entry-only; the loader may place it after the prologue's
 * single-stepped instructions (argument registers intact there). */
static __always_inline int free_body(struct pt_regs *ctx, u64 addr)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!addr)
        return 1;
    struct track_t *t = recording(tgid);
    if (!t)
        return 1;
#ifdef BLOCK_TABLE
    if (!(t->flags & TF_ROOT)) {
        int i = 0;
        struct bucket_t *tb = table_find(t->serial, addr, &i);
        if (tb)
            slot_clear(tb, i);
        else if (t->overflowed)
            overflow_forget(t, tgid, addr, ~0ULL);
        return 1;
    }
#endif
    if (t->flags & TF_RING) {
        struct ring_ent_t *e = ring_find(t, addr);
        if (e) {
            e->addr = 0;
            return 1;
        }
    }
    struct block_key_t k = {.tgid = tgid, .addr = addr};
    blocks.delete(&k);
    return 1;
}


/* Kernels with uprobe_multi links: programs for every allocator site, told
 * apart by the attach cookie (the FN_* id the loader gives each site). */
static u64 (*attach_cookie)(void *ctx) = (void *)BPF_FUNC_get_attach_cookie;

/* An allocator's entry: its arguments by function; 1 when its return needs
 * no probe. */
static __always_inline int entry_dispatch(struct pt_regs *ctx, u32 fn)
{
    /* CTX_ARG_FN_BIT: the arguments follow a context pointer */
    u64 r1 = PT_REGS_PARM1(ctx), r2 = PT_REGS_PARM2(ctx), r3 = PT_REGS_PARM3(ctx), r4 = PT_REGS_PARM4(ctx);
    /* values, not register slots, are chosen: the verifier refuses a ctx
     * pointer moved by a computed offset */
    asm volatile("" : "+r"(r1), "+r"(r2), "+r"(r3), "+r"(r4));
    int shift = fn & CTX_ARG_FN_BIT;
    u64 p1 = shift ? r2 : r1, p2 = shift ? r3 : r2, p3 = shift ? r4 : r3;
    switch (fn & NEST_FN_MASK) {
    case FN_FREE:
        return free_body(ctx, p1);
    case FN_MALLOC:
    case FN_VALLOC:
    case FN_PVALLOC:
        return gen_entry(fn, p1, 0);
    case FN_REALLOCARRAY:
        return gen_entry(fn, p1, mul_or_max(p2, p3));
    case FN_POSIX_MEMALIGN:
        return gen_entry(fn, p1, p3);
    case FN_CALLOC:
    case FN_REALLOC:
    case FN_MEMALIGN:
        return gen_entry(fn, p1, p2);
    }
    return 1;
}

static __always_inline int return_dispatch(struct pt_regs *ctx, u32 fn)
{
    if ((fn & NEST_FN_MASK) == 0 || (fn & NEST_FN_MASK) >= FN_FREE)
        return 0;
    return gen_return(ctx, fn);
}

#ifdef ATTACH_PERF
/* One program per probe site: kernels without uprobe_multi links (before 6.6).
 * A non-zero return would make the perf uprobe emit a sample: always 0.
 * (fn is a constant here: each dispatch folds to its one case.) */
#define PER_SITE(name, fn) \
    int name##_entry(struct pt_regs *ctx)  { entry_dispatch(ctx, fn); return 0; } \
    int name##_return(struct pt_regs *ctx) { return_dispatch(ctx, fn); return 0; }
PER_SITE(malloc, FN_MALLOC)
PER_SITE(calloc, FN_CALLOC)
PER_SITE(realloc, FN_REALLOC)
PER_SITE(reallocarray, FN_REALLOCARRAY)
PER_SITE(posix_memalign, FN_POSIX_MEMALIGN)
PER_SITE(memalign, FN_MEMALIGN)
PER_SITE(valloc, FN_VALLOC)
PER_SITE(pvalloc, FN_PVALLOC)
int free_entry(struct pt_regs *ctx)           { free_body(ctx, PT_REGS_PARM1(ctx)); return 0; }
/* other allocators' sites (NEST_FN_BIT) */
PER_SITE(malloc_nest, FN_MALLOC | NEST_FN_BIT)
PER_SITE(calloc_nest, FN_CALLOC | NEST_FN_BIT)
PER_SITE(realloc_nest, FN_REALLOC | NEST_FN_BIT)
PER_SITE(reallocarray_nest, FN_REALLOCARRAY | NEST_FN_BIT)
PER_SITE(posix_memalign_nest, FN_POSIX_MEMALIGN | NEST_FN_BIT)
PER_SITE(memalign_nest, FN_MEMALIGN | NEST_FN_BIT)
PER_SITE(valloc_nest, FN_VALLOC | NEST_FN_BIT)
PER_SITE(pvalloc_nest, FN_PVALLOC | NEST_FN_BIT)
#endif

#ifdef ATTACH_MULTI
/* uprobe_multi (6.6+): an entry link and a return link */
int alloc_entry(struct pt_regs *ctx)
{
    entry_dispatch(ctx, attach_cookie(ctx));
    return 0;
}

int alloc_return(struct pt_regs *ctx)
{
    return return_dispatch(ctx, attach_cookie(ctx));
}
#endif

#ifdef ATTACH_SESSION
/* uprobe sessions (6.13+): one program for a site's entry and return. An
 * entry returning 1 has the kernel skip this call's return probe: untracked
 * processes never pay for the return trampoline. Three links: malloc's
 * session, with a program of its own (its function is a constant: no attach
 * cookie to read, the dispatch folds away); the other allocators' session,
 * told apart by the attach cookie; and free's entry (an entry-only
 * uprobe_multi link: no session to ask about). */
static __always_inline int session(struct pt_regs *ctx, u32 fn)
{
    if (session_is_return() & 0xff)   /* a bool: only its low byte is defined */
        return return_dispatch(ctx, fn);
    return entry_dispatch(ctx, fn);
}

int malloc_session(struct pt_regs *ctx)
{
    return session(ctx, FN_MALLOC);
}

int alloc_session(struct pt_regs *ctx)
{
    return session(ctx, attach_cookie(ctx));
}

int free_entry(struct pt_regs *ctx)
{
    free_body(ctx, PT_REGS_PARM1(ctx));
    return 0;
}
#endif

/* ---- process lifecycle ------------------------------------------------ */

/* A path event for userspace, header filled; NULL (counted) when the ring
 * buffer is full. */
static __always_inline struct event_t *reserve_event(u32 type, u32 tgid, u64 serial)
{
    struct event_t *e = events.ringbuf_reserve(sizeof(struct event_t));
    if (!e) {
        count(CTR_LOST_EVENTS);
        return NULL;
    }
    e->type = type;
    e->tgid = tgid;
    e->serial = serial;
    return e;
}

static __always_inline void fill_proc(struct proc_t *p, struct track_t *t, u32 tgid)
{
    p->serial = t->serial;
    p->start_ns = bpf_ktime_get_ns();
    p->tgid = tgid;
    p->ppid = t->ppid;
    p->test_id = t->test_id;
    p->uid = (u32)bpf_get_current_uid_gid();
    bpf_get_current_comm(&p->comm, sizeof(p->comm));
}

/* New tasks: a thread of a tracked image, or a process created by a root or
 * by a tracked process. Runs in the parent's context. */
TRACEPOINT_PROBE(task, task_newtask)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct track_t *parent = tracked.lookup(&tgid);
    if (!parent)
        return 0;
    if (args->clone_flags & CLONE_THREAD) {
        if (!(parent->flags & TF_ROOT)) {
            /* the thread has not run yet: this one is the image's only one */
            ring_flush(parent, tgid);
            __sync_fetch_and_add(&parent->nthreads, 1);
        }
        return 0;
    }
    u32 child = args->pid;
    u32 zero = 0;
    struct track_t *tp = track_scratch.lookup(&zero);
    if (!tp)
        return 0;
    __builtin_memset(tp, 0, sizeof(*tp));
    if (parent->flags & TF_SPAWNER) {
        /* an xdist worker: a root from its first instruction (the controller
         * serves it this program's maps) */
        tp->flags = TF_ROOT | TF_SPAWNED;
        tp->ppid = tgid;
        if (tracked.update(&child, tp) != 0)
            count(CTR_LOST_PROCS);
        else
            pidmap_set(child);
        return 0;
    }
    if (parent->test_id == 0)
        return 0;           /* root between tests */
    tp->serial = next_serial();
    tp->test_id = parent->test_id;
    tp->flags = TF_ALLOCS | RING_FLAG | (parent->flags & TF_KINDS);
    if (args->clone_flags & CLONE_VFORK)
        tp->flags |= TF_VFORK;
    tp->nthreads = 1;
    tp->ppid = tgid;
    u64 serial = tp->serial;
    if (tracked.update(&child, tp) != 0) {
        count(CTR_LOST_PROCS);
        return 0;
    }
    pidmap_set(child);
    allocmap_set(child);
    struct proc_t *p = proc_scratch.lookup(&zero);
    if (!p)
        return 0;
    __builtin_memset(p, 0, sizeof(*p));
    fill_proc(p, tp, child);
    p->tgid = child;
    /* until exec the child runs the parent's image */
    if (parent->flags & TF_ROOT) {
        p->exe[0] = 0;
    } else {
        u64 ps = parent->serial;
        struct proc_t *pp = procs.lookup(&ps);
        if (pp) {
            p->execs = pp->execs;
            p->alloc_id = pp->alloc_id;
            bpf_probe_read_kernel(p->exe, sizeof(p->exe), pp->exe);
        }
    }
    if (procs.update(&serial, p) != 0) {
        count(CTR_LOST_PROCS);
        tracked.delete(&child);
        pidmap_clear(child);
        allocmap_clear(child);
    }
    return 0;
}

/* ---- the allocator of each exec ---------------------------------------- */

/* The first value of env string `name` (its length with '=') into `dst`.
 * 1: stored; 0: not this variable; -1: a second one or too long (the key
 * cannot be exact). */
static __always_inline int ld_value(struct envbuf_t *eb, long n, const char *name, int nlen, u32 *has,
                                    char *dst, u64 addr)
{
#pragma unroll
    for (int i = 0; i < 16; i++) {
        if (i >= nlen)
            break;
        if (eb->b[i] != name[i])
            return 0;
    }
    if (*has || n - nlen > LDVAL_LEN)
        return -1;
    *has = 1;
    if (bpf_probe_read_user_str(dst, LDVAL_LEN, (void *)(addr + nlen)) < 0)
        return -1;
    return 1;
}

/* The key of the current image (just exec'd): the executable's device and
 * inode, and its LD_PRELOAD / LD_LIBRARY_PATH read from the new image's
 * environment (mm->env_start..env_end, one string at a time). 1 when exact. */
/* a kernel pointer/integer member at a BTF offset (0 when unreadable) */
static __always_inline u64 kread64(u64 base, u64 off)
{
    u64 v = 0;
    if (base)
        bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
    return v;
}

static __always_inline u32 kread32(u64 base, u64 off)
{
    u32 v = 0;
    if (base)
        bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
    return v;
}

#ifdef OFF_TASK_MM
/* The key of the current image (just exec'd): the executable's device and
 * inode, and its LD_PRELOAD / LD_LIBRARY_PATH read from the new image's
 * environment (mm->env_start..env_end, one string at a time). 1 when exact. */
static __always_inline int exec_key(struct resolved_key_t *k, u64 task)
{
    u32 zero = 0;
    u64 mm = kread64(task, OFF_TASK_MM);
    u64 inode = kread64(kread64(mm, OFF_MM_EXE_FILE), OFF_FILE_INODE);
    if (!inode)
        return 0;
    k->ino = kread64(inode, OFF_INODE_INO);
    k->dev = kread32(kread64(inode, OFF_INODE_SB), OFF_SB_DEV);
    k->size = kread64(inode, OFF_INODE_SIZE);
    k->mtime_sec = kread64(inode, OFF_INODE_MTIME_SEC);
    k->mtime_nsec = kread32(inode, OFF_INODE_MTIME_NSEC);
    u64 a = kread64(mm, OFF_MM_ENV_START), end = kread64(mm, OFF_MM_ENV_END);
    struct envbuf_t *eb = envbuf.lookup(&zero);
    if (!eb)
        return 0;
    for (int i = 0; i < MAX_ENV_STRINGS; i++) {
        if (a >= end)
            return 1;
        long n = bpf_probe_read_user_str(eb->b, sizeof(eb->b), (void *)a);
        if (n <= 0 || n >= ENV_STR_MAX)
            return 0;   /* unreadable, or too long to know where the next one starts */
        if (eb->b[0] == 'L' && eb->b[1] == 'D' && eb->b[2] == '_') {
            int r = ld_value(eb, n, "LD_PRELOAD=", 11, &k->has_preload, k->preload, a);
            if (r == 0)
                r = ld_value(eb, n, "LD_LIBRARY_PATH=", 16, &k->has_libpath, k->libpath, a);
            if (r < 0)
                return 0;
        }
        a += n;
    }
    return a >= end;
}

/* A tracked image just exec'd: its allocator answer when the session has one
 * for this executable and these loader inputs (no pause: the common case
 * after the first exec), else stop it (SIGSTOP, taken on the way back to user
 * mode, before the dynamic loader runs) and tell userspace, which resolves
 * the allocator, probes it if needed and continues the process. A ptraced
 * process is never stopped (its tracer would see the signal): userspace is
 * told all the same. (A vfork child is past its parent's wait here: exec
 * gave it its own mm and released the parent before this tracepoint.) */
static __always_inline void exec_allocator(void *ctx, struct proc_t *p, u32 tgid, void *filename)
{
    u32 zero = 0;
    struct resolved_key_t *k = rkey_scratch.lookup(&zero);
    if (!k)
        return;
    __builtin_memset(k, 0, sizeof(*k));
    u64 task = bpf_get_current_task();
    int exact = exec_key(k, task);
    if (exact) {
        u32 *id = resolved.lookup(k);
        if (id) {
            p->alloc_id = *id;
            return;
        }
    }
    u32 ptraced = kread32(task, OFF_TASK_PTRACE);
    struct pause_t *e = pause_scratch.lookup(&zero);
    if (!e)
        return;
    e->tgid = tgid;
    e->serial = p->serial;
    e->flags = exact ? PAUSE_KEYED : 0;
    int stop = !ptraced && pending.update(&tgid, k) == 0;
    if (stop)
        e->flags |= PAUSE_STOPPED;
    bpf_probe_read_kernel_str(e->path, sizeof(e->path), filename);
    /* stopped only once userspace is sure to hear of it */
    if (pauses.perf_submit(ctx, e, sizeof(*e)) != 0) {
        if (stop)
            pending.delete(&tgid);
        count(CTR_LOST_EVENTS);
        return;
    }
    count(CTR_PAUSE_EVENTS);
    if (stop)
        bpf_send_signal(19);   /* SIGSTOP */
}
#else
static __always_inline void exec_allocator(void *ctx, struct proc_t *p, u32 tgid, void *filename) {}
#endif

/* A thread's nested hand-off slots, and a stopped image's pending key, at exit */
static __always_inline void exit_allocator(u64 id, int group_dead)
{
    for (u32 fn = FN_MALLOC; fn < FN_FREE; fn++) {
        struct handoff_key_t hk = {.tid = (u32)id, .fn = fn | NEST_FN_BIT};
        handoffs.delete(&hk);
    }
    if (group_dead) {
        u32 tgid = id >> 32;
        pending.delete(&tgid);
    }
}

/* exec: the old image's records vanish, a new image (serial) begins. */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct track_t *t = tracked.lookup(&tgid);
    if (!t || (t->flags & TF_ROOT))
        return 0;
    u64 old = t->serial;
    u32 execs = 0;
    struct proc_t *op = procs.lookup(&old);
    if (op)
        execs = op->execs + 1;
    procs.delete(&old);
    t->serial = next_serial();
    t->nthreads = 1;
    /* the old image's blocks are dropped with it; the new one has one thread */
    for (int i = 0; i < RING; i++)
        t->ring[i].addr = 0;
    t->flags |= RING_FLAG;
#ifdef BLOCK_TABLE
    /* its blocks in the table: cleared by userspace (its hash ones are
     * garbage the hash sweep deletes) */
    u32 one = 1;
    if (dead.update(&old, &one) != 0)
        count(CTR_LOST_DEAD);
    t->overflowed = 0;
#endif
    t->flags &= ~TF_VFORK;   /* its own memory from now on */
    t->alloc_bytes = 0;
    t->alloc_blocks = 0;
    t->lost_blocks = 0;
    t->lost_handoffs = 0;
    t->lost_stacks = 0;

    u32 zero = 0;
    struct proc_t *p = proc_scratch.lookup(&zero);
    if (!p)
        return 0;
    __builtin_memset(p, 0, sizeof(*p));
    fill_proc(p, t, tgid);
    p->execs = execs;
    unsigned short loc = args->data_loc_filename & 0xFFFF;
    bpf_probe_read_kernel_str(p->exe, sizeof(p->exe), (void *)args + loc);
    exec_allocator(args, p, tgid, (void *)args + loc);
    if (procs.update(&t->serial, p) != 0)
        count(CTR_LOST_PROCS);

    struct event_t *e = reserve_event(EV_EXEC, tgid, t->serial);
    if (!e)
        return 0;
    bpf_probe_read_kernel_str(e->path, sizeof(e->path), (void *)args + loc);
    events.ringbuf_submit(e, 0);
    return 0;
}

/* The dynamic loader opens libraries O_RDONLY|O_CLOEXEC: their paths let the
 * symbolizer find modules by build id after the process is gone. */
TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
    if (args->flags != O_CLOEXEC_FLAG)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct track_t *t = tracked.lookup(&tgid);
    if (!t || (t->flags & TF_ROOT))
        return 0;
    struct event_t *e = reserve_event(EV_OPEN, tgid, t->serial);
    if (!e)
        return 0;
    if (bpf_probe_read_user_str(e->path, sizeof(e->path), (void *)args->filename) < 0)
        e->path[0] = 0;
    events.ringbuf_submit(e, 0);
    return 0;
}

static __always_inline void set_terminal(u32 tgid, s32 code, s32 sig)
{
    struct track_t *t = tracked.lookup(&tgid);
    if (!t || (t->flags & TF_ROOT))
        return;
    u64 s = t->serial;
    struct proc_t *p = procs.lookup(&s);
    if (!p || (p->flags & PF_TERMINATED))
        return;
    p->exit_code = code;
    p->signal = sig;
    p->flags |= PF_TERMINATED;
}

TRACEPOINT_PROBE(syscalls, sys_enter_exit_group)
{
    set_terminal(bpf_get_current_pid_tgid() >> 32, (s32)(args->error_code & 0xff), 0);
    return 0;
}

/* ---- registers at the stop at exit (leak kinds) -----------------------
 * The thread of an image paused at exit (its `pending` key PENDING_AT_EXIT)
 * that dequeues SIGSTOP is about to group-stop with the user registers the
 * kernel saved on its way in: copied here (memleak.h stop_regs_t), so that
 * userspace needs no ptrace round trip for a single-threaded process. Needs
 * bpf_task_pt_regs (HAVE_TASK_PT_REGS) and the BTF offset of fs_base. */
#if defined(HAVE_TASK_PT_REGS) && defined(OFF_TASK_FSBASE)
static __always_inline void stop_registers(u64 id)
{
    u32 tgid = id >> 32;
    struct resolved_key_t *k = pending.lookup(&tgid);
    if (!k || k->dev != PENDING_AT_EXIT)
        return;
    struct track_t *t = tracked.lookup(&tgid);
    if (!t)
        return;
    struct stop_regs_t r = {};
    r.serial = t->serial;
    r.tid = (u32)id;
    bpf_probe_read_kernel(&r.regs, sizeof(r.regs), (void *)bpf_task_pt_regs(bpf_get_current_task_btf()));
    bpf_probe_read_kernel(&r.fs_base, sizeof(r.fs_base), (void *)(bpf_get_current_task() + OFF_TASK_FSBASE));
    stop_regs.update(&tgid, &r);
}
#else
static __always_inline void stop_registers(u64 id) {}
#endif

/* A signal whose default action terminates the process, delivered with
 * SIG_DFL (or SIGKILL): the process dies of it. SIGSTOP: stop_registers. */
TRACEPOINT_PROBE(signal, signal_deliver)
{
    int sig = args->sig;
    if (sig == 19) {
        u64 id = bpf_get_current_pid_tgid();
        if (maybe_tracked(id >> 32))
            stop_registers(id);
        return 0;
    }
    if (sig != 9 && args->sa_handler != 0)
        return 0;
    switch (sig) {
    case 17: /* SIGCHLD */
    case 18: /* SIGCONT */
    case 19: /* SIGSTOP */
    case 20: /* SIGTSTP */
    case 21: /* SIGTTIN */
    case 22: /* SIGTTOU */
    case 23: /* SIGURG */
    case 28: /* SIGWINCH */
        return 0;
    }
    if (sig <= 0 || sig > 64)
        return 0;
    set_terminal(bpf_get_current_pid_tgid() >> 32, -1, sig);
    return 0;
}

/* The image ends when its last thread exits. */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    struct track_t *t = tracked.lookup(&tgid);
    if (!t) {
        allocmap_clear(tgid);   /* left running past its test, untracked */
        return 0;
    }
    /* this thread's hand-off slots */
    for (u32 fn = FN_MALLOC; fn < FN_FREE; fn++) {
        struct handoff_key_t hk = {.tid = (u32)id, .fn = fn};
        handoffs.delete(&hk);
    }
#ifdef HAVE_GROUP_DEAD
    exit_allocator(id, args->group_dead);
#else
    exit_allocator(id, (u32)id == tgid);
#endif
    if (t->flags & TF_ROOT) {
#ifdef HAVE_GROUP_DEAD
        /* a worker that exits: its pid may be reused (userspace also drops
         * it when the worker disconnects) */
        if ((t->flags & TF_SPAWNED) && args->group_dead) {
            tracked.delete(&tgid);
            pidmap_clear(tgid);
        }
#endif
        return 0;
    }
#ifdef HAVE_GROUP_DEAD
    if (!args->group_dead)
        return 0;
#else
    /* Older kernels: count threads. Two last threads racing may both see 0;
     * finalising twice writes the same values. */
    __sync_fetch_and_add(&t->nthreads, -1);
    if (t->nthreads != 0)
        return 0;
#endif
    ring_flush(t, tgid);   /* its outstanding blocks, for userspace */
    u64 s = t->serial;
    struct proc_t *p = procs.lookup(&s);
    if (p) {
        p->exit_ns = bpf_ktime_get_ns();
        p->flags |= PF_EXITED;
        p->alloc_bytes = t->alloc_bytes;
        p->alloc_blocks = t->alloc_blocks;
        p->lost_blocks = t->lost_blocks;
        p->lost_handoffs = t->lost_handoffs;
        p->lost_stacks = t->lost_stacks;
        p->overflowed = t->overflowed;
    }
    tracked.delete(&tgid);
    pidmap_clear(tgid);
    allocmap_clear(tgid);
    return 0;
}

/* ---- pause at exit (leak kinds) ----------------------------------------
 * A uprobe on libc _exit and abort: a tracked process whose test wants leak
 * kinds is sent SIGSTOP (it group-stops on the way back to user mode, before
 * exit_group); userspace scans its memory and sends SIGCONT. Never a vfork
 * child (it shares its parent's memory) nor a ptraced process (the stop would
 * go to its tracer): userspace is told, and leaves its blocks unclassified. */
int exit_pause(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!maybe_tracked(tgid))
        return 0;
    struct track_t *t = tracked.lookup(&tgid);
    if (!t || (t->flags & (TF_ROOT | TF_VFORK)) || !(t->flags & TF_KINDS))
        return 0;
    u32 type = EV_EXIT_STOPPED;
#ifdef OFF_TASK_PTRACE       /* offsets from the kernel's BTF (tracer/kernel_offsets.py) */
    u32 ptrace = 0;
    bpf_probe_read_kernel(&ptrace, sizeof(ptrace), (void *)bpf_get_current_task() + OFF_TASK_PTRACE);
    if (ptrace)
        type = EV_EXIT_TRACED;
#endif
    struct event_t *e = reserve_event(type, tgid, t->serial);
    if (!e)
        return 0;      /* userspace would never resume it: no pause */
    e->path[0] = 0;
    if (type == EV_EXIT_STOPPED) {
        /* listed in `pending` before the stop: the watchdog continues it at
         * its time limit, or when pytest dies, even if pytest never reads
         * this event (stopped, or killed) */
        u32 zero = 0;
        struct resolved_key_t *k = rkey_scratch.lookup(&zero);
        if (k) {
            k->dev = PENDING_AT_EXIT;
            k->ino = 0;
        }
        if (k && pending.update(&tgid, k) == 0)
            bpf_send_signal(19);   /* SIGSTOP */
        else
            e->type = EV_EXIT_UNPAUSED;
    }
    events.ringbuf_submit(e, 0);
    return 0;
}
