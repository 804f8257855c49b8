"""Classify heap blocks the way valgrind memcheck 3.19 does (mc_leakcheck.c).

Pure computation, no I/O.  Inputs:

* the live blocks: ``starts`` and ``sizes`` (requested sizes, in bytes);
* the root regions: ``(address, words)`` pairs, ``words`` a numpy uint64 array
  of the aligned 8-byte words starting at ``address`` (8-aligned), plus the
  registers of every thread (``registers``: any iterable of ints);
* the blocks' contents: ``heap``, ``(address, words)`` segments that hold the
  blocks (a block's words are the aligned words inside ``[start, start+size)``;
  a block that no segment covers has no readable content).

Rules, as memcheck's (read ``lc_push_without_clique_if_a_chunk_ptr``,
``heuristic_reachedness``, ``lc_process_markstack`` and the clique loop of
``MC_(detect_memory_leaks)``):

* a word points to block ``b`` when ``start <= word < start + max(size, 1)``
  (a 0-byte block counts as 1 byte); a word equal to ``start`` is a start
  pointer, anything else an interior pointer;
* an interior pointer that one of the enabled heuristics accepts counts as a
  start pointer;
* **reachable**: reached by a start pointer from a root, a register, or a
  reachable block; **possibly lost**: reached by any pointer from a root, a
  register, a reachable or a possibly lost block, and not reachable (so a block
  reached only through an interior pointer, or through a possibly lost block,
  is possibly lost);
* the rest are lost.  In address order, each lost block still unreached leads
  a clique: every unreached block it reaches (start or interior pointer,
  transitively) is **indirectly lost**, including earlier leaders; the leaders
  left are **definitely lost**.

glibc hazard (``hazard_offsets``): glibc's bins, ``top``, ``last_remainder``
and the fd/bk words of free chunks are raw pointers to a chunk's header, which
lies 16 bytes before the chunk's user memory, i.e. in the last word of the
previous block when that block's request used it.  memcheck never sees these
words: its own allocator has redzones, the client's free memory is
unaddressable and a fresh block's words are undefined until written.  A word
equal to ``start + hazard_offsets[b]`` (glibc: the block's chunk size - 16) is
therefore not a pointer to ``b`` here.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
import time
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

DEFINITE, INDIRECT, POSSIBLE, REACHABLE = 0, 1, 2, 3
KIND_NAMES = ("definite", "indirect", "possible", "reachable")

#: memcheck's heuristic names, in the order it tries them.
HEURISTICS = ("stdstring", "length64", "newarray", "multipleinheritance")
#: memcheck's default ``--leak-check-heuristics`` (all four).
DEFAULT_HEURISTICS = frozenset(HEURISTICS)

_UNREACHED = -1
# marking goes on in plain Python once the frontier stayed this narrow for
# this many levels (a long chain: one numpy round per level would cost more)
_NARROW, _NARROW_LEVELS = 256, 32
_WORD = np.uint64(8)

Region = Tuple[int, np.ndarray]


@dataclasses.dataclass
class Classification:
    """The verdict for every block, in the order the blocks were given."""

    starts: np.ndarray  # uint64
    sizes: np.ndarray  # uint64
    kinds: np.ndarray  # int8: DEFINITE, INDIRECT, POSSIBLE or REACHABLE
    #: per block, the heuristic (1 + index in HEURISTICS) that made it
    #: reachable and no start pointer did; 0 if none.
    heuristic: np.ndarray

    def summary(self) -> Dict[str, Tuple[int, int]]:
        """``{kind name: (bytes, blocks)}`` for the four kinds."""
        out = {}
        if self.kinds.size <= SMALL_BLOCKS:        # a few blocks: plain Python
            acc = [[0, 0] for _ in KIND_NAMES]
            for k, z in zip(self.kinds.tolist(), self.sizes.tolist()):
                acc[k][0] += z
                acc[k][1] += 1
            return {name: (acc[k][0], acc[k][1]) for k, name in enumerate(KIND_NAMES)}
        for k, name in enumerate(KIND_NAMES):
            sel = self.kinds == k
            out[name] = (int(self.sizes[sel].sum()), int(sel.sum()))
        return out

    def heuristic_summary(self) -> Dict[str, Tuple[int, int]]:
        """``{heuristic: (bytes, blocks)}`` of reachable blocks that only a
        heuristic made reachable (memcheck's "of which reachable via
        heuristic")."""
        out = {}
        for h, name in enumerate(HEURISTICS, start=1):
            sel = (self.heuristic == h) & (self.kinds == REACHABLE)
            if sel.any():
                out[name] = (int(self.sizes[sel].sum()), int(sel.sum()))
        return out


def _as_words(words) -> np.ndarray:
    arr = np.asarray(words)
    if arr.dtype != np.uint64:
        arr = arr.astype(np.uint64)
    return arr if arr.ndim == 1 else arr.reshape(-1)


class _Blocks:
    """Blocks sorted by address, and lookup of words against them."""

    def __init__(self, starts, sizes, hazard_offsets):
        starts = np.asarray(starts, dtype=np.uint64).reshape(-1)
        sizes = np.asarray(sizes, dtype=np.uint64).reshape(-1)
        if starts.shape != sizes.shape:
            raise ValueError(f"starts ({starts.size}) and sizes ({sizes.size}) differ in length")
        self.order = np.argsort(starts, kind="stable")
        self.starts = starts[self.order]
        self.sizes = sizes[self.order]
        self.n = int(self.starts.size)
        self.ends = self.starts + np.maximum(self.sizes, np.uint64(1))
        if self.n > 1 and bool((self.ends[:-1] > self.starts[1:]).any()):
            i = int(np.nonzero(self.ends[:-1] > self.starts[1:])[0][0])
            raise ValueError(
                f"blocks overlap: {int(self.starts[i]):#x}+{int(self.sizes[i])} and "
                f"{int(self.starts[i + 1]):#x}+{int(self.sizes[i + 1])}")
        if hazard_offsets is None:
            self.hazard = None
        else:
            hz = np.asarray(hazard_offsets, dtype=np.int64).reshape(-1)
            if hz.shape != starts.shape:
                raise ValueError("hazard_offsets must have one entry per block")
            hz = hz[self.order]
            # -1: none; an offset at/after the end can never match anyway
            self.hazard = np.where(hz >= 0, self.starts + hz.astype(np.uint64), np.uint64(0))
        self.lo = self.starts[0] if self.n else np.uint64(0)
        self.hi = self.ends.max() if self.n else np.uint64(0)

    def lookup(self, values: np.ndarray):
        """For each value: (positions kept, block index, is start pointer)."""
        if self.n == 0 or values.size == 0:
            e = np.zeros(0, dtype=np.int64)
            return e, e, np.zeros(0, dtype=bool)
        cand = _in_range(values, self.lo, self.hi)
        v = values[cand]
        idx = np.searchsorted(self.starts, v, side="right").astype(np.int64) - 1
        ok = idx >= 0
        idx_c = np.where(ok, idx, 0)
        ok &= v < self.ends[idx_c]
        if self.hazard is not None:
            ok &= ~((v == self.hazard[idx_c]) & (self.hazard[idx_c] != 0))
        cand, idx, v = cand[ok], idx_c[ok], v[ok]
        return cand, idx, v == self.starts[idx]


_CHUNK_WORDS = 1 << 20


def _in_range(values: np.ndarray, lo, hi) -> np.ndarray:
    """Positions of the values in [lo, hi), a chunk at a time (the
    temporaries of a big array stay small and in cache)."""
    if values.size <= _CHUNK_WORDS:
        return np.nonzero((values >= lo) & (values < hi))[0]
    a = np.empty(_CHUNK_WORDS, dtype=bool)
    b = np.empty(_CHUNK_WORDS, dtype=bool)
    out = []
    for i in range(0, values.size, _CHUNK_WORDS):
        v = values[i:i + _CHUNK_WORDS]
        x, y = a[:v.size], b[:v.size]
        np.greater_equal(v, lo, out=x)
        np.less(v, hi, out=y)
        np.logical_and(x, y, out=x)
        out.append(np.flatnonzero(x) + i)
    return np.concatenate(out)


def _root_base(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _joined(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The uint64 arrays one after the other: a view, with no copy, when they
    lie one after the other in one buffer (ProcessMemory.words_many reads
    the blocks' segments so), else a concatenation."""
    if not arrays:
        return np.zeros(0, dtype=np.uint64)
    if len(arrays) == 1:
        return arrays[0]
    base = _root_base(arrays[0])
    if base.ndim == 1 and base.flags.c_contiguous and all(a.flags.c_contiguous for a in arrays) \
            and all(_root_base(a) is base for a in arrays[1:]) \
            and all(a.ctypes.data + a.nbytes == b.ctypes.data for a, b in zip(arrays, arrays[1:])):
        off = arrays[0].ctypes.data - base.ctypes.data
        n = sum(a.size for a in arrays)
        flat = base.view(np.uint8) if base.dtype != np.uint8 else base
        return flat[off:off + 8 * n].view(np.uint64)
    return np.concatenate(arrays)


class _Contents:
    """Block words located in the heap segments."""

    def __init__(self, blocks: _Blocks, heap: Sequence[Region]):
        segs = sorted(((int(a), _as_words(w)) for a, w in heap), key=lambda s: s[0])
        for a, _ in segs:
            if a % 8:
                raise ValueError(f"heap segment at {a:#x} is not 8-byte aligned")
        self.seg_starts = np.array([a for a, _ in segs], dtype=np.uint64)
        self.seg_ends = np.array([a + 8 * w.size for a, w in segs], dtype=np.uint64)
        offs = np.zeros(len(segs) + 1, dtype=np.int64)
        if segs:
            offs[1:] = np.cumsum([w.size for _, w in segs])
        self.words = _joined([w for _, w in segs])
        n = blocks.n
        # word range [wlo, whi) of each block in self.words; empty if not covered
        first = (blocks.starts + np.uint64(7)) & ~np.uint64(7)
        last = (blocks.starts + blocks.sizes) & ~np.uint64(7)
        last = np.maximum(last, first)
        si = np.searchsorted(self.seg_starts, blocks.starts, side="right").astype(np.int64) - 1
        covered = si >= 0
        si_c = np.where(covered, si, 0)
        if segs:
            covered &= last <= self.seg_ends[si_c]
            covered &= blocks.starts >= self.seg_starts[si_c]
            base = offs[si_c] + ((first - self.seg_starts[si_c]) // _WORD).astype(np.int64)
        else:
            covered &= False
            base = np.zeros(n, dtype=np.int64)
        count = ((last - first) // _WORD).astype(np.int64)
        self.wlo = np.where(covered, base, 0)
        self.whi = np.where(covered, base + count, 0)
        self.covered = covered
        self.blocks = blocks

    def word_at(self, b: np.ndarray, offset: int):
        """Word at start+offset of blocks b (aligned starts): (valid, value)."""
        bl = self.blocks
        valid = self.covered[b] & (bl.starts[b] % _WORD == 0) & (bl.sizes[b] >= np.uint64(offset + 8))
        pos = self.wlo[b] + offset // 8
        pos = np.where(valid, pos, 0)
        vals = self.words[pos] if self.words.size else np.zeros(b.size, dtype=np.uint64)
        return valid, np.where(valid, vals, np.uint64(0))

    def edges(self):
        """Every pointer from a block's words: (source block, target, is_start, value)."""
        bl = self.blocks
        cand, tgt, is_start = bl.lookup(self.words)
        if cand.size == 0:
            e = np.zeros(0, dtype=np.int64)
            return e, e, np.zeros(0, dtype=bool), np.zeros(0, dtype=np.uint64)
        # owner block of each word position (block word ranges are disjoint, sorted)
        live = np.nonzero(self.whi > self.wlo)[0]
        owner_i = np.searchsorted(self.wlo[live], cand, side="right").astype(np.int64) - 1
        ok = owner_i >= 0
        owner_i = np.where(ok, owner_i, 0)
        src = live[owner_i] if live.size else owner_i
        ok &= cand < self.whi[src] if live.size else False
        return src[ok], tgt[ok], is_start[ok], self.words[cand[ok]]


def _heuristic(blocks: _Blocks, contents: _Contents, tgt, values, heuristics, is_vtable):
    """For interior pointers ``values`` to blocks ``tgt``: the heuristic that
    accepts each (1-based index into HEURISTICS), 0 for none."""
    res = np.zeros(tgt.size, dtype=np.int8)
    if tgt.size == 0 or not heuristics:
        return res
    off = values - blocks.starts[tgt]
    size = blocks.sizes[tgt]
    v0, w0 = contents.word_at(tgt, 0)
    if "stdstring" in heuristics:
        v1, w1 = contents.word_at(tgt, 8)
        # capacity word at +8 with 24 + capacity + 1 == size, length at +0 <= capacity
        # (memcheck's SizeT arithmetic wraps around; so does numpy's uint64)
        hit = (off == np.uint64(24)) & v1 & v0 & (w1 + np.uint64(25) == size) & (w0 <= w1)
        res[(res == 0) & hit] = 1
    if "length64" in heuristics:
        hit = (off == _WORD) & v0 & (w0 > 0) & (size >= _WORD) & (size - _WORD == w0)
        res[(res == 0) & hit] = 2
    if "newarray" in heuristics:
        n = np.where(w0 > 0, w0, np.uint64(1))
        hit = (off == _WORD) & v0 & (w0 > 0) & (size >= _WORD) & ((size - _WORD) % n == 0)
        res[(res == 0) & hit] = 3
    if "multipleinheritance" in heuristics and is_vtable is not None:
        todo = np.nonzero((res == 0) & (values % _WORD == 0))[0]
        if todo.size:
            t = tgt[todo]
            o = off[todo]
            # the word at ptr must lie inside the block
            inside = contents.covered[t] & (o + _WORD <= blocks.sizes[t])
            pos = np.where(inside, contents.wlo[t] + (o // _WORD).astype(np.int64), 0)
            inner = np.where(inside, contents.words[pos] if contents.words.size else 0, 0).astype(np.uint64)
            first_ok, first = v0[todo], w0[todo]
            page = np.uint64(4096)
            maybe = (inside & first_ok & (inner % _WORD == 0) & (inner >= page)
                     & (first % _WORD == 0) & (first >= page))
            if maybe.any():
                vals = np.unique(np.concatenate([inner[maybe], first[maybe]]))
                vt = np.asarray(is_vtable(vals), dtype=bool)
                ok_in = np.zeros(todo.size, dtype=bool)
                ok_first = np.zeros(todo.size, dtype=bool)
                ok_in[maybe] = vt[np.searchsorted(vals, inner[maybe])]
                ok_first[maybe] = vt[np.searchsorted(vals, first[maybe])]
                hit = maybe & ok_in & ok_first
                res[todo[hit]] = 4
    return res


def _dedup(values: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """``values`` (indices < len(scratch)) without repeats, in O(len(values))."""
    if values.size < 2:
        return values
    pos = np.arange(values.size, dtype=np.int64)
    scratch[values] = pos
    return values[scratch[values] == pos]


class _Graph:
    """Pointer edges between blocks in CSR form (by source block)."""

    def __init__(self, n, src, tgt, strong, is_start, heur):
        if src.size < 2 or bool((src[1:] >= src[:-1]).all()):
            order = slice(None)  # block words come out in address order already
        else:
            order = np.argsort(src, kind="stable")
        self.tgt = tgt[order]
        self.strong = strong[order]
        self.is_start = is_start[order]
        self.heur = heur[order]
        self._lists = None
        self.indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(src, minlength=n), out=self.indptr[1:])

    def walk(self, start: np.ndarray, state: np.ndarray, mark: int, strong_only: bool):
        """Depth-first marking from ``start`` (already marked ``mark``) in
        plain Python: for narrow frontiers (long chains, e.g. linked lists)
        one numpy round per level costs far more than a list walk.
        REACHABLE marks over strong edges any block not yet reachable;
        POSSIBLE marks, over any edge, blocks still unreached."""
        if self._lists is None:
            self._lists = (self.indptr.tolist(), self.tgt.tolist(), self.strong.tolist())
        indptr, tgt, strong = self._lists
        st = state.tolist()
        stack = start.tolist()
        changed = []
        if strong_only:
            while stack:
                b = stack.pop()
                for k in range(indptr[b], indptr[b + 1]):
                    t = tgt[k]
                    if strong[k] and st[t] != mark:
                        st[t] = mark
                        changed.append(t)
                        stack.append(t)
        else:
            while stack:
                b = stack.pop()
                for k in range(indptr[b], indptr[b + 1]):
                    t = tgt[k]
                    if st[t] == _UNREACHED:
                        st[t] = mark
                        changed.append(t)
                        stack.append(t)
        if changed:
            state[np.array(changed, dtype=np.int64)] = mark

    def out_edges(self, nodes: np.ndarray):
        """Indices into tgt/strong of every edge leaving ``nodes``."""
        lo = self.indptr[nodes]
        cnt = self.indptr[nodes + 1] - lo
        total = int(cnt.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        rep = np.repeat(lo - np.concatenate(([0], np.cumsum(cnt)[:-1])), cnt)
        return rep + np.arange(total, dtype=np.int64)


def _indirect(n: int, srcs: np.ndarray, tgts: np.ndarray, lost: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """The lost blocks memcheck's clique pass calls indirectly lost, given the
    pointers ``srcs -> tgts`` between distinct lost blocks (indices in address
    order).

    memcheck: in address order, each lost block not yet reached leads a
    clique and marks every not yet reached block it reaches (transitively,
    itself excepted; earlier leaders included); the leaders left unmarked are
    definitely lost.  Its outcome depends on that order only on cycles:

    * a block no lost block points to ("head") always leads and is never
      marked: definitely lost;
    * a block some lost block points to, and on no cycle, always ends marked:
      each of its predecessors is expanded by some clique (as a leader or when
      marked), and that marks it unless it leads that clique itself, which
      needs a path back to it from its predecessor;
    * the rest depends on the order: only blocks from which a cycle can be
      reached (``A``: what is left after repeatedly dropping the blocks that
      point to no block still there, one numpy round per level).  ``A`` holds
      every predecessor of its blocks, so memcheck's own loop run on ``A``
      alone (leaders and marking limited to ``A``) decides them exactly.
      Lost lists and trees reached from their head have no cycle; circular
      and doubly linked ones get there.
    """
    pointed = np.zeros(n, dtype=bool)
    pointed[tgts] = True
    outdeg = np.bincount(srcs, minlength=n)
    rev = _Graph(n, tgts, srcs, np.ones(srcs.size, bool), np.ones(srcs.size, bool), np.zeros(srcs.size, np.int8))
    left = lost & (outdeg > 0)          # blocks still there: A once nothing more drops
    frontier = np.nonzero(~left & pointed)[0]
    narrow = 0
    while frontier.size:
        narrow = narrow + 1 if frontier.size < _NARROW else 0
        if narrow > _NARROW_LEVELS:
            indptr, gs, deg = rev.indptr.tolist(), rev.tgt.tolist(), outdeg.tolist()
            keep = bytearray(left.tobytes())
            stack = frontier.tolist()
            while stack:
                b = stack.pop()
                for q in gs[indptr[b]:indptr[b + 1]]:
                    deg[q] -= 1
                    if deg[q] == 0:
                        keep[q] = 0
                        stack.append(q)
            left = np.frombuffer(bytes(keep), dtype=bool).copy()
            break
        q = rev.tgt[rev.out_edges(frontier)]
        np.subtract.at(outdeg, q, 1)
        q = _dedup(q, scratch)
        frontier = q[(outdeg[q] == 0) & left[q]]
        left[frontier] = False
    indirect = lost & pointed & ~left
    if left.any():
        sub = _Graph(n, srcs, tgts, np.ones(srcs.size, bool), np.ones(srcs.size, bool), np.zeros(srcs.size, np.int8))
        indptr, gt = sub.indptr.tolist(), sub.tgt.tolist()
        st = bytearray(left.tobytes())  # 1: in A and not marked yet
        for leader in np.nonzero(left)[0].tolist():
            if not st[leader]:
                continue
            stack = [leader]
            while stack:
                b = stack.pop()
                for t in gt[indptr[b]:indptr[b + 1]]:
                    if st[t] and t != leader:
                        st[t] = 0
                        stack.append(t)
        indirect |= left & ~np.frombuffer(bytes(st), dtype=bool)
    return indirect


#: classify in plain Python (_classify_small) up to this many blocks, this
#: many words inside them and this many root words that fall among them: a
#: small process's scan is then a few dozen Python steps instead of ~100 small
#: numpy calls (each costing microseconds whatever its size)
SMALL_BLOCKS, SMALL_BLOCK_WORDS, SMALL_ROOT_HITS = 64, 8192, 4096
_M64 = (1 << 64) - 1


_SCRATCH_WORDS = 1 << 16       # 1.1 MiB per thread, kept
_scratch = threading.local()


def _words_in_range(arrays: Sequence[np.ndarray], lo: int, hi: int, limit: int) -> Optional[list]:
    """The words of ``arrays`` in [lo, hi), in order (None past ``limit`` of
    them): ``(w - lo) mod 2**64 < hi - lo`` over the arrays joined into this
    thread's scratch buffers, a scratch-full at a time: a handful of numpy
    calls and no temporary array (each allocation in a traced pytest
    process is a uprobe hit)."""
    sc = getattr(_scratch, "bufs", None)
    if sc is None or sc[0].size != _SCRATCH_WORDS:
        sc = _scratch.bufs = (np.empty(_SCRATCH_WORDS, dtype=np.uint64), np.empty(_SCRATCH_WORDS, dtype=np.uint64),
                              np.empty(_SCRATCH_WORDS, dtype=bool))
    j_all, d_all, m_all = sc
    low, span = np.uint64(lo), np.uint64(hi - lo)
    out: list = []
    group: list = []
    size = 0

    def run(group, size):
        j, d, m = j_all[:size], d_all[:size], m_all[:size]
        if len(group) == 1:
            j = group[0]
        else:
            np.concatenate(group, out=j)
        np.subtract(j, low, out=d)
        np.less(d, span, out=m)
        if m.any():
            out.extend(j[m].tolist())

    pieces = (w if w.size <= _SCRATCH_WORDS else w[i:i + _SCRATCH_WORDS]
              for w in arrays for i in range(0, w.size, _SCRATCH_WORDS))
    for part in pieces:
        if size + part.size > _SCRATCH_WORDS:
            run(group, size)
            if len(out) > limit:
                return None
            group, size = [], 0
        group.append(part)
        size += part.size
    if size:
        run(group, size)
    return None if len(out) > limit else out


def _classify_small(starts: np.ndarray, sizes: np.ndarray, roots, heap, registers, heuristics, is_vtable,
                    hazard_offsets, clock) -> Optional[Classification]:
    """classify() for small inputs, the same rules step by step in plain
    Python (tests/test_kinds_classify.py compares it with the vectorised
    passes on random graphs); None when the input is not small (or a block
    start is not 8-aligned): the caller takes the vectorised path."""
    n = int(starts.size)
    if n > SMALL_BLOCKS:
        return None
    S0, Z0 = starts.tolist(), sizes.tolist()
    if any(a % 8 for a in S0):
        return None
    order = sorted(range(n), key=S0.__getitem__)        # stable, as argsort(kind="stable")
    S = [S0[i] for i in order]
    Z = [Z0[i] for i in order]
    E = [a + (z if z > 1 else 1) for a, z in zip(S, Z)]
    for i in range(n - 1):
        if E[i] > S[i + 1]:
            raise ValueError(f"blocks overlap: {S[i]:#x}+{Z[i]} and {S[i + 1]:#x}+{Z[i + 1]}")
    if hazard_offsets is None:
        H = None
    else:
        hz = np.asarray(hazard_offsets, dtype=np.int64).reshape(-1)
        if hz.shape != starts.shape:
            raise ValueError("hazard_offsets must have one entry per block")
        hz = hz.tolist()
        H = [(a + hz[i]) & _M64 if hz[i] >= 0 else 0 for a, i in zip(S, order)]
    # each block's words (aligned starts: from its start to its last whole word)
    segs = sorted(((int(a), _as_words(w)) for a, w in heap), key=lambda x: x[0])
    for a, _ in segs:
        if a % 8:
            raise ValueError(f"heap segment at {a:#x} is not 8-byte aligned")
    seg_lo = [a for a, _ in segs]
    W: list = [None] * n            # None: not covered (no readable content)
    total = 0
    for b in range(n):
        k = bisect.bisect_right(seg_lo, S[b]) - 1
        last = (S[b] + Z[b]) & ~7
        if k >= 0:
            a, w = segs[k]
            if last <= a + 8 * w.size:
                total += (last - S[b]) // 8
                if total > SMALL_BLOCK_WORDS:
                    return None
                W[b] = w[(S[b] - a) // 8:(last - a) // 8].tolist()
    if n:
        lo, hi = S[0], max(E)
    clock.lap("blocks")

    def find(v):
        """(block, is start) of a pointer value, or None."""
        if v < lo or v >= hi:
            return None
        t = bisect.bisect_right(S, v) - 1
        if t < 0 or v >= E[t] or (H is not None and H[t] and v == H[t]):
            return None
        return t, v == S[t]

    def word(t, off):
        w = W[t]
        return w[off // 8] if w is not None and Z[t] >= off + 8 else None

    vt_cache: dict = {}

    def vtable(v):
        if v not in vt_cache:
            vt_cache[v] = bool(np.asarray(is_vtable(np.array([v], dtype=np.uint64)), dtype=bool)[0])
        return vt_cache[v]

    def heur(t, v):
        """The heuristic (1-based) accepting the interior pointer v to block t, 0 for none."""
        if not heuristics:
            return 0
        off, size = v - S[t], Z[t]
        w0 = word(t, 0)
        if "stdstring" in heuristics and off == 24:
            w1 = word(t, 8)
            if w0 is not None and w1 is not None and (w1 + 25) & _M64 == size and w0 <= w1:
                return 1
        if off == 8 and w0 is not None and w0 > 0 and size >= 8:
            if "length64" in heuristics and size - 8 == w0:
                return 2
            if "newarray" in heuristics and (size - 8) % w0 == 0:
                return 3
        if "multipleinheritance" in heuristics and is_vtable is not None and v % 8 == 0:
            if W[t] is not None and off + 8 <= size and w0 is not None:
                inner = W[t][off // 8]
                if inner % 8 == 0 and inner >= 4096 and w0 % 8 == 0 and w0 >= 4096 \
                        and vtable(inner) and vtable(w0):
                    return 4
        return 0

    # pointers from the roots: the words among the blocks, found by numpy
    # passes over scratch buffers (no temporary arrays: in a traced pytest
    # process every malloc and free is a uprobe hit)
    rhits = []                      # (target, is start, heuristic)
    if n:
        vals = _words_in_range([_as_words(w) for _, w in roots], lo, hi, SMALL_ROOT_HITS)
        if vals is None:
            return None
        vals += [r for r in (int(x) & _M64 for x in registers) if lo <= r < hi]
        if len(vals) > SMALL_ROOT_HITS:
            return None
        for v in vals:
            f = find(v)
            if f is not None:
                rhits.append((f[0], f[1], 0 if f[1] else heur(f[0], v)))
    # pointers between blocks: per source, (target, is start, heuristic)
    out = [[] for _ in range(n)]
    for b in range(n):
        if W[b] is None:
            continue
        for v in W[b]:
            if lo <= v < hi:
                f = find(v)
                if f is not None:
                    out[b].append((f[0], f[1], 0 if f[1] else heur(f[0], v)))
    clock.lap("pointers")

    U = _UNREACHED
    state = [U] * n
    stack = [t for t, st, h in rhits if st or h]
    for t in stack:
        state[t] = REACHABLE
    while stack:
        b = stack.pop()
        for t, st, h in out[b]:
            if (st or h) and state[t] != REACHABLE:
                state[t] = REACHABLE
                stack.append(t)
    stack = [t for t, _, _ in rhits if state[t] == U]
    stack += [t for b in range(n) if state[b] == REACHABLE for t, _, _ in out[b] if state[t] == U]
    for t in stack:
        state[t] = POSSIBLE
    while stack:
        b = stack.pop()
        for t, _, _ in out[b]:
            if state[t] == U:
                state[t] = POSSIBLE
                stack.append(t)
    # reachable via heuristic: the first heuristic accepting a pointer from
    # the roots or a reachable block, unless a start pointer from the roots,
    # a reachable or a possibly lost block reaches it
    heur_of = [0] * n
    from_reach = [e for b in range(n) if state[b] == REACHABLE for e in out[b]]
    if any(h for _, _, h in rhits) or any(h for _, _, h in from_reach):
        started = [False] * n
        for t, st, _ in rhits:
            if st:
                started[t] = True
        for b in range(n):
            if state[b] != U:
                for t, st, _ in out[b]:
                    if st:
                        started[t] = True
        for t, _, h in rhits + from_reach:
            if h and (not heur_of[t] or h < heur_of[t]):
                heur_of[t] = h
        for b in range(n):
            if started[b] or state[b] != REACHABLE:
                heur_of[b] = 0
    clock.lap("marking")

    # memcheck's clique pass: in address order, each lost block not yet
    # marked leads and marks every unmarked lost block it reaches but itself
    lost = [st == U for st in state]
    marked = [False] * n
    for leader in range(n):
        if not lost[leader] or marked[leader]:
            continue
        stack = [leader]
        while stack:
            b = stack.pop()
            for t, _, _ in out[b]:
                if lost[t] and not marked[t] and t != leader:
                    marked[t] = True
                    stack.append(t)
    for b in range(n):
        if lost[b]:
            state[b] = INDIRECT if marked[b] else DEFINITE
    clock.lap("cliques")

    kinds = np.empty(n, dtype=np.int8)
    hout = np.zeros(n, dtype=np.int8)
    for k, i in enumerate(order):
        kinds[i] = state[k]
        if state[k] == REACHABLE:
            hout[i] = heur_of[k]
    return Classification(starts=starts.copy(), sizes=sizes.copy(), kinds=kinds, heuristic=hout)


class _Clock:
    """Seconds per phase into ``timings`` (when it is a dict)."""

    def __init__(self, timings):
        self.timings = timings
        self.t = time.perf_counter() if timings is not None else 0.0

    def lap(self, phase: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[phase] = self.timings.get(phase, 0.0) + now - self.t
            self.t = now


def classify(starts, sizes, roots: Iterable[Region], heap: Sequence[Region], *,
             registers: Iterable[int] = (),
             heuristics=DEFAULT_HEURISTICS,
             is_vtable: Optional[Callable[[np.ndarray], np.ndarray]] = None,
             hazard_offsets=None, timings: Optional[Dict[str, float]] = None,
             small: bool = True) -> Classification:
    """Classify every block; see the module docstring.

    ``is_vtable(values)`` -> bool array: memcheck's "looks like a vtable" test
    (needed by the multipleinheritance heuristic; without it that heuristic
    never accepts).  ``hazard_offsets``: per block, an offset from its start
    that is never taken as a pointer to it (-1 for none).  ``timings``: a
    dict that gets the seconds each phase took (``blocks``: sorting and
    locating the blocks; ``pointers``: finding the pointers in the roots and
    the blocks, heuristics included; ``marking``: reachable and possibly
    lost; ``cliques``: the clique pass) -- for bench/kinds.py.  ``small``:
    small inputs take the plain-Python path (:func:`_classify_small`); False
    forces the vectorised one.
    """
    clock = _Clock(timings)
    heuristics = frozenset(heuristics)
    unknown = heuristics - DEFAULT_HEURISTICS
    if unknown:
        raise ValueError(f"unknown leak-check heuristic(s): {', '.join(sorted(unknown))}")
    starts = np.asarray(starts, dtype=np.uint64).reshape(-1)
    sizes = np.asarray(sizes, dtype=np.uint64).reshape(-1)
    if starts.shape != sizes.shape:
        raise ValueError(f"starts ({starts.size}) and sizes ({sizes.size}) differ in length")
    if small:
        got = _classify_small(starts, sizes, roots, heap, registers, heuristics, is_vtable, hazard_offsets, clock)
        if got is not None:
            return got
    blocks = _Blocks(starts, sizes, hazard_offsets)
    n = blocks.n
    contents = _Contents(blocks, heap)
    clock.lap("blocks")

    # --- pointers from the root set (memory roots and registers)
    root_words = [_as_words(w) for _, w in roots]
    regs = np.array([int(r) & 0xFFFFFFFFFFFFFFFF for r in registers], dtype=np.uint64)
    all_root = np.concatenate(root_words + [regs]) if (root_words or regs.size) else np.zeros(0, np.uint64)
    rpos, rt, rstart = blocks.lookup(all_root)
    rvals = all_root[rpos]
    rheur = np.zeros(rt.size, dtype=np.int8)
    inter = ~rstart
    rheur[inter] = _heuristic(blocks, contents, rt[inter], rvals[inter], heuristics, is_vtable)
    rstrong = rstart | (rheur > 0)

    # --- pointers between blocks
    src, tgt, is_start, vals = contents.edges()
    heur = np.zeros(tgt.size, dtype=np.int8)
    inter = ~is_start
    heur[inter] = _heuristic(blocks, contents, tgt[inter], vals[inter], heuristics, is_vtable)
    strong = is_start | (heur > 0)
    graph = _Graph(n, src, tgt, strong, is_start, heur)
    clock.lap("pointers")

    state = np.full(n, _UNREACHED, dtype=np.int8)
    heur_of = np.zeros(n, dtype=np.int8)  # a heuristic that made a block reachable

    # reachable: closure over strong pointers from roots and reachable blocks
    scratch = np.zeros(n, dtype=np.int64)
    frontier = _dedup(rt[rstrong], scratch)
    state[frontier] = REACHABLE
    narrow = 0
    while frontier.size:
        narrow = narrow + 1 if frontier.size < _NARROW else 0
        if narrow > _NARROW_LEVELS:
            graph.walk(frontier, state, REACHABLE, strong_only=True)
            break
        e = graph.out_edges(frontier)
        e = e[graph.strong[e]]
        t = graph.tgt[e]
        new = _dedup(t[state[t] != REACHABLE], scratch)
        state[new] = REACHABLE
        frontier = new

    # possibly lost: any pointer from roots, reachable or possible blocks
    frontier = rt[state[rt] == _UNREACHED]
    reach = np.nonzero(state == REACHABLE)[0]
    t = graph.tgt[graph.out_edges(reach)]
    frontier = _dedup(np.concatenate([frontier, t[state[t] == _UNREACHED]]), scratch)
    narrow = 0
    while frontier.size:
        state[frontier] = POSSIBLE
        narrow = narrow + 1 if frontier.size < _NARROW else 0
        if narrow > _NARROW_LEVELS:
            graph.walk(frontier, state, POSSIBLE, strong_only=False)
            break
        t = graph.tgt[graph.out_edges(frontier)]
        frontier = _dedup(t[state[t] == _UNREACHED], scratch)

    # "reachable via heuristic": reachable, and no start pointer from the
    # roots, a reachable or a possibly lost block reaches it (memcheck clears
    # the heuristic of a reachable block when a start pointer reaches it)
    reach = np.nonzero(state == REACHABLE)[0]
    e_reach = graph.out_edges(reach)
    if (rheur > 0).any() or (graph.heur[e_reach] > 0).any():
        started = np.zeros(n, dtype=bool)
        started[rt[rstart]] = True
        e = graph.out_edges(np.nonzero(state != _UNREACHED)[0])
        started[graph.tgt[e[graph.is_start[e]]]] = True
        # the first heuristic (in memcheck's order) accepting a pointer from
        # the root set or a reachable block
        tg = np.concatenate([rt, graph.tgt[e_reach]])
        hh = np.concatenate([rheur, graph.heur[e_reach]])
        for h in range(len(HEURISTICS), 0, -1):
            heur_of[tg[hh == h]] = h
        heur_of[started | (state != REACHABLE)] = 0

    clock.lap("marking")

    # clique pass over the unreached blocks, in address order (_indirect)
    lost = state == _UNREACHED
    if lost.any():
        e = graph.out_edges(np.nonzero(lost)[0])
        srcs = np.repeat(np.arange(n), np.diff(graph.indptr))[e]
        keep = lost[graph.tgt[e]] & (graph.tgt[e] != srcs)
        srcs, tgts = srcs[keep], graph.tgt[e][keep]
        if srcs.size:
            state[_indirect(n, srcs, tgts, lost, scratch)] = INDIRECT
        state[state == _UNREACHED] = DEFINITE

    clock.lap("cliques")

    kinds = np.empty(n, dtype=np.int8)
    kinds[blocks.order] = state
    hout = np.zeros(n, dtype=np.int8)
    hout[blocks.order] = np.where(state == REACHABLE, heur_of, 0)
    inv = np.empty(n, dtype=np.int64)
    inv[blocks.order] = np.arange(n, dtype=np.int64)
    return Classification(starts=blocks.starts[inv], sizes=blocks.sizes[inv], kinds=kinds, heuristic=hout)
