"""Unit tests of kinds/allocmem.py: each allocator's memory found in fake maps
and fake memory (no process), and the reasons an unknown allocator gives."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pytest_memleak_ebpf.kinds import allocmem
from pytest_memleak_ebpf.kinds.allocmem import PAGE, Thread, UnsupportedAllocator
from pytest_memleak_ebpf.procmaps import parse_regions
from pytest_memleak_ebpf.tracer import exitpause

MiB = 1 << 20


class Memory:
    """Sparse little-endian memory: unwritten bytes read as zero inside the
    given ranges, and are unreadable outside them."""

    def __init__(self, ranges):
        self.ranges = ranges
        self.bytes = {}

    def put(self, addr, *words):
        for i, w in enumerate(words):
            self.put_bytes(addr + 8 * i, struct.pack("<Q", w))

    def put_bytes(self, addr, data):
        for i, b in enumerate(data):
            self.bytes[addr + i] = b

    def read(self, addr, n):
        out = bytearray()
        for a in range(addr, addr + n):
            if not any(lo <= a < hi for lo, hi in self.ranges):
                break
            out.append(self.bytes.get(a, 0))
        return bytes(out)


def _maps(text):
    return parse_regions("\n".join(line.strip() for line in text.strip().splitlines()) + "\n")


# -- jemalloc, tcmalloc, mimalloc: the mappings holding blocks --------------

MAPS = _maps("""
555555554000-555555555000 r-xp 00000000 fe:00 1 /usr/bin/prog
555555557000-555555558000 rw-p 00003000 fe:00 1 /usr/bin/prog
555555558000-555555579000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000800000 rw-p 00000000 00:00 0
7f0000a00000-7f0000e00000 rw-p 00000000 00:00 0
7f0001000000-7f0001001000 rw-p 00000000 00:00 0
7f0002000000-7f0002001000 rw-s 00000000 00:05 9 /dev/shm/x
7ffffffde000-7ffffffff000 rw-p 00000000 00:00 0 [stack]
""")


def test_mapping_allocators_take_the_private_anonymous_mappings_that_hold_a_block():
    starts = np.array([0x7f0000001000, 0x555555560010, 0x7f0002000010, 0x555555557010], dtype=np.uint64)
    sizes = np.full(4, 16, dtype=np.uint64)
    mem = Memory([])
    for kind in ("tcmalloc", "mimalloc", "jemalloc"):
        am = allocmem.allocator_memory(kind, MAPS, mem.read, starts, sizes)
        # [heap] and the first anonymous mapping hold blocks; a shared mapping,
        # the program's data (a block there is not the allocator's mapping) and
        # mappings without a block are not taken
        assert sorted(am.ranges) == [(0x555555558000, 0x555555579000), (0x7f0000000000, 0x7f0000800000)], kind
        assert am.hazard is None and am.keep == []


def test_mimalloc_segment_area_is_its_own_even_without_a_live_block():
    maps = _maps("""
    1fff0000000-1fff2000000 rw-p 00000000 00:00 0
    24d7c000000-24d7e000000 rw-p 00000000 00:00 0
    41526000000-41528000000 rw-p 00000000 00:00 0
    41528000000-41529000000 rw-s 00000000 00:05 9 /dev/shm/y
    7f0000000000-7f0000800000 rw-p 00000000 00:00 0
    """)
    starts = np.array([0x7f0000001000], dtype=np.uint64)
    am = allocmem.allocator_memory("mimalloc", maps, Memory([]).read, starts, [8])
    # a segment whose blocks were all freed (its stale words are not roots), below 2 TiB nothing
    assert sorted(am.ranges) == [(0x24d7c000000, 0x24d7e000000), (0x41526000000, 0x41528000000),
                                 (0x7f0000000000, 0x7f0000800000)]
    am = allocmem.allocator_memory("jemalloc", maps, Memory([]).read, starts, [8])
    assert am.ranges == [(0x7f0000000000, 0x7f0000800000)]


def test_jemalloc_base_blocks_are_found_by_their_header():
    """A base block (2 MiB aligned) starts with base_block_t {size, next,
    edata {e_bits, e_addr, e_bsize}}: its edata is the block's unused tail."""
    mem = Memory([(0x7f0000a00000, 0x7f0000e00000), (0x7f0000000000, 0x7f0000800000)])
    base = 0x7f0000c00000
    mem.put(base, 2 * MiB, 0, 0xE80AFFF, base + 0x16580, 2 * MiB - 0x16580)
    # not headers: a tail past the block's end, a size not a 2 MiB multiple, a zero page
    mem.put(0x7f0000200000, 2 * MiB, 0, 0xE80AFFF, 0x7f0000200100, 2 * MiB)
    mem.put(0x7f0000400000, 4096, 0, 0, 0x7f0000400100, 4096 - 0x100)
    assert allocmem.jemalloc_base_blocks(MAPS, mem.read) == [(base, base + 2 * MiB)]
    starts = np.array([0x7f0000001000], dtype=np.uint64)
    am = allocmem.allocator_memory("jemalloc", MAPS, mem.read, starts, np.array([8], dtype=np.uint64))
    assert sorted(am.ranges) == [(0x7f0000000000, 0x7f0000800000), (base, base + 2 * MiB)]
    # the same header means nothing to the other allocators
    am = allocmem.allocator_memory("mimalloc", MAPS, mem.read, starts, np.array([8], dtype=np.uint64))
    assert am.ranges == [(0x7f0000000000, 0x7f0000800000)]


