"""CPython's pymalloc, read from a snapshot of a running interpreter: which
of its blocks are live and which are free (leak kinds of the pytest process,
kinds/inprocess.py).

pymalloc serves Python's small requests (512 bytes or less) from arenas it
maps itself (anonymous mmaps, ``_PyObject_ArenaMmap``).  A freed block keeps
its words: a stale pointer there would make a leaked block look reachable,
so arena memory is never a root as a whole.  What is live is known from
pymalloc's own structures (CPython 3.10 and 3.11, Objects/obmalloc.c, 64-bit
with the radix tree, the default build):

* ``arenas`` (static ``struct arena_object *``) and ``maxarenas`` (static
  ``uint``): the arena table; an entry whose ``address`` is 0 is unused;
* an arena of ``ARENA_SIZE`` (1 MiB) bytes at ``address`` holds pools of
  ``POOL_SIZE`` (16 KiB) from the first pool-aligned address up to
  ``pool_address`` (the pools beyond it were never carved);
* a pool whose ``ref.count`` is 0 is free (on its arena's ``freepools``);
  in any other, blocks of ``(szidx + 1) * 16`` bytes are carved from
  ``POOL_OVERHEAD`` (48) up to ``nextoffset``, and those on the chain that
  starts at ``freeblock`` (each free block's first word is the next) are
  free.  Every other carved block is live, and a used pool's live blocks
  number exactly ``ref.count``: the walk checks it, pool by pool.

The two statics are local symbols: they are found in the interpreter's
``.symtab`` (libpython, or the executable when it links CPython
statically).  CPython 3.12 moved them into ``_PyRuntime``'s obmalloc state:
there (or with no symbol table) :func:`locate` raises LookupError saying
why, and the scan is unclassified, never silently made of stale words.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..procmaps import Region

Range = Tuple[int, int]

ARENA_OBJECT_BYTES = 48     # address, pool_address, nfreepools, ntotalpools, freepools, nextarena, prevarena
POOL_OVERHEAD = 48          # struct pool_header rounded up to ALIGNMENT
ALIGNMENT = 16
NB_SMALL_SIZE_CLASSES = 32  # SMALL_REQUEST_THRESHOLD 512 / ALIGNMENT
# pool_header word offsets: ref.count (uint in a pointer-sized union), freeblock,
# nextpool, prevpool, then uint arenaindex, szidx, nextoffset, maxnextoffset
_COUNT, _FREEBLOCK = 0, 1
_U32_SZIDX, _U32_NEXTOFFSET, _U32_MAXNEXT = 9, 10, 11   # as uint32 indices
_MAX_ARENAS = 1 << 22       # a sane bound on maxarenas (4 TiB of arenas)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one interpreter's pymalloc state lies in its process."""

    arenas: int                 # address of the static `arenas` pointer
    maxarenas: int              # address of the static `maxarenas` uint
    arena_size: int = 1 << 20
    pool_size: int = 1 << 14
    source: str = ""            # the file whose symbols gave them


_symbols_cache: Dict[Tuple[str, int, int], Tuple[Optional[Tuple[int, int]], list]] = {}


def _object_symbols(path: str) -> Tuple[Optional[Tuple[int, int]], list]:
    """((st_value of `arenas`, of `maxarenas`) in `path`'s .symtab, or None;
    its PT_LOADs, elf.load_segments), read once per file."""
    st = os.stat(path)
    key = (path, st.st_ino, st.st_mtime_ns)
    if key in _symbols_cache:
        return _symbols_cache[key]
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    from ..elf import load_segments

    found: Dict[str, int] = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        sec = elf.get_section_by_name(".symtab")
        if isinstance(sec, SymbolTableSection):
            for name in ("arenas", "maxarenas"):
                for sym in sec.get_symbol_by_name(name) or ():
                    if sym["st_info"]["type"] == "STT_OBJECT" and sym["st_shndx"] != "SHN_UNDEF":
                        found[name] = sym["st_value"]
                        break
    out = ((found["arenas"], found["maxarenas"]) if len(found) == 2 else None, load_segments(path))
    _symbols_cache[key] = out
    return out


