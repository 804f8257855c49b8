"""glibc (2.26+, checked against 2.36) malloc structures seen from outside the process.

* :func:`find_main_arena` locates ``main_arena`` in libc's writable data (it is
  a static, not in .dynsym): an arena is recognised by its empty bins, whose
  fd and bk point at the bin itself minus 16, and its ``top``/``next`` fields;
* :func:`arenas` follows ``main_arena.next`` around the ring of arenas;
  a non-main arena's heaps are found from its ``top`` chunk
  (``heap_for_ptr``: the 64 MiB-aligned ``heap_info``) along ``heap_info.prev``;
* :func:`walk` walks every heap's chunks and tells live chunks from free ones:
  a chunk is free when the next chunk's PREV_INUSE bit is clear, or when it
  sits in a fastbin or a tcache list (those keep PREV_INUSE set); the tcache
  structs themselves are found by their shape (a 0x290 chunk whose every
  non-empty entry chain leads through chunks of its bin's size and has its
  count's length);
* :func:`mmapped_extent` gives the mapping of a block served by mmap
  (IS_MMAPPED in its size word), never a root;
* :func:`hazard_offsets`: per block, the offset of the next chunk's header
  (chunk size - 16), see :mod:`.classify`.

Layout (x86-64): chunk = ``prev_size, size|flags`` then user memory; user
pointer = chunk + 16; flags PREV_INUSE 1, IS_MMAPPED 2, NON_MAIN_ARENA 4;
``struct malloc_state``: mutex, flags, have_fastchunks, fastbinsY[10] at 16,
top at 96, last_remainder at 104, bins[254] at 112, binmap[4] at 2144, next at
2160, next_free 2168, attached_threads 2176, system_mem 2184, max_system_mem
2192 (2200 bytes); ``heap_info``: ar_ptr, prev, size, mprotect_size,
pagesize, pad (48 bytes).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..procmaps import Region

PREV_INUSE, IS_MMAPPED, NON_MAIN_ARENA = 1, 2, 4
SIZE_BITS = 7
MINSIZE = 32
HEAP_MAX_SIZE = 64 << 20
HEAP_INFO_SIZE = 48
ARENA_SIZE = 2200
OFF_FASTBINS, NFASTBINS = 16, 10
OFF_TOP, OFF_BINS, NBINS_WORDS, OFF_NEXT = 96, 112, 254, 2160
TCACHE_BINS = 64
TCACHE_CHUNK = 0x290

#: reads ``n`` bytes at an address; returns fewer when unreadable
ReadFn = Callable[[int, int], bytes]


def _words(read: ReadFn, addr: int, n_bytes: int) -> np.ndarray:
    data = read(addr, n_bytes)
    return np.frombuffer(data[:len(data) // 8 * 8], dtype=np.uint64)


def _word(read: ReadFn, addr: int) -> Optional[int]:
    data = read(addr, 8)
    return int.from_bytes(data, "little") if len(data) == 8 else None


def request2chunk(size: int) -> int:
    """glibc's chunk size for a malloc request (request2size)."""
    return max(MINSIZE, (size + 8 + 15) & ~15)


