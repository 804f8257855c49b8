"""Allocator memory: what each supported allocator keeps for itself in a
stopped process, never a root of the leak scan.

Every live block's address and size are known exactly (the uprobes' block
map, whatever the allocator), so the blocks themselves need no walk; what a
scan must not take as roots is the rest of the allocator's memory: free
regions (a stale pointer in a freed block would turn a lost block
reachable), headers, free lists, and metadata that points at blocks
(jemalloc's ``edata_t.e_addr`` is the start of a large block or of a slab's
first region).  :func:`allocator_memory` gives it per allocator kind (the
``kind`` of :mod:`pytest_memleak_ebpf.allocators`):

* ``glibc``: ``[heap]``, every non-main arena's heaps, ``main_arena`` and
  each mmapped chunk (:mod:`.heap`), plus the hazard offsets of glibc's chunk
  headers (:func:`.heap.hazard_offsets`); ``static-glibc`` the same, with
  ``main_arena`` found in the executable's data and ``[heap]`` taken from its
  first chunk on (:func:`.heap.static_heap_start`: the main thread's TLS
  comes before it);
* ``jemalloc``, ``tcmalloc``, ``mimalloc``: every private anonymous
  read-write mapping (``[heap]`` included: tcmalloc grows it with ``sbrk``)
  that holds a live block -- these allocators take memory from the kernel in
  large mappings of their own (jemalloc's extents, tcmalloc's spans and
  metadata arena, mimalloc's segments, 32 MiB aligned from 2 TiB up) --, and
  jemalloc's ``base`` blocks wherever they are (:func:`jemalloc_base_blocks`:
  its arenas, edata and rtree nodes), and every mapping in mimalloc's
  segment area (:data:`MIMALLOC_HINT_AREA`), a segment whose blocks were all
  freed included; tcmalloc's and mimalloc's metadata hold no block's address
  (spans keep page numbers, mimalloc's pages sit in the segment).  What of a thread is kept a root even in a mapping the kernel
  merged with the allocator's: :func:`thread_ranges`.  Limits: a jemalloc or
  tcmalloc mapping whose blocks were all freed is scanned (stale pointers
  there can make a lost block reachable, never the reverse); a program's own
  anonymous mapping merged by the kernel with a block-holding one is taken as
  the allocator's;
* ``musl`` and ``static-musl`` (mallocng, musl 1.2.1 and later): exactly the
  groups of every active ``struct meta``, and the meta areas.  A live block
  leads to its group (``p - 16 * offset - 16``, the offset in the 4-byte slot
  header before ``p``), the group to its meta (the group's first word), the
  meta to its meta area (``meta & -4096``, whose ``check`` is
  ``ctx.secret``); the secret leads to ``ctx`` (``__malloc_context``, found by
  that word in the rw data of musl's libc or of the static executable), whose
  ``meta_area_head`` chains every meta area; every meta with a group gives
  ``[mem, mem + 16 + stride * (last_idx + 1))``, or ``maplen`` pages for an
  mmapped group.  Groups may sit in musl's own mappings, inside a larger
  group's slot, or in the unused tail of a loaded object's ``.bss`` that the
  dynamic loader donates to malloc: only their bytes leave the roots, never
  the rest of the mapping.  Layouts: ``struct meta`` 40 bytes (prev, next,
  mem, avail_mask and freed_mask, then last_idx:5 freeable:1 sizeclass:6
  maplen), ``struct meta_area`` check, next, nslots then the metas from byte
  24, ``struct malloc_context`` with ``meta_area_head`` at byte 56 (x86-64
  defines PAGESIZE: no pagesize field).

Any other kind (``other``) raises :class:`UnsupportedAllocator`, whose text
is the reason its process's blocks stay unclassified; so does an allocator
whose structures are not where they should be.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..procmaps import Region
from . import heap as glibc_heap

Range = Tuple[int, int]
ReadFn = Callable[[int, int], bytes]
PAGE = 4096
HUGEPAGE = 2 << 20
RED_ZONE = 128   # the amd64 red zone below a thread's sp (memcheck scans it)

#: the kinds :func:`allocator_memory` knows
SUPPORTED = ("glibc", "static-glibc", "jemalloc", "tcmalloc", "mimalloc", "musl", "static-musl")


class UnsupportedAllocator(LookupError):
    """The scan cannot tell this allocator's memory from roots; the text is
    the reason its process's blocks stay unclassified."""


