// SPDX-License-Identifier: MIT
// pytest-memleak-ebpf: the contract between the BPF program (memleak.bpf.c,
// which #includes this header) and userspace (pytest_memleak_ebpf/tracer/,
// which reads it with tracer/abi.py): every id, flag, counter index and map
// value layout both sides use is written here, once.
//
// abi.py reads `#define NAME <integer>` lines and `struct NAME { ... };`
// definitions whose fields are u8/u16/u32/u64/s32/s64/char, arrays of them,
// or structs defined earlier (and the kernel's struct bpf_stack_build_id);
// array sizes are integers, defines of this header, or the loader's
// parameters (STACK_DEPTH, EXE_LEN). Keep to that form.

#ifndef PYTEST_MEMLEAK_EBPF_H
#define PYTEST_MEMLEAK_EBPF_H

/* Allocator function ids: the attach cookie of each uprobe_multi site
 * (tracer/probes.py ALLOCATOR_SITES names each site's). */
#define FN_MALLOC          1
#define FN_CALLOC          2
#define FN_REALLOC         3
#define FN_REALLOCARRAY    4
#define FN_POSIX_MEMALIGN  5
#define FN_MEMALIGN        6   /* also aligned_alloc */
#define FN_VALLOC          7
#define FN_PVALLOC         8
#define FN_FREE            9   /* entry only */

/* Added to a site's id (its attach cookie) when its calls may nest in, or
 * tail-call, another probed entry point of the same allocator (jemalloc's
 * _Znam -> _Znwm, mimalloc's mi_new -> malloc, musl's calloc -> malloc): its
 * hand-off has a slot of its own and an entry time, and its return records
 * the block only when no nested call did. glibc's own sites never carry it. */
#define NEST_FN_BIT        0x100
#define NEST_FN_MASK       0xff
/* Added to a site's id when the function's arguments follow a context
 * pointer: CPython's pymalloc functions (_PyObject_Malloc(ctx, size),
 * _PyObject_Free(ctx, p), ...), probed in the pytest process while a test's
 * in-process window is open (tracer/probes.py PYMALLOC_SITES). */
#define CTX_ARG_FN_BIT     0x200

/* track_t.flags */
#define TF_ROOT            1   /* the pytest process: children are tracked */
#define TF_ALLOCS          2   /* record this process's own allocations */
#define TF_SPAWNER         4   /* ROOT (the xdist controller): every process it
                                  creates is a ROOT (a worker) from birth */
#define TF_SPAWNED         8   /* ROOT created by a spawner: forgotten at exit */
#define TF_RING           16   /* single-threaded image: its newest blocks are
                                  kept in its entry's ring (below) */
#define TF_KINDS          32   /* classify its blocks at exit: pause it at libc
                                  _exit/abort (inherited at fork; a root has it
                                  while its test wants leak kinds) */
#define TF_VFORK          64   /* a vfork child until it execs: shares its
                                  parent's memory, never paused */

/* proc_t.flags */
#define PF_EXITED          1
#define PF_TERMINATED      2   /* exit code or fatal signal recorded */

/* event_t.type */
#define EV_EXEC            1
#define EV_OPEN            2
#define EV_EXIT_STOPPED    3   /* at _exit/abort: SIGSTOP sent (tgid, serial) */
#define EV_EXIT_TRACED     4   /* at _exit/abort, ptraced: not paused */
#define EV_EXIT_UNPAUSED   5   /* at _exit/abort: the pending table is full, not paused */

/* resolved_key_t.dev of a `pending` entry that is a pause at exit (an exec
 * pause's is the executable's device) */
#define PENDING_AT_EXIT    0xffffffffffffffffULL

/* pause_t.flags: a tracked process exec'd an executable whose allocator the
 * session has not resolved for its inputs (resolved_key_t) */
#define PAUSE_STOPPED      1   /* SIGSTOP sent: userspace resolves, then SIGCONTs */
#define PAUSE_KEYED        2   /* the key is exact (else: never published) */

/* Indexes of the `counters` array */
#define CTR_LOST_PROCS     0   /* tracked/procs map full: a process went untracked */
#define CTR_LOST_EVENTS    1   /* ring buffer full: exec/open path not delivered */
#define CTR_LOST_STACKS    2   /* stack map full */
#define CTR_NEW_STACKS     3   /* stacks inserted (userspace sizes its clean-ups) */
#define CTR_PAUSE_EVENTS   4   /* exec pause records submitted (userspace waits until it
                                  has answered them all before collecting a test) */
#define CTR_LOST_DEAD      5   /* `dead` map full: an exec'd-away image's table
                                  blocks are left for a whole-table sweep */
#define CTR_NCOUNTERS      6

