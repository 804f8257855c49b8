"""The tracer: compile and load the BPF program once (BCC), attach the allocator
uprobes and process tracepoints, and read/clear the maps per test.

It serves clients: the pytest process itself (add_root), or, under xdist, every
worker of the controller that loaded it (add_spawner, connect; shared.py). A
test's records are taken out selectively, so clients' tests may overlap.

Everything this module returns is made of builtin types; the accounting and
reporting layers never see BCC or ctypes objects.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from . import bpfcache as _bpfcache
from . import placement as _placement
from .preflight import ATTACH_ENV, ATTACH_MODES

# Allocator functions: name -> (argument registers the entry reads, has return probe)
ALLOCATORS: dict[str, tuple[tuple[str, ...], bool]] = {
    "malloc": (("rdi",), True),
    "calloc": (("rdi", "rsi"), True),
    "realloc": (("rdi", "rsi"), True),
    "reallocarray": (("rdi", "rsi", "rdx"), True),
    "posix_memalign": (("rdi", "rsi", "rdx"), True),
    "aligned_alloc": (("rdi", "rsi"), True),
    "memalign": (("rdi", "rsi"), True),
    "valloc": (("rdi",), True),
    "pvalloc": (("rdi",), True),
    "free": (("rdi",), False),
}
# BPF function prefix per allocator (aligned_alloc has memalign's signature)
_BPF_FN = {"aligned_alloc": "memalign"}
# The BPF source's FN_* ids: the attach cookie of each uprobe_multi site
FN_IDS = {"malloc": 1, "calloc": 2, "realloc": 3, "reallocarray": 4, "posix_memalign": 5,
          "aligned_alloc": 6, "memalign": 6, "valloc": 7, "pvalloc": 8, "free": 9}
BPF_TRACE_UPROBE_MULTI = 48      # enum bpf_attach_type (Linux 6.6+)
BPF_TRACE_UPROBE_SESSION = 57    # (Linux 6.13+)
# The programs the BPF source builds for each attach mode (preflight.ATTACH_MODES)
_MODE_CFLAGS = {"session": ["-DATTACH_SESSION=1"], "multi": ["-DATTACH_MULTI=1"], "perf": ["-DATTACH_PERF=1"]}
BPF_F_UPROBE_MULTI_RETURN = 1
_BPF_LINK_CREATE = 28
_NR_BPF = {"x86_64": 321, "aarch64": 280}

TF_ROOT, TF_ALLOCS, TF_SPAWNER, TF_SPAWNED, TF_RING = 1, 2, 4, 8, 16
PF_EXITED, PF_TERMINATED = 1, 2
EV_EXEC, EV_OPEN = 1, 2
CTR_LOST_PROCS, CTR_LOST_EVENTS, CTR_LOST_STACKS, CTR_NEW_STACKS = 0, 1, 2, 3
# In-process window serials (process image serials are monotonic ns << 8)
WINDOW_SERIAL = 1 << 62
# _select() verdict: delete the entry (used, or garbage) without yielding anything
_DELETE = object()
BUILD_ID_VALID, BUILD_ID_IP = 1, 2
BATCH_CHUNK = 4096


@dataclass
class TracerConfig:
    max_blocks: int = 1 << 20
    max_procs: int = 1 << 15
    max_stacks: int = 1 << 15
    max_handoffs: int = 1 << 14
    stack_depth: int = 32
    ringbuf_pages: int = 512
    exe_len: int = 256
    max_ext_pages: int = 1 << 16
    max_rawcache: int = 1 << 16
    scan_words: int = 128
    max_roots: int = 1024


@dataclass
class ProbeInfo:
    function: str
    library: str
    offset: int
    instruction: str
    emulated: bool
    return_probe: bool
    aliases: tuple[str, ...] = ()


@dataclass
class RawTest:
    """Everything the maps held for one test, as builtin types."""

    processes: list[dict] = field(default_factory=list)
    blocks: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)  # serial -> [(bytes, stack, blocks)]
    stacks: dict[int, list[tuple[int, str | None, int]]] = field(default_factory=dict)  # hash -> frames
    paths: dict[int, list[str]] = field(default_factory=dict)  # serial -> exec/open paths
    lost_procs: int = 0
    lost_events: int = 0
    # in-process (the pytest process's own blocks from its last window)
    inproc_blocks: list[tuple[int, int, int]] = field(default_factory=list)  # (size, stack, ext_ip)
    inproc_counters: dict | None = None


class _Event(ctypes.Structure):
    """The BPF source's struct event_t (a ring-buffer record)."""

    _fields_ = [("type", ctypes.c_uint32), ("tgid", ctypes.c_uint32), ("serial", ctypes.c_uint64),
                ("path", ctypes.c_char * 256)]


@dataclass(eq=False)
class Client:
    """A pytest process the tracer serves: the session's own, or an xdist
    worker (shared.py). Its roots' children are tracked during its tests;
    its tests and in-process windows are its own."""

    roots: list[int]
    counter_base: list[int]
    root_flags: int = TF_ROOT
    test_id: int = 0                     # the current test, 0 between tests
    in_window: bool = False
    window_serial: int = 0
    window_counters: dict | None = None  # a closed window not collected yet
    ext_pages: set | None = None
    forked: bool = False                 # a worker the kernel made a root at fork


