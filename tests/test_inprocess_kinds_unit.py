"""Leak kinds of an in-process window (kinds/inprocess.py), without root: a
synthetic image of a running glibc process — main_arena in libc's data, a
[heap] with live, free (unsorted bin, fastbin, tcache) and top chunks, mmapped
chunks, a data mapping with an excluded buffer, a stack — and the blocks
classified against it."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pytest_memleak_ebpf import classify as cl
from pytest_memleak_ebpf.kinds import DEFINITE, INDIRECT, POSSIBLE, REACHABLE
from pytest_memleak_ebpf.kinds import heap as H
from pytest_memleak_ebpf.kinds import inprocess as ip
from pytest_memleak_ebpf.procmaps import Region

LIBC, ARENA = 0x7F0000000000, 0x7F0000000100
HEAP, HEAP_END = 0x555500000000, 0x555500010000
DATA, STACK = 0x7D0000000000, 0x7FFD00000000
MM1, MM2 = 0x7E0000000000, 0x7E0000010000
SP = STACK + 0x8000


class Image:
    def __init__(self):
        self.mem = {LIBC: bytearray(0x2000), HEAP: bytearray(HEAP_END - HEAP), DATA: bytearray(0x1000),
                    STACK: bytearray(0x10000), MM1: bytearray(0x2000), MM2: bytearray(0x2000)}

    def put(self, addr, *words):
        for base, buf in self.mem.items():
            if base <= addr < base + len(buf):
                struct.pack_into(f"<{len(words)}Q", buf, addr - base, *words)
                return
        raise AssertionError(hex(addr))

    def chunk(self, off, size, flags=H.PREV_INUSE):
        self.put(HEAP + off + 8, size | flags)
        return HEAP + off + 16

    def maps(self):
        return sorted([
            Region(LIBC, LIBC + 0x2000, "rw-p", 0x1d4000, "fd:01", 42, "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            Region(HEAP, HEAP_END, "rw-p", 0, "00:00", 0, "[heap]"),
            Region(DATA, DATA + 0x1000, "rw-p", 0, "00:00", 0, ""),
            Region(STACK, STACK + 0x10000, "rw-p", 0, "00:00", 0, "[stack]"),
            Region(MM1, MM1 + 0x2000, "rw-p", 0, "00:00", 0, ""),
            Region(MM2, MM2 + 0x2000, "rw-p", 0, "00:00", 0, ""),
        ], key=lambda m: m.start)

    def snapshot(self):
        return ip.Snapshot.of_data([(a, bytes(b)) for a, b in self.mem.items()])


def _bin(k):
    return ARENA + H.OFF_TOP + 16 * k


@pytest.fixture
def image():
    """Blocks by name -> (address, size); the image holds every case."""
    im = Image()
    for k in range(H.NBINS_WORDS // 2):          # empty bins point at themselves
        im.put(ARENA + H.OFF_BINS + 16 * k, _bin(k), _bin(k))
    im.put(ARENA + H.OFF_NEXT, ARENA)            # one arena: its ring is itself
    b = {}
    tcache = im.chunk(0x000, H.TCACHE_CHUNK)
    b["A"] = (im.chunk(0x290, 0x30), 40)         # lost head
    b["D"] = (im.chunk(0x2C0, 0x30), 24)         # only A points at it: indirect
    old = im.chunk(0x2F0, 0x40)                  # an older live chunk (not a candidate): a root
    b["B"] = (im.chunk(0x330, 0x30), 32)
    free = im.chunk(0x360, 0x40)                 # a free chunk in the unsorted bin
    b["C"] = (im.chunk(0x3A0, 0x30), 16)         # only the free chunk points at it
    tc = im.chunk(0x3D0, 0x30)                   # a chunk in the tcache (looks in use)
    b["E"] = (im.chunk(0x400, 0x30), 8)          # only the tcache'd chunk points at it
    fast = im.chunk(0x430, 0x30)                 # a chunk in a fastbin
    b["G"] = (im.chunk(0x460, 0x30), 40)         # only the fastbin chunk points at it
    b["K"] = (im.chunk(0x490, 0x30), 40)         # from the data mapping
    b["L"] = (im.chunk(0x4C0, 0x30), 40)         # from a dead stack slot (below sp - 128)
    b["M"] = (im.chunk(0x4F0, 0x30), 40)         # from the live stack
    b["N"] = (im.chunk(0x520, 0x30), 40)         # from a register
    b["R"] = (im.chunk(0x550, 0x30), 40)         # from an mmapped chunk that is not a candidate
    b["S"] = (im.chunk(0x580, 0x30), 40)         # from an excluded buffer only
    b["H"] = (im.chunk(0x5B0, 0x30), 40)         # from the top chunk only
    b["I"] = (im.chunk(0x5E0, 0x30), 40)         # an interior pointer from the data: possibly lost
    top = HEAP + 0x610
    im.put(top + 8, (HEAP_END - top) | H.PREV_INUSE)
    im.put(ARENA + H.OFF_TOP, top)
    im.put(top + 0x40, b["H"][0])

    im.put(b["A"][0] + 8, b["D"][0])
    im.put(old + 16, b["B"][0])
    im.put(free, _bin(0), _bin(0), b["C"][0])    # fd, bk: the unsorted bin's head; then stale data
    im.put(ARENA + H.OFF_BINS, free - 16, free - 16)
    im.put(tc, (tc >> 12) ^ 0, 0, b["E"][0])     # next (mangled NULL), key, stale data
    im.put(tcache + 2 * 1, 1)                     # counts[1] = 1 ... (uint16: written as part of a word)
    im.put(tcache + 128 + 8 * 1, tc)              # entries[1]
    im.put(fast, (fast >> 12) ^ 0, b["G"][0])
    im.put(ARENA + H.OFF_FASTBINS + 8 * 1, fast - 16)
    im.put(DATA + 0x10, b["K"][0])
    im.put(DATA + 0x20, b["I"][0] + 16)
    im.put(DATA + 0x800, b["S"][0])               # the excluded buffer
    im.put(SP - 0x1000, b["L"][0])
    im.put(SP + 0x1000, b["M"][0])
    im.put(MM1, 0, 0x2000 | H.IS_MMAPPED)         # a candidate served by mmap, lost
    b["P"] = (MM1 + 16, 5000)
    im.put(MM2, 0, 0x2000 | H.IS_MMAPPED)         # an mmapped chunk nobody recorded: live, a root
    im.put(MM2 + 0x100, b["R"][0])
    return im, b


def _scan(im, b, **kw):
    names = sorted(b)
    starts = [b[n][0] for n in names]
    sizes = [b[n][1] for n in names]
    ctx = {"tid": 1, "sp": SP, "registers": [b["N"][0]] + [0] * 15}
    result, stats = ip.classify_image(im.maps(), im.snapshot(), starts, sizes, context=ctx,
                                      exclude=[(DATA + 0x800, DATA + 0x840)], **kw)
    return dict(zip(names, result.kinds.tolist())), stats


def test_roots_are_the_live_memory_of_a_running_process(image):
    im, b = image
    kinds, stats = _scan(im, b)
    assert kinds == {
        "A": DEFINITE, "D": INDIRECT,               # a lost list: head and rest
        "B": REACHABLE,                              # an older live chunk is a root
        "C": DEFINITE, "E": DEFINITE, "G": DEFINITE, "H": DEFINITE,   # free memory never is
        "K": REACHABLE, "I": POSSIBLE,               # module data: start / interior pointer
        "L": DEFINITE, "M": REACHABLE,               # the waiting thread's stack from sp - 128 up
        "N": REACHABLE,                              # its registers
        "R": REACHABLE, "P": DEFINITE,               # mmapped chunks: live unless candidates
        "S": DEFINITE,                               # an excluded buffer is no root
    }
    assert stats["tcaches"] == 1
    # the live heap scanned: the heap minus free chunks (from each size word on),
    # candidates' chunks (user memory) and top: the tcache struct with A's header,
    # the old chunk O whole, a size word per other candidate, and the two header
    # words after each free chunk (its footer and the next size word)
    assert stats["live_heap_bytes"] == 0x2A0 + 0x40 + 8 * 10 + 3 * 16


def test_free_lists_come_from_glibcs_own_structures(image):
    im, _ = image
    snap = im.snapshot()
    arenas = H.arenas(im.maps(), snap.read, H.find_main_arena(im.maps(), snap.read))
    free, tcaches = ip.free_chunks(snap, arenas)
    assert tcaches == [HEAP + 16]
    assert sorted(free) == sorted([
        (HEAP + 0x610 + 8, HEAP_END),                 # top
        (HEAP + 0x360 + 8, HEAP + 0x3A0),             # unsorted bin
        (HEAP + 0x430 + 8, HEAP + 0x460),             # fastbin
        (HEAP + 0x3D0 + 8, HEAP + 0x400),             # tcache
    ])


def test_without_the_waiting_threads_context_its_whole_stack_is_scanned(image):
    im, b = image
    names = sorted(b)
    result, _ = ip.classify_image(im.maps(), im.snapshot(), [b[n][0] for n in names], [b[n][1] for n in names])
    kinds = dict(zip(names, result.kinds.tolist()))
    assert kinds["L"] == REACHABLE and kinds["M"] == REACHABLE    # below the stack pointer too
    assert kinds["N"] == DEFINITE and kinds["S"] == REACHABLE     # no registers; nothing excluded


def test_a_snapshot_answers_like_the_memory():
    snap = ip.Snapshot.of_data([(0x1000, struct.pack("<3Q", 1, 2, 3)), (0x9000, b"\xff" * 16)])
    assert snap.read(0x1008, 8) == struct.pack("<Q", 2) and snap.read(0x1010, 100) == struct.pack("<Q", 3)
    assert snap.read(0x5000, 8) == b"" and snap.word(0x1004) is None and snap.word(0x9008) == 2 ** 64 - 1
    assert snap.view(0x1000, 0x1018).tolist() == [1, 2, 3] and snap.nbytes == 40


def test_own_context_is_this_threads():
    import threading

    ctx = ip.own_context()
    assert ctx["tid"] == threading.get_native_id() and len(ctx["registers"]) == 16
    with open("/proc/self/maps") as f:
        stack = next(line for line in f if "[stack]" in line)
    lo, hi = (int(x, 16) for x in stack.split()[0].split("-"))
    assert lo <= ctx["sp"] < hi and ctx["sp"] in ctx["registers"]
    # CPython's frame stack beyond this frame: dead, one range inside a writable mapping
    (dead_lo, dead_hi), = ctx["dead"]
    with open("/proc/self/maps") as f:
        spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in f if line.split()[1][:2] == "rw"]
    assert dead_lo < dead_hi and any(a <= dead_lo and dead_hi <= b for a, b in spans)


def test_the_pipeline_shows_a_classified_window_by_kind():
    from pytest_memleak_ebpf.accounting import account_in_process, in_process_groups

    kinds = {"definite": [(100, 3, 0x10)], "reachable": [(777, 4, 0x10), (50, 5, 0)]}
    per, classified, reason = cl.classify_window([], kinds, None, True)
    assert classified and reason is None and per == kinds
    counted, _, groups = in_process_groups("extensions", per, None, cl.DEFAULT_KINDS)
    assert (counted.bytes, counted.blocks) == (100, 1)
    # the kinds that count first; a non-extension block is never shown in "extensions" mode
    assert [(h, kind, a.bytes) for h, _, kind, a in groups] == [(3, "definite", 100), (4, "reachable", 777)]
    ip_ = account_in_process("extensions", per, counted, None, [], {}, classified=True, kinds=cl.DEFAULT_KINDS)
    j = ip_.to_json()
    assert j["classified"] is True and "reason" not in j
    assert j["reachability"]["reachable"] == {"bytes": 827, "blocks": 2}
    assert j["reachability"]["definite"] == {"bytes": 100, "blocks": 1}
    assert sum(v["bytes"] for v in j["reachability"].values()) == j["outstanding"]["bytes"] == 927


def test_a_window_that_was_not_classified_says_why():
    per, classified, reason = cl.classify_window([(10, 1, 0)], None, None, False)
    assert per == {"unclassified": [(10, 1, 0)]} and not classified
    assert reason == "leak kinds were not asked for (kinds=all)"
    per, classified, reason = cl.classify_window([(10, 1, 0)], None, "the scan timed out (over 10 s)", True)
    assert not classified and reason == "the scan timed out (over 10 s)"
    c = cl.classify({}, [], inproc_kinds={"definite": [(8, 1, 2)]}, wanted=True)
    assert c.in_process == {"definite": [(8, 1, 2)]} and c.in_process_classified


def test_main_arena_is_found_by_its_top_when_most_bins_are_in_use(image):
    """A long-running process may have most bins non-empty: glibc's empty-bin
    signature fails, the top chunk's does not."""
    im, _ = image
    for k in range(1, 100):
        im.put(ARENA + H.OFF_BINS + 16 * k, DATA + 0x900, DATA + 0x900)
    snap = im.snapshot()
    assert H.find_main_arena(im.maps(), snap.read) is None
    assert ip.find_main_arena(im.maps(), snap) == ARENA