/* A process image's serial: bpf_ktime << SERIAL_CPU_BITS | cpu (unique per
 * CPU; userspace compares serials with times shifted the same way). */
#define SERIAL_CPU_BITS    8

/* The stacks' hash: FNV-1a over 64-bit words, seeded with the frame count
 * (userspace recomputes the plain-ip hash to find a stack's rawcache entry). */
#define FNV_OFFSET         0xcbf29ce484222325ULL
#define FNV_PRIME          0x100000001b3ULL

/* struct bpf_stack_build_id.status (the kernel's enum
 * bpf_stack_build_id_status) */
#define BUILD_ID_VALID     1   /* build_id + offset */
#define BUILD_ID_IP        2   /* a plain ip */

/* Kernel functions (kfuncs) of uprobe sessions. BCC cannot emit kfunc calls:
 * the source calls these placeholder helper ids, which the loader
 * (tracer/loading.py) rewrites into calls of the kernel functions by their
 * BTF ids. KFUNC_<NAME> stands for the kernel function bpf_<name>. */
#define KFUNC_SESSION_COOKIE     0x7ffff001
#define KFUNC_SESSION_IS_RETURN  0x7ffff002

/* A live block of a single-threaded image, kept in the image's own entry
 * (addr 0: a free slot). */
struct ring_ent_t {
    u64 addr;
    u64 size;
    u64 ts;              /* bpf_ktime at record time */
    u64 stack;
};
#define RING 8           /* a power of 2 */

/* Per tgid: the filter every probe hits first. */
struct track_t {
    u64 serial;          /* unique id of the current process image */
    u32 test_id;         /* ROOT: current test (0 = none); else owning test */
    u32 flags;           /* TF_* */
    u32 nthreads;        /* live threads: the image ends when it reaches 0 */
    u32 ppid;
    u64 alloc_bytes;     /* lifetime totals of this image */
    u64 alloc_blocks;
    u64 lost_blocks;     /* live-block map full */
    u64 lost_handoffs;   /* hand-off map full */
    u64 lost_stacks;     /* stack not captured */
    /* TF_RING: the image's RING newest blocks. Most blocks are freed soon
     * after they are allocated: one freed while still here costs neither an
     * insert into nor a delete from the (shared, locked) block map. The one
     * pushed out goes to the block map; at exit the rest do. Only while the
     * image has one thread (nothing else touches it): its first thread moves
     * them to the map and turns the ring off. */
    u32 ring_head;
    u32 ring_pad;
    struct ring_ent_t ring[RING];
    u64 overflowed;      /* BLOCK_TABLE: its blocks in the overflow hash
                            (`blocks`) now; 0: frees never look there */
};

/* Per process image (keyed by serial): what outlives the process. */
struct proc_t {
    u64 serial;
    u64 start_ns;
    u64 exit_ns;
    u64 alloc_bytes;
    u64 alloc_blocks;
    u64 lost_blocks;
    u64 lost_handoffs;
    u64 lost_stacks;
    u32 tgid;
    u32 ppid;
    u32 test_id;
    u32 uid;
    u32 flags;           /* PF_* */
    s32 exit_code;
    s32 signal;
    u32 execs;           /* number of execs before this image */
    char comm[16];
    char exe[EXE_LEN];
    u32 alloc_id;        /* the resolved allocator (userspace's answer id),
                            0 = not resolved at exec (paused, or unknown) */
    u32 alloc_pad;
    u64 overflowed;      /* track_t.overflowed at exit */
};

struct block_key_t {
    u32 tgid;
    u32 pad;
    u64 addr;
};

struct block_t {
    u64 size;
    u64 ts;              /* bpf_ktime at record time */
    u64 serial;          /* image that allocated it */
    u64 stack;           /* hash of the captured stack, 0 = none */
    u64 ext_ip;          /* root blocks: innermost return address into an
                            extension module found on the stack, 0 = none */
};

/* The live-block table (builds with BLOCK_TABLE; without it every block is
 * in the `blocks` hash): a preallocated, mmapable array of buckets of
 * TABLE_WAYS slots, open-addressed, keyed by (image serial, address) -- no
 * allocation, no lock. A slot is claimed by a compare-and-swap of its addr
 * word (0: free), then filled, its serial written last; it is freed serial
 * first, then addr: userspace reads a slot as a block only when its serial is
 * set. An image's blocks live in two regions of TABLE_REGION_BUCKETS buckets
 * (the loader's parameter), chosen by the hash of its serial; within a
 * region, a block's bucket by the hash of its address (a second choice in the
 * second region). Userspace takes one image's blocks by reading its two
 * regions only. Both choices full: the block goes to the `blocks` hash (the
 * overflow) and its image counts it (track_t.overflowed). Roots' blocks (in-
 * process windows) are always in the hash. Hashes: the high 32 bits of
 * x * TABLE_MIX (x ^ TABLE_MIX2 for the second choice); a second choice equal to
 * the first is the neighbour (index ^ 1). */
