"""Unit tests of the memcheck-style classifier on synthetic memory (no process)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from pytest_memleak_ebpf.kinds.classify import (DEFAULT_HEURISTICS, DEFINITE, INDIRECT, POSSIBLE, REACHABLE,
                                                classify)
from pytest_memleak_ebpf.kinds.heap import hazard_offsets

HEAP = 0x5555_0000_0000
ROOT = 0x7fff_0000_0000


class Mem:
    """A fake heap: blocks laid out one after the other (16-aligned, with a
    16-byte gap like glibc's chunk headers), words set by the test."""

    def __init__(self):
        self.blocks = []  # (start, size)
        self.words = {}  # address -> value
        self.roots = []  # values in one root region
        self.regs = []
        self.at = HEAP + 16

    def alloc(self, size, at=None):
        start = self.at if at is None else at
        self.blocks.append((start, size))
        self.at = max(self.at, start + ((max(size, 1) + 15) & ~15) + 16)
        return start

    def put(self, addr, value):
        assert addr % 8 == 0
        self.words[addr] = value

    def inputs(self):
        """(starts, sizes, roots, the heap's words from HEAP on)."""
        starts = [s for s, _ in self.blocks]
        sizes = [n for _, n in self.blocks]
        hi = max([self.at] + [a + 8 for a in self.words])
        seg = np.zeros((hi - HEAP) // 8, dtype=np.uint64)
        for a, v in self.words.items():
            seg[(a - HEAP) // 8] = v
        return starts, sizes, [(ROOT, np.array(self.roots, dtype=np.uint64))], seg

    def run(self, **kw):
        starts, sizes, roots, seg = self.inputs()
        return classify(starts, sizes, roots, [(HEAP, seg)], registers=self.regs, **kw)


def kinds(c):
    return c.kinds.tolist()


def test_list_lost_from_its_head_is_one_definite_and_the_rest_indirect():
    m = Mem()
    nodes = [m.alloc(32) for _ in range(10)]
    for a, b in zip(nodes, nodes[1:]):
        m.put(a, b)
    c = m.run()
    assert kinds(c) == [DEFINITE] + [INDIRECT] * 9
    assert c.summary() == {"definite": (32, 1), "indirect": (288, 9), "possible": (0, 0), "reachable": (0, 0)}


def test_list_whose_head_is_at_the_highest_address_absorbs_the_earlier_leaders():
    m = Mem()
    nodes = [m.alloc(32) for _ in range(5)]
    for a, b in zip(nodes[1:], nodes):  # each points to the one below it
        m.put(a, b)
    c = m.run()
    assert kinds(c) == [INDIRECT] * 4 + [DEFINITE]


def test_tree_lost_from_its_root():
    m = Mem()
    ids = [m.alloc(48) for _ in range(15)]
    for i in range(7):
        m.put(ids[i], ids[2 * i + 1])
        m.put(ids[i] + 8, ids[2 * i + 2])
    c = m.run()
    assert c.summary()["definite"] == (48, 1)
    assert c.summary()["indirect"] == (48 * 14, 14)


def test_cycle_nobody_points_to_has_one_leader():
    m = Mem()
    a, b, c_ = m.alloc(64), m.alloc(64), m.alloc(64)
    m.put(a, b), m.put(b, c_), m.put(c_, a)
    c = m.run()
    assert kinds(c) == [DEFINITE, INDIRECT, INDIRECT]


def test_cycle_reached_from_a_root_is_reachable():
    m = Mem()
    a, b = m.alloc(64), m.alloc(64)
    m.put(a, b), m.put(b, a)
    m.roots = [b]
    assert kinds(m.run()) == [REACHABLE, REACHABLE]


def test_clique_order_is_memchecks_address_order():
    # x <-> a is a cycle, s -> a; x has the lowest address: x leads {x, a}
    # first, then s finds a already indirect: two definite blocks (memcheck's
    # result for this layout), while s -> x would make s the only leader
    m = Mem()
    x, a, s = m.alloc(32), m.alloc(32), m.alloc(32)
    m.put(x, a), m.put(a, x), m.put(s, a)
    assert kinds(m.run()) == [DEFINITE, INDIRECT, DEFINITE]
    m = Mem()
    x, a, s = m.alloc(32), m.alloc(32), m.alloc(32)
    m.put(x, a), m.put(a, x), m.put(s, x)
    assert kinds(m.run()) == [INDIRECT, INDIRECT, DEFINITE]


def test_interior_pointer_from_a_root_is_possibly_lost_and_so_is_what_it_reaches():
    m = Mem()
    a, b, c_ = m.alloc(80), m.alloc(88), m.alloc(40)
    m.put(a, b)  # start pointer, but from a possibly lost block
    m.put(b + 16, c_ + 8)  # interior
    m.roots = [a + 16]
    c = m.run()
    assert kinds(c) == [POSSIBLE, POSSIBLE, POSSIBLE]


def test_interior_pointer_from_a_reachable_block_is_possibly_lost():
    m = Mem()
    a, b = m.alloc(96), m.alloc(104)
    m.put(a, b + 40)
    m.roots = [a]
    assert kinds(m.run()) == [REACHABLE, POSSIBLE]


def test_start_pointer_later_upgrades_a_possible_block():
    m = Mem()
    a, b, k = m.alloc(64), m.alloc(64), m.alloc(64)
    m.put(a, b)
    m.put(k, a)  # k reachable -> a reachable by a start pointer -> b reachable
    m.roots = [a + 24, k]
    assert kinds(m.run()) == [REACHABLE, REACHABLE, REACHABLE]


def test_pointer_past_the_end_is_not_a_pointer_but_a_zero_size_block_counts_as_one_byte():
    m = Mem()
    a = m.alloc(40)
    z = m.alloc(0)
    m.roots = [a + 40, z]
    assert kinds(m.run()) == [DEFINITE, REACHABLE]


def test_registers_are_roots():
    m = Mem()
    a, b = m.alloc(32), m.alloc(32)
    m.regs = [b]
    assert kinds(m.run()) == [DEFINITE, REACHABLE]


def test_pointer_kept_only_in_a_freed_block_leaves_the_block_definitely_lost():
    m = Mem()
    a = m.alloc(32)
    freed = m.at  # a freed chunk: in the heap, but neither a block nor a root
    m.at += 64
    m.put(freed + 16, a)
    assert kinds(m.run()) == [DEFINITE]


def test_words_not_8_aligned_or_beyond_the_last_whole_word_are_not_scanned():
    m = Mem()
    a, b = m.alloc(12), m.alloc(32)
    m.put(a + 8, b)  # the word [a+8, a+16) is not wholly inside the 12-byte block
    m.roots = [a]
    assert kinds(m.run()) == [REACHABLE, DEFINITE]


# --- heuristics ------------------------------------------------------------------

def _string_block(m, capacity, length):
    s = m.alloc(24 + capacity + 1)
    m.put(s, length)
    m.put(s + 8, capacity)
    return s


def test_stdstring_heuristic():
    m = Mem()
    s = _string_block(m, 100, 100)
    bad = _string_block(m, 100, 101)  # length > capacity
    m.roots = [s + 24, bad + 24]
    c = m.run()
    assert kinds(c) == [REACHABLE, POSSIBLE]
    assert c.heuristic_summary() == {"stdstring": (125, 1)}
    assert kinds(m.run(heuristics=())) == [POSSIBLE, POSSIBLE]


def test_length64_and_newarray_heuristics():
    m = Mem()
    l64 = m.alloc(48)
    m.put(l64, 40)  # size - 8
    arr = m.alloc(8 + 5 * 24)
    m.put(arr, 5)  # 5 elements of 24 bytes
    bad = m.alloc(64)
    m.put(bad, 5)  # 56 % 5 != 0 and 56 != 5
    m.roots = [l64 + 8, arr + 8, bad + 8]
    c = m.run()
    assert kinds(c) == [REACHABLE, REACHABLE, POSSIBLE]
    # memcheck tries length64 before newarray: the 48-byte block is length64's
    assert c.heuristic_summary() == {"length64": (48, 1), "newarray": (128, 1)}
    assert kinds(m.run(heuristics={"newarray"})) == [REACHABLE, REACHABLE, POSSIBLE]
    assert kinds(m.run(heuristics={"length64"})) == [REACHABLE, POSSIBLE, POSSIBLE]


def test_multipleinheritance_heuristic():
    vt_a, vt_b, data = 0x4000_1000, 0x4000_2000, 0x4000_9000
    m = Mem()
    obj = m.alloc(40)
    m.put(obj, vt_a)
    m.put(obj + 16, vt_b)
    plain = m.alloc(40)
    m.put(plain, vt_a)
    m.put(plain + 16, data)  # not a vtable
    m.roots = [obj + 16, plain + 16]

    def is_vtable(values):
        return np.isin(values, [vt_a, vt_b])

    c = m.run(is_vtable=is_vtable)
    assert kinds(c) == [REACHABLE, POSSIBLE]
    assert c.heuristic_summary() == {"multipleinheritance": (40, 1)}
    assert kinds(m.run()) == [POSSIBLE, POSSIBLE]  # no vtable oracle: never accepted


def test_a_start_pointer_clears_the_heuristic_mark():
    m = Mem()
    arr = m.alloc(8 + 4 * 8)
    m.put(arr, 4)
    m.roots = [arr + 8, arr]
    c = m.run()
    assert kinds(c) == [REACHABLE]
    assert c.heuristic_summary() == {}


def test_heuristic_from_a_lost_block_does_not_make_anything_reachable():
    m = Mem()
    lost, arr = m.alloc(32), m.alloc(8 + 4 * 8)
    m.put(arr, 4)
    m.put(lost, arr + 8)
    assert kinds(m.run()) == [DEFINITE, INDIRECT]


# --- the glibc chunk-header hazard -----------------------------------------------

def test_pointer_at_the_next_chunks_header_is_not_an_interior_pointer():
    m = Mem()
    a = m.alloc(24)  # glibc chunk 32: the next chunk's header is at a + 16
    b = m.alloc(40)  # chunk 48: next header at b + 32
    m.roots = [a + 16, b + 32]
    sizes = np.array([24, 40])
    assert hazard_offsets(sizes).tolist() == [16, 32]
    assert kinds(m.run(hazard_offsets=hazard_offsets(sizes))) == [DEFINITE, DEFINITE]
    assert kinds(m.run()) == [POSSIBLE, POSSIBLE]
    # other interior pointers still count
    m.roots = [a + 8, b + 24]
    assert kinds(m.run(hazard_offsets=hazard_offsets(sizes))) == [POSSIBLE, POSSIBLE]


def test_hazard_offsets_follow_glibcs_request2size():
    sizes = np.array([0, 1, 8, 16, 17, 24, 25, 40, 1000])
    chunk = np.maximum(32, (sizes + 8 + 15) & ~15)
    assert hazard_offsets(sizes).tolist() == (chunk - 16).tolist()


# --- input errors -----------------------------------------------------------------

def test_overlapping_blocks_are_an_error():
    with pytest.raises(ValueError, match="blocks overlap"):
        classify([0x1000, 0x1010], [32, 8], [], [])


def test_mismatched_arrays_and_unknown_heuristics_are_errors():
    with pytest.raises(ValueError, match="differ in length"):
        classify([0x1000], [32, 8], [], [])
    with pytest.raises(ValueError, match="unknown leak-check heuristic.*bogus"):
        classify([0x1000], [32], [], [], heuristics={"bogus"})


def test_no_blocks():
    c = classify([], [], [(ROOT, np.array([1, 2], dtype=np.uint64))], [])
    assert c.summary() == {k: (0, 0) for k in ("definite", "indirect", "possible", "reachable")}


def test_default_heuristics_are_memchecks_four():
    assert DEFAULT_HEURISTICS == {"stdstring", "length64", "newarray", "multipleinheritance"}


def test_large_random_graph_matches_a_plain_reference_implementation():
    """The vectorised passes against a word-by-word transcription of
    mc_leakcheck.c's mark stack (without heuristics)."""
    rng = np.random.default_rng(13)
    m = Mem()
    ids = [m.alloc(int(rng.integers(1, 9)) * 8) for _ in range(400)]
    sizes = dict(m.blocks)
    for _ in range(500):
        a, b = rng.choice(len(ids), 2)
        off = 0 if rng.random() < 0.7 else int(rng.integers(0, sizes[ids[b]] // 8)) * 8
        slot = ids[a] + 8 * int(rng.integers(0, sizes[ids[a]] // 8))
        m.put(slot, ids[b] + off)
    m.roots = [ids[i] + (8 if i % 3 == 0 else 0) for i in rng.choice(len(ids), 20)]
    got = kinds(m.run(heuristics=()))
    assert got == _reference(m)


def _reference(m):
    blocks = sorted(m.blocks)
    starts = [s for s, _ in blocks]

    def find(v):
        for i, (s, n) in enumerate(blocks):
            if s <= v < s + max(n, 1):
                return i
        return -1

    def words(i):
        s, n = blocks[i]
        return [m.words.get(a, 0) for a in range(s, s + n - n % 8, 8)]

    U, P, R, I = "U", "P", "R", "I"
    state = [U] * len(blocks)
    stack = []

    def push_root(v, prior_definite):
        i = find(v)
        if i < 0 or state[i] == R:
            return
        if v == starts[i] and prior_definite:
            state[i] = R
            stack.append(i)
        elif state[i] == U:
            state[i] = P
            stack.append(i)

    for v in m.roots + m.regs:
        push_root(v, True)
    while stack:
        i = stack.pop()
        for v in words(i):
            push_root(v, state[i] != P)
    for leader in range(len(blocks)):
        if state[leader] != U:
            continue
        stack = [leader]
        while stack:
            i = stack.pop()
            for v in words(i):
                j = find(v)
                if j >= 0 and state[j] == U and j != leader:
                    state[j] = I
                    stack.append(j)
    names = {U: DEFINITE, I: INDIRECT, P: POSSIBLE, R: REACHABLE}
    order = {s: k for k, s in enumerate(starts)}
    return [names[state[order[s]]] for s, _ in m.blocks]


def test_long_chains_reachable_then_possible():
    """Long chains (marked in plain Python once the frontier stays narrow):
    a 100-node list from a root with an interior pointer to node 60, so the
    rest is possibly lost; and a lost 100-node list."""
    m = Mem()
    nodes = [m.alloc(32) for _ in range(100)]
    for i, (a, b) in enumerate(zip(nodes, nodes[1:])):
        m.put(a, b + (8 if i == 59 else 0))
    lost = [m.alloc(48) for _ in range(100)]
    for a, b in zip(lost, lost[1:]):
        m.put(a, b)
    m.roots = [nodes[0]]
    c = m.run()
    assert kinds(c) == [REACHABLE] * 60 + [POSSIBLE] * 40 + [DEFINITE] + [INDIRECT] * 99
    assert kinds(m.run(heuristics=())) == kinds(c)
    assert kinds(c) == _reference(m)


def test_segments_read_into_one_buffer_are_joined_without_a_copy_and_classify_the_same():
    """classify's block words: segments that lie one after the other in one
    buffer (ProcessMemory.words_many(one_buffer=True)) are one view of it;
    others are concatenated; the kinds are the same either way."""
    import importlib

    C = importlib.import_module("pytest_memleak_ebpf.kinds.classify")
    buf = np.arange(64, dtype=np.uint8).view(np.uint64).copy().view(np.uint8)   # 8 words
    a, b = buf[:24].view(np.uint64), buf[24:64].view(np.uint64)
    j = C._joined([a, b])
    assert j.tolist() == a.tolist() + b.tolist() and j.ctypes.data == a.ctypes.data    # a view
    far = np.array([7, 8], dtype=np.uint64)
    k = C._joined([a, far])
    assert k.tolist() == a.tolist() + [7, 8] and k.ctypes.data != a.ctypes.data      # a copy
    assert C._joined([b[1:], a]).tolist() == b.tolist()[1:] + a.tolist()             # not in order: a copy
    # a lost list: the same kinds whether its words come as one view or as copies
    starts = np.array([HEAP + 0x10, HEAP + 0x40, HEAP + 0x70], dtype=np.uint64)
    sizes = np.array([32, 32, 32], dtype=np.uint64)
    words = np.zeros(0x90 // 8, dtype=np.uint64)
    words[0x10 // 8], words[0x40 // 8] = HEAP + 0x40, HEAP + 0x70
    one = words.view(np.uint8)
    seg1, seg2 = one[:0x40].view(np.uint64), one[0x40:].view(np.uint64)
    roots = [(ROOT, np.array([HEAP + 0x70 + 8], dtype=np.uint64))]     # an interior pointer to the last
    r1 = classify(starts, sizes, roots, [(HEAP, seg1), (HEAP + 0x40, seg2)])
    r2 = classify(starts, sizes, roots, [(HEAP, seg1.copy()), (HEAP + 0x40, seg2.copy())])
    assert r1.kinds.tolist() == r2.kinds.tolist() == [DEFINITE, INDIRECT, POSSIBLE]


def test_word_ranges_are_found_a_chunk_at_a_time(monkeypatch):
    import importlib

    C = importlib.import_module("pytest_memleak_ebpf.kinds.classify")
    rng = np.random.default_rng(5)
    v = rng.integers(0, 1000, 10_000).astype(np.uint64)
    want = np.nonzero((v >= 300) & (v < 310))[0].tolist()
    monkeypatch.setattr(C, "_CHUNK_WORDS", 777)
    assert C._in_range(v, np.uint64(300), np.uint64(310)).tolist() == want and len(want) > 50


def _random_case(rng, n):
    """Blocks with pointers of every kind between them and from the roots:
    start and interior pointers, cycles, std::string / length64 / new[]
    layouts, vtable-like words, glibc's next-chunk headers, blocks with no
    content, 0-byte blocks."""
    m = Mem()
    ids = [m.alloc(int(rng.choice([0, 8, 16, 24, 32, 40, 64, 96]))) for _ in range(n)]
    sizes = dict(m.blocks)
    vt = {0x4000_0000 + 64 * k for k in range(4)}          # "vtables"
    hz = hazard_offsets(np.array([sizes[i] for i in ids]))
    for _ in range(int(rng.integers(0, 3 * n + 1))):
        a, b = (int(x) for x in rng.choice(n, 2))
        if sizes[ids[a]] < 8:
            continue
        slot = ids[a] + 8 * int(rng.integers(0, sizes[ids[a]] // 8))
        r = rng.random()
        if r < 0.5:
            v = ids[b]
        elif r < 0.7:
            v = ids[b] + int(rng.integers(0, max(sizes[ids[b]], 1)))
        elif r < 0.8:
            v = ids[b] + int(hz[b])                     # the next chunk's header
        elif r < 0.9:
            v = int(rng.choice(sorted(vt)))
        else:
            v = ids[b] + int(rng.choice([8, 24]))
        m.put(slot, v)
    for b in rng.choice(n, int(rng.integers(0, n // 2 + 1))).tolist():   # heuristic layouts
        s, z = ids[b], sizes[ids[b]]
        if z >= 16:
            kind = rng.integers(0, 3)
            if kind == 0:
                m.put(s, z - 8)                          # length64
            elif kind == 1:
                m.put(s, int(rng.choice([1, 2, 4, 8])))  # new[] count
            elif z >= 32:
                m.put(s + 8, z - 25)                     # std::string capacity
                m.put(s, int(rng.integers(0, z - 24)))
    roots = []
    for _ in range(int(rng.integers(0, 6))):
        b = int(rng.integers(0, n))
        roots.append(ids[b] + int(rng.choice([0, 0, 8, 24, 3, int(hz[b])])))
    m.roots = roots
    m.regs = [ids[int(rng.integers(0, n))] + 8] if rng.random() < 0.3 else []
    return m, vt, hz


@pytest.mark.parametrize("seed", range(6))
def test_plain_python_path_for_small_inputs_matches_the_vectorised_passes(seed):
    """_classify_small (up to SMALL_BLOCKS blocks) against the numpy passes on
    random graphs: every kind and every heuristic mark the same."""
    C = importlib.import_module("pytest_memleak_ebpf.kinds.classify")

    rng = np.random.default_rng(1000 + seed)
    taken = 0
    for case in range(150):
        n = int(rng.integers(1, C.SMALL_BLOCKS + 1))
        m, vt, hz = _random_case(rng, n)
        is_vt = lambda vals: np.array([int(v) in vt for v in vals], dtype=bool)  # noqa: E731
        # some cases: a block at the end with no content (its segment ends before it)
        cut = rng.random() < 0.2
        starts, sizes, roots, seg = m.inputs()
        if cut:
            seg = seg[:max(0, (starts[-1] - HEAP) // 8)]
        kw = dict(registers=m.regs, is_vtable=is_vt, hazard_offsets=hz if rng.random() < 0.7 else None,
                  heuristics=DEFAULT_HEURISTICS if rng.random() < 0.8 else ())
        small = C._classify_small(np.array(starts, np.uint64), np.array(sizes, np.uint64), roots,
                                  [(HEAP, seg)], m.regs, frozenset(kw["heuristics"]), is_vt,
                                  kw["hazard_offsets"], C._Clock(None))
        assert small is not None
        taken += 1
        big = classify(starts, sizes, roots, [(HEAP, seg)], small=False, **kw)
        assert small.kinds.tolist() == big.kinds.tolist(), (seed, case)
        assert small.heuristic.tolist() == big.heuristic.tolist(), (seed, case)
        assert small.starts.tolist() == starts and small.sizes.tolist() == sizes
    assert taken == 150


def test_inputs_past_the_small_limits_take_the_vectorised_path(monkeypatch):
    C = importlib.import_module("pytest_memleak_ebpf.kinds.classify")

    m = Mem()
    for _ in range(C.SMALL_BLOCKS + 1):
        m.alloc(8)
    starts = np.array([s for s, _ in m.blocks], np.uint64)
    sizes = np.array([z for _, z in m.blocks], np.uint64)
    assert C._classify_small(starts, sizes, [], [], [], frozenset(), None, None, C._Clock(None)) is None
    assert C._classify_small(starts[:2] + np.uint64(4), sizes[:2], [], [], [], frozenset(), None, None,
                             C._Clock(None)) is None        # not 8-aligned
    monkeypatch.setattr(C, "SMALL_BLOCK_WORDS", 1)
    assert C._classify_small(starts[:2], sizes[:2], [], [(HEAP, np.zeros(64, np.uint64))], [], frozenset(),
                             None, None, C._Clock(None)) is None


@pytest.mark.parametrize("small", [True, False])
def test_a_block_two_heuristics_accept_gets_the_first_in_memchecks_order(small):
    """57 bytes, length 7 at +0 and capacity 32 at +8: std::string (via +24)
    and new[] of 7 (via +8) both accept it; memcheck tries stdstring first."""
    m = Mem()
    b = m.alloc(57)
    m.put(b, 7)
    m.put(b + 8, 32)
    m.roots = [b + 8, b + 24]
    c = m.run(small=small)
    assert kinds(c) == [REACHABLE]
    assert c.heuristic.tolist() == [1]
    m.roots = [b + 8]
    assert m.run(small=small).heuristic.tolist() == [3]


@pytest.mark.parametrize("scratch", [7, 64, 1 << 16])
def test_root_words_among_the_blocks_are_found_a_scratch_buffer_at_a_time(monkeypatch, scratch):
    C = importlib.import_module("pytest_memleak_ebpf.kinds.classify")
    monkeypatch.setattr(C, "_SCRATCH_WORDS", scratch)
    rng = np.random.default_rng(scratch)
    lo, hi = HEAP + 0x100, HEAP + 0x900
    arrays = []
    for n in (0, 1, 5, 7, 8, 13, 64, 200):
        w = rng.integers(HEAP, HEAP + 0x1000, n, dtype=np.uint64)
        w[::3] = rng.integers(0, 1 << 63, w[::3].size, dtype=np.uint64)     # far away, and wrapping below lo
        arrays.append(w)
    want = [int(v) for w in arrays for v in w if lo <= int(v) < hi]
    assert len(want) > 20
    assert C._words_in_range(arrays, lo, hi, 10_000) == want
    assert C._words_in_range(arrays, lo, hi, len(want)) == want
    assert C._words_in_range(arrays, lo, hi, len(want) - 1) is None
