"""The Tracer: one loaded BPF program (loading.py) with its allocator probes
(probes.py) and process tracepoints, serving its clients' tests and
in-process windows (the map walks: collection.py).

It serves clients: the pytest process itself (add_root), or, under xdist, every
worker of the controller that loaded it (add_spawner, connect; server.py). A
test's records are taken out selectively, so clients' tests may overlap.

Everything this module returns is made of builtin types; the accounting and
reporting layers never see BCC or ctypes objects.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..preflight import ATTACH_ENV, ATTACH_MODES
from . import exitpause, kernel_offsets, loading, probes as _probes
from .abi import (CTR_LOST_EVENTS, CTR_LOST_PROCS, CTR_PAUSE_EVENTS, EV_EXIT_STOPPED, EV_EXIT_TRACED,
                  EV_EXIT_UNPAUSED, PENDING_AT_EXIT, STOP_REGS, TF_ALLOCS, TF_KINDS, TF_ROOT, TF_SPAWNED, TF_SPAWNER)
from .blocktable import BlockTable
from .collection import COUNTERS, Collector, RawTest, absolute_path, counters_of, decode_event, delete, serial_at
from .execpause import ExecPauses
from .loading import TracerConfig
from .probes import ProbeInfo
from .watchdog import Watchdog

# In-process window serials (process image serials are monotonic ns << SERIAL_CPU_BITS)
WINDOW_SERIAL = 1 << 62


@dataclass(eq=False)
class Client:
    """A pytest process the tracer serves: the session's own, or an xdist
    worker (server.py). Its roots' children are tracked during its tests;
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
    kinds: bool = False                  # the current test wants leak kinds (TF_KINDS)
    window_kinds: dict | None = None     # the closed window's {address: kind}, when it was classified
    window_reason: str | None = None     # why it was not (a scan was asked for)
    pymalloc: bool = False               # its windows probe its interpreter's pymalloc (enable_pymalloc_probes)
    pymalloc_links: list | None = None   # the open window's pymalloc links


def _quietly(fn) -> None:
    with contextlib.suppress(Exception):
        fn()