def test_a_threads_stack_and_tls_are_kept_even_in_a_merged_mapping():
    maps = _maps("""
    7f0000000000-7f0000001000 ---p 00000000 00:00 0
    7f0000001000-7f0000a00000 rw-p 00000000 00:00 0
    7f0001000000-7f0001010000 rw-p 00000000 00:00 0
    7ffffffde000-7ffffffff000 rw-p 00000000 00:00 0 [stack]
    """)
    # a glibc thread: stack and struct pthread in one mapping, merged with
    # the allocator's memory above it (a block at 7f0000900000)
    t = Thread(sp=0x7f0000700000, fs_base=0x7f00007ff6c0)
    # the main thread: its TLS in an anonymous mapping with no block
    main = Thread(sp=0x7fffffffe000, fs_base=0x7f0001008740)
    starts = np.array([0x7f0000900000], dtype=np.uint64)
    keep = allocmem.thread_ranges(maps, [t, main], starts, [8])
    assert keep == [(0x7f0000700000 - 128, 0x7f0000801000),
                    (0x7f0001004000, 0x7f000100a000)]
    am = allocmem.allocator_memory("jemalloc", maps, Memory([]).read, starts, np.array([8], dtype=np.uint64),
                                   [t, main])
    assert am.ranges == [(0x7f0000001000, 0x7f0000a00000)] and am.keep == keep
    # a stack that is itself a block (a coroutine's): nothing kept
    assert allocmem.thread_ranges(maps, [Thread(0x7f0000900100, 0x7f0000900800)], starts, [0x1000]) == []
    assert allocmem.thread_ranges(maps, [Thread(0x7f0000900100, 0x7f0000900800)], starts, [0x10]) == [
        (0x7f0000900100 - 128, 0x7f0000902000)]


# -- musl mallocng ---------------------------------------------------------------

SECRET = 0x5EC12E7AB1E5EC12


