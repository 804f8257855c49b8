"""Leak kinds for the pytest process itself: the blocks an in-process window
(a test's C-extension calls) left live, classified at the window's close
against the rest of the process's memory.

The process is not stopped: it waits for the answer (its thread that closed
the window blocks on it; with xdist the worker waits on the controller's
socket), so its memory holds still while it is read.  The scan never runs in
the process it reads: whatever reads the block map and classifies keeps
copies of block addresses in its own memory (batch buffers, numpy
temporaries, allocator caches), and those copies would be roots pointing at
every candidate.  A helper process (:class:`WindowScanner`, started with the
tracer, before any test) reads it with ``process_vm_readv`` instead; the
requests carry addresses as decimal text, never as raw 8-byte words.  In the
pytest process itself the block map is read, and the request sent, by a
thread of the tracer's whose stack is left out of the roots (the addresses
that pass through a thread's registers stay in its stack as stale words),
while the thread that closed the window waits.

Roots, as :mod:`.roots` takes them for a launched process (its functions are
reused), with three differences because the process is running, not paused:

* glibc's heaps are not skipped whole: every **live** chunk that is not a
  candidate is a root (the process's older blocks are not in the block map,
  and they hold its caches: interned strings, type caches, module dicts,
  free lists).  A chunk is live unless it is the top chunk or lies in a bin,
  a fastbin or a thread's tcache (glibc's own lists, walked in the snapshot);
  so a stale pointer in freed memory never makes a block reachable.  Chunks
  served by mmap are live (their mappings are roots) unless they are
  candidates;
* the thread that closed the window gives its registers and stack pointer
  itself (:func:`own_context`, ``getcontext``, just before it asks): its
  stack is scanned from 128 bytes below that stack pointer up, and its
  registers are roots;
* CPython's own frame stack beyond the waiting thread's innermost frame
  (:func:`_dead_datastack`): the dead frames of the test's deeper calls;
* the registers of the process's other threads cannot be read without
  stopping it (ptrace): their whole stack mappings are scanned, below the
  stack pointer too, and their registers are not roots.

Everything is read once, in one pass, into one snapshot (numpy); the heap's
lists are followed in the snapshot, and the classification
(:func:`.classify.classify`: start and interior pointers, memcheck's
heuristics, the clique pass) is vectorised over its words.

Diagnosis, in the helper's environment: PYTEST_MEMLEAK_EBPF_SCAN_PROFILE=PATH
writes a cProfile of each scan to PATH.N; PYTEST_MEMLEAK_EBPF_SCAN_ROOTS=FILE
appends, per scan, where the pointers to each block that is not lost lie.
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import json
import os
import select
import subprocess
import sys
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from . import heap as glibc_heap
from . import pymalloc as pymalloc_heap
from .classify import KIND_NAMES, classify
from .memory import _IOV_MAX, ProcessMemory, _IOVec, _process_vm_readv
from .roots import RED_ZONE, VtableCheck, _block_segments, _is_device, root_ranges, subtract
from ..procmaps import Region, read_regions

Range = Tuple[int, int]

#: glibc's getcontext(): ``ucontext_t`` (x86-64): uc_flags, uc_link, uc_stack
#: (24 bytes), then ``mcontext_t.gregs[23]`` in the order of <sys/ucontext.h>.
_GREGS_OFFSET = 40
_GREGS = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp", "rbx", "rdx", "rax",
          "rcx", "rsp", "rip")
_UCONTEXT_BYTES = 2048          # > sizeof(ucontext_t) (968 with glibc 2.36)
_MAX_FREE_CHAIN = 1 << 22       # bound on any one free list followed (a corrupt heap)
_PR_SET_PTRACER = 0x59616d61

_libc = ctypes.CDLL(None, use_errno=True)


def _own_registers() -> Dict[str, int]:
    """The calling thread's general-purpose registers (glibc ``getcontext``)."""
    buf = ctypes.create_string_buffer(_UCONTEXT_BYTES)
    if _libc.getcontext(buf) != 0:
        raise OSError(ctypes.get_errno(), "getcontext failed")
    # element by element: no bytes or array copy of the raw words is left behind
    gregs = (ctypes.c_uint64 * len(_GREGS)).from_buffer(buf, _GREGS_OFFSET)
    regs = [gregs[i] for i in range(len(_GREGS))]
    del gregs
    ctypes.memset(buf, 0, _UCONTEXT_BYTES)
    return dict(zip(_GREGS, regs))


