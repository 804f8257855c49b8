"""The live-block table (tracer/blocktable.py) and the collection reading it,
on a table in plain memory filled the way the BPF program fills it (its
bucket choices, recomputed here from memleak.h's constants): one image's
blocks are read from its own regions, taken out while other images' stay,
two images with the same addresses stay apart, the overflow (the hash) is
read only for images that overflowed, images gone at exec are cleared."""

import numpy as np
import pytest

from fakemaps import fake_maps
from pytest_memleak_ebpf.tracer import abi, blocktable, loading
from pytest_memleak_ebpf.tracer.blocktable import ADDR, SERIAL, SIZE, STACK, TS, WAYS, BlockTable
from pytest_memleak_ebpf.tracer.collection import Collector, serial_at


def new_table(buckets=64, region=8):
    buf = bytearray(buckets * 5 * WAYS * 8)
    return BlockTable(buf, buckets, region)


def put(t, serial, addr, size, stack=0):
    """What the program's record_block does: the first free slot of the
    first choice, else of the second; False when both are full."""
    for c in (0, 1):
        b = t.a[t.bucket_of(serial, addr, c)]
        free = np.flatnonzero(b[ADDR] == 0)
        if len(free):
            i = free[0]
            b[ADDR, i], b[SIZE, i], b[TS, i], b[STACK, i], b[SERIAL, i] = addr, size, 1, stack, serial
            return True
    return False