def _musl_process():
    """A mallocng heap: ctx in libc's .bss, one meta area, three groups (one
    in a donated .bss tail, one mmapped, one inside another's slot) and a
    freed meta; returns (maps, memory, live blocks, expected ranges)."""
    maps = _maps("""
    7f0000000000-7f0000001000 rw-p 00000000 fe:00 1 /usr/bin/prog
    7f0000100000-7f0000104000 rw-p 00000000 00:00 0
    7f0000200000-7f0000210000 rw-p 00000000 00:00 0
    7f0000300000-7f0000301000 rw-p 0000a000 fe:00 2 /lib/ld-musl-x86_64.so.1
    """)
    mem = Memory([(m.start, m.end) for m in maps])
    ctx = 0x7f0000300100
    area = 0x7f0000100000
    mem.put(ctx, SECRET)
    mem.put(ctx + allocmem.CTX_META_AREA_HEAD, area)
    mem.put(area, SECRET, 0, 4)  # check, next, nslots
    metas = [area + 24 + 40 * k for k in range(4)]

    def meta(m, group, last_idx, sizeclass, maplen=0):
        mem.put(m, 0, 0, group, 0, last_idx | (sizeclass << 6) | (maplen << 12))
        mem.put(group, m)

    g1 = 0x7f0000000800             # in the program's .bss (donated)
    meta(metas[0], g1, 2, 3)        # 3 slots of 64 B
    g2 = 0x7f0000200000             # mmapped: 2 pages
    meta(metas[1], g2, 0, 63, maplen=2)
    g3 = g1 + 16 + 64 + 16          # nested in g1's second slot's storage
    meta(metas[2], g3, 1, 0)        # 2 slots of 16 B
    # metas[3] is free (mem 0)

    def slot(group, idx, stride):
        """Slot idx's user pointer, with mallocng's 4-byte header before it:
        p[-4] 0 (a 16-bit offset), p[-3] the index, p[-2..-1] the offset in units."""
        p = group + 16 + stride * idx
        mem.put_bytes(p - 4, bytes([0, idx]) + struct.pack("<H", (p - group - 16) // 16))
        return p

    blocks = [slot(g1, 0, 64), slot(g2, 0, 2 * PAGE - 16), slot(g3, 1, 16)]
    want = [(g1, g1 + 16 + 3 * 64), (g2, g2 + 2 * PAGE), (g3, g3 + 16 + 2 * 16), (area, area + PAGE)]
    return maps, mem, np.array(blocks, dtype=np.uint64), want


def test_musl_groups_and_meta_areas_are_found_from_a_block():
    maps, mem, blocks, want = _musl_process()
    assert allocmem.musl_group_of(mem.read, int(blocks[0])) == 0x7f0000000800
    assert allocmem.musl_context(maps, mem.read, blocks) == 0x7f0000300100
    for kind in ("musl", "static-musl"):
        am = allocmem.allocator_memory(kind, maps, mem.read, blocks, np.full(3, 8, dtype=np.uint64))
        # exactly the groups' bytes: the rest of the donated .bss page stays a root
        assert sorted(am.ranges) == sorted(want)
        assert am.hazard is None


def test_musl_without_its_context_or_with_a_bad_meta_area_is_unsupported():
    maps, mem, blocks, _ = _musl_process()
    mem.put(0x7f0000300100, 0)   # ctx's secret gone
    with pytest.raises(UnsupportedAllocator, match=r"^its allocator is musl, but mallocng's context "
                                                   r"\(__malloc_context\) was not found through its blocks, "
                                                   r"so its blocks count as unclassified$"):
        allocmem.allocator_memory("musl", maps, mem.read, blocks, np.full(3, 8, dtype=np.uint64))
    maps, mem, blocks, _ = _musl_process()
    mem.put(0x7f0000100000 + 8, 0x7f0000200000)   # the area's next is not an area
    with pytest.raises(UnsupportedAllocator, match="meta area at 0x7f0000200000 has a bad check word"):
        allocmem.allocator_memory("musl", maps, mem.read, blocks, np.full(3, 8, dtype=np.uint64))
    # no blocks: nothing to find
    assert allocmem.allocator_memory("musl", maps, mem.read, [], []).ranges == []


# -- static glibc ----------------------------------------------------------------------

def test_static_glibc_heap_starts_at_the_tcache_after_the_main_threads_tls():
    """A static executable's [heap] starts with the static TLS and TCB
    (sbrk'd by __libc_setup_tls): a root; malloc's chunks start at the
    tcache chunk (size 0x291, prev_size 0, 16-aligned)."""
    from pytest_memleak_ebpf.kinds import heap

    maps = _maps("""
    400000-401000 r-xp 00000000 fe:00 1 /usr/bin/prog
    4a4000-4a7000 rw-p 000a4000 fe:00 1 /usr/bin/prog
    4a7000-4ac000 rw-p 00000000 00:00 0
    1000000-1022000 rw-p 00000000 00:00 0 [heap]
    """)
    mem = Memory([(m.start, m.end) for m in maps])
    mem.put(0x1000300, 0x291)        # in the TLS: 8 mod 16 would make a chunk at ...2f8: not 16-aligned
    mem.put(0x1000d38, 5, 0x291)     # prev_size not 0
    mem.put(0x1000d40, 0, 0x291)     # the tcache chunk
    heap_map = maps[-1]
    assert heap.static_heap_start(mem.read, heap_map) == 0x1000d40
    assert heap.allocator_ranges(maps, mem.read, None, static=True) == [(0x1000d40, 0x1022000)]
    assert heap.allocator_ranges(maps, mem.read, None) == [(0x1000000, 0x1022000)]
    # no main_arena in the executable's data: unsupported, with the reason
    with pytest.raises(UnsupportedAllocator, match="^its allocator is static-glibc, but glibc's main_arena was "
                                                   "not found in the executable's data, so its blocks count as "
                                                   "unclassified$"):
        allocmem.allocator_memory("static-glibc", maps, mem.read, [0x1000d50], [8])
    assert allocmem.allocator_memory("static-glibc", maps, mem.read, [], []).ranges == [(0x1000d40, 0x1022000)]


# -- unknown allocators --------------------------------------------------------------

@pytest.mark.parametrize("kind, reason", [
    ("other", "its allocator is other: leak kinds do not know its memory, so its blocks count as unclassified"),
    ("jemalloc-6", "its allocator is jemalloc-6: leak kinds do not know its memory, so its blocks count as "
                   "unclassified"),
])
def test_an_allocator_without_a_walk_is_unclassified_with_its_reason(kind, reason):
    with pytest.raises(UnsupportedAllocator) as exc:
        allocmem.check_supported(kind)
    assert str(exc.value) == reason
    with pytest.raises(UnsupportedAllocator):
        allocmem.allocator_memory(kind, [], Memory([]).read, [], [])
    # the exit pause's scan gives the reason, with blocks or without, and reads nothing
    for blocks in ([], [(0x1000, 8)]):
        out = exitpause.scan(-1, blocks, allocator=kind, registers=lambda: pytest.fail("read registers"))
        assert out.kinds is None and out.reason == reason
    from pytest_memleak_ebpf.kinds.roots import scan_process
    with pytest.raises(UnsupportedAllocator, match=reason):
        scan_process(-1, [0x1000], [8], allocator=kind)


@pytest.mark.parametrize("kind", allocmem.SUPPORTED)
def test_supported_allocators_pass_the_gate(kind):
    allocmem.check_supported(kind)
    assert exitpause.scan(-1, [], allocator=kind).kinds == {}