def hazard_offsets(sizes: np.ndarray) -> np.ndarray:
    """Offset, from a block's start, of the header of the chunk after it
    (chunk size - 16) for heap blocks; memalign'd or mmapped blocks alike:
    their next header is just as far from their start."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return np.maximum(np.int64(MINSIZE), (sizes + 23) & ~np.int64(15)) - 16


@dataclasses.dataclass
class Arena:
    address: int
    top: int
    is_main: bool
    heaps: List[Tuple[int, int]]  # (start, end) of each heap's chunk area (main: [heap])


@dataclasses.dataclass
class HeapWalk:
    arenas: List[Arena]
    #: live chunks: user pointer and usable size
    live_starts: np.ndarray
    live_sizes: np.ndarray
    #: free chunks (bins, fastbins, tcache, top): chunk address and size
    free_chunks: List[Tuple[int, int]]
    #: the tcache_perthread_struct chunks (user pointers), a subset of the live ones
    tcaches: List[int]


def _libc_data_ranges(maps: Sequence[Region], static: bool = False) -> List[Tuple[int, int]]:
    """libc's writable mappings, plus the anonymous one right after them (its
    .bss); ``static``: those of the executable (the only file a static
    executable maps)."""
    out = []
    for i, m in enumerate(maps):
        if not m.writable or (not static and "libc" not in m.path):
            continue
        base = m.path.rsplit("/", 1)[-1]
        ours = m.file_backed if static else base.startswith("libc.so") or base.startswith("libc-")
        if ours:
            out.append((m.start, m.end))
            if i + 1 < len(maps) and maps[i + 1].path == "" and maps[i + 1].start == m.end and maps[i + 1].writable:
                out.append((maps[i + 1].start, maps[i + 1].end))
    return out


def _looks_like_arena(w: np.ndarray, i: int, base: int) -> bool:
    """Words ``w`` (from ``base``) hold a malloc_state at word index i?"""
    if i < 0 or i + ARENA_SIZE // 8 > w.size:
        return False
    x = base + 8 * i
    # plain Python over the 254 bin words (a dozen numpy calls cost more)
    bins = w[i + OFF_BINS // 8: i + OFF_BINS // 8 + NBINS_WORDS].tolist()
    own = x + OFF_TOP
    empty = 0
    for fd, bk in zip(bins[0::2], bins[1::2]):
        if fd == own and bk == own:
            empty += 1
        elif fd == 0 or bk == 0:
            # a non-empty bin holds pointers into chunk memory, both directions set
            return False
        own += 16
    if empty < NBINS_WORDS // 4:
        return False
    nxt = int(w[i + OFF_NEXT // 8])
    return nxt != 0 and nxt % 8 == 0


#: where main_arena was found last in each file's data: (path, device, inode,
#: file offset of the mapping) -> its offset in that mapping (it is a static
#: of the file: every process of the same build has it at the same place)
_ARENA_AT: Dict[Tuple[str, str, int, int], int] = {}


def _file_key(maps: Sequence[Region], lo: int):
    m = next((m for m in maps if m.start == lo), None)
    return (m.path, m.dev, m.inode, m.offset) if m is not None and m.file_backed else None


def find_main_arena(maps: Sequence[Region], read: ReadFn, static: bool = False) -> Optional[int]:
    """Address of libc's ``main_arena``, or None (no libc...); ``static``: in
    a statically linked executable's data. Where it was found in a file's
    data is tried first (the same test as the search's decides)."""
    data = _libc_data_ranges(maps, static)
    for lo, hi in data:
        key = _file_key(maps, lo)
        off = _ARENA_AT.get(key) if key else None
        if off is not None and lo + off + ARENA_SIZE <= hi:
            w = _words(read, lo + off, ARENA_SIZE)
            if _looks_like_arena(w, 0, lo + off):
                return lo + off
    found = _search_main_arena(data, read)
    if found is not None:
        for lo, hi in data:
            key = _file_key(maps, lo)
            if key and lo <= found < hi:
                _ARENA_AT[key] = found - lo
    return found


def _search_main_arena(data: Sequence[Tuple[int, int]], read: ReadFn) -> Optional[int]:
    for lo, hi in data:
        w = _words(read, lo, hi - lo).astype(np.int64)
        if w.size < ARENA_SIZE // 8:
            continue
        addr = lo + 8 * np.arange(w.size, dtype=np.int64)
        # fd of an empty bin == its own address - 16, and bk (next word) the same
        self_fd = np.nonzero((w[:-1] == addr[:-1] - 16) & (w[1:] == addr[:-1] - 16))[0]
        if self_fd.size == 0:
            continue
        tried = set()
        for p in self_fd[:8].tolist():
            for k in range(NBINS_WORDS // 2):
                i = p - (OFF_BINS // 8) - 2 * k
                if i in tried:
                    continue
                tried.add(i)
                if _looks_like_arena(w.view(np.uint64), i, lo):
                    return lo + 8 * i
    return None


def arenas(maps: Sequence[Region], read: ReadFn, main_arena: int) -> List[Arena]:
    heap_map = next((m for m in maps if m.path == "[heap]"), None)
    out: List[Arena] = []
    a = main_arena
    seen = set()
    while a and a not in seen and len(seen) < 4096:
        seen.add(a)
        top = _word(read, a + OFF_TOP) or 0
        if a == main_arena:
            heaps = [(heap_map.start, heap_map.end)] if heap_map else []
            out.append(Arena(a, top, True, heaps))
        else:
            heaps = []
            h = top & ~(HEAP_MAX_SIZE - 1)
            hs = set()
            while h and h not in hs and len(hs) < 4096:
                hs.add(h)
                info = _words(read, h, HEAP_INFO_SIZE)
                if info.size < 3:
                    break
                first = a + ARENA_SIZE if int(info[0]) == a and h + HEAP_INFO_SIZE == a else h + HEAP_INFO_SIZE
                if first == a + ARENA_SIZE:
                    first += (-(first + 16)) % 16
                heaps.append((first, h + int(info[2])))
                h = int(info[1])
            out.append(Arena(a, top, False, heaps))
        a = _word(read, a + OFF_NEXT) or 0
        if a == main_arena:
            break
    return out


def _chunks(w: np.ndarray, base: int, end: int, top: int):
    """Walk chunks of one heap: yields (chunk address, size, prev_inuse of next)."""
    out = []
    c = base
    n = w.size
    while c < end:
        i = (c - base) // 8
        if i + 1 >= n:
            break
        size = int(w[i + 1]) & ~SIZE_BITS
        if c == top:
            out.append((c, size, False, True))
            break
        if size < 16 or c + size > end or size % 16:
            break
        j = (c + size - base) // 8
        nxt_inuse = bool(int(w[j + 1]) & PREV_INUSE) if j + 1 < n else True
        out.append((c, size, nxt_inuse, False))
        c += size
    return out


def _tcache_entries(read: ReadFn, user: int, chunk_sizes: Dict[int, int]) -> Optional[List[int]]:
    """If the chunk at ``user`` is a tcache_perthread_struct: its free chunks."""
    data = read(user, TCACHE_CHUNK - 16)
    if len(data) < TCACHE_BINS * 10:
        return None
    counts = np.frombuffer(data[:TCACHE_BINS * 2], dtype=np.uint16)
    entries = np.frombuffer(data[TCACHE_BINS * 2:TCACHE_BINS * 10], dtype=np.uint64)
    free = []
    for b in range(TCACHE_BINS):
        e, cnt = int(entries[b]), int(counts[b])
        if (e == 0) != (cnt == 0):
            return None
        want = MINSIZE + 16 * b
        seen = 0
        while e:
            if chunk_sizes.get(e - 16) != want or seen > cnt:
                return None
            free.append(e - 16)
            seen += 1
            nxt = _word(read, e)
            if nxt is None:
                return None
            e = (e >> 12) ^ nxt
        if seen != cnt:
            return None
    return free


def walk(maps: Sequence[Region], read: ReadFn, main_arena: Optional[int] = None) -> HeapWalk:
    """Live and free chunks of every arena (mmapped chunks are not in arenas:
    see :func:`mmapped_extent`)."""
    if main_arena is None:
        main_arena = find_main_arena(maps, read)
    if main_arena is None:
        raise LookupError("glibc's main_arena not found in libc's data")
    ars = arenas(maps, read, main_arena)
    chunks = []
    for ar in ars:
        for lo, hi in ar.heaps:
            w = _words(read, lo, hi - lo)
            chunks.extend(_chunks(w, lo, lo + 8 * w.size, ar.top))
    sizes = {c: s for c, s, _, _ in chunks}
    free = {c for c, _, inuse, is_top in chunks if is_top or not inuse}
    # fastbins: raw head in the arena, mangled fd in the chunks
    for ar in ars:
        heads = _words(read, ar.address + OFF_FASTBINS, 8 * NFASTBINS)
        for h in heads.tolist():
            c, n = int(h), 0
            while c and c in sizes and n < 1 << 20:
                free.add(c)
                nxt = _word(read, c + 16)
                if nxt is None:
                    break
                c = ((c + 16) >> 12) ^ nxt
                n += 1
    tcaches = []
    for c, s, inuse, is_top in chunks:
        if s == TCACHE_CHUNK and inuse and c not in free:
            ent = _tcache_entries(read, c + 16, sizes)
            if ent is not None:
                tcaches.append(c + 16)
                free.update(ent)
    live = [(c + 16, s - 8) for c, s, inuse, is_top in chunks if c not in free and s >= MINSIZE]
    return HeapWalk(arenas=ars,
                    live_starts=np.array([a for a, _ in live], dtype=np.uint64),
                    live_sizes=np.array([s for _, s in live], dtype=np.uint64),
                    free_chunks=sorted((c, sizes[c]) for c in free),
                    tcaches=tcaches)


def mmapped_extent(read: ReadFn, start: int) -> Optional[Tuple[int, int]]:
    """The mapping ``(lo, hi)`` of a block glibc served with mmap, else None."""
    hdr = _words(read, start - 16, 16)
    if hdr.size < 2:
        return None
    prev, size = int(hdr[0]), int(hdr[1])
    if not size & IS_MMAPPED:
        return None
    lo = start - 16 - prev
    return lo, lo + prev + (size & ~SIZE_BITS)


def static_heap_start(read: ReadFn, heap_map: Region, limit: int = 1 << 20) -> Optional[int]:
    """Where malloc's chunks begin in a static executable's ``[heap]``: the
    brk area starts with the main thread's static TLS and TCB
    (``__libc_setup_tls`` takes them with sbrk), then malloc's first chunk,
    the tcache (a 0x290 chunk, PREV_INUSE, ``prev_size`` 0).  None when not
    found (tcache disabled)."""
    w = _words(read, heap_map.start, min(limit, heap_map.end - heap_map.start))
    want = np.uint64(TCACHE_CHUNK | PREV_INUSE)
    for i in np.nonzero(w == want)[0].tolist():
        c = heap_map.start + 8 * (i - 1)
        if i >= 1 and c % 16 == 0 and int(w[i - 1]) == 0:
            return c
    return None


def allocator_ranges(maps: Sequence[Region], read: ReadFn, main_arena: Optional[int],
                     static: bool = False) -> List[Tuple[int, int]]:
    """Memory that belongs to malloc and is never a root: [heap] (``static``:
    from its first chunk, see :func:`static_heap_start`), every non-main
    arena's heaps (whole 64 MiB reservations), main_arena itself."""
    out = []
    for m in maps:
        if m.path == "[heap]":
            start = static_heap_start(read, m) if static else None
            out.append((m.start if start is None else start, m.end))
    if main_arena is not None:
        out.append((main_arena, main_arena + ARENA_SIZE))
        for ar in arenas(maps, read, main_arena):
            if not ar.is_main:
                for lo, hi in ar.heaps:
                    h = lo & ~(HEAP_MAX_SIZE - 1)
                    out.append((h, h + HEAP_MAX_SIZE))
    return out


def mmapped_chunks(maps: Sequence[Region], read: ReadFn,
                   exclude: Sequence[Tuple[int, int]] = ()) -> List[Tuple[int, int, int, int]]:
    """Chunks glibc served with mmap, found without a block list: in every
    private anonymous rw mapping (the kernel may merge neighbours into one
    line of maps), a page that starts a chunk whose size word has IS_MMAPPED,
    a page-multiple size that fits, and a prev_size (the memalign offset)
    below a page.  Returns ``(user pointer, usable size, map lo, map hi)``.
    ``exclude``: ranges not to look into (e.g. arena heaps)."""
    out = []
    for m in maps:
        if not (m.readable and m.writable and m.path == "" and m.perms.endswith("p")):
            continue
        if any(lo <= m.start < hi for lo, hi in exclude):
            continue
        a = m.start
        while a + 4096 <= m.end:
            hdr = _words(read, a, 16)
            if hdr.size < 2:
                a += 4096
                continue
            prev, size = int(hdr[0]), int(hdr[1])
            total = (size & ~SIZE_BITS) + prev
            if (size & SIZE_BITS) == IS_MMAPPED and prev < 4096 and prev % 16 == 0 \
                    and total % 4096 == 0 and 0 < total <= m.end - a:
                user = a + prev + 16
                out.append((user, (size & ~SIZE_BITS) - 16, a, a + total))
                a += total
            else:
                a += 4096
    return out