def own_stack_pointer() -> int:
    """The calling thread's stack pointer (no /proc read)."""
    return _own_registers()["rsp"]


def own_context() -> dict:
    """The calling thread's id, stack pointer and general-purpose registers
    (glibc ``getcontext``): what a scan of this process needs from the thread
    that waits for it.  Values are plain ints."""
    named = _own_registers()
    return {"tid": threading.get_native_id(), "sp": named["rsp"],
            "registers": [named[r] for r in _GREGS if r != "rip"], "dead": _dead_datastack(sys._getframe())}


# CPython 3.11: PyFrameObject.f_frame, and in _PyInterpreterFrame f_code,
# frame_obj and where localsplus starts
_F_FRAME, _IF_CODE, _IF_FRAME_OBJ, _IF_LOCALSPLUS = 24, 32, 40, 72


def _dead_datastack(frame) -> list:
    """CPython keeps its frames on a data stack of its own (chunks it
    mmaps); what lies beyond the innermost frame (this one) are the dead
    frames of earlier, deeper calls — the test's own — whose slots still hold
    the objects they used: as for a C stack below its stack pointer, never
    roots.  Returns [(lo, hi)]: from the end of `frame` to the end of its
    chunk (whose header, {previous, size, top}, starts a page at or below
    it), or [] when this is not a CPython 3.11 frame laid out as expected."""
    if sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 11):
        return []
    try:
        iframe = ctypes.c_void_p.from_address(id(frame) + _F_FRAME).value
        if not iframe or ctypes.c_void_p.from_address(iframe + _IF_CODE).value != id(frame.f_code) \
                or ctypes.c_void_p.from_address(iframe + _IF_FRAME_OBJ).value != id(frame):
            return []
        code = frame.f_code
        slots = len(code.co_varnames) + len(code.co_cellvars) + len(code.co_freevars) + code.co_stacksize
        end = (iframe + _IF_LOCALSPLUS + 8 * slots + 7) & ~7
        region = next((m for m in read_regions(os.getpid()) if m.start <= iframe < m.end), None)
        if region is None:
            return []
        a = iframe & ~4095
        while a >= region.start:
            size = ctypes.c_uint64.from_address(a + 8).value     # _PyStackChunk.size
            if size and size % 4096 == 0 and a + size > iframe and a + size <= region.end:
                return [(end, a + size)] if a + size > end else []
            a -= 4096
    except (ValueError, OSError):
        pass
    return []


# --- one snapshot of the process's writable memory -------------------------------