def test_the_hash_is_the_programs():
    # memleak.bpf.c: mix32(x) = (x * TABLE_MIX) >> 32 (64-bit product)
    assert blocktable.mix32(1) == abi.TABLE_MIX >> 32
    assert blocktable.mix32(1 << 40) == ((abi.TABLE_MIX << 40) & ((1 << 64) - 1)) >> 32
    t = new_table(64, 8)
    for s in (serial_at(5), serial_at(6) | 3, 12345):
        regions = t.image_regions(s)
        assert len(regions) == 2 and regions[0] != regions[1]
        for a in (0x1000, 0x7f0012345670):
            assert {t.bucket_of(s, a, c) // 8 for c in (0, 1)} <= set(regions)


def test_geometry_from_the_capacity():
    assert loading.table_geometry(1 << 20) == (1 << 17, abi.TABLE_REGION_SLOTS // WAYS)
    assert loading.table_geometry(16) == (2, 2)           # the smallest: one region of two buckets
    assert loading.table_geometry(100) == (16, 16)
    assert loading.table_geometry(1 << 26)[0] * WAYS == loading.TABLE_MAX_SLOTS   # the rest: the hash's
    t = new_table(2, 2)
    assert t.image_regions(99) == (0,)
    # one region: the second choice is the other bucket
    assert {t.bucket_of(99, a, 0) ^ t.bucket_of(99, a, 1) for a in range(16, 4096, 16)} == {1}


def test_one_images_blocks_are_taken_while_others_stay():
    t = new_table(256, 32)
    A, B = serial_at(100), serial_at(101)
    for i in range(40):
        assert put(t, A, 0x1000 + 16 * i, i + 1, stack=7)
        assert put(t, B, 0x1000 + 16 * i, 100 + i, stack=8)   # the same addresses: another image
    got = t.take([A], remove=False)
    assert sorted(got) == [A]
    addrs, sizes, stacks = got[A]
    assert sorted(zip(addrs.tolist(), sizes.tolist())) == [(0x1000 + 16 * i, i + 1) for i in range(40)]
    assert set(stacks.tolist()) == {7}
    assert t.count() == 80                                    # nothing removed
    taken = t.take([A], remove=True)
    assert sorted(taken[A][1].tolist()) == list(range(1, 41))
    assert t.count() == 40 and t.take([A], remove=False) == {}
    rest = t.take([B], remove=False)[B]
    assert sorted(rest[1].tolist()) == [100 + i for i in range(40)]
    # freed slots are free for the program (addr 0), not only unset
    assert int((t.a[:, ADDR, :] != 0).sum()) == 40


def test_only_the_images_regions_are_read():
    t = new_table(64, 8)
    A = serial_at(7)
    assert put(t, A, 0x5000, 3)
    # a block of A's serial planted outside its regions is not A's (the program never puts it there)
    outside = next(r for r in range(t.regions) if r not in t.image_regions(A))
    t.a[outside * 8, ADDR, 0], t.a[outside * 8, SERIAL, 0], t.a[outside * 8, SIZE, 0] = 0x6000, A, 4
    assert t.take([A], remove=False)[A][1].tolist() == [3]


def test_a_slot_being_written_is_not_a_block():
    t = new_table()
    A = serial_at(9)
    b = t.a[t.bucket_of(A, 0x10, 0)]
    b[ADDR, 0] = 0x10            # claimed, serial not written yet
    assert t.take([A], remove=True) == {} and b[ADDR, 0] == 0x10


def collector(maps, lib, table):
    maps["dead"] = maps["procs"].__class__(maps["procs"].Key, maps["procs"].Key)
    lib.tables[maps["dead"].map_fd] = maps["dead"]
    return Collector(maps, lib, stack_depth=4, max_stacks=8, thread_alive=lambda tid: False, table=table)


def test_collection_takes_the_tests_images_from_the_table_and_the_overflow():
    maps, lib = fake_maps()
    t = new_table(2, 2)          # 16 slots: A's blocks overflow into the hash
    c = collector(maps, lib, t)
    A, C, OLD = serial_at(1000), serial_at(1001), serial_at(10)
    pr = maps["procs"]
    pr[A] = pr.Leaf(serial=A, tgid=201, test_id=1, flags=abi.PF_EXITED, overflowed=2)
    pr[C] = pr.Leaf(serial=C, tgid=301, test_id=2, flags=0)     # another client's test, running
    tr = maps["tracked"]
    tr[301] = tr.Leaf(serial=C, test_id=2, flags=abi.TF_ALLOCS, nthreads=1)
    for i in range(10):
        assert put(t, A, 0x100 + 16 * i, 10, stack=11)
    for i in range(6):
        assert put(t, C, 0x100 + 16 * i, 1, stack=12)       # the same addresses as A's
    assert not put(t, A, 0x900, 5)                            # full: the overflow
    bl = maps["blocks"]
    for addr in (0x900, 0x910):
        bl[bl.Key(tgid=201, addr=addr)] = bl.Leaf(size=5, ts=1, serial=A, stack=13)
    rec = c.collect_test(1, active={2}, window_serial=-1, window_allocs=False, windows=set(), single_client=False)
    assert sorted(rec.blocks[A], key=lambda r: r[1]) == [(100, 11, 10), (10, 13, 2)]
    assert len(bl) == 0 and t.take([A], remove=False) == {}
    assert sorted(t.take([C], remove=False)[C][0].tolist()) == [0x100 + 16 * i for i in range(6)]
    # an image gone at exec (listed in `dead`): its blocks are cleared at the next collection
    maps["dead"][OLD] = maps["dead"].Leaf(1)
    assert put(t, OLD, 0x2000, 9)
    c.collect_test(3, active={2}, window_serial=-1, window_allocs=False, windows=set(), single_client=False)
    assert t.take([OLD], remove=False) == {} and len(maps["dead"]) == 0
    assert len(t.take([C], remove=False)[C][0]) == 6


def test_the_hash_is_not_walked_when_no_image_overflowed():
    maps, lib = fake_maps()
    t = new_table()
    c = collector(maps, lib, t)
    A = serial_at(1000)
    pr = maps["procs"]
    pr[A] = pr.Leaf(serial=A, tgid=201, test_id=1, flags=abi.PF_EXITED)
    assert put(t, A, 0x100, 10, stack=11)
    lib.calls.clear()
    rec = c.collect_test(1, active=set(), window_serial=-1, window_allocs=False, windows=set(), single_client=True)
    assert rec.blocks[A] == [(10, 11, 1)]
    assert not [k for k in lib.calls if k[1] == maps["blocks"].map_fd]


def test_a_paused_images_blocks_come_from_its_regions(monkeypatch):
    maps, lib = fake_maps()
    t = new_table()
    c = collector(maps, lib, t)
    A, B = serial_at(1000), serial_at(1001)
    tr = maps["tracked"]
    tr[201] = tr.Leaf(serial=A, test_id=1, flags=abi.TF_ALLOCS | abi.TF_KINDS, nthreads=1, alloc_blocks=5)
    for i in range(5):
        assert put(t, A, 0x100 + 16 * i, 10 + i)
        assert put(t, B, 0x100 + 16 * i, 99)
    lib.calls.clear()
    assert sorted(c.image_blocks(201, A)) == [(0x100 + 16 * i, 10 + i) for i in range(5)]
    assert not lib.calls                                       # no hash walk: nothing overflowed
    bl = maps["blocks"]
    bl[bl.Key(tgid=201, addr=0x999)] = bl.Leaf(size=3, ts=1, serial=A, stack=0)
    tr[201] = tr.Leaf(serial=A, test_id=1, flags=abi.TF_ALLOCS | abi.TF_KINDS, nthreads=1, overflowed=1,
                      alloc_blocks=6)
    assert (0x999, 3) in c.image_blocks(201, A)
    assert t.count() == 10


def test_an_image_that_never_recorded_a_block_has_none_and_its_regions_are_not_read(monkeypatch):
    maps, lib = fake_maps()
    t = new_table()
    c = collector(maps, lib, t)
    A = serial_at(1000)
    tr = maps["tracked"]
    tr[201] = tr.Leaf(serial=A, test_id=1, flags=abi.TF_ALLOCS | abi.TF_KINDS, nthreads=1, alloc_blocks=0)
    monkeypatch.setattr(t, "take", lambda *a, **k: pytest.fail("the table was read"))
    lib.calls.clear()
    assert c.image_blocks(201, A) == []
    assert not lib.calls
    # an older image of the same pid (its entry has another serial now): read as before
    monkeypatch.undo()
    assert put(t, A, 0x100, 10)
    tr[201] = tr.Leaf(serial=A + 1, test_id=1, flags=abi.TF_ALLOCS | abi.TF_KINDS, nthreads=1, alloc_blocks=0)
    assert c.image_blocks(201, A) == [(0x100, 10)]


def test_a_bad_store_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(loading.BLOCK_STORE_ENV, "arena")
    with pytest.raises(ValueError, match="PYTEST_MEMLEAK_EBPF_BLOCK_STORE='arena': expected one of table, hash"):
        loading.program_cflags(loading.TracerConfig(), 1)
    monkeypatch.setenv(loading.BLOCK_STORE_ENV, "hash")
    assert not any("BLOCK_TABLE" in f for f in loading.program_cflags(loading.TracerConfig(), 1))
    monkeypatch.delenv(loading.BLOCK_STORE_ENV)
    assert "-DBLOCK_TABLE=1" in loading.program_cflags(loading.TracerConfig(), 1)