def _version(path: str) -> Optional[Tuple[int, int]]:
    m = re.search(r"(?:libpython|python)(\d)\.(\d+)", os.path.basename(path))
    return (int(m.group(1)), int(m.group(2))) if m else None


def locate(maps: Sequence[Region], exe: Optional[str] = None) -> Layout:
    """The pymalloc state of the process whose mappings are `maps` (its
    libpython's, else its executable's `exe`). LookupError saying why when
    it cannot be known."""
    files = [m.path for m in maps if os.path.basename(m.path).startswith("libpython")]
    if exe:
        files.append(exe)
    tried = []
    for path in dict.fromkeys(files):
        version = _version(path)
        if version is not None and not ((3, 10) <= version <= (3, 11)):
            tried.append(f"{path}: CPython {version[0]}.{version[1]} keeps pymalloc's arenas elsewhere "
                         "(read here for 3.10 and 3.11)")
            continue
        try:
            syms, loads = _object_symbols(path)
        except (OSError, ValueError) as exc:
            tried.append(f"{path}: {exc}")
            continue
        if syms is None:
            tried.append(f"{path} has no symbols `arenas` and `maxarenas`")
            continue
        mine = [m for m in maps if m.path == path]
        bias = None
        for m in mine:
            seg = next(((off, fsz, va) for off, fsz, va, _ in loads if off <= m.offset < off + max(fsz, 1)), None)
            if seg is not None:
                bias = m.start - (seg[2] + m.offset - seg[0])
                break
        if bias is None:
            tried.append(f"{path} is not mapped")
            continue
        return Layout(arenas=bias + syms[0], maxarenas=bias + syms[1], source=path)
    raise LookupError("pymalloc's arena table was not found (" + ("; ".join(tried) or "no interpreter mapped") + ")")