class Tracer:
    """source: the BPF C source to compile (default: the shipped one)."""

    def __init__(self, config: TracerConfig | None = None, *, libc: str | None = None,
                 source: Path | None = None, window_scans: bool = True):
        from ..bccloader import load_bcc

        self.config = config or TracerConfig()
        bcc = self._bcc = load_bcc()
        self._pidmap_words = (loading.pid_max() + 63) // 64
        t0 = time.monotonic()
        c = self.config
        source = source or loading.bpf_source_path()
        cflags = loading.program_cflags(c, self._pidmap_words) + kernel_offsets.cflags()
        forced = os.environ.get(ATTACH_ENV) or "auto"
        modes = ATTACH_MODES if forced == "auto" else (forced,)
        self.bpf, self.cached = loading.load(bcc, source, [*cflags, *loading.MODE_CFLAGS[modes[0]]])
        self.libc = libc or _probes.find_libc()

        def programs(mode):   # the BPF source compiles one mode's allocator programs
            self.bpf.cleanup()
            self.bpf, self.cached = loading.load(bcc, source, [*cflags, *loading.MODE_CFLAGS[mode]])
            return self.bpf

        attached = _probes.attach_allocators(self.bpf, self.libc, modes, programs)
        self.probes: list[ProbeInfo] = attached.probes
        self.attach_mode = attached.mode
        self.attach_errors: dict[str, str] = attached.errors
        self._links: list[int] = attached.links
        self.exit_probes = _probes.attach_exit_probes(self.bpf, self.libc)
        self.tracepoints = sum(1 for _ in self.bpf.tracepoint_fds)
        self.load_seconds = time.monotonic() - t0
        self._tracked = self.bpf[b"tracked"]
        maps = {name: self.bpf[name.encode()] for name in
                ("tracked", "procs", "blocks", "stacks", "counters", "rawcache", "handoffs")}
        self.block_store = loading.block_store(c)
        self._table = None
        if self.block_store == "table":
            maps["dead"] = self.bpf[b"dead"]
            self._table = BlockTable.from_map(self.bpf[b"slots"], loading.table_geometry(c.max_blocks)[1])
        self._maps = Collector(maps, bcc.lib, stack_depth=c.stack_depth, max_stacks=c.max_stacks, table=self._table)
        self._paths: dict[int, list[str]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._clients: list[Client] = []
        self._local: Client | None = None   # this process's own (add_root)
        self._next_test = 0
        self._next_window = 0
        # every process the session stops (at exec, at exit, at its test's end)
        # is a key of `pending` while stopped; the watchdog continues it at the
        # time limit or when pytest dies
        self._pending = self.bpf[b"pending"]
        self.watchdog = Watchdog(self._pending.map_fd, exitpause.WATCHDOG_SECONDS)
        self.exec_pauses = ExecPauses(self, self.probes, self.watchdog)
        self._stop_regs = self.bpf[b"stop_regs"]
        self._pauser = exitpause.Pauser(self._maps.image_blocks, self.watchdog, self._hold, self._release,
                                        allocator_kind=self._allocator_kind, stop_registers=self._stop_registers)
        # in-process scans: (seconds, root bytes, blocks, {phase: seconds})
        self.window_scans: list[tuple[float, int, int, dict]] = []
        from ..kinds.inprocess import WindowScanner

        # started before any test (a process made during a test would be one of the test's),
        # when in-process windows may be classified (window_scans)
        self._window_scanner = WindowScanner() if window_scans else None
        self._pymalloc_placed: dict[int, tuple[str, list] | str] = {}   # root -> (binary, sites) or why not
        self._reader_stack: tuple[int, int] | None = None
        self.bpf[b"events"].open_ring_buffer(self._on_event)
        self._wake = os.pipe()              # written once, at close: ends the event thread's wait
        self._poller = threading.Thread(target=self._poll_loop, name="memleak-ebpf-events", daemon=True)
        self._poller.start()

    # -- stopped processes ----------------------------------------------------

    def _hold(self, tgid: int) -> bool:
        """List `tgid` in `pending` before userspace stops it; False when the map is full."""
        key = self._pending.Leaf()
        key.dev = PENDING_AT_EXIT
        try:
            self._pending[self._pending.Key(tgid)] = key
        except Exception:   # noqa: BLE001 - the map is full (E2BIG)
            return False
        return True

    def _release(self, tgid: int) -> None:
        try:
            del self._pending[self._pending.Key(tgid)]
        except KeyError:
            pass

    def _stop_registers(self, tgid: int) -> exitpause.StopRegisters | None:
        """Take the BPF program's record of `tgid`'s registers at its stop
        (memleak.h stop_regs_t), or None."""
        from ..kinds.ptrace import USER_REGS

        key = self._stop_regs.Key(tgid)
        try:
            r = self._stop_regs[key]
        except KeyError:
            return None
        try:
            del self._stop_regs[key]
        except KeyError:
            pass
        regs = dict(zip(USER_REGS[:STOP_REGS], r.regs))
        regs["fs_base"] = int(r.fs_base)
        return exitpause.StopRegisters(int(r.serial), int(r.tid), regs)

    # -- the allocator of every exec (execpause.py) --------------------------

    def _allocator_kind(self, serial: int) -> str | None:
        """The allocator kind of a live process image (its exec answer), or None."""
        procs = self.bpf[b"procs"]
        try:
            aid = int(procs[procs.Key(serial)].alloc_id)
        except KeyError:
            aid = 0
        # a first exec (paused there): its answer is userspace's, not in its proc entry
        aid = aid or self.exec_pauses.alloc_id_of(serial)
        answers = self.exec_pauses.answers
        if not 0 < aid <= len(answers):
            return None
        # an allocator not probed: its blocks are not seen, there is nothing to classify
        return answers[aid - 1]["kind"] if answers[aid - 1]["covered"] else "other"

    @property
    def allocators_probed(self) -> dict[str, str]:
        """Every allocator object probed: host path -> kind."""
        return dict(self.exec_pauses.kinds)

    @property
    def probe_count(self) -> int:
        extra = sum(1 + p.return_probe for host, ps in self.exec_pauses.probed.items() if host != self.libc
                    for p in ps)
        return (sum(1 + p.return_probe for p in self.probes) + self.tracepoints + self.exit_probes + extra
                + self.exec_pauses.exit_probes)

    # -- events -----------------------------------------------------------

    def _on_event(self, ctx, data, size) -> None:
        ev_type, tgid, serial, path = decode_event(data)
        if ev_type in (EV_EXIT_STOPPED, EV_EXIT_TRACED, EV_EXIT_UNPAUSED):
            self._pauser.at_exit(tgid, serial, ev_type == EV_EXIT_TRACED, ev_type == EV_EXIT_UNPAUSED)
            return
        if not path:
            return
        if not path.startswith("/"):
            path = absolute_path(tgid, path, ev_type)
        self._paths.setdefault(serial, []).append(path)

    def _poll_loop(self) -> None:
        self._quiet_thread()
        while not self._closed:
            with self._lock:
                if self._closed:
                    return
                # this thread's allocations are never recorded (quiet): it polls
                # during in-process windows too, to scan processes paused at exit
                try:
                    self.bpf.ring_buffer_poll(timeout=0)
                except Exception:
                    pass
            self._wait_events(0.02)

    def _wait_events(self, seconds: float) -> None:
        """Sleep until the ring buffer has records or the tracer closes,
        without the lock: a process paused at exit waits for this thread.
        With no epoll fd to wait on: `seconds` at most. (Never woken for
        nothing: a thread that runs Python code beside a test changes what it
        sees, sys.getrefcount(None) for one.)"""
        import ctypes
        import select

        fd = getattr(self, "_events_fd", None)
        if fd is None:
            lib = self._bcc.lib
            try:
                lib.ring_buffer__epoll_fd.restype = ctypes.c_int
                lib.ring_buffer__epoll_fd.argtypes = [ctypes.c_void_p]
                fd = lib.ring_buffer__epoll_fd(self.bpf._ringbuf_manager)
            except (AttributeError, TypeError):
                fd = -1
            self._events_fd = fd
        if fd < 0:
            time.sleep(seconds)
            return
        try:
            select.select([fd, self._wake[0]], [], [])
        except (OSError, ValueError):
            time.sleep(seconds)

    def _quiet_thread(self) -> None:
        """Tell the BPF program this (event) thread's allocations are never
        recorded: the scans of paused processes run here."""
        q = self.bpf[b"quiet"]
        q[q.Key(0)] = q.Leaf(threading.get_native_id())

    # -- clients: the pytest processes this tracer serves -------------------

    def add_root(self, tgid: int) -> None:
        """Track processes that `tgid` (this pytest process) creates during
        tests. Before the first test only: the pid bitmap's word is written
        here without an atomic operation, safe while no tracked process can
        be forking."""
        if self._next_test:
            raise RuntimeError("add_root() after the first test")
        if self._local is None:
            self._local = Client(roots=[], counter_base=self._maps.read_counters())
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
            c = Client(roots=[tgid], counter_base=self._maps.read_counters(), root_flags=TF_ROOT | TF_SPAWNED,
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
                self._maps.untrack_test(c.test_id)
            for tgid in c.roots:
                delete(self._tracked, self._tracked.Key(tgid))   # its bit stays: a hint only
                delete(self.bpf[b"ext"], self.bpf[b"ext"].Key(tgid))
            if c.ext_pages:
                self._set_ext_keys(c, set())
            self._detach_later(c.pymalloc_links or [])
            c.pymalloc_links = None
            for tgid in c.roots:
                self._pymalloc_placed.pop(tgid, None)

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
        flags = c.root_flags | (TF_ALLOCS if allocs else 0) | (TF_KINDS if test_id and c.kinds else 0)
        self._write_root(tgid, flags, test_id, serial)

    @staticmethod
    def _root_flags(c: Client) -> int:
        """A root's flags outside a window: TF_KINDS while its test wants leak kinds."""
        return c.root_flags | (TF_KINDS if c.test_id and c.kinds else 0)

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

    def _window_serials(self) -> set[int]:
        """In-process windows whose blocks must stay: open, or closed and not
        yet collected."""
        return {o.window_serial for o in self._clients if o.in_window or o.window_counters is not None}

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
                delete(table, table.Key(tgid, 0, page))
            for page in pages - old:
                table[table.Key(tgid, 0, page)] = table.Leaf(1)

    # -- CPython's pymalloc in a root's windows ----------------------------

    def pymalloc_problem(self, tgid: int) -> str | None:
        """Why the pymalloc functions of process `tgid`'s interpreter cannot
        be probed in its windows, or None when they can."""
        if self.attach_mode not in ("session", "multi"):
            return (f"the {self.attach_mode} attach mode cannot probe one process only "
                    f"(uprobe_multi links, Linux 6.6+, can)")
        got = self._pymalloc_placed.get(tgid)
        if got is None:
            try:
                got = _probes.place_pymalloc(tgid)
            except LookupError as exc:
                got = str(exc)
            self._pymalloc_placed[tgid] = got
        return got if isinstance(got, str) else None

    def enable_pymalloc_probes(self, c: Client | None = None) -> str | None:
        """Have the client's windows probe its interpreter's pymalloc
        (probes.PYMALLOC_SITES, in its roots only, attached while a window is
        open): Python objects are then seen without PYTHONMALLOC=malloc.
        Returns None, or why it cannot be done (nothing is enabled then)."""
        c = self._client(c)
        for tgid in c.roots:
            problem = self.pymalloc_problem(tgid)
            if problem is not None:
                return problem
        c.pymalloc = True
        return None

    def _attach_pymalloc(self, c: Client) -> None:
        links: list[int] = []
        try:
            for tgid in c.roots:
                binary, placed = self._pymalloc_placed[tgid]
                links += _probes.attach_pymalloc(self.bpf, self.attach_mode, binary, placed, tgid)
        except (OSError, ValueError) as exc:
            self._detach_later(links)
            raise RuntimeError(f"CPython's pymalloc could not be probed for this test's window ({exc}): "
                               f"Python objects made in it would not be seen") from None
        c.pymalloc_links = links

    def _detach_later(self, links: list[int]) -> None:
        """Close pymalloc links off the test's path: a uprobe's release waits
        for an RCU grace period, which the watchdog process waits out
        (Watchdog.release): no thread of this process runs beside the test."""
        if links:
            self.watchdog.release(links)

    def open_window(self, c: Client | None = None) -> int:
        """Start recording the root's own allocations; returns the window's serial."""
        c = self._client(c)
        with self._lock:
            if c.pymalloc and c.pymalloc_links is None:
                self._attach_pymalloc(c)
            self._next_window += 1
            c.window_serial = WINDOW_SERIAL | self._next_window
            for tgid in c.roots:
                self._set_root(c, tgid, c.test_id, allocs=True, serial=c.window_serial)
            c.in_window = True
        return c.window_serial

    def close_window(self, scan: str | None = None, context: dict | None = None, c: Client | None = None) -> dict:
        """Stop recording the root's allocations; returns its lifetime counters.

        scan ("extensions" or "all"): classify the window's live blocks now
        (kinds/inprocess.py), when one of them could count ("extensions":
        one with an extension's return address on its stack). The root
        process waits meanwhile: `context` is its waiting thread's
        (kinds.inprocess.own_context; taken here for this process's own)."""
        c = self._client(c)
        with self._lock:
            counters = dict.fromkeys(COUNTERS, 0)
            for tgid in c.roots:
                try:
                    for k, n in counters_of(self._tracked[self._tracked.Key(tgid)]).items():
                        counters[k] += n
                except KeyError:
                    pass
                self._set_root_fields(tgid, flags=self._root_flags(c))
            links, c.pymalloc_links = c.pymalloc_links, None
            self._detach_later(links or [])
            c.window_counters = counters
            c.in_window = False
            c.window_kinds = c.window_reason = None
            if scan is not None:
                if context is None and c is self._local:
                    from ..kinds.inprocess import own_context

                    context = own_context()
                c.window_kinds, c.window_reason = self._classify_window(c, scan, context)
            return counters

    def _classify_window(self, c: Client, scan: str, context: dict | None) -> tuple[dict | None, str | None]:
        """({address: kind}, None), or (None, why not) of the closed window's blocks.

        For this process's own window the block map is read, and the scan
        asked for, by a thread of its own: the addresses that pass through a
        thread's registers and stack slots stay there as stale words, and the
        waiting thread's stack is a root; that thread's stack is not."""
        if c is not self._local:
            return self._classify_window_of(c, scan, context, lambda: [])
        # A thread of its own for each scan, joined: once join returns it has
        # run its last bytecode. (A pool's worker goes on running Python code
        # after it hands the result over, beside the next test, which then sees
        # sys.getrefcount(None) move.)
        out: list = []

        def run():
            try:
                out.append(self._classify_own_window(c, scan, context))
            except BaseException as exc:   # noqa: BLE001 - raised again in the caller
                out.append(exc)

        th = threading.Thread(target=run, name="memleak-ebpf-window", daemon=True)
        th.start()
        th.join()
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    def _classify_own_window(self, c: Client, scan: str, context: dict | None):
        from ..kinds.inprocess import own_stack_pointer
        from ..procmaps import read_regions

        sp = own_stack_pointer()
        if self._reader_stack is None or not self._reader_stack[0] <= sp < self._reader_stack[1]:
            self._reader_stack = next(((m.start, m.end) for m in read_regions(os.getpid()) if m.start <= sp < m.end),
                                      (sp, sp))
        # the buffers that hold the block map's keys (made by the first walk:
        # asked for after it), and this thread's stack, are never roots
        return self._classify_window_of(c, scan, context,
                                        lambda: self._maps.scratch_ranges() + [self._reader_stack])

    def _classify_window_of(self, c: Client, scan: str, context: dict | None, excluded):
        blocks = self._maps.window_addresses(c.window_serial)
        exclude = excluded()
        if not any(scan == "all" or ext for _, _, _, ext in blocks):
            from ..kinds.inprocess import NOTHING_TO_CLASSIFY

            return None, NOTHING_TO_CLASSIFY
        kinds: dict[int, str] = {}
        reasons = []
        for tgid in c.roots:
            mine = [(a, s) for t, a, s, _ in blocks if t == tgid]
            if not mine:
                continue
            if self._window_scanner is None:
                from ..kinds.inprocess import KINDS_OFF

                return None, KINDS_OFF
            out = self._window_scanner.scan(tgid, mine, context, exclude, pymalloc=c.pymalloc)
            if out.kinds is None:
                reasons.append(out.reason)
            else:
                kinds.update(out.kinds)
            self.window_scans.append((out.seconds, out.root_bytes, len(mine), out.phases))
        if reasons:
            return None, reasons[0]
        return kinds, None

    def window_snapshot(self, c: Client | None = None) -> list[tuple[int, int, int]]:
        """The current window's live root blocks, without removing them.
        Recording pauses while the maps are read (reading allocates)."""
        c = self._client(c)
        with self._lock:
            for tgid in c.roots:
                self._set_root_fields(tgid, flags=self._root_flags(c))
            try:
                out = self._maps.window_blocks(c.window_serial)
            finally:
                for tgid in c.roots:
                    self._set_root_fields(tgid, flags=self._root_flags(c) | TF_ALLOCS)
        return out

    def collect_window(self, c: Client | None = None) -> tuple[list[tuple[int, int, int]], dict | None, dict,
                                                               tuple[dict | None, str | None]]:
        """After close_window() outside a test: the closed window's live blocks,
        counters, their stacks and (its blocks per kind or None, why not
        classified) — used when the window spanned a whole test."""
        c = self._client(c)
        with self._lock:
            got = self._maps.collect_window(c.window_serial, windows=self._window_serials(),
                                            single_client=len(self._clients) <= 1, window_kinds=c.window_kinds)
            inproc, stacks = got[:2]
            kinds = (got[2] if len(got) > 2 else None, c.window_reason)
            counters, c.window_counters = c.window_counters, None
            c.window_kinds = c.window_reason = None
        return inproc, counters, stacks, kinds

    # -- per test -------------------------------------------------------

    def begin_test(self, kinds: bool = False, c: Client | None = None) -> int:
        """kinds: classify the blocks of the test's processes (pause them at exit)."""
        c = self._client(c)
        with self._lock:
            self._next_test += 1
            c.test_id = self._next_test
            c.kinds = kinds
            for tgid in c.roots:
                self._set_root(c, tgid, c.test_id)
        return c.test_id

    def running(self, test_id: int | None, c: Client | None = None) -> int:
        """How many processes of the test are still alive."""
        if not test_id:
            return 0
        with self._lock:
            return self._maps.running(test_id)

    def end_test(self, test_id: int, c: Client | None = None) -> RawTest:
        """Stop attributing new processes to the test and collect its records.

        Processes of the test still running are reported as running and
        stop being tracked, so they never reach another test's figures.
        Other clients' records (xdist workers sharing this tracer) stay.
        """
        c = self._client(c)
        raw = RawTest()
        self.exec_pauses.wait_answered(self._maps.read_counters()[CTR_PAUSE_EVENTS])
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
            if c.kinds:
                self._pauser.scan_running(self._maps.running_images(test_id))
            active = {o.test_id for o in self._clients if o.test_id}
            raw.inproc_counters, c.window_counters = c.window_counters, None
            window_closed = raw.inproc_counters is not None
            rec = self._maps.collect_test(
                test_id, active=active, window_serial=c.window_serial if window_closed else -1,
                window_allocs=window_closed and raw.inproc_counters.get("alloc_blocks", 0) > 0,
                windows=self._window_serials(), single_client=len(self._clients) <= 1,
                block_kinds=self._block_kinds if c.kinds else None,
                window_kinds=c.window_kinds if window_closed else None)
            procs = rec.processes
            outcomes = self._pauser.take(procs)
            raw.kinds = rec.kinds
            raw.unclassified = {s: o.reason for s, o in outcomes.items() if o.kinds is None}
            raw.scanned = {s for s, o in outcomes.items() if o.kinds is not None}
            self._pauser.forget_older(serial_at(rec.t0 - 600 * 10**9))
            raw.inproc_blocks = rec.inproc_blocks
            if window_closed:
                raw.inproc_kinds = rec.inproc_kinds if c.window_kinds is not None else None
                raw.inproc_reason = c.window_reason
                c.window_kinds = c.window_reason = None
            paths = {s: self._paths.pop(s) for s in list(self._paths) if s in procs}
            # paths of images nothing will report (exec'd away, ended with their test)
            t0_serial = serial_at(rec.t0)
            self._paths = {s: p for s, p in self._paths.items() if s in rec.live or s >= t0_serial}
            for p in procs.values():
                p["allocator"] = self.exec_pauses.answer_of(p)
            self.exec_pauses.prune(lambda s: s in rec.live or s >= t0_serial)
            counters = self._maps.read_counters()
            raw.lost_procs = counters[CTR_LOST_PROCS] - c.counter_base[CTR_LOST_PROCS]
            raw.lost_events = counters[CTR_LOST_EVENTS] - c.counter_base[CTR_LOST_EVENTS]
            c.counter_base = counters
        raw.processes = sorted(procs.values(), key=lambda p: p["serial"])
        raw.blocks = rec.blocks
        raw.stacks = rec.stacks
        raw.paths = paths
        return raw

    def _block_kinds(self, serials) -> dict[int, dict[int, str]]:
        """Per-block kinds of the images among `serials` that were scanned."""
        return {s: o.kinds for s in serials if (o := self._pauser.outcomes.get(s)) is not None
                and o.kinds is not None}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _quietly(lambda: os.write(self._wake[1], b"x"))
        self._links += self.exec_pauses.close()
        for c in self._clients:
            self._links += c.pymalloc_links or []
            c.pymalloc_links = None
        _quietly(self.watchdog.close)
        if self._window_scanner is not None:
            _quietly(self._window_scanner.close)
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
            if self._table is not None:
                _quietly(self._table.close)   # the mapping holds the map's memory
        self._poller.join(timeout=2)          # woken by the pipe; it takes the lock to see _closed
        with self._lock:
            for fd in self._wake:
                _quietly(lambda fd=fd: os.close(fd))
            try:
                self.bpf.cleanup()
            except Exception:
                pass