@dataclass
class _Sweep:
    """What one walk of the live-block map found (Tracer._sweep_blocks)."""

    blocks: dict = field(default_factory=dict)       # serial -> [(bytes, stack, blocks)]
    inproc: list = field(default_factory=list)       # the closed window's (size, stack, ext_ip)
    referenced: set = field(default_factory=set)     # stacks of the blocks left in the map
    frames: dict = field(default_factory=dict)       # stack hash -> frames (looked up)
    started_ns: int = field(default_factory=time.monotonic_ns)


def bpf_source_path() -> Path:
    """The BPF C source, shipped inside the package (or the checkout's bpf/)."""
    try:
        p = resources.files("pytest_memleak_ebpf").joinpath("bpf/memleak.bpf.c")
        if p.is_file():
            return Path(str(p))
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    p = Path(__file__).resolve().parent.parent / "bpf" / "memleak.bpf.c"
    if p.is_file():
        return p
    raise FileNotFoundError("memleak.bpf.c is missing from the installation (expected in pytest_memleak_ebpf/bpf/)")


def find_libc() -> str:
    """The libc this process maps (the one dynamically linked programs load)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and os.path.basename(parts[5]).startswith("libc.so"):
                return os.path.realpath(parts[5])
    for cand in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6", "/usr/lib64/libc.so.6"):
        if os.path.exists(cand):
            return os.path.realpath(cand)
    raise FileNotFoundError("libc.so.6 not found")


def _bpf_syscall(cmd: int, attr) -> int:
    """bpf(cmd, attr): the fd it returns; OSError(errno) when the kernel refuses."""
    nr = _NR_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"no bpf syscall number known for {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def _uprobe_multi_link(prog_fd: int, path: str, sites: list[tuple[int, int]], retprobe: bool,
                       attach_type: int = BPF_TRACE_UPROBE_MULTI) -> int:
    """BPF_LINK_CREATE of a uprobe_multi (or session) link: prog_fd on every (file offset,
    cookie) of `path`. Returns the link fd; OSError when the kernel refuses."""
    n = len(sites)
    offsets = (ctypes.c_uint64 * n)(*[o for o, _ in sites])
    cookies = (ctypes.c_uint64 * n)(*[c for _, c in sites])
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    attr = (ctypes.c_uint8 * 128)()          # union bpf_attr, link_create member
    ctypes.c_uint32.from_buffer(attr, 0).value = prog_fd
    ctypes.c_uint32.from_buffer(attr, 8).value = attach_type
    ctypes.c_uint64.from_buffer(attr, 16).value = ctypes.addressof(cpath)     # uprobe_multi.path
    ctypes.c_uint64.from_buffer(attr, 24).value = ctypes.addressof(offsets)   # .offsets
    ctypes.c_uint64.from_buffer(attr, 40).value = ctypes.addressof(cookies)   # .cookies
    ctypes.c_uint32.from_buffer(attr, 48).value = n                           # .cnt
    ctypes.c_uint32.from_buffer(attr, 52).value = BPF_F_UPROBE_MULTI_RETURN if retprobe else 0
    try:
        return _bpf_syscall(_BPF_LINK_CREATE, attr)
    except OSError as e:
        raise OSError(e.errno, f"uprobe link (attach type {attach_type}) on {path}: {e.strerror}") from None


def _quietly(fn) -> None:
    with contextlib.suppress(Exception):
        fn()


def _pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return min(max(int(f.read()), 64), 1 << 22)   # PID_MAX_LIMIT on 64-bit
    except (OSError, ValueError):
        return 1 << 22


def _tracepoint_has_field(event: str, name: str) -> bool:
    for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        try:
            with open(f"{d}/events/{event}/format") as f:
                return any(f" {name};" in line for line in f)
        except OSError:
            continue
    return False


COUNTERS = ("alloc_bytes", "alloc_blocks", "lost_blocks", "lost_handoffs", "lost_stacks")


def _counters(v) -> dict:
    """The lifetime and loss counters of a track_t or proc_t value."""
    return {name: int(getattr(v, name)) for name in COUNTERS}


def _place(ip: int, biases) -> tuple:
    """A plain-ip frame as (VALID, build id, file offset) in the module whose
    known load bias puts it at the smallest offset, else unchanged."""
    best = None
    for bid, bias in biases:
        off = ip - bias
        if 0 <= off < (1 << 31) and (best is None or off < best[2]):
            best = (BUILD_ID_VALID, bid, off)
    return best or (BUILD_ID_IP, None, ip)


def _fnv_ips(ips: list[int]) -> int:
    """The BPF program's hash of a plain-ip stack (capture_stack)."""
    mask = (1 << 64) - 1
    h = 0xCBF29CE484222325 ^ len(ips)
    for ip in ips:
        h = ((h ^ ip) * 0x100000001B3) & mask
    return h


