"""The tracer: compile and load the BPF program once (BCC), attach the allocator
uprobes and process tracepoints, and read/clear the maps per test.

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

TF_ROOT, TF_ALLOCS = 1, 2
PF_EXITED, PF_TERMINATED = 1, 2
EV_EXEC, EV_OPEN = 1, 2
CTR_LOST_PROCS, CTR_LOST_EVENTS, CTR_LOST_STACKS = 0, 1, 2
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


def _uprobe_multi_link(prog_fd: int, path: str, sites: list[tuple[int, int]], retprobe: bool,
                       attach_type: int = BPF_TRACE_UPROBE_MULTI) -> int:
    """BPF_LINK_CREATE of a uprobe_multi (or session) link: prog_fd on every (file offset,
    cookie) of `path`. Returns the link fd; OSError when the kernel refuses."""
    nr = _NR_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"no bpf syscall number known for {os.uname().machine}")
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
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(_BPF_LINK_CREATE), ctypes.byref(attr),
                      ctypes.c_uint(ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"uprobe link (attach type {attach_type}) on {path}: {os.strerror(err)}")
    return int(fd)


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


COUNTERS = ("alloc_bytes", "alloc_blocks", "free_blocks", "lost_blocks", "lost_handoffs", "lost_stacks")


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


def _copy(c):
    """A detached copy of a ctypes key/value (batch buffers are reused);
    simple ctypes elements already come out of arrays as Python ints."""
    if isinstance(c, int):
        return c
    return type(c).from_buffer_copy(c)


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
            "-Wno-macro-redefined",
        ]
        if _tracepoint_has_field("sched/sched_process_exit", "group_dead"):
            cflags.append("-DHAVE_GROUP_DEAD=1")
        self._cflags = cflags
        forced = os.environ.get(ATTACH_ENV) or "auto"
        self._modes = ATTACH_MODES if forced == "auto" else (forced,)
        self.bpf = bcc.BPF(src_file=str(bpf_source_path()).encode(), cflags=[*cflags, *_MODE_CFLAGS[self._modes[0]]])
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
        self._roots: dict[int, str] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._test_id = 0
        self._window = 0
        self._window_serial = 0
        self._window_counters: dict | None = None
        self._in_window = False
        self._batch_bufs: dict = {}
        self._counter_base = self._read_counters()
        self.bpf[b"events"].open_ring_buffer(self._on_event)
        self._poller = threading.Thread(target=self._poll_loop, name="memleak-ebpf-events", daemon=True)
        self._poller.start()

    # -- set-up ---------------------------------------------------------

    def _attach_allocators(self) -> None:
        """Place and attach the allocator probes the best way the kernel has
        (preflight.ATTACH_MODES: a uprobe session link, 6.13+; an entry and a
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
                self.bpf = self._bcc.BPF(src_file=str(bpf_source_path()).encode(),
                                         cflags=[*self._cflags, *_MODE_CFLAGS[mode]])
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
        prog = self.bpf.load_func(b"alloc_session", self._bcc.BPF.KPROBE, attach_type=BPF_TRACE_UPROBE_SESSION)
        self._links.append(_uprobe_multi_link(prog.fd, self.libc, [(s[2], FN_IDS[s[0]]) for s in sites], False,
                                              attach_type=BPF_TRACE_UPROBE_SESSION))

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
        ev = self.bpf[b"events"].event(data)
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
                if not self._in_window:
                    try:
                        self.bpf.ring_buffer_poll(timeout=0)
                    except Exception:
                        pass
            time.sleep(0.02)

    # -- per test -------------------------------------------------------

    def add_root(self, tgid: int) -> None:
        """Track processes that `tgid` creates during tests. Before the first
        test only: the pid bitmap's word is written here without an atomic
        operation, safe while no tracked process can be forking."""
        if self._test_id:
            raise RuntimeError("add_root() after the first test")
        self._roots[tgid] = ""
        self._set_root(tgid, 0)
        pm = self.bpf[b"pidmap"]
        if tgid >> 6 < self._pidmap_words:
            key = pm.Key(tgid >> 6)
            pm[key] = pm.Leaf(int(pm[key].value) | (1 << (tgid & 63)))

    def _set_root(self, tgid: int, test_id: int, *, allocs: bool = False, serial: int = 0) -> None:
        key = self._tracked.Key(tgid)
        leaf = self._tracked.Leaf()
        leaf.test_id = test_id
        leaf.flags = TF_ROOT | (TF_ALLOCS if allocs else 0)
        leaf.serial = serial
        leaf.nthreads = 0
        self._tracked[key] = leaf

    # -- in-process windows (the pytest process's own allocations) ----------

    def set_extension_pages(self, ranges: list[tuple[int, int]]) -> None:
        """Executable address ranges of extension modules in this process:
        root allocations whose stack holds a return address into one of them
        are attributed to an extension (block.ext_ip)."""
        pages = set()
        for start, end in ranges:
            pages.update(range(start >> 12, (end + 4095) >> 12))
        if pages == getattr(self, "_ext_pages", None):
            return
        table = self.bpf[b"ext_pages"]
        table.clear()
        limit = self.config.max_ext_pages
        for i, page in enumerate(sorted(pages)):
            if i >= limit:
                break
            table[table.Key(page)] = table.Leaf(1)
        ext = self.bpf[b"ext"]
        leaf = ext.Leaf()
        leaf.n = min(len(pages), limit)
        leaf.lo = min(pages) << 12 if pages else 0
        leaf.hi = (max(pages) + 1) << 12 if pages else 0
        ext[ext.Key(0)] = leaf
        self._ext_pages = pages

    def open_window(self) -> int:
        """Start recording the root's own allocations; returns the window's serial."""
        with self._lock:
            self._window += 1
            self._window_serial = (1 << 62) | self._window
            for tgid in self._roots:
                self._set_root(tgid, self._test_id, allocs=True, serial=self._window_serial)
            self._in_window = True
        return self._window_serial

    def close_window(self) -> dict:
        """Stop recording the root's allocations; returns its lifetime counters."""
        with self._lock:
            counters = dict.fromkeys(COUNTERS, 0)
            for tgid in self._roots:
                try:
                    for k, n in _counters(self._tracked[self._tracked.Key(tgid)]).items():
                        counters[k] += n
                except KeyError:
                    pass
                self._set_root_fields(tgid, flags=TF_ROOT)
            self._window_counters = counters
            self._in_window = False
            return counters

    def window_snapshot(self) -> list[tuple[int, int, int]]:
        """The current window's live root blocks, without removing them.
        Recording pauses while the maps are read (reading allocates)."""
        serial = self._window_serial
        with self._lock:
            for tgid in self._roots:
                self._set_root_fields(tgid, flags=TF_ROOT)
            try:
                out = [b[1:] for b in self._batch(self._blocks, lambda k, v: (v.serial, v.size, v.stack, v.ext_ip),
                                                   delete=False) if b[0] == serial]
            finally:
                for tgid in self._roots:
                    self._set_root_fields(tgid, flags=TF_ROOT | TF_ALLOCS)
        return out

    def _set_root_fields(self, tgid: int, **fields) -> None:
        """Change some fields of a root's entry, keeping its window counters."""
        key = self._tracked.Key(tgid)
        leaf = self._tracked[key]
        for name, value in fields.items():
            setattr(leaf, name, value)
        self._tracked[key] = leaf

    def collect_window(self) -> tuple[list[tuple[int, int, int]], dict | None, dict]:
        """After close_window() outside a test: the closed window's live blocks,
        counters and their stacks (used when the window spanned a whole test)."""
        wserial = self._window_serial
        with self._lock:
            inproc = [b[1:] for b in self._drain(self._blocks, lambda k, v: (v.serial, v.size, v.stack, v.ext_ip))
                      if b[0] == wserial]
            wanted = {h for _, h, _ in inproc if h}
            stacks = {h: f for h, f in self._drain(
                self._stacks, lambda k, v: (_int(k), self._frames(v) if _int(k) in wanted else None)) if f}
            counters, self._window_counters = self._window_counters, None
        return inproc, counters, stacks

    def begin_test(self) -> int:
        self._test_id += 1
        for tgid in self._roots:
            self._set_root(tgid, self._test_id)
        return self._test_id

    def _read_counters(self) -> list[int]:
        return [int(v.value) for v in self._counters.values()]

    def running(self, test_id: int | None) -> int:
        """How many processes of the test are still alive."""
        if not test_id:
            return 0
        with self._lock:
            return sum(1 for _, v in self._tracked.items()
                       if not int(v.flags) & TF_ROOT and int(v.test_id) == test_id)

    def end_test(self, test_id: int) -> RawTest:
        """Stop attributing new processes to the test and collect its records.

        Processes of the test still running are reported as running and
        stop being tracked, so they never reach another test's figures.
        """
        raw = RawTest()
        with self._lock:
            for tgid in self._roots:
                if self._in_window:   # a window spanning the whole test stays open
                    self._set_root_fields(tgid, test_id=0)
                else:
                    self._set_root(tgid, 0)
            try:
                self.bpf.ring_buffer_consume()
            except Exception:
                pass
            running = self._untrack_test(test_id)
            self._sweep_handoffs()
            procs: dict[int, dict] = {}
            for k, v in list(self._procs.items()):
                serial = _int(k)
                if int(v.test_id) != test_id:
                    # left over from an earlier test (a process forked while that
                    # test was being collected): drop it
                    if int(v.test_id) < test_id:
                        self._delete(self._procs, k)
                    continue
                procs[serial] = self._proc_dict(v, running.get(serial))
                self._delete(self._procs, k)
            # Draining walks every bucket of the block map (~0.4 ms at 1M entries) even
            # when it is empty: skip it when nothing of this test can be in it.
            # a window closed during the test: its counters, and its blocks below
            raw.inproc_counters, self._window_counters = self._window_counters, None
            window_closed = raw.inproc_counters is not None
            if procs or self._in_window or (window_closed and raw.inproc_counters.get("alloc_blocks", 0) > 0):
                blocks, stacks = self._collect_blocks(procs, raw, window_closed)
            else:
                blocks, stacks = {}, {}
            paths = {s: self._paths.pop(s) for s in list(self._paths) if s in procs}
            # paths of images we will never report (exec'd away, other tests)
            self._paths = {s: p for s, p in self._paths.items() if s > max(procs, default=0)}
        counters = self._read_counters()
        raw.lost_procs = counters[CTR_LOST_PROCS] - self._counter_base[CTR_LOST_PROCS]
        raw.lost_events = counters[CTR_LOST_EVENTS] - self._counter_base[CTR_LOST_EVENTS]
        self._counter_base = counters
        raw.processes = sorted(procs.values(), key=lambda p: p["serial"])
        raw.blocks = blocks
        raw.stacks = stacks
        raw.paths = paths
        return raw

    def _collect_blocks(self, procs: dict, raw: RawTest, window_closed: bool) -> tuple[dict, dict]:
        """Drain the live blocks and stacks: the finished processes' blocks per
        stack, the closed in-process window's blocks into raw; the open window's
        entries are put back. Returns (blocks by serial, frames by stack)."""
        agg: dict[int, dict[int, list[int]]] = {}   # serial -> stack -> [bytes, blocks]
        inproc: list[tuple[int, int, int]] = []
        wserial = self._window_serial if window_closed else -1
        open_serial = self._window_serial if self._in_window else -1
        keep = []   # the open window's blocks: put back after the drain
        for serial, size, stack, ext_ip, kv in self._drain(
                self._blocks, lambda k, v: (v.serial, v.size, v.stack, v.ext_ip,
                                            (_copy(k), _copy(v)) if v.serial == open_serial else None)):
            if serial in procs:
                a = agg.setdefault(serial, {}).setdefault(stack, [0, 0])
                a[0] += size
                a[1] += 1
            elif serial == wserial:
                inproc.append((size, stack, ext_ip))
            elif kv is not None:
                keep.append(kv)
        blocks = {serial: [(b, h, n) for h, (b, n) in per.items()] for serial, per in agg.items()}
        del agg
        for k, v in keep:
            self._blocks[self._blocks.Key(k) if isinstance(k, int) else k] = v
        raw.inproc_blocks = inproc
        kept_stacks = {int(v.stack) for _, v in keep if int(v.stack)}
        all_frames: dict[int, list] = {}
        restore = []
        for h, frames, kv in self._drain(
                self._stacks, lambda k, v: (_int(k), self._frames(v),
                                            (_copy(k), _copy(v)) if _int(k) in kept_stacks else None)):
            all_frames[h] = frames
            if kv is not None:
                restore.append(kv)
        for k, v in restore:
            self._stacks[self._stacks.Key(k) if isinstance(k, int) else k] = v
        blocks = self._remap_ip_stacks(blocks, all_frames)
        wanted = {h for bl in blocks.values() for _, h, _ in bl if h} | {h for _, h, _ in inproc if h}
        stacks = {h: all_frames[h] for h in wanted if h in all_frames}
        del all_frames
        return blocks, stacks

    def _remap_ip_stacks(self, blocks, all_frames):
        """Stacks the kernel returned as plain ips (it could not take the mmap
        lock: another thread was mapping memory) are resolved through the
        image's other captures (the BPF program's rawcache): the same ips map
        to the same build-id stack; otherwise each ip is placed in a module
        whose load bias (ip - file offset) the image's other stacks revealed."""
        biases: dict[int, set] = {}      # serial -> {(build_id, bias)}
        same: dict[tuple, int] = {}      # (serial, raw hash) -> build-id stack hash
        for serial, rh, h, ips in self._drain(
                self.bpf[b"rawcache"],
                lambda k, v: (k.serial, k.rawhash, v.h, [v.ip[i] for i in range(min(v.n, self.config.stack_depth))])):
            if serial not in blocks:
                continue
            same[(serial, rh)] = h
            frames = all_frames.get(h) or []
            if len(frames) == len(ips):
                for (st, bid, off), ip in zip(frames, ips):
                    if st == BUILD_ID_VALID:
                        biases.setdefault(serial, set()).add((bid, ip - off))
        out = {}
        for serial, bl in blocks.items():
            per: dict[int, list[int]] = {}
            for nbytes, h, n in bl:
                frames = all_frames.get(h)
                if frames and all(st == BUILD_ID_IP for st, _, _ in frames):
                    h2 = same.get((serial, _fnv_ips([ip for _, _, ip in frames])))
                    if h2 in all_frames:
                        h = h2
                    elif serial in biases:
                        fixed = [_place(ip, biases[serial]) for _, _, ip in frames]
                        h = hash(("remapped", serial, tuple(fixed)))
                        all_frames[h] = fixed
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
        their live counters by serial."""
        running: dict[int, dict] = {}
        for _ in range(3):
            found = False
            for k, v in list(self._tracked.items()):
                if int(v.flags) & TF_ROOT or int(v.test_id) != test_id:
                    continue
                found = True
                running[int(v.serial)] = _counters(v)
                self._delete(self._tracked, k)
            if not found:
                break
        return running

    @staticmethod
    def _delete(table, key) -> None:
        try:
            del table[key]
        except KeyError:
            pass

    def _batch(self, table, conv, *, delete: bool):
        """All entries of `table` through BPF_MAP_LOOKUP(_AND_DELETE)_BATCH in
        fixed chunks (buffers allocated once), each converted by conv(k, v)
        to builtin types before the buffers are reused. A generator: callers
        aggregate as they go, so memory stays proportional to one chunk."""
        import ctypes as ct
        import errno

        bcc = sys.modules["bcc"]
        bufs = self._batch_bufs.get(id(table))
        if bufs is None:
            bufs = ((table.Key * BATCH_CHUNK)(), (table.Leaf * BATCH_CHUNK)())
            self._batch_bufs[id(table)] = bufs
        keys, vals = bufs
        fn = bcc.lib.bpf_lookup_and_delete_batch if delete else bcc.lib.bpf_lookup_batch
        token = ct.c_uint32(0)
        first = True
        while True:
            cnt = ct.c_uint32(BATCH_CHUNK)
            res = fn(table.map_fd, None if first else ct.byref(token), ct.byref(token),
                     ct.byref(keys), ct.byref(vals), ct.byref(cnt))
            err = ct.get_errno()
            for i in range(cnt.value):
                yield conv(keys[i], vals[i])
            if res != 0:
                if err == errno.ENOENT:
                    break
                raise OSError(err, f"BPF map batch operation failed: {os.strerror(err)}")
            first = False

    def _drain(self, table, conv):
        return self._batch(table, conv, delete=True)

    def _discard(self, table) -> None:
        for _ in self._batch(table, lambda k, v: None, delete=True):
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
