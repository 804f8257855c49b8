"""The root set, as memcheck takes it (``scan_memory_root_set`` and
``VG_(apply_to_GP_regs)`` in mc_leakcheck.c / m_machine.c), and a whole scan
of a stopped process.

Roots: every readable and writable mapping (data, bss, stacks, TLS,
anonymous and shared mappings) except

* allocator memory, per allocator (:mod:`.allocmem`; glibc's: ``[heap]``,
  the heaps of non-main arenas, ``main_arena`` itself, mmapped chunks, see
  :mod:`.heap`), and any range the caller names (e.g. a test recorder's own
  table);
* device mappings (character/block devices), except ``/dev/zero``;
* each thread's stack below ``sp - 128`` (the amd64 red zone is scanned);
* the main thread's frames of the ``exit`` that ``__libc_start_call_main``
  called, when it is inside it (:mod:`.exitframe`: slots memcheck sees as
  undefined).

Plus the 16 general-purpose registers of every thread.  Only aligned 8-byte
words are read.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import stat
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from . import allocmem, exitframe
from .classify import Classification, classify
from ..procmaps import Region, read_regions
from .memory import ProcessMemory
from .ptrace import GP_REGS, thread_registers

RED_ZONE = allocmem.RED_ZONE  # the amd64 red zone below sp, scanned
Range = Tuple[int, int]


def _is_device(m: Region) -> bool:
    """A mapping of a character or block device (memcheck skips those, but
    scans /dev/zero mappings; POSIX shared memory lives in /dev/shm)."""
    path = m.path[:-len(" (deleted)")] if m.path.endswith(" (deleted)") else m.path
    if not path.startswith("/dev/") or path == "/dev/zero" or path.startswith("/dev/shm/"):
        return False
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def subtract(ranges: Iterable[Range], holes: Iterable[Range]) -> List[Range]:
    """``ranges`` minus ``holes`` (half-open intervals)."""
    holes = sorted((lo, hi) for lo, hi in holes if hi > lo)
    out = []
    for lo, hi in sorted(ranges):
        cur = lo
        for hlo, hhi in holes:
            if hhi <= cur or hlo >= hi:
                continue
            if hlo > cur:
                out.append((cur, hlo))
            cur = max(cur, hhi)
            if cur >= hi:
                break
        if cur < hi:
            out.append((cur, hi))
    return out


def root_ranges(maps: Sequence[Region], stack_pointers: Iterable[int],
                exclude: Iterable[Range] = ()) -> List[Range]:
    """The address ranges scanned as roots (8-aligned)."""
    base = [(m.start, m.end) for m in maps
            if m.readable and m.writable and not _is_device(m)]
    holes = list(exclude)
    for sp in stack_pointers:
        for m in maps:
            if m.start <= sp < m.end:
                holes.append((m.start, max(m.start, (sp - RED_ZONE) & ~7)))
                break
    return [(lo + (-lo) % 8, hi & ~7) for lo, hi in subtract(base, holes) if (hi & ~7) > lo + (-lo) % 8]


class VtableCheck:
    """memcheck's ``aligned_ptr_above_page0_is_vtable_addr``: the value points
    into a readable file mapping, and among the (up to 21) words from there,
    stopping one word before the mapping's end, at least two non-null ones
    come before any that does not point into an executable file mapping."""

    def __init__(self, maps: Sequence[Region], read):
        self.maps = sorted(maps, key=lambda m: m.start)
        self.starts = np.array([m.start for m in self.maps], dtype=np.uint64)
        self.read = read

    def _find(self, addr: int) -> Optional[Region]:
        i = int(np.searchsorted(self.starts, np.uint64(addr), side="right")) - 1
        if i >= 0 and addr < self.maps[i].end:
            return self.maps[i]
        return None

    def one(self, ptr: int) -> bool:
        seg = self._find(ptr)
        if seg is None or not seg.file_backed or not seg.readable:
            return False
        scan_max = min(ptr + 20 * 8, seg.end - 1 - 8)
        if scan_max < ptr:
            return False
        data = self.read(ptr, ((scan_max - ptr) // 8 + 1) * 8)
        n = 0
        for k in range(len(data) // 8):
            fn = int.from_bytes(data[8 * k:8 * k + 8], "little")
            if fn == 0:
                continue
            s = self._find(fn)
            if s is None or not s.file_backed or not s.executable:
                return False
            n += 1
            if n == 2:
                return True
        return False

    def __call__(self, values: np.ndarray) -> np.ndarray:
        return np.array([self.one(int(v)) for v in values], dtype=bool)


@dataclasses.dataclass
class Scan:
    classification: Classification
    roots: List[Range]
    registers: Dict[int, Dict[str, int]]
    main_arena: Optional[int]
    root_bytes: int


def scan_process(pid: int, starts, sizes, *, exclude: Iterable[Range] = (),
                 registers: Optional[Dict[int, Dict[str, int]]] = None,
                 hazard: bool = True, allocator: str = "glibc") -> Scan:
    """Classify the blocks ``starts``/``sizes`` of the stopped process ``pid``,
    whose allocator is ``allocator`` (a kind of
    :mod:`pytest_memleak_ebpf.allocators`; :mod:`.allocmem` tells its memory).
    An allocator it does not know raises
    :class:`~.allocmem.UnsupportedAllocator` before the process is read."""
    allocmem.check_supported(allocator)
    starts = np.asarray(starts, dtype=np.uint64)
    sizes = np.asarray(sizes, dtype=np.uint64)
    maps = read_regions(pid)
    if registers is None:
        registers = thread_registers(pid)
    with ProcessMemory(pid) as mem:
        # the small writable mappings at once: the allocator's structures, the
        # exit path's frames and the roots are read from them
        mem.prefetch(prefetch_ranges(maps, [r["rsp"] for r in registers.values()]))
        threads = [allocmem.Thread(r["rsp"], r.get("fs_base", 0)) for r in registers.values()]
        am = allocmem.allocator_memory(allocator, maps, mem.read, starts, sizes, threads)
        main_arena = am.main_arena
        holes = list(exclude) + subtract(am.ranges, am.keep)
        main = registers.get(pid)
        exit_frames = exitframe.exit_path_hole(maps, main["rsp"], mem.read,
                                               lambda a, n: mem.words_many([(a, n)])[0],
                                               mem.read_many) if main else None
        if exit_frames:
            holes.append(exit_frames)
        roots = root_ranges(maps, [r["rsp"] for r in registers.values()], holes)
        root_words = list(zip((lo for lo, _ in roots), mem.words_many([(lo, hi - lo) for lo, hi in roots])))
        # block contents: the allocator's memory, read in big pieces
        order = np.argsort(starts)
        segs = _block_segments(starts[order], sizes[order], maps)
        heap_words = list(zip((lo for lo, _ in segs), mem.words_many([(lo, hi - lo) for lo, hi in segs],
                                                                     one_buffer=True)))
        regs = [r[name] for r in registers.values() for name in GP_REGS]
        result = classify(starts, sizes, root_words, heap_words, registers=regs,
                          is_vtable=VtableCheck(maps, mem.read),
                          hazard_offsets=am.hazard if hazard else None)
    return Scan(result, roots, registers, main_arena, sum(hi - lo for lo, hi in roots))


#: a writable mapping up to this size is read at the scan's start (prefetch_ranges)
PREFETCH_MAPPING = 16 << 20
PREFETCH_TOTAL = 256 << 20


def prefetch_ranges(maps: Sequence[Region], stack_pointers: Iterable[int] = ()) -> List[Range]:
    """The readable and writable mappings (devices excepted) of at most
    PREFETCH_MAPPING bytes each, PREFETCH_TOTAL in all, as (addr, length);
    not ``[heap]`` (glibc's: never a root; its blocks are read as segments),
    and a mapping holding a thread's stack pointer from ``sp - RED_ZONE`` up
    (what is below is never read)."""
    sps = sorted(stack_pointers)
    out, total = [], 0
    for m in maps:
        if not (m.readable and m.writable) or m.path == "[heap]":
            continue
        lo = m.start
        i = bisect.bisect_left(sps, m.start)
        if i < len(sps) and sps[i] < m.end:
            lo = max(m.start, (sps[i] - RED_ZONE) & ~7)
        n = m.end - lo
        if n <= PREFETCH_MAPPING and total + n <= PREFETCH_TOTAL and not _is_device(m):
            out.append((lo, n))
            total += n
    return out


#: _block_segments works in plain Python up to this many blocks
SMALL_SEGMENTS = 64


def _block_segments(starts: np.ndarray, sizes: np.ndarray, maps: Sequence[Region],
                    gap: int = 1 << 16) -> List[Range]:
    """Cover the (sorted) blocks with few read ranges: blocks of one mapping
    closer than ``gap`` share one."""
    if starts.size == 0:
        return []
    if starts.size <= SMALL_SEGMENTS:     # a few blocks: plain Python (numpy's per-call cost dominates)
        mstarts = [m.start for m in maps]
        out: List[Range] = []
        prev_which, reach = None, 0
        for s, z in zip(starts.tolist(), sizes.tolist()):
            lo, hi = s & ~7, (s + z + 7) & ~7
            which = bisect.bisect_right(mstarts, s) - 1
            if out and which == prev_which and lo - reach <= gap:
                reach = max(reach, hi)
                out[-1] = (out[-1][0], reach)
            else:
                reach = max(reach, hi) if out else hi
                out.append((lo, reach))
            prev_which = which
        return out
    lo = (starts & ~np.uint64(7)).astype(np.int64)
    hi = ((starts + sizes + np.uint64(7)) & ~np.uint64(7)).astype(np.int64)
    mstarts = np.array([m.start for m in maps], dtype=np.uint64)
    which = np.searchsorted(mstarts, starts, side="right").astype(np.int64) - 1
    reach = np.maximum.accumulate(hi)
    new = np.ones(lo.size, dtype=bool)
    new[1:] = (which[1:] != which[:-1]) | (lo[1:] - reach[:-1] > gap)
    first = np.nonzero(new)[0]
    last = np.append(first[1:], lo.size) - 1
    return list(zip(lo[first].tolist(), reach[last].tolist()))