def _int(v) -> int:
    return int(getattr(v, "value", v))


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class Tracer:
    def __init__(self, config: TracerConfig | None = None, *, libc: str | None = None):
        from .bccloader import load_bcc

        self.config = config or TracerConfig()
        bcc = self._bcc = load_bcc()
        self._pidmap_words = (_pid_max() + 63) // 64
        t0 = time.monotonic()
        c = self.config
        cflags = [
            f"-DMAX_BLOCKS={int(c.max_blocks)}",
            f"-DMAX_PROCS={int(c.max_procs)}",
            f"-DMAX_STACKS={int(c.max_stacks)}",
            f"-DMAX_HANDOFFS={int(c.max_handoffs)}",
            f"-DSTACK_DEPTH={int(c.stack_depth)}",
            f"-DRINGBUF_PAGES={_pow2(c.ringbuf_pages)}",
            f"-DEXE_LEN={int(c.exe_len)}",
            f"-DMAX_EXT_PAGES={int(c.max_ext_pages)}",
            f"-DMAX_RAWCACHE={int(c.max_rawcache)}",
            f"-DSCAN_WORDS={int(c.scan_words)}",
            f"-DPIDMAP_WORDS={self._pidmap_words}",
            f"-DMAX_ROOTS={int(c.max_roots)}",
            "-Wno-macro-redefined",
        ]
        if _tracepoint_has_field("sched/sched_process_exit", "group_dead"):
            cflags.append("-DHAVE_GROUP_DEAD=1")
        self._cflags = cflags
        forced = os.environ.get(ATTACH_ENV) or "auto"
        self._modes = ATTACH_MODES if forced == "auto" else (forced,)
        self.bpf, self.cached = _bpfcache.load(bcc, bpf_source_path(), [*cflags, *_MODE_CFLAGS[self._modes[0]]])
        self.libc = libc or find_libc()
        self.probes: list[ProbeInfo] = []
        self._attach_allocators()
        self.tracepoints = sum(1 for _ in self.bpf.tracepoint_fds)
        self.load_seconds = time.monotonic() - t0
        self._tracked = self.bpf[b"tracked"]
        self._procs = self.bpf[b"procs"]
        self._blocks = self.bpf[b"blocks"]
        self._stacks = self.bpf[b"stacks"]
        self._counters = self.bpf[b"counters"]
        self._paths: dict[int, list[str]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._clients: list[Client] = []
        self._local: Client | None = None   # this process's own (add_root)
        self._next_test = 0
        self._next_window = 0
        self._batch_bufs: dict = {}
        self._stacks_deleted = 0
        self._stack_gc_at = max(16, c.max_stacks // 2)
        self.bpf[b"events"].open_ring_buffer(self._on_event)
        self._poller = threading.Thread(target=self._poll_loop, name="memleak-ebpf-events", daemon=True)
        self._poller.start()

    # -- set-up ---------------------------------------------------------

    def _attach_allocators(self) -> None:
        """Place and attach the allocator probes the best way the kernel has
        (preflight.ATTACH_MODES: uprobe session links, 6.13+; an entry and a
        return uprobe_multi link, 6.6+; a perf-event uprobe per site through
        BCC), or the one PYTEST_MEMLEAK_EBPF_ATTACH forces. Sets self.probes,
        self.attach_mode, self.attach_errors (modes that failed) and
        self._links (the link fds, closed first at exit)."""
        wanted = {name: regs for name, (regs, _) in ALLOCATORS.items()}
        placed = _placement.place_probes(self.libc, wanted)
        seen_addresses: set[int] = set()
        sites = []   # (name, probe vaddr, probe file offset, has_return)
        self.probes = []
        for name, (regs, has_return) in ALLOCATORS.items():
            sp = placed.get(name)
            if sp is None or sp.address in seen_addresses:
                continue  # not in this libc, or an alias already probed
            seen_addresses.add(sp.address)
            pl = sp.placement
            # A return probe hijacks the return address at [rsp] where it sits:
            # it may move past the prologue only if nothing skipped touched rsp
            # or memory (placement.return_probe_ok); otherwise both stay at +0.
            if has_return and not getattr(pl, "return_probe_ok", False):
                off, insn, emulated = 0, "entry", pl.emulated and pl.offset == 0
            else:
                off, insn, emulated = pl.offset, pl.insn, pl.emulated
            sites.append((name, sp.address + off, sp.file_offset + off, has_return))
            self.probes.append(ProbeInfo(name, self.libc, off, insn, emulated, has_return, tuple(sp.aliases)))
        self._links: list[int] = []
        self.attach_errors: dict[str, str] = {}
        modes = getattr(self, "_modes", ATTACH_MODES)
        for i, mode in enumerate(modes):
            # The source compiles only the programs of one mode (each copy of the
            # allocator code costs compile time); the first is built by __init__.
            if i and hasattr(self, "_cflags"):
                self.bpf.cleanup()
                self.bpf, self.cached = _bpfcache.load(self._bcc, bpf_source_path(),
                                                       [*self._cflags, *_MODE_CFLAGS[mode]])
            try:
                getattr(Tracer, f"_attach_{mode}")(self, sites)   # also for bench.Floor
                self.attach_mode = mode
                return
            except Exception as e:
                if mode == modes[-1]:
                    raise
                self.attach_errors[mode] = str(e)
                for fd in self._links:
                    os.close(fd)
                self._links = []

    def _attach_session(self, sites) -> None:
        """Three links: malloc's session (a program of its own), the other
        allocators' session (one program, the attach cookie says which), and
        free's entry-only uprobe_multi link."""
        kprobe = self._bcc.BPF.KPROBE
        groups = (("malloc_session", BPF_TRACE_UPROBE_SESSION, [s for s in sites if s[0] == "malloc"]),
                  ("alloc_session", BPF_TRACE_UPROBE_SESSION, [s for s in sites if s[0] not in ("malloc", "free")]),
                  ("free_entry", BPF_TRACE_UPROBE_MULTI, [s for s in sites if s[0] == "free"]))
        for name, attach_type, group in groups:
            if group:
                prog = self.bpf.load_func(name.encode(), kprobe, attach_type=attach_type)
                self._links.append(_uprobe_multi_link(prog.fd, self.libc, [(s[2], FN_IDS[s[0]]) for s in group],
                                                      False, attach_type=attach_type))

    def _attach_multi(self, sites) -> None:
        bcc = self._bcc
        entry = self.bpf.load_func(b"alloc_entry", bcc.BPF.KPROBE, attach_type=BPF_TRACE_UPROBE_MULTI)
        ret = self.bpf.load_func(b"alloc_return", bcc.BPF.KPROBE, attach_type=BPF_TRACE_UPROBE_MULTI)
        self._links.append(_uprobe_multi_link(entry.fd, self.libc, [(s[2], FN_IDS[s[0]]) for s in sites], False))
        self._links.append(_uprobe_multi_link(ret.fd, self.libc, [(s[2], FN_IDS[s[0]]) for s in sites if s[3]], True))

    def _attach_perf(self, sites) -> None:
        lib = self.libc.encode()
        for name, addr, _foff, has_return in sites:
            prefix = _BPF_FN.get(name, name)
            self.bpf.attach_uprobe(name=lib, addr=addr, fn_name=f"{prefix}_entry".encode())
            if has_return:
                self.bpf.attach_uretprobe(name=lib, addr=addr, fn_name=f"{prefix}_return".encode())

    @property
    def probe_count(self) -> int:
        return sum(1 + p.return_probe for p in self.probes) + self.tracepoints

    # -- events -----------------------------------------------------------

    def _on_event(self, ctx, data, size) -> None:
        ev = ctypes.cast(data, ctypes.POINTER(_Event)).contents
        path = ev.path.decode("utf-8", "surrogateescape")
        if not path:
            return
        tgid = int(ev.tgid)
        if not path.startswith("/"):
            path = self._absolutize(tgid, path, ev.type == EV_EXEC)
        self._paths.setdefault(int(ev.serial), []).append(path)

    def _absolutize(self, tgid: int, path: str, is_exec: bool) -> str:
        if is_exec:
            try:
                return os.readlink(f"/proc/{tgid}/exe")
            except OSError:
                pass
        try:
            cwd = os.readlink(f"/proc/{tgid}/cwd")
        except OSError:
            cwd = os.getcwd()
        return os.path.normpath(os.path.join(cwd, path))

    def _poll_loop(self) -> None:
        while not self._closed:
            with self._lock:
                if self._closed:
                    return
                # allocate nothing in this process while a window records it
                if not self.in_window():
                    try:
                        self.bpf.ring_buffer_poll(timeout=0)
                    except Exception:
                        pass
            time.sleep(0.02)

    # -- clients: the pytest processes this tracer serves -------------------

    def add_root(self, tgid: int) -> None:
        """Track processes that `tgid` (this pytest process) creates during
        tests. Before the first test only: the pid bitmap's word is written
        here without an atomic operation, safe while no tracked process can
        be forking."""
        if self._next_test:
            raise RuntimeError("add_root() after the first test")
        if self._local is None:
            self._local = Client(roots=[], counter_base=self._read_counters())
            self._clients.append(self._local)
        self._local.roots.append(tgid)
        self._set_root(self._local, tgid, 0)
        self._pidmap_or(tgid)

    def add_spawner(self, tgid: int) -> None:
        """The xdist controller: every process it creates from now on is a
        root from its first instruction (the BPF program follows the fork),
        to be served through connect(). Before the workers start."""
        self._write_root(tgid, TF_ROOT | TF_SPAWNER)
        self._pidmap_or(tgid)

    def connect(self, tgid: int) -> Client:
        """A worker of the spawner: its client state. The kernel made it a
        root at fork; a process the spawner did not create is added here."""
        with self._lock:
            try:
                flags = int(self._tracked[self._tracked.Key(tgid)].flags)
            except KeyError:
                flags = 0
            c = Client(roots=[tgid], counter_base=self._read_counters(), root_flags=TF_ROOT | TF_SPAWNED,
                       forked=bool(flags & TF_ROOT))
            self._set_root(c, tgid, 0)
            if not c.forked:
                # not forked by the spawner (another host's worker cannot reach us):
                # registered above; now its bit, then repair bits of the word a fork may have raced
                self._pidmap_or(tgid)
                self._repair_pidmap(tgid >> 6)
            self._clients.append(c)
            return c

    def disconnect(self, c: Client) -> None:
        """A worker went away (ended or died): forget its test, windows and roots."""
        with self._lock:
            if c not in self._clients:
                return
            self._clients.remove(c)
            if c.test_id:
                self._untrack_test(c.test_id)
            for tgid in c.roots:
                self._delete(self._tracked, self._tracked.Key(tgid))   # its bit stays: a hint only
                self._delete(self.bpf[b"ext"], self.bpf[b"ext"].Key(tgid))
            if c.ext_pages:
                self._set_ext_keys(c, set())

    def _pidmap_or(self, tgid: int) -> None:
        pm = self.bpf[b"pidmap"]
        if tgid >> 6 < self._pidmap_words:
            key = pm.Key(tgid >> 6)
            pm[key] = pm.Leaf(int(pm[key].value) | (1 << (tgid & 63)))

    def _repair_pidmap(self, word: int) -> None:
        """Set the bit of every tracked pid in `word` (a fork's atomic update
        may have landed between our read and write of the word)."""
        bits = 0
        for k in list(self._tracked.keys()):
            if int(k.value) >> 6 == word:
                bits |= 1 << (int(k.value) & 63)
        if bits and word < self._pidmap_words:
            pm = self.bpf[b"pidmap"]
            key = pm.Key(word)
            pm[key] = pm.Leaf(int(pm[key].value) | bits)

    def _client(self, c: Client | None) -> Client:
        if c is not None:
            return c
        if self._local is None:
            raise RuntimeError("no root: call add_root() first")
        return self._local

    def _set_root(self, c: Client, tgid: int, test_id: int, *, allocs: bool = False, serial: int = 0) -> None:
        self._write_root(tgid, c.root_flags | (TF_ALLOCS if allocs else 0), test_id, serial)

    def _write_root(self, tgid: int, flags: int, test_id: int = 0, serial: int = 0) -> None:
        """A root's entry in `tracked`, counters zeroed."""
        leaf = self._tracked.Leaf()
        leaf.test_id = test_id
        leaf.flags = flags
        leaf.serial = serial
        self._tracked[self._tracked.Key(tgid)] = leaf

    def _set_root_fields(self, tgid: int, **fields) -> None:
        """Change some fields of a root's entry, keeping its window counters."""
        key = self._tracked.Key(tgid)
        leaf = self._tracked[key]
        for name, value in fields.items():
            setattr(leaf, name, value)
        self._tracked[key] = leaf

    def in_window(self, c: Client | None = None) -> bool:
        c = c or self._local
        return c is not None and c.in_window

    # -- in-process windows (a pytest process's own allocations) ------------

    def set_extension_pages(self, ranges: list[tuple[int, int]], c: Client | None = None) -> None:
        """Executable address ranges of extension modules in the client's
        process: its allocations whose stack holds a return address into one
        of them are attributed to an extension (block.ext_ip)."""
        c = self._client(c)
        pages = set()
        for start, end in ranges:
            pages.update(range(start >> 12, (end + 4095) >> 12))
        if pages == c.ext_pages:
            return
        limit = self.config.max_ext_pages
        pages = set(sorted(pages)[:limit])
        with self._lock:
            self._set_ext_keys(c, pages)
            ext = self.bpf[b"ext"]
            leaf = ext.Leaf()
            leaf.n = len(pages)
            leaf.lo = min(pages) << 12 if pages else 0
            leaf.hi = (max(pages) + 1) << 12 if pages else 0
            for tgid in c.roots:
                ext[ext.Key(tgid)] = leaf
        c.ext_pages = pages

    def _set_ext_keys(self, c: Client, pages: set) -> None:
        table = self.bpf[b"ext_pages"]
        old = c.ext_pages or set()
        for tgid in c.roots:
            for page in old - pages:
                self._delete(table, table.Key(tgid, 0, page))
            for page in pages - old:
                table[table.Key(tgid, 0, page)] = table.Leaf(1)

    def open_window(self, c: Client | None = None) -> int:
        """Start recording the root's own allocations; returns the window's serial."""
        c = self._client(c)
        with self._lock:
            self._next_window += 1
            c.window_serial = WINDOW_SERIAL | self._next_window
            for tgid in c.roots:
                self._set_root(c, tgid, c.test_id, allocs=True, serial=c.window_serial)
            c.in_window = True
        return c.window_serial

    def close_window(self, c: Client | None = None) -> dict:
        """Stop recording the root's allocations; returns its lifetime counters."""
        c = self._client(c)
        with self._lock:
            counters = dict.fromkeys(COUNTERS, 0)
            for tgid in c.roots:
                try:
                    for k, n in _counters(self._tracked[self._tracked.Key(tgid)]).items():
                        counters[k] += n
                except KeyError:
                    pass
                self._set_root_fields(tgid, flags=c.root_flags)
            c.window_counters = counters
            c.in_window = False
            return counters

    def window_snapshot(self, c: Client | None = None) -> list[tuple[int, int, int]]:
        """The current window's live root blocks, without removing them.
        Recording pauses while the maps are read (reading allocates)."""
        c = self._client(c)
        serial = c.window_serial
        with self._lock:
            for tgid in c.roots:
                self._set_root_fields(tgid, flags=c.root_flags)
            try:
                pick = lambda k, v: (v.size, v.stack, v.ext_ip) if v.serial == serial else None  # noqa: E731
                out = [r for _, _, results in self._chunks(self._blocks, pick) for r in results if r is not None]
            finally:
                for tgid in c.roots:
                    self._set_root_fields(tgid, flags=c.root_flags | TF_ALLOCS)
        return out

    def collect_window(self, c: Client | None = None) -> tuple[list[tuple[int, int, int]], dict | None, dict]:
        """After close_window() outside a test: the closed window's live blocks,
        counters and their stacks (used when the window spanned a whole test)."""
        c = self._client(c)
        with self._lock:
            wserial = c.window_serial
            t0 = time.monotonic_ns()
            live = self._tracked_serials() | {_int(k) for k in self._procs.keys()}   # other clients' tests' images
            sweep = self._sweep_blocks({}, wserial, live=live, t0=t0)
            inproc = sweep.inproc
            stacks = self._stack_frames({h for _, h, _ in inproc if h})
            self._collect_stack_garbage(sweep)
            counters, c.window_counters = c.window_counters, None
        return inproc, counters, stacks

    # -- per test -------------------------------------------------------

    def begin_test(self, c: Client | None = None) -> int:
        c = self._client(c)
        with self._lock:
            self._next_test += 1
            c.test_id = self._next_test
            for tgid in c.roots:
                self._set_root(c, tgid, c.test_id)
        return c.test_id

    def _read_counters(self) -> list[int]:
        return [int(v.value) for v in self._counters.values()]

    def running(self, test_id: int | None, c: Client | None = None) -> int:
        """How many processes of the test are still alive."""
        if not test_id:
            return 0
        with self._lock:
            return sum(1 for _, v in self._tracked.items()
                       if not int(v.flags) & TF_ROOT and int(v.test_id) == test_id)

    def end_test(self, test_id: int, c: Client | None = None) -> RawTest:
        """Stop attributing new processes to the test and collect its records.

        Processes of the test still running are reported as running and
        stop being tracked, so they never reach another test's figures.
        Other clients' records (xdist workers sharing this tracer) stay.
        """
        c = self._client(c)
        raw = RawTest()
        with self._lock:
            for tgid in c.roots:
                if c.in_window:   # a window spanning the whole test stays open
                    self._set_root_fields(tgid, test_id=0)
                else:
                    self._set_root(c, tgid, 0)
            c.test_id = 0
            try:
                self.bpf.ring_buffer_consume()
            except Exception:
                pass
            # Records made from now on belong to live processes: serials are
            # monotonic time, so anything older that no live process or active
            # test owns is garbage (a process that outlived its test).
            t0 = time.monotonic_ns()
            running = self._untrack_test(test_id)
            self._sweep_handoffs()
            live = self._tracked_serials()
            active = {o.test_id for o in self._clients if o.test_id}
            procs: dict[int, dict] = {}
            for k, v in list(self._procs.items()):
                serial, tid = _int(k), int(v.test_id)
                if tid == test_id:
                    procs[serial] = self._proc_dict(v, running.get(serial))
                    self._delete(self._procs, k)
                elif tid in active or serial in live:
                    live.add(serial)
                else:   # its test is over (forked while a test was being collected)
                    self._delete(self._procs, k)
            raw.inproc_counters, c.window_counters = c.window_counters, None
            window_closed = raw.inproc_counters is not None
            wserial = c.window_serial if window_closed else -1
            # Walking the block map costs ~0.4 ms at 1M entries even when empty:
            # skip it when nothing of this test can be in it.
            if procs or (window_closed and raw.inproc_counters.get("alloc_blocks", 0) > 0):
                sweep = self._sweep_blocks(procs, wserial, live=live, t0=t0)
                blocks = self._remap_ip_stacks(sweep, live, t0)
                raw.inproc_blocks = sweep.inproc
                wanted = {h for bl in blocks.values() for _, h, _ in bl if h} | {h for _, h, _ in sweep.inproc if h}
                frames = {**sweep.frames, **self._stack_frames(wanted - sweep.frames.keys())}
                stacks = {h: frames[h] for h in wanted if h in frames}
                self._collect_stack_garbage(sweep)
            else:
                blocks, stacks = {}, {}
            paths = {s: self._paths.pop(s) for s in list(self._paths) if s in procs}
            # paths of images nothing will report (exec'd away, ended with their test)
            t0_serial = t0 << 8
            self._paths = {s: p for s, p in self._paths.items() if s in live or s >= t0_serial}
            counters = self._read_counters()
            raw.lost_procs = counters[CTR_LOST_PROCS] - c.counter_base[CTR_LOST_PROCS]
            raw.lost_events = counters[CTR_LOST_EVENTS] - c.counter_base[CTR_LOST_EVENTS]
            c.counter_base = counters
        raw.processes = sorted(procs.values(), key=lambda p: p["serial"])
        raw.blocks = blocks
        raw.stacks = stacks
        raw.paths = paths
        return raw

    def _tracked_serials(self) -> set[int]:
        """Images of the processes tracked now (all clients' tests)."""
        return {int(v.serial) for _, v in self._tracked.items() if not int(v.flags) & TF_ROOT}

    def _window_serials(self) -> set[int]:
        """In-process windows whose blocks must stay: open, or closed and not
        yet collected."""
        return {o.window_serial for o in self._clients if o.in_window or o.window_counters is not None}

    def _sweep_blocks(self, procs: dict, wserial: int, *, live: set, t0: int) -> _Sweep:
        """One walk of the live-block map: the blocks of `procs` (finished or
        untracked images of the test, per serial and stack) and of the closed
        window `wserial` are taken out; garbage (older than t0, owned by
        nothing live) is deleted; everything else stays, its stacks noted."""
        s = _Sweep(started_ns=t0)
        agg: dict[int, dict[int, list[int]]] = {}   # serial -> stack -> [bytes, blocks]
        inproc = s.inproc
        windows = self._window_serials() - {wserial}
        t0_serial = t0 << 8
        referenced = s.referenced

        def pick(k, v):
            serial = v.serial
            if serial in procs:
                a = agg.setdefault(serial, {}).setdefault(v.stack, [0, 0])
                a[0] += v.size
                a[1] += 1
                return _DELETE
            if serial == wserial:
                inproc.append((v.size, v.stack, v.ext_ip))
                return _DELETE
            if serial in live or serial in windows or serial >= t0_serial:
                referenced.add(v.stack)
                return None
            return _DELETE   # garbage

        # One client, no open window, nothing live: every entry goes (ours or garbage)
        drain = not live and not windows and len(self._clients) <= 1
        for _ in self._select(self._blocks, pick, drain=drain):
            pass
        s.blocks = {serial: [(b, h, n) for h, (b, n) in per.items()] for serial, per in agg.items()}
        return s

    def _stack_frames(self, hashes) -> dict[int, list]:
        """The frames of these stack hashes (those still in the map)."""
        out = {}
        for h in hashes:
            try:
                out[h] = self._frames(self._stacks[self._stacks.Key(h)])
            except KeyError:
                pass
        return out

    def _collect_stack_garbage(self, sweep: _Sweep) -> None:
        """Stacks are shared by every block (and every xdist worker's test)
        that was allocated from the same place, so they are not taken with a
        test's blocks: once the map is half full, delete those no remaining
        block refers to and no allocation used since the block walk began
        (the BPF program stamps a stack each time it is used)."""
        new = self._read_counters()[CTR_NEW_STACKS]
        if new - self._stacks_deleted < self._stack_gc_at:
            return
        keep = sweep.referenced | self._ring_stacks()
        since = sweep.started_ns
        dropped = 0

        def pick(k, v):
            nonlocal dropped
            if int(v.used) >= since or _int(k) in keep:
                return None
            dropped += 1
            return _DELETE

        for _ in self._select(self._stacks, pick):
            pass
        self._stacks_deleted += dropped
        left = new - self._stacks_deleted
        self._stack_gc_at = max(self.config.max_stacks // 2, left + self.config.max_stacks // 4)

    def _remap_ip_stacks(self, sweep: _Sweep, live: set, t0: int) -> dict:
        """Stacks the kernel returned as plain ips (it could not take the mmap
        lock: another thread was mapping memory) are resolved through the
        image's other captures (the BPF program's rawcache): the same ips map
        to the same build-id stack; otherwise each ip is placed in a module
        whose load bias (ip - file offset) the image's other stacks revealed.
        Takes the test's images' rawcache entries (and garbage) out."""
        blocks = sweep.blocks
        frames_of = sweep.frames
        t0_serial = t0 << 8
        depth = self.config.stack_depth

        def pick(k, v):
            serial = k.serial
            if serial in blocks:
                return (serial, k.rawhash, v.h, [v.ip[i] for i in range(min(v.n, depth))])
            if serial in live or serial >= t0_serial:
                return None
            return _DELETE

        cached = list(self._select(self.bpf[b"rawcache"], pick))
        ip_only = {h for bl in blocks.values() for _, h, _ in bl if h}
        frames_of.update(self._stack_frames(ip_only | {h for _, _, h, _ in cached}))
        ip_only = {h for h in ip_only if frames_of.get(h) and all(st == BUILD_ID_IP for st, _, _ in frames_of[h])}
        if not ip_only:
            return blocks
        biases: dict[int, set] = {}      # serial -> {(build_id, bias)}
        same: dict[tuple, int] = {}      # (serial, raw hash) -> build-id stack hash
        for serial, rh, h, ips in cached:
            same[(serial, rh)] = h
            frames = frames_of.get(h) or []
            if len(frames) == len(ips):
                for (st, bid, off), ip in zip(frames, ips):
                    if st == BUILD_ID_VALID:
                        biases.setdefault(serial, set()).add((bid, ip - off))
        out = {}
        for serial, bl in blocks.items():
            per: dict[int, list[int]] = {}
            for nbytes, h, n in bl:
                if h in ip_only:
                    h2 = same.get((serial, _fnv_ips([ip for _, _, ip in frames_of[h]])))
                    if h2 in frames_of:
                        h = h2
                    elif serial in biases:
                        fixed = [_place(ip, biases[serial]) for _, _, ip in frames_of[h]]
                        h = hash(("remapped", serial, tuple(fixed)))
                        frames_of[h] = fixed
                a = per.setdefault(h, [0, 0])
                a[0] += nbytes
                a[1] += n
            out[serial] = [(b, h, n) for h, (b, n) in per.items()]
        return out

    def _sweep_handoffs(self) -> None:
        """Hand-off slots live as long as their thread (the BPF program deletes
        them when a tracked thread exits); drop those of threads that ended
        untracked (still running at their test's end) or changed id at exec."""
        ho = self.bpf[b"handoffs"]
        gone = [k for k in list(ho.keys()) if not os.path.exists(f"/proc/{int(k.tid)}")]
        for k in gone:
            self._delete(ho, k)

    def _untrack_test(self, test_id: int) -> dict[int, dict]:
        """Remove the test's still-running processes from `tracked`; return
        their live counters by serial. The blocks in their entries' rings go
        to the block map, with the rest of their blocks."""
        running: dict[int, dict] = {}
        for _ in range(3):
            found = False
            for k, v in list(self._tracked.items()):
                if int(v.flags) & TF_ROOT or int(v.test_id) != test_id:
                    continue
                found = True
                v = self._take(self._tracked, k)
                if v is None:
                    continue   # it ended meanwhile: the program finished it
                running[int(v.serial)] = _counters(v)
                self._spill_ring(int(k.value), v)
            if not found:
                break
        return running

    def _take(self, table, key):
        """Look up and delete in one step (the entry the BPF program last
        wrote); None when it is gone."""
        leaf = table.Leaf()
        if self._bcc.lib.bpf_lookup_and_delete(table.map_fd, ctypes.byref(key), ctypes.byref(leaf)) == 0:
            return leaf
        try:   # kernels before 5.14: no lookup-and-delete on hash maps
            leaf = table[key]
        except KeyError:
            return None
        self._delete(table, key)
        return leaf

    def _spill_ring(self, tgid: int, v) -> None:
        """The blocks of an untracked image's ring into the block map."""
        if not int(v.flags) & TF_RING:
            return
        for e in v.ring:
            if e.addr:
                key = self._blocks.Key()
                key.tgid, key.addr = tgid, e.addr
                leaf = self._blocks.Leaf()
                leaf.size, leaf.ts, leaf.serial, leaf.stack = e.size, e.ts, v.serial, e.stack
                try:
                    self._blocks[key] = leaf
                except Exception:
                    v.lost_blocks += 1

    def _ring_stacks(self) -> set[int]:
        """Stacks of the blocks in tracked images' rings."""
        return {int(e.stack) for _, v in self._tracked.items() if int(v.flags) & TF_RING
                for e in v.ring if e.addr and e.stack}

    def _select(self, table, pick, *, drain: bool = False):
        """Walk `table` in batches: pick(key, value) returns None to leave an
        entry, _DELETE to delete it, or any other value, which is yielded and
        the entry deleted. Deletions are batched per chunk (a key that vanished
        meanwhile is skipped).
        drain: the caller knows every entry goes (pick never returns None):
        each batch is looked up and deleted in one call, ~2x faster."""
        bcc = sys.modules["bcc"]
        ksize = ctypes.sizeof(table.Key)
        dbuf = self._batch_bufs.get(("del", id(table)))
        if dbuf is None:
            dbuf = self._batch_bufs[("del", id(table))] = (table.Key * BATCH_CHUNK)()
        for keys, n, results in self._chunks(table, pick, delete=drain):
            yield from (r for r in results if r is not None and r is not _DELETE)
            if drain:
                continue
            if None not in results:          # the whole chunk goes (the common case)
                sel = range(n)
            else:
                sel = [i for i, r in enumerate(results) if r is not None]
                if not sel:
                    continue
            if len(sel) == n:
                base = ctypes.addressof(keys)
            else:
                for j, i in enumerate(sel):
                    ctypes.memmove(ctypes.addressof(dbuf) + j * ksize, ctypes.addressof(keys) + i * ksize, ksize)
                base = ctypes.addressof(dbuf)
            start = 0
            while start < len(sel):
                cnt = ctypes.c_uint32(len(sel) - start)
                at = ctypes.c_void_p(base + start * ksize)
                if bcc.lib.bpf_delete_batch(table.map_fd, at, ctypes.byref(cnt)) == 0:
                    break
                start += cnt.value + 1   # that key was deleted meanwhile (a free): skip it

    def _chunks(self, table, pick, *, delete: bool = False):
        """(keys buffer, n, [pick(k, v) per entry]) per batch lookup (and
        delete, with delete=True)."""
        bcc = sys.modules["bcc"]
        bufs = self._batch_bufs.get(id(table))
        if bufs is None:
            bufs = ((table.Key * BATCH_CHUNK)(), (table.Leaf * BATCH_CHUNK)())
            self._batch_bufs[id(table)] = bufs
        keys, vals = bufs
        fn = bcc.lib.bpf_lookup_and_delete_batch if delete else bcc.lib.bpf_lookup_batch
        token = ctypes.c_uint32(0)
        first = True
        while True:
            cnt = ctypes.c_uint32(BATCH_CHUNK)
            res = fn(table.map_fd, None if first else ctypes.byref(token), ctypes.byref(token),
                     ctypes.byref(keys), ctypes.byref(vals), ctypes.byref(cnt))
            err = ctypes.get_errno()
            n = cnt.value
            if n:
                yield keys, n, [pick(keys[i], vals[i]) for i in range(n)]
            if res != 0:
                if err == errno.ENOENT:
                    break
                raise OSError(err, f"BPF map batch operation failed: {os.strerror(err)}")
            first = False

    @staticmethod
    def _delete(table, key) -> None:
        try:
            del table[key]
        except KeyError:
            pass

    @staticmethod
    def _proc_dict(v, running: dict | None) -> dict:
        flags = int(v.flags)
        d = {
            "serial": int(v.serial),
            "pid": int(v.tgid),
            "ppid": int(v.ppid),
            "uid": int(v.uid),
            "comm": bytes(v.comm).split(b"\0", 1)[0].decode("utf-8", "replace"),
            "exe_raw": bytes(v.exe).split(b"\0", 1)[0].decode("utf-8", "surrogateescape") or None,
            "execs": int(v.execs),
            "exited": bool(flags & PF_EXITED),
            "exit_code": int(v.exit_code) if flags & PF_TERMINATED and int(v.signal) == 0 else None,
            "signal": int(v.signal) if flags & PF_TERMINATED and int(v.signal) else None,
            "start_ns": int(v.start_ns),
            "exit_ns": int(v.exit_ns) or None,
            **_counters(v),
        }
        if running is not None and not d["exited"]:
            d.update(running)
        d["running_at_test_end"] = not d["exited"]
        return d

    def _frames(self, v) -> list[tuple[int, str | None, int]]:
        out = []
        n = min(int(v.nframes), self.config.stack_depth)
        for i in range(n):
            f = v.frames[i]
            status = int(f.status)
            if status == BUILD_ID_VALID:
                out.append((status, bytes(f.build_id).hex(), int(f.offset)))
            elif status == BUILD_ID_IP:
                out.append((status, None, int(f.ip)))
            else:
                break
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            # Each detach waits for an RCU grace period; done side by side the
            # waits overlap (6 tracepoints: 0.45 s one after another, 0.25 s at once).
            jobs = [lambda fd=fd: os.close(fd) for fd in self._links]
            jobs += [lambda k=k: self.bpf.detach_tracepoint(k) for k in list(self.bpf.tracepoint_fds)]
            self._links = []
            threads = [threading.Thread(target=_quietly, args=(job,), daemon=True) for job in jobs]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            try:
                self.bpf.cleanup()
            except Exception:
                pass