@dataclasses.dataclass
class Heap:
    """pymalloc's memory in one snapshot."""

    arenas: List[Range]                 # every arena in use, whole
    live: List[Tuple[int, np.ndarray]]  # per arena: (its start, bool per word: inside a live block)
    pools: int = 0
    live_blocks: int = 0
    free_blocks: int = 0

    def root_words(self, snap, holes: Sequence[Range]) -> List[Tuple[int, np.ndarray]]:
        """The words of the live blocks outside `holes` (the candidates),
        one array per arena."""
        out = []
        holes = sorted(holes)
        hlo = [a for a, _ in holes]
        for lo, mask in self.live:
            hi = lo + 8 * mask.size
            keep = mask
            i = bisect.bisect_left(hlo, lo)
            j = bisect.bisect_left(hlo, hi)
            if i < j:
                keep = mask.copy()
                for a, b in holes[i:j]:
                    keep[(a - lo) // 8:(min(b, hi) - lo + 7) // 8] = False
            words = snap.view(lo, hi)
            if words.size != mask.size:      # not in the snapshot: nothing to read
                continue
            out.append((lo, words[keep]))
        return out


def walk(snap, layout: Layout) -> Heap:
    """pymalloc's arenas and live blocks in `snap` (inprocess.Snapshot).
    ValueError when its structures do not read as pymalloc's (another
    layout, or memory that moved)."""
    table = snap.word(layout.arenas)
    nwords = snap.word(layout.maxarenas & ~7)
    if table is None or nwords is None:
        raise ValueError("pymalloc's arena table is not in the process's writable memory")
    maxarenas = (nwords >> (8 * (layout.maxarenas & 7))) & 0xFFFFFFFF
    heap = Heap(arenas=[], live=[])
    if table == 0 or maxarenas == 0:
        return heap                          # pymalloc never made an arena (PYTHONMALLOC=malloc)
    if maxarenas > _MAX_ARENAS:
        raise ValueError(f"pymalloc's maxarenas reads {maxarenas}")
    raw = snap.read(table, maxarenas * ARENA_OBJECT_BYTES)
    if len(raw) != maxarenas * ARENA_OBJECT_BYTES:
        raise ValueError("pymalloc's arena table is not readable whole")
    objs = np.frombuffer(raw, dtype=np.uint64).reshape(maxarenas, ARENA_OBJECT_BYTES // 8)
    asize, psize = layout.arena_size, layout.pool_size
    pwords = psize // 8
    for address, pool_address in sorted(zip(objs[:, 0].tolist(), objs[:, 1].tolist())):
        if address == 0:
            continue
        first = (address + psize - 1) & ~(psize - 1)
        if not (first <= pool_address <= address + asize) or (pool_address - first) % psize:
            raise ValueError(f"pymalloc arena {address:#x}: pool_address {pool_address:#x} is not one of its pools")
        words = snap.view(address, address + asize)
        if words.size != asize // 8:
            raise ValueError(f"pymalloc arena {address:#x} is not in the snapshot")
        mask = np.zeros(asize // 8, dtype=bool)
        base_w = (first - address) // 8
        npools = (pool_address - first) // psize
        if npools:
            hdr = words[base_w:base_w + npools * pwords].reshape(npools, pwords)[:, :6]
            counts = (hdr[:, _COUNT] & np.uint64(0xFFFFFFFF)).astype(np.int64)
            u32 = hdr.view(np.uint32)       # per pool: 12 uint32s
            szidx = u32[:, _U32_SZIDX].astype(np.int64)
            nextoff = u32[:, _U32_NEXTOFFSET].astype(np.int64)
            for p in np.nonzero(counts)[0].tolist():
                _mark_pool(snap, words, mask, address, base_w + p * pwords, first + p * psize,
                           int(counts[p]), int(szidx[p]), int(nextoff[p]), psize, int(hdr[p, _FREEBLOCK]), heap)
            heap.pools += int(np.count_nonzero(counts))
        heap.arenas.append((address, address + asize))
        heap.live.append((address, mask))
    return heap


def _mark_pool(snap, words, mask, arena: int, w0: int, pool: int, count: int, szidx: int, nextoffset: int,
               psize: int, freeblock: int, heap: Heap) -> None:
    """Set `mask` over the live blocks of the used pool at `pool` (word `w0`
    of its arena's words)."""
    if szidx >= NB_SMALL_SIZE_CLASSES or not (POOL_OVERHEAD <= nextoffset <= psize):
        raise ValueError(f"pymalloc pool {pool:#x}: szidx {szidx}, nextoffset {nextoffset}")
    size = (szidx + 1) * ALIGNMENT
    carved = (nextoffset - POOL_OVERHEAD) // size
    if carved <= 0:
        raise ValueError(f"pymalloc pool {pool:#x} counts {count} blocks but none is carved")
    sw = size // 8
    lo_w = w0 + POOL_OVERHEAD // 8
    mask[lo_w:lo_w + carved * sw] = True
    free = 0
    b = freeblock
    end = pool + POOL_OVERHEAD + carved * size
    while b:
        if not (pool + POOL_OVERHEAD <= b < end) or (b - pool - POOL_OVERHEAD) % size:
            raise ValueError(f"pymalloc pool {pool:#x}: free block {b:#x} is not one of its blocks")
        i = (b - arena) >> 3
        mask[i:i + sw] = False
        free += 1
        if free > carved:
            raise ValueError(f"pymalloc pool {pool:#x}: its free list loops")
        b = int(words[i])
    if carved - free != count:
        raise ValueError(f"pymalloc pool {pool:#x}: {carved - free} live blocks, its count says {count}")
    heap.live_blocks += count
    heap.free_blocks += free