class Snapshot:
    """Every readable+writable mapping of a process (devices except
    /dev/zero and /dev/shm left out), read in one pass into one array of
    words.  ``read(addr, n)`` answers from it (heap.py's ReadFn); a range
    the kernel would not give (a mapping that went away) reads as zeros."""

    def __init__(self, regions: Sequence[Range]):
        """Zeroed words for `regions` [(lo, hi)] (8-aligned, sorted, disjoint)."""
        self.lo = np.array([a for a, _ in regions], dtype=np.uint64)
        self.hi = np.array([b for _, b in regions], dtype=np.uint64)
        self.off = np.zeros(len(regions) + 1, dtype=np.int64)   # byte offsets into self.bytes
        if regions:
            self.off[1:] = np.cumsum([b - a for a, b in regions])
        self.words = np.zeros(int(self.off[-1]) // 8, dtype=np.uint64)
        self.bytes = self.words.view(np.uint8)
        self.unread = 0
        self.pid = 0
        # plain lists for the lookups done one word at a time (free lists)
        self._lo, self._hi, self._off = self.lo.tolist(), self.hi.tolist(), self.off.tolist()
        self._mv = memoryview(self.words) if self.words.size else None   # ints at once, no numpy scalars

    @classmethod
    def of_process(cls, pid: int, maps: Sequence[Region]) -> "Snapshot":
        """The process's writable memory, read now."""
        regions = [(m.start, m.end) for m in maps if m.readable and m.writable and not _is_device(m)]
        snap = cls(regions)
        snap.pid = pid
        snap._read_all(regions)
        return snap

    @classmethod
    def of_data(cls, pieces: Sequence[Tuple[int, bytes]]) -> "Snapshot":
        """A snapshot made of given contents [(address, bytes)] (tests)."""
        pieces = sorted(pieces)
        snap = cls([(a, a + len(d)) for a, d in pieces])
        for i, (_, d) in enumerate(pieces):
            snap.bytes[int(snap.off[i]):int(snap.off[i]) + len(d)] = np.frombuffer(d, dtype=np.uint8)
        return snap

    def _read_all(self, regions: List[Range]) -> None:
        base = self.words.ctypes.data
        todo = list(range(len(regions)))
        while todo:
            part = todo[:_IOV_MAX]
            local = (_IOVec * len(part))()
            remote = (_IOVec * len(part))()
            for j, i in enumerate(part):
                lo, hi = regions[i]
                local[j].iov_base = base + int(self.off[i])
                local[j].iov_len = remote[j].iov_len = hi - lo
                remote[j].iov_base = lo
            got = _process_vm_readv(self.pid, local, len(part), remote, len(part), 0)
            if got < 0:
                err = ctypes.get_errno()
                if err == 3:   # ESRCH
                    raise ProcessLookupError(f"pid {self.pid} is gone")
                got = 0
            # the kernel stops at the first range it could not read wholly
            done = 0
            for i in part:
                n = regions[i][1] - regions[i][0]
                if got >= n:
                    got -= n
                    done += 1
                    continue
                self.unread += n - got      # the rest of this one reads as zeros
                done += 1
                break
            todo = todo[done:]

    def _find(self, addr: int) -> int:
        i = bisect.bisect_right(self._lo, addr) - 1
        return i if i >= 0 and addr < self._hi[i] else -1

    def read(self, addr: int, n: int) -> bytes:
        i = self._find(addr)
        if i < 0 or n <= 0:
            return b""
        n = min(n, self._hi[i] - addr)
        at = self._off[i] + addr - self._lo[i]
        return self.bytes[at:at + n].tobytes()

    def word(self, addr: int) -> Optional[int]:
        i = self._find(addr)
        if i < 0 or addr + 8 > self._hi[i] or addr % 8:
            return None
        return self._mv[(self._off[i] + addr - self._lo[i]) >> 3]

    def view(self, lo: int, hi: int) -> np.ndarray:
        """The words of [lo, hi) (8-aligned, inside one mapping): a view."""
        i = self._find(lo)
        if i < 0 or hi > self._hi[i]:
            return np.zeros(0, dtype=np.uint64)
        at = (self._off[i] + lo - self._lo[i]) // 8
        return self.words[at:at + (hi - lo) // 8]

    @property
    def nbytes(self) -> int:
        return int(self.off[-1])


# --- glibc's free memory, from its own lists --------------------------------------

class _ChunkSizes:
    """heap._tcache_entries' ``chunk_sizes``: a chunk's size from its header
    in the snapshot (not from a walk of every chunk)."""

    def __init__(self, snap: Snapshot, heaps: List[Range]):
        self.snap = snap
        self.heaps = sorted(heaps)
        self._lo = [lo for lo, _ in self.heaps]

    def get(self, chunk: int, default=None):
        """Its size, when its header is readable and the chunk fits in its heap."""
        i = bisect.bisect_right(self._lo, chunk) - 1
        if i < 0 or chunk >= self.heaps[i][1]:
            return default
        end = self.heaps[i][1]
        w = self.snap.word(chunk + 8)
        if w is None:
            return default
        size = w & ~glibc_heap.SIZE_BITS
        return size if chunk + size <= end else default


def free_chunks(snap: Snapshot, arenas: Sequence[glibc_heap.Arena]) -> Tuple[List[Range], List[int]]:
    """glibc's free memory in the arenas' heaps: each arena's top chunk and
    the chunks of its bins (unsorted, small, large) and fastbins, and the
    chunks of every thread's tcache (a tcache_perthread_struct is found by
    its shape: a 0x290 chunk whose non-empty entries chain through chunks of
    their bin's size, as many as its count says).  Returns the free ranges
    (each chunk from its size word to its end: the word before it is the
    previous chunk's) and the tcache structs' user addresses."""
    heaps = [h for ar in arenas for h in ar.heaps]
    sizes = _ChunkSizes(snap, heaps)
    out: List[Range] = []

    def add(chunk: int) -> bool:
        size = sizes.get(chunk)
        if not size or size < glibc_heap.MINSIZE:
            return False
        out.append((chunk + 8, chunk + size))
        return True

    for ar in arenas:
        if ar.top:
            add(ar.top)
        for k in range(glibc_heap.NBINS_WORDS // 2):
            head = ar.address + glibc_heap.OFF_TOP + 16 * k
            c = snap.word(head + 16)
            n = 0
            while c and c != head and n < _MAX_FREE_CHAIN and add(c):
                c = snap.word(c + 16)
                n += 1
        for i in range(glibc_heap.NFASTBINS):
            c = snap.word(ar.address + glibc_heap.OFF_FASTBINS + 8 * i)
            n = 0
            while c and n < _MAX_FREE_CHAIN and add(c):
                nxt = snap.word(c + 16)
                if nxt is None:
                    break
                c = ((c + 16) >> 12) ^ nxt
                n += 1
    tcaches = []
    want = np.uint64(glibc_heap.TCACHE_CHUNK | glibc_heap.PREV_INUSE)
    for lo, hi in heaps:
        w = snap.view(lo, hi)
        hits = np.nonzero((w & ~np.uint64(glibc_heap.NON_MAIN_ARENA)) == want)[0]
        for i in hits.tolist():
            chunk = lo + 8 * i - 8
            if chunk % 16:
                continue
            ent = glibc_heap._tcache_entries(snap.read, chunk + 16, sizes)
            if not ent:     # not one, or one with nothing in it: frees nothing
                continue
            tcaches.append(chunk + 16)
            for e in ent:
                add(e)
    return out, tcaches


def near_blocks(arrays: Sequence[np.ndarray], starts: np.ndarray, sizes: np.ndarray,
                clusters: int = 8) -> np.ndarray:
    """The words of ``arrays`` that fall inside one of a few address ranges
    covering every block (the blocks split at their ``clusters - 1`` widest
    gaps): the only words that can point at a block.  Blocks in ``[heap]``
    and others served by mmap lie terabytes apart; one range over them all
    would let every pointer of the process through to the exact look-up."""
    if starts.size == 0:
        return np.zeros(0, dtype=np.uint64)
    order = np.argsort(starts)
    lo = starts[order]
    hi = lo + np.maximum(sizes[order], np.uint64(1))
    reach = np.maximum.accumulate(hi)
    gaps = lo[1:].astype(np.float64) - reach[:-1].astype(np.float64)
    widest = np.argsort(gaps)[::-1][:clusters - 1]
    cut = np.sort(widest[gaps[widest] > 0])
    first = np.concatenate(([0], cut + 1)).astype(np.int64)
    last = np.concatenate((cut, [lo.size - 1])).astype(np.int64)
    ranges = list(zip(lo[first].tolist(), reach[last].tolist()))
    out = []
    for w in arrays:
        if w.size == 0:
            continue
        keep = np.zeros(w.size, dtype=bool)
        for a, b in ranges:
            keep |= (w >= np.uint64(a)) & (w < np.uint64(b))
        out.append(w[keep])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint64)


def live_words(words: np.ndarray, base: int, holes: Sequence[Range]) -> np.ndarray:
    """The words of ``words`` (at ``base``) outside every hole (half-open
    byte ranges; a word partly inside one is out), in order: the holes
    merged, the words between them joined in one copy."""
    n = words.size
    if not holes or n == 0:
        return words
    end = base + 8 * n
    keep = []
    at = 0                                  # first word index not yet decided
    for lo, hi in sorted((max(a, base), min(b, end)) for a, b in holes if a < end and b > base):
        wlo, whi = (lo - base) // 8, (hi - base + 7) // 8
        if wlo > at:
            keep.append(words[at:wlo])
        at = max(at, whi)
    if at < n:
        keep.append(words[at:])
    return np.concatenate(keep) if keep else words[:0]


def find_main_arena(maps: Sequence[Region], snap: Snapshot) -> Optional[int]:
    """``main_arena`` of a running process.  heap.find_main_arena knows it
    by its empty bins, but a long-running process (pytest after many tests)
    may have most of its bins in use; its ``top`` is a surer sign: the word
    that points at the top chunk of ``[heap]``, whose size reaches exactly to
    the mapping's end, with a non-null ``next`` after it.  Without a
    ``[heap]``: heap.find_main_arena."""
    heap_map = next((m for m in maps if m.path == "[heap]"), None)
    if heap_map is not None:
        for lo, hi in glibc_heap._libc_data_ranges(maps):
            w = snap.view(lo, hi)
            hits = np.nonzero((w >= np.uint64(heap_map.start)) & (w < np.uint64(heap_map.end)))[0]
            for i in hits.tolist():
                top, arena = int(w[i]), lo + 8 * i - glibc_heap.OFF_TOP
                size = snap.word(top + 8)
                nxt = snap.word(arena + glibc_heap.OFF_NEXT)
                if size is not None and top + (size & ~glibc_heap.SIZE_BITS) == heap_map.end \
                        and nxt and nxt % 8 == 0 and snap.word(arena) is not None:
                    return arena
    return glibc_heap.find_main_arena(maps, snap.read)


# --- the scan ---------------------------------------------------------------------

def wait_blocked(pid: int, tid: int, seconds: float = 2.0) -> Optional[int]:
    """Wait until thread `tid` of `pid` sleeps in a system call: the thread
    that asked for the scan sends its request and then blocks reading the
    answer, and what it runs in between (with PYTHONMALLOC=malloc, every
    object it makes is a malloc) must not overlap the read.  Returns its
    stack pointer there (/proc/PID/task/TID/syscall), or None when the
    kernel does not say; TimeoutError when it never blocks."""
    deadline = time.monotonic() + seconds
    path = f"/proc/{pid}/task/{tid}"
    while True:
        try:
            with open(f"{path}/syscall") as f:
                sc = f.read().split()
            with open(f"{path}/stat") as f:
                st = f.read()
        except FileNotFoundError:
            raise ProcessLookupError(f"thread {tid} of pid {pid} is gone") from None
        state = st[st.rindex(")") + 2]
        if sc and sc[0].lstrip("-").isdigit() and int(sc[0]) >= 0 and state in ("S", "D"):
            return int(sc[-2], 16) if len(sc) >= 3 else None
        if time.monotonic() >= deadline:
            raise TimeoutError(f"thread {tid} of pid {pid} did not wait for the scan")
        time.sleep(0.0002)


@dataclasses.dataclass
class WindowScan:
    kinds: np.ndarray           # int8 per block (input order): classify.DEFINITE ... REACHABLE
    seconds: float
    root_bytes: int             # bytes of root memory scanned (live heap included)
    live_heap_bytes: int        # of which live heap chunks that are not candidates
    snapshot_bytes: int
    tcaches: int
    phases: dict = dataclasses.field(default_factory=dict)   # seconds: wait, read, classify


def _inside(addrs: np.ndarray, ranges: List[Range]) -> np.ndarray:
    if not ranges or addrs.size == 0:
        return np.zeros(addrs.size, dtype=bool)
    r = sorted(ranges)
    lo = np.array([a for a, _ in r], dtype=np.uint64)
    hi = np.array([b for _, b in r], dtype=np.uint64)
    i = np.searchsorted(lo, addrs, side="right").astype(np.int64) - 1
    ok = i >= 0
    i = np.where(ok, i, 0)
    return ok & (addrs < hi[i])


def scan_window(pid: int, starts, sizes, *, context: Optional[dict] = None,
                exclude: Iterable[Range] = (), pymalloc: bool = False) -> WindowScan:
    """Classify the blocks ``starts``/``sizes`` of the running process
    ``pid``, which must hold still meanwhile (it waits for the answer).
    ``context``: :func:`own_context` of its waiting thread (its stack is
    scanned from its stack pointer up, its registers are roots); other
    threads' stacks are scanned whole.  ``exclude``: ranges of its memory
    that are never roots (a recorder's own buffers).  ``pymalloc``: the
    process serves Python objects from pymalloc, whose free blocks are told
    from its live ones by a walk of its arenas (kinds/pymalloc.py);
    LookupError / ValueError when they cannot be."""
    t0 = time.monotonic()
    starts = np.asarray(starts, dtype=np.uint64).reshape(-1)
    sizes = np.asarray(sizes, dtype=np.uint64).reshape(-1)
    if context:
        # Its stack from getcontext's stack pointer up, not from where it sleeps:
        # what it ran since (sending the request, waiting) holds none of the
        # window's blocks, and the unwritten slots of those frames hold stale
        # words of the deeper calls the test made (memcheck would call them
        # undefined: never pointers).
        wait_blocked(pid, int(context["tid"]))
    t1 = time.monotonic()
    maps = read_regions(pid)
    layout = pymalloc_heap.locate(maps, os.path.realpath(f"/proc/{pid}/exe")) if pymalloc else None
    snap = Snapshot.of_process(pid, maps)
    pyheap = pymalloc_heap.walk(snap, layout) if layout is not None else None
    t2 = time.monotonic()
    with ProcessMemory(pid) as mem:   # vtables live in read-only file mappings
        result, stats = classify_image(maps, snap, starts, sizes, context=context, exclude=exclude, pyheap=pyheap,
                                       is_vtable=VtableCheck(maps, mem.read),
                                       alive=lambda tid: os.path.exists(f"/proc/{pid}/task/{tid}"))
    t3 = time.monotonic()
    return WindowScan(kinds=result.kinds, seconds=t3 - t0, snapshot_bytes=snap.nbytes,
                      phases={"wait": round(t1 - t0, 4), "read": round(t2 - t1, 4), "classify": round(t3 - t2, 4)},
                      **stats)


def _explain(path, maps, roots, *, heap_roots, result, registers) -> None:
    """Append, for every block that is not lost, the places in the root
    memory holding a start pointer to it (mapping or heap), as a JSON line."""
    from .classify import REACHABLE, POSSIBLE

    keep = np.nonzero((result.kinds == REACHABLE) | (result.kinds == POSSIBLE))[0]
    out = []
    for b in keep.tolist():
        st = int(result.starts[b])
        hits = []
        for lo, w in roots:
            if lo == 0 or w.size == 0:
                continue
            idx = np.nonzero((w >= np.uint64(st)) & (w < np.uint64(st + max(int(result.sizes[b]), 1))))[0][:4]
            heap = any(lo == h for h, _ in heap_roots)   # its live words are joined: no address
            for i in idx.tolist():
                where = "live heap chunk" if heap else next(
                    (f"{m.path or 'anon'} {m.perms} {m.start:#x}" for m in maps if m.start <= lo + 8 * i < m.end), "?")
                hits.append([-1 if heap else lo + 8 * i, where, int(w[i]) - st])
        out.append({"start": st, "size": int(result.sizes[b]), "kind": int(result.kinds[b]), "hits": hits[:8],
                    "register": st in registers})
    with open(path, "a") as f:
        f.write(json.dumps(out) + "\n")


def classify_image(maps: Sequence[Region], snap: Snapshot, starts, sizes, *, context: Optional[dict] = None,
                   exclude: Iterable[Range] = (), is_vtable=None, alive=lambda tid: True,
                   pyheap: Optional[pymalloc_heap.Heap] = None):
    """The classification of the blocks ``starts``/``sizes`` in the image
    ``snap`` of a process whose mappings are ``maps`` (pure: no I/O; see the
    module docstring for the roots).  ``pyheap``: its pymalloc arenas
    (pymalloc.walk), whose live blocks that are not candidates are roots and
    whose other memory is not.  Returns (classify.Classification,
    {"root_bytes", "live_heap_bytes", "tcaches"})."""
    starts = np.asarray(starts, dtype=np.uint64).reshape(-1)
    sizes = np.asarray(sizes, dtype=np.uint64).reshape(-1)
    main_arena = find_main_arena(maps, snap)
    if main_arena is None:
        raise LookupError("glibc's main_arena was not found in libc's data")
    arenas = glibc_heap.arenas(maps, snap.read, main_arena)
    heaps = sorted(h for ar in arenas for h in ar.heaps)
    free, tcaches = free_chunks(snap, arenas)
    exclude = list(exclude)

    # candidates: inside an arena's heap (their chunk's user memory is no
    # root), or served by mmap (their mapping is no root)
    in_heap = _inside(starts, heaps)
    in_arena = _inside(starts, pyheap.arenas if pyheap is not None else [])
    cand_chunks: List[Range] = []
    cand_blocks: List[Range] = []     # in pymalloc's arenas: the whole block (its size class)
    mmapped: List[Range] = []
    chunk_sizes = _ChunkSizes(snap, heaps)
    for s, size, ih, ia in zip(starts.tolist(), sizes.tolist(), in_heap.tolist(), in_arena.tolist()):
        if ia:
            cand_blocks.append((s, s + max(-(-size // pymalloc_heap.ALIGNMENT) * pymalloc_heap.ALIGNMENT,
                                           pymalloc_heap.ALIGNMENT)))
            continue
        hdr = snap.word(s - 8)
        if ih:
            csize = chunk_sizes.get(s - 16) or 0     # 0: not a sane header (then the request only)
            cand_chunks.append((s, s + max(csize - 8, size)))
        elif hdr is not None and hdr & glibc_heap.IS_MMAPPED:
            ext = glibc_heap.mmapped_extent(snap.read, s)
            if ext:
                mmapped.append(ext)
        else:
            cand_chunks.append((s, s + size))

    # roots: the mappings as for a launched process (allocator memory out) ...
    dead = [tuple(r) for r in context.get("dead", ())] if context else []
    py_arenas = pyheap.arenas if pyheap is not None else []
    holes = exclude + dead + glibc_heap.allocator_ranges(maps, snap.read, main_arena) + mmapped + py_arenas
    sps = [int(context["sp"])] if context and alive(context.get("tid")) else []
    mapped_roots = root_ranges(maps, sps, holes)
    # ... plus the live chunks of the heaps that are not candidates
    holes_in_heap = free + cand_chunks + exclude
    roots = [(lo, snap.view(lo, hi)) for lo, hi in mapped_roots]
    live_heap = 0
    for lo, hi in heaps:
        words = live_words(snap.view(lo, hi), lo, holes_in_heap)
        live_heap += 8 * words.size
        roots.append((lo, words))
    # ... and the live blocks of pymalloc's arenas that are not candidates
    if pyheap is not None:
        for lo, words in pyheap.root_words(snap, cand_blocks + exclude):
            live_heap += 8 * words.size
            roots.append((lo, words))

    order = np.argsort(starts, kind="stable")
    segs = _block_segments(starts[order], sizes[order], maps, gap=256)
    contents = [(lo, snap.view(lo, hi)) for lo, hi in segs]
    registers = [int(r) for r in context.get("registers", ())] if context else []
    root_list = roots
    roots = [(0, near_blocks([w for _, w in roots], starts, sizes))]
    result = classify(starts, sizes, roots, contents, registers=registers, is_vtable=is_vtable,
                      hazard_offsets=glibc_heap.hazard_offsets(sizes))
    why = os.environ.get("PYTEST_MEMLEAK_EBPF_SCAN_ROOTS")   # a path: where start pointers were found (diagnosis)
    if why:
        _explain(why, maps, root_list, heap_roots=heaps + py_arenas, result=result, registers=registers)
    return result, {"root_bytes": sum(hi - lo for lo, hi in mapped_roots) + live_heap,
                    "live_heap_bytes": live_heap, "tcaches": len(tcaches)}


# --- the helper process -------------------------------------------------------------

def serve(rfile=None, wfile=None) -> None:
    """The helper's loop: one JSON request a line, one JSON answer a line.
    Request: {"pid", "blocks": [[address, size], ...], "context", "exclude", "pymalloc"};
    answer: {"kinds": "0312..." (one digit a block, classify's codes),
    "seconds", "root_bytes", "live_heap_bytes", "snapshot_bytes"} or
    {"error": text}."""
    rfile = rfile or sys.stdin.buffer
    wfile = wfile or sys.stdout.buffer
    # warm up (numpy's first calls) while pytest starts, not at the first window
    classify(np.array([16], dtype=np.uint64), np.array([8], dtype=np.uint64), [(0, np.zeros(4, np.uint64))],
             [(16, np.zeros(1, np.uint64))])
    profile = os.environ.get("PYTEST_MEMLEAK_EBPF_SCAN_PROFILE")   # a path: cProfile each scan (diagnosis)
    for n, line in enumerate(rfile):
        try:
            req = json.loads(line)
            blocks = req["blocks"]
            args = (int(req["pid"]), [a for a, _ in blocks], [s for _, s in blocks])
            kw = {"context": req.get("context"), "exclude": [tuple(r) for r in req.get("exclude", ())],
                  "pymalloc": bool(req.get("pymalloc"))}
            if profile:
                import cProfile

                prof = cProfile.Profile()
                scan = prof.runcall(scan_window, *args, **kw)
                prof.dump_stats(f"{profile}.{n}")
            else:
                scan = scan_window(*args, **kw)
            answer = {"kinds": "".join(map(str, scan.kinds.tolist())), "seconds": scan.seconds,
                      "root_bytes": scan.root_bytes, "live_heap_bytes": scan.live_heap_bytes,
                      "snapshot_bytes": scan.snapshot_bytes, "phases": scan.phases}
        except Exception as exc:   # noqa: BLE001 - reported to the tracer, which reports it
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        wfile.write(json.dumps(answer).encode() + b"\n")
        wfile.flush()


_HELPER = ("import sys; sys.path.insert(0, sys.argv[1]); "
           "from pytest_memleak_ebpf.kinds.inprocess import serve; serve()")


@dataclasses.dataclass
class Outcome:
    """A window's scan: per-block kind names (address -> kind), or why not."""

    kinds: Optional[Dict[int, str]] = None
    reason: Optional[str] = None
    seconds: float = 0.0
    root_bytes: int = 0
    phases: Dict[str, float] = dataclasses.field(default_factory=dict)


# why a window's blocks were not classified: none of them could count
NOTHING_TO_CLASSIFY = "no block that could count was live at the window's end: nothing to classify"
# why a window's blocks were not classified when in-process leak kinds are not on
KINDS_OFF = "in-process leak kinds are off (--ebpf-leaks-in-process-kinds turns them on)"


class WindowScanner:
    """The helper process that classifies in-process windows.  Start it
    before any test (a process the pytest process creates during a test is
    one of the test's processes)."""

    def __init__(self, limit: float = 10.0):
        self.limit = limit
        self._out = b""
        self.stopped: Optional[str] = None     # why it is no longer running
        package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.proc: Optional[subprocess.Popen] = subprocess.Popen(
            [sys.executable, "-c", _HELPER, package_parent], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, close_fds=True)
        # Yama (ptrace_scope 1) lets a process read only its descendants' memory: allow the helper ours
        _libc.prctl(_PR_SET_PTRACER, ctypes.c_ulong(self.proc.pid), 0, 0, 0)

    def scan(self, pid: int, blocks: Sequence[Tuple[int, int]], context: Optional[dict] = None,
             exclude: Sequence[Range] = (), pymalloc: bool = False) -> Outcome:
        """Classify `blocks` [(address, size)] of process `pid` (which waits;
        `pymalloc`: it serves Python objects from pymalloc)."""
        t0 = time.monotonic()
        if not blocks:
            return Outcome(kinds={})
        if self.proc is None or self.proc.poll() is not None:
            return Outcome(reason=f"the window scanner is not running ({self.stopped or 'it exited'})")
        req = json.dumps({"pid": pid, "blocks": [[int(a), int(s)] for a, s in blocks], "context": context,
                          "exclude": [[int(lo), int(hi)] for lo, hi in exclude], "pymalloc": pymalloc})
        try:
            self.proc.stdin.write(req.encode() + b"\n")
            self.proc.stdin.flush()
            line = self._line(t0 + self.limit)
        except (OSError, ValueError) as exc:
            self._stop(f"it failed: {exc}")
            return Outcome(reason=f"the window scanner failed ({exc})", seconds=time.monotonic() - t0)
        if line is None:
            # not restarted here: a process made during a test would be one of the test's
            self._stop(f"a scan went over its time limit of {self.limit:g} s")
            return Outcome(reason=f"the scan timed out (over {self.limit:g} s)", seconds=time.monotonic() - t0)
        answer = json.loads(line)
        if "error" in answer:
            return Outcome(reason=f"its memory could not be scanned ({answer['error']})",
                           seconds=time.monotonic() - t0)
        names = [KIND_NAMES[int(k)] for k in answer["kinds"]]
        return Outcome(kinds={int(a): n for (a, _), n in zip(blocks, names)}, seconds=answer["seconds"],
                       root_bytes=answer["root_bytes"], phases=answer.get("phases", {}))

    def _line(self, deadline: float) -> Optional[bytes]:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._out:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise OSError("the window scanner is gone")
            self._out += chunk
        line, self._out = self._out.split(b"\n", 1)
        return line

    def _stop(self, why: str) -> None:
        self.stopped = why
        if self.proc is not None:
            self.proc.kill()
        self.close()

    def close(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        try:
            p.stdin.close()
        except OSError:
            pass
        try:
            p.wait(timeout=2)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        try:
            p.stdout.close()
        except OSError:
            pass