def test_only_words_near_the_blocks_reach_the_exact_look_up():
    starts = np.array([100, 200, 10**12, 10**12 + 50], dtype=np.uint64)
    sizes = np.array([10, 10, 10, 5], dtype=np.uint64)
    words = np.array([99, 100, 105, 150, 205, 210, 10**12 + 3, 10**12 + 54, 10**12 + 55, 5 * 10**11], dtype=np.uint64)
    # two ranges: [100, 210) and [10**12, 10**12 + 55); eight: every block apart
    assert ip.near_blocks([words], starts, sizes, clusters=2).tolist() == [100, 105, 150, 205, 10**12 + 3, 10**12 + 54]
    assert ip.near_blocks([words[:5], words[5:]], starts, sizes).tolist() == [100, 105, 205, 10**12 + 3, 10**12 + 54]
    assert ip.near_blocks([words], starts[:0], sizes[:0]).size == 0


def test_live_words_leave_out_every_word_a_hole_touches():
    words = np.arange(10, dtype=np.uint64)      # word i at 1000 + 8 i
    holes = [(1008, 1016), (1012, 1030), (1060, 2000), (900, 1001)]
    assert ip.live_words(words, 1000, holes).tolist() == [4, 5, 6]
    assert ip.live_words(words, 1000, []).tolist() == list(range(10))
    assert ip.live_words(words, 1000, [(0, 5000)]).size == 0