@dataclasses.dataclass
class AllocatorMemory:
    ranges: List[Range]                 # never roots ...
    keep: List[Range] = dataclasses.field(default_factory=list)  # ... except these (threads' stacks and TLS)
    hazard: Optional[np.ndarray] = None  # per block, an offset no pointer to it may have (glibc's next header)
    main_arena: Optional[int] = None     # glibc


@dataclasses.dataclass
class Thread:
    sp: int
    fs_base: int


def _words(read: ReadFn, addr: int, n: int) -> np.ndarray:
    data = read(addr, n)
    return np.frombuffer(data[:len(data) // 8 * 8], dtype=np.uint64)


def _word(read: ReadFn, addr: int) -> Optional[int]:
    data = read(addr, 8)
    return int.from_bytes(data, "little") if len(data) == 8 else None


def _find(maps: Sequence[Region], addr: int) -> Optional[Region]:
    for m in maps:
        if m.start <= addr < m.end:
            return m
    return None


def _anon_rw(m: Region) -> bool:
    return m.readable and m.writable and m.perms.endswith("p") and m.path in ("", "[heap]")


def _holding(maps: Sequence[Region], starts: np.ndarray) -> List[Region]:
    """The private anonymous rw mappings holding a block's start."""
    if starts.size == 0:
        return []
    s = np.sort(starts)
    out = []
    for m in maps:
        if not _anon_rw(m):
            continue
        i = int(np.searchsorted(s, np.uint64(m.start), side="left"))
        if i < s.size and int(s[i]) < m.end:
            out.append(m)
    return out


def thread_ranges(maps: Sequence[Region], threads: Iterable[Thread], starts=(), sizes=()) -> List[Range]:
    """What of a thread is never allocator memory, even in a mapping the
    kernel merged with the allocator's: a glibc thread's stack (its thread
    pointer above ``sp`` in the same mapping: from ``sp - 128`` to the page
    after the thread pointer, ``struct pthread`` and the static TLS below it
    included), and, for a thread pointer in another mapping (the main
    thread's, allocated by ld.so), the four pages below it and the one it is
    in.  A range holding a live block is not kept (a stack or TLS inside
    allocator memory, e.g. a coroutine's stack that is itself a block)."""
    starts = np.asarray(starts, dtype=np.uint64)
    order = np.argsort(starts)
    s = starts[order]
    e = s + np.maximum(np.asarray(sizes, dtype=np.uint64)[order], np.uint64(1)) if s.size else s
    out = []
    for t in threads:
        m = _find(maps, t.sp)
        f = _find(maps, t.fs_base)
        if m is not None and f is m and t.fs_base > t.sp:
            out.append(((t.sp - RED_ZONE) & ~7, min(m.end, (t.fs_base + 2 * PAGE) & ~(PAGE - 1))))
        elif f is not None:
            lo = max(f.start, (t.fs_base & ~(PAGE - 1)) - 4 * PAGE)
            out.append((lo, min(f.end, (t.fs_base + 2 * PAGE) & ~(PAGE - 1))))
    keep = []
    for lo, hi in out:
        # the last block starting below hi: the only one that may overlap (blocks do not overlap)
        i = int(np.searchsorted(s, np.uint64(hi), side="left")) - 1
        if i < 0 or int(e[i]) <= lo:
            keep.append((lo, hi))
    return keep


# -- jemalloc ------------------------------------------------------------------

def jemalloc_base_blocks(maps: Sequence[Region], read: ReadFn) -> List[Range]:
    """jemalloc's ``base`` blocks (its metadata: arenas, edata, rtree nodes)
    in private anonymous mappings: at a 2 MiB-aligned (``HUGEPAGE``) address, a
    ``base_block_t`` ``{size, next, edata}`` whose size is a multiple of
    2 MiB within the mapping, whose next is 0 or 2 MiB-aligned, and whose
    ``edata`` (``e_bits, e_addr, e_bsize``) describes the block's unused
    tail: ``e_addr`` inside the block, ``e_addr + e_bsize`` its end."""
    out = []
    for m in maps:
        if not _anon_rw(m) or m.path:
            continue
        a = (m.start + HUGEPAGE - 1) & ~(HUGEPAGE - 1)
        while a + HUGEPAGE <= m.end:
            w = _words(read, a, 40)
            if w.size == 5:
                size, nxt, addr, bsize = int(w[0]), int(w[1]), int(w[3]), int(w[4])
                if size and size % HUGEPAGE == 0 and a + size <= m.end and nxt % HUGEPAGE == 0 \
                        and a + 40 <= addr <= a + size and addr + bsize == a + size:
                    out.append((a, a + size))
                    a += size
                    continue
            a += HUGEPAGE
    return out


#: where mimalloc asks the kernel for its segments (``mi_os_get_aligned_hint``:
#: 2 TiB up to 30 TiB in mimalloc 2, 4 TiB up to 32 TiB in mimalloc 3); the
#: kernel places nothing there unasked
MIMALLOC_HINT_AREA = (2 << 40, 32 << 40)


def _mapping_ranges(kind: str, maps: Sequence[Region], read: ReadFn, starts: np.ndarray) -> List[Range]:
    ranges = [(m.start, m.end) for m in _holding(maps, starts)]
    if kind == "jemalloc":
        ranges += jemalloc_base_blocks(maps, read)
    if kind == "mimalloc":
        lo, hi = MIMALLOC_HINT_AREA
        ranges += [(m.start, m.end) for m in maps if _anon_rw(m) and not m.path and lo <= m.start and m.end <= hi]
    return ranges


# -- musl mallocng -------------------------------------------------------------

UNIT = 16
MUSL_SIZE_CLASSES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 18, 20, 25, 31, 36, 42, 50, 63, 72, 84, 102, 127,
                     146, 170, 204, 255, 292, 340, 409, 511, 584, 682, 818, 1023, 1169, 1364, 1637, 2047,
                     2340, 2730, 3276, 4095, 4680, 5460, 6552, 8191)
META_SIZE = 40            # struct meta: prev, next, mem, avail_mask+freed_mask, bitfield word
META_AREA_HEADER = 24     # struct meta_area: check, next, nslots (+ pad)
CTX_META_AREA_HEAD = 56   # struct malloc_context (PAGESIZE defined on x86-64: no pagesize field)
CTX_SIZE = 928


@dataclasses.dataclass
class MuslMeta:
    address: int
    mem: int
    last_idx: int
    sizeclass: int
    maplen: int

    @property
    def group(self) -> Range:
        if self.maplen:
            return self.mem, self.mem + self.maplen * PAGE
        stride = UNIT * MUSL_SIZE_CLASSES[self.sizeclass]
        return self.mem, self.mem + UNIT + stride * (self.last_idx + 1)


def musl_group_of(read: ReadFn, p: int) -> Optional[int]:
    """The group (``struct group *``) a mallocng slot ``p`` belongs to."""
    hdr = read(p - 8, 8)
    if len(hdr) != 8:
        return None
    offset = int.from_bytes(hdr[6:8], "little")
    if hdr[4]:
        offset = int.from_bytes(hdr[0:4], "little")
    return p - UNIT * offset - UNIT


def _musl_meta(read: ReadFn, addr: int) -> Optional[MuslMeta]:
    w = _words(read, addr, META_SIZE)
    if w.size != 5:
        return None
    bits = int(w[4])
    return MuslMeta(addr, int(w[2]), bits & 31, (bits >> 6) & 63, bits >> 12)


def musl_context(maps: Sequence[Region], read: ReadFn, starts: np.ndarray) -> Optional[int]:
    """Address of mallocng's ``ctx``, found through the first live block."""
    secret = None
    for p in np.sort(starts)[:64].tolist():
        g = musl_group_of(read, int(p))
        meta = _word(read, g) if g is not None else None
        if not meta or meta % 8:
            continue
        m = _musl_meta(read, meta)
        if m is None or m.mem != g:
            continue
        secret = _word(read, meta & ~(PAGE - 1))
        if secret is not None:
            break
    if secret is None:
        return None
    for m in maps:
        if not (m.readable and m.writable) or m.path.startswith("["):
            continue
        w = _words(read, m.start, m.end - m.start)
        for i in np.nonzero(w == np.uint64(secret))[0].tolist():
            addr = m.start + 8 * i
            # (a meta area's check word matches too: its word 7 is never a meta area)
            head = _word(read, addr + CTX_META_AREA_HEAD)
            if head and head % PAGE == 0 and _word(read, head) == secret:
                return addr
    return None


def musl_metas(read: ReadFn, ctx: int) -> Tuple[List[MuslMeta], List[Range]]:
    """Every meta with a group, and every meta area (its pages)."""
    secret = _word(read, ctx)
    area = _word(read, ctx + CTX_META_AREA_HEAD) or 0
    metas, areas, seen = [], [], set()
    while area and area not in seen and len(seen) < 1 << 16:
        seen.add(area)
        hdr = _words(read, area, META_AREA_HEADER)
        if hdr.size != 3 or int(hdr[0]) != secret:
            raise UnsupportedAllocator(f"its allocator is musl, but the meta area at {area:#x} has a bad check "
                                       "word, so its blocks count as unclassified")
        nslots = int(hdr[2]) & 0xFFFFFFFF
        end = area + META_AREA_HEADER + META_SIZE * nslots
        areas.append((area, (end + PAGE - 1) & ~(PAGE - 1)))
        w = _words(read, area + META_AREA_HEADER, META_SIZE * nslots).reshape(-1, 5)
        for k in np.nonzero(w[:, 2])[0].tolist():
            bits = int(w[k, 4])
            metas.append(MuslMeta(area + META_AREA_HEADER + META_SIZE * k, int(w[k, 2]), bits & 31,
                                  (bits >> 6) & 63, bits >> 12))
        area = int(hdr[1])
    return metas, areas


def _musl_ranges(maps: Sequence[Region], read: ReadFn, starts: np.ndarray) -> List[Range]:
    if starts.size == 0:
        return []
    ctx = musl_context(maps, read, starts)
    if ctx is None:
        raise UnsupportedAllocator("its allocator is musl, but mallocng's context (__malloc_context) was not found "
                                   "through its blocks, so its blocks count as unclassified")
    metas, areas = musl_metas(read, ctx)
    return [m.group for m in metas] + areas


# -- glibc ---------------------------------------------------------------------

def _glibc(maps: Sequence[Region], read: ReadFn, starts: np.ndarray, sizes: np.ndarray,
           static: bool = False) -> AllocatorMemory:
    try:
        main_arena = glibc_heap.find_main_arena(maps, read, static=static)
    except Exception:  # noqa: BLE001 - a process without glibc malloc
        main_arena = None
    if static and main_arena is None and starts.size:
        raise UnsupportedAllocator("its allocator is static-glibc, but glibc's main_arena was not found in the "
                                   "executable's data, so its blocks count as unclassified")
    holes = glibc_heap.allocator_ranges(maps, read, main_arena, static=static)
    # blocks outside the arenas' heaps are mmapped chunks (their headers say)
    arena_mem = sorted(r for r in holes if r[1] > r[0])
    outside = _outside(starts, arena_mem)
    holes += [e for e in (glibc_heap.mmapped_extent(read, int(s)) for s in starts[outside]) if e]
    return AllocatorMemory(holes, hazard=glibc_heap.hazard_offsets(sizes), main_arena=main_arena)


def _outside(starts: np.ndarray, ranges: List[Range]) -> np.ndarray:
    """Mask of the addresses in none of the (sorted, disjoint enough) ranges."""
    if not ranges:
        return np.ones(starts.size, dtype=bool)
    lo = np.array([a for a, _ in ranges], dtype=np.uint64)
    hi = np.array([b for _, b in ranges], dtype=np.uint64)
    i = np.searchsorted(lo, starts, side="right").astype(np.int64) - 1
    ok = i >= 0
    i = np.where(ok, i, 0)
    return ~(ok & (starts < hi[i]))


def check_supported(kind: str) -> None:
    """Raise :class:`UnsupportedAllocator` (its text: why the blocks stay
    unclassified) unless :func:`allocator_memory` knows ``kind``."""
    if kind in SUPPORTED:
        return
    raise UnsupportedAllocator(f"its allocator is {kind}: leak kinds do not know its memory, so its blocks "
                               "count as unclassified")


def allocator_memory(kind: str, maps: Sequence[Region], read: ReadFn, starts, sizes,
                     threads: Iterable[Thread] = ()) -> AllocatorMemory:
    """The memory of allocator ``kind`` in a stopped process (its ``maps``,
    ``read`` of its memory, its live blocks and its threads)."""
    check_supported(kind)
    starts = np.asarray(starts, dtype=np.uint64)
    sizes = np.asarray(sizes, dtype=np.uint64)
    if kind in ("glibc", "static-glibc"):
        return _glibc(maps, read, starts, sizes, static=kind == "static-glibc")
    if kind in ("jemalloc", "tcmalloc", "mimalloc"):
        return AllocatorMemory(_mapping_ranges(kind, maps, read, starts), thread_ranges(maps, threads, starts, sizes))
    return AllocatorMemory(_musl_ranges(maps, read, starts))