#define TABLE_WAYS         8
#define TABLE_MIX          0x9e3779b97f4a7c15ULL
#define TABLE_MIX2         0xc2b2ae3d27d4eb4fULL
#define TABLE_REGION_SLOTS 65536   /* the largest region, in slots */
struct bucket_t {
    u64 addr[TABLE_WAYS];     /* 0: a free slot */
    u64 serial[TABLE_WAYS];   /* 0: being written, or freed */
    u64 size[TABLE_WAYS];
    u64 ts[TABLE_WAYS];       /* bpf_ktime at record time */
    u64 stack[TABLE_WAYS];
};

/* A stack entry's `used` is stamped at most once per STACK_STAMP_NS (a store
 * to a line every thread shares costs more than the check); userspace keeps
 * the stacks used since its block walk began less twice this. */
#define STACK_STAMP_NS     1000000

struct handoff_key_t {
    u32 tid;
    u32 fn;
};

/* Entries stay while their thread lives (written in place, `live` while a
 * call is in flight): a lookup and a store per call instead of an insert and
 * a delete. Deleted when the thread exits; userspace sweeps threads gone
 * untracked. */
struct handoff_t {
    u64 a0;
    u64 a1;
    u64 ts;              /* entry time, for calls that may nest; else 0 */
    u64 live;
};

struct stack_t {
    u32 nframes;
    u32 pad;
    u64 used;            /* bpf_ktime of the last block that used it: userspace
                            deletes only stacks unused since its block walk began */
    struct bpf_stack_build_id frames[STACK_DEPTH];
};

/* A ring-buffer record: a path an image exec'd or opened */
#define EVENT_PATH_LEN 256
struct event_t {
    u32 type;            /* EV_* */
    u32 tgid;
    u64 serial;
    char path[EVENT_PATH_LEN];
};

/* Build-id stacks are costly (a VMA lookup and an ELF note read per frame).
 * A process image's plain-ip stack identifies its build-id stack, so cache
 * (image, hash of the ips) -> build-id stack hash: the build-id walk runs once
 * per distinct call stack of each image. */
struct rawkey_t {
    u64 serial;
    u64 rawhash;
};
/* value: the build-id stack's hash and the ips it was made from (userspace
 * learns each module's load bias from them to resolve stacks the kernel
 * could only give as plain ips) */
struct rawval_t {
    u64 h;
    u64 n;
    u64 ip[STACK_DEPTH];
};

/* Executable pages of extension modules in the root (pytest) process are
 * set by userspace when an in-process window opens: per root (each xdist
 * worker has its own address space) */
struct ext_t {
    u64 n;               /* number of extension text pages (0: no scanning) */
    u64 lo, hi;          /* envelope of all extension text */
};
struct ext_page_t {
    u32 tgid;
    u32 pad;
    u64 page;
};

/* What makes the session's allocator answer for an exec valid: the
 * executable's identity and the environment variables that change the
 * dynamic loader's search (the first LD_PRELOAD / LD_LIBRARY_PATH of the new
 * image's environment; has_* tells an empty value from an absent one). */
#define LDVAL_LEN 224
struct resolved_key_t {
    u64 dev;
    u64 ino;
    u64 size;            /* the executable's size and modification time: an */
    u64 mtime_sec;       /* executable rewritten in place (same inode) is   */
    u64 mtime_nsec;      /* another key, resolved again                     */
    u32 has_preload;
    u32 has_libpath;
    char preload[LDVAL_LEN];
    char libpath[LDVAL_LEN];
};

/* A perf-buffer record: a tracked image stopped (or, ptraced, not stopped)
 * at exec for userspace to resolve its allocator; the key is in `pending`. */
struct pause_t {
    u32 tgid;
    u32 flags;           /* PAUSE_* */
    u64 serial;
    char path[EVENT_PATH_LEN];
};

/* The registers of a thread at its stop (leak kinds, exitpause.py): when a
 * thread of a tracked image listed in `pending` for a pause at exit
 * (PENDING_AT_EXIT) dequeues SIGSTOP, the signal_deliver tracepoint copies
 * its user registers as the kernel saved them (x86-64 struct pt_regs: the
 * first STOP_REGS words of struct user_regs_struct, r15 ... ss) and its
 * fs_base, keyed by tgid. Those are the registers ptrace would read during
 * the stop: userspace takes them instead when the image has that one thread. */
#define STOP_REGS          21
struct stop_regs_t {
    u64 serial;          /* the image (track_t.serial) */
    u32 tid;             /* the thread that took the stop */
    u32 pad;
    u64 fs_base;
    u64 regs[STOP_REGS];
};

#endif
