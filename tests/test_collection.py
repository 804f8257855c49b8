"""The per-test map walks (tracer/collection.py) on fake maps, no root:
one test's records are taken out and every other test's, window's and
still-running process's stay; rings of running processes are spilled into
the block map; stacks are collected only when nothing refers to them and
they were unused since the walk began; plain-ip stacks are mapped back."""

import time

import pytest

from fakemaps import fake_maps
from pytest_memleak_ebpf.tracer import abi, collection
from pytest_memleak_ebpf.tracer.collection import DELETE, Collector, serial_at

BID = bytes(range(20))


def collector(maps, lib, alive=()):
    return Collector(maps, lib, stack_depth=4, max_stacks=8, thread_alive=lambda tid: tid in alive)


def track(maps, tgid, *, serial=0, test_id=0, flags=abi.TF_ALLOCS, ring=(), **counters):
    t = maps["tracked"]
    v = t.Leaf(serial=serial, test_id=test_id, flags=flags, nthreads=1, **counters)
    for i, (addr, size, stack) in enumerate(ring):
        v.ring[i].addr, v.ring[i].size, v.ring[i].stack, v.ring[i].ts = addr, size, stack, 1
    t[tgid] = v


def proc(maps, serial, *, tgid, test_id, flags=abi.PF_EXITED | abi.PF_TERMINATED, comm=b"prog", **counters):
    p = maps["procs"]
    p[serial] = p.Leaf(serial=serial, tgid=tgid, test_id=test_id, flags=flags, comm=comm, exe=b"/bin/prog",
                       start_ns=5, **counters)


def block(maps, tgid, addr, *, size, serial, stack, ext_ip=0):
    b = maps["blocks"]
    key = b.Key(tgid=tgid, addr=addr)
    b[key] = b.Leaf(size=size, ts=1, serial=serial, stack=stack, ext_ip=ext_ip)


def stack(maps, h, frames=((abi.BUILD_ID_VALID, 0x40),), used=1):
    s = maps["stacks"]
    v = s.Leaf(nframes=len(frames), used=used)
    for i, (status, off) in enumerate(frames):
        v.frames[i].status = status
        if status == abi.BUILD_ID_VALID:
            v.frames[i].build_id[:] = list(BID)
            v.frames[i].offset = off
        else:
            v.frames[i].ip = off
    s[h] = v


def remaining_blocks(maps):
    return sorted((int(k.tgid), int(k.addr), int(v.serial), int(v.size), int(v.stack))
                  for k, v in maps["blocks"].items())


def by_stack(bl):
    return sorted(bl, key=lambda t: t[1])


OLD = 7 << abi.SERIAL_CPU_BITS   # an image older than any collection: garbage unless someone owns it
SA, SB, SC, SD = (serial_at(n) for n in (1000, 1001, 2000, 2001))
WINDOW = (1 << 62) | 5


@pytest.fixture
def world():
    """Test 1 (being collected): A exited, B still running with blocks in its
    ring. Test 2 (another client's, running): C running, D exited. Another
    client's open in-process window. Garbage: a block and a process record
    nobody owns, a hand-off slot of a thread that is gone."""
    maps, lib = fake_maps()
    track(maps, 100, test_id=1, flags=abi.TF_ROOT)
    proc(maps, SA, tgid=201, test_id=1, exit_code=3, alloc_blocks=9, alloc_bytes=99)
    block(maps, 201, 0xA1, size=10, serial=SA, stack=11)
    block(maps, 201, 0xA2, size=20, serial=SA, stack=11)
    block(maps, 201, 0xA3, size=5, serial=SA, stack=12)
    track(maps, 202, serial=SB, test_id=1, flags=abi.TF_ALLOCS | abi.TF_RING,
          ring=[(0xB1, 7, 11), (0, 1000, 99), (0xB2, 9, 13)], alloc_blocks=4, alloc_bytes=116, lost_stacks=1)
    proc(maps, SB, tgid=202, test_id=1, flags=0)
    block(maps, 202, 0xB0, size=100, serial=SB, stack=11)
    track(maps, 301, serial=SC, test_id=2)
    proc(maps, SC, tgid=301, test_id=2, flags=0)
    block(maps, 301, 0xC1, size=1, serial=SC, stack=11)
    block(maps, 301, 0xC2, size=2, serial=SC, stack=14)
    proc(maps, SD, tgid=302, test_id=2)
    block(maps, 302, 0xD1, size=3, serial=SD, stack=15)
    block(maps, 400, 0xE1, size=4, serial=WINDOW, stack=16)
    block(maps, 500, 0xF1, size=6, serial=OLD, stack=17)
    proc(maps, OLD, tgid=500, test_id=9)
    for h in (11, 12, 13, 14, 15, 16, 17):
        stack(maps, h, [(abi.BUILD_ID_VALID, h * 16)])
    ho = maps["handoffs"]
    ho[ho.Key(tid=202, fn=abi.FN_MALLOC)] = ho.Leaf(live=1)
    ho[ho.Key(tid=999, fn=abi.FN_REALLOC)] = ho.Leaf(live=1)
    return maps, lib


def test_one_tests_records_are_taken_out_and_everything_else_stays(world):
    maps, lib = world
    c = collector(maps, lib, alive={202})
    rec = c.collect_test(1, active={2}, window_serial=-1, window_allocs=False, windows={WINDOW},
                         single_client=False)
    assert sorted(rec.processes) == [SA, SB]
    a, b = rec.processes[SA], rec.processes[SB]
    assert (a["pid"], a["exited"], a["exit_code"], a["alloc_blocks"], a["running_at_test_end"]) == (201, True, 3, 9, False)
    assert (a["comm"], a["exe_raw"]) == ("prog", "/bin/prog")
    # B is running: its live counters (from its tracked entry), and it stops being tracked
    assert (b["pid"], b["exited"], b["alloc_blocks"], b["alloc_bytes"], b["lost_stacks"]) == (202, False, 4, 116, 1)
    assert b["running_at_test_end"] is True
    assert by_stack(rec.blocks[SA]) == [(30, 11, 2), (5, 12, 1)]
    # B's ring (two used slots) joined its block in the map, then all were taken
    assert by_stack(rec.blocks[SB]) == [(107, 11, 2), (9, 13, 1)]
    assert rec.stacks == {h: [(abi.BUILD_ID_VALID, BID.hex(), h * 16)] for h in (11, 12, 13)}
    # test 2's, the window's blocks stay; the garbage block went
    assert remaining_blocks(maps) == [(301, 0xC1, SC, 1, 11), (301, 0xC2, SC, 2, 14), (302, 0xD1, SD, 3, 15),
                                      (400, 0xE1, WINDOW, 4, 16)]
    assert sorted(int(k.value) for k in maps["tracked"].keys()) == [100, 301]
    assert sorted(int(k.value) for k in maps["procs"].keys()) == [SC, SD]
    assert [int(k.tid) for k in maps["handoffs"].keys()] == [202]
    assert {SC, SD} <= rec.live and SA not in rec.live
    assert rec.inproc_blocks == []
    assert ("lookup_and_delete_batch", maps["blocks"].map_fd) not in lib.calls   # entries stay: no drain
    # the stack map is below its collection threshold: every stack stays
    assert len(maps["stacks"]) == 7


def test_a_closed_window_is_taken_with_its_test(world):
    maps, lib = world
    c = collector(maps, lib, alive={202})
    rec = c.collect_test(1, active={2}, window_serial=WINDOW, window_allocs=True, windows={WINDOW},
                         single_client=False)
    assert rec.inproc_blocks == [(4, 16, 0)]
    assert 16 in rec.stacks
    assert [b[:3] for b in remaining_blocks(maps)] == [(301, 0xC1, SC), (301, 0xC2, SC), (302, 0xD1, SD)]


def test_nothing_of_the_test_skips_the_block_walk(world):
    maps, lib = world
    c = collector(maps, lib, alive={202})
    rec = c.collect_test(5, active={1, 2}, window_serial=-1, window_allocs=False, windows=set(), single_client=False)
    assert rec.processes == {} and rec.blocks == {} and rec.stacks == {}
    assert not any(fd == maps["blocks"].map_fd for _, fd in lib.calls)
    assert len(maps["blocks"]) == 9


def test_a_lone_client_drains_the_block_map_in_one_call_per_batch():
    maps, lib = fake_maps()
    proc(maps, SA, tgid=201, test_id=1)
    block(maps, 201, 0xA1, size=10, serial=SA, stack=0)
    block(maps, 500, 0xF1, size=6, serial=OLD, stack=0)
    rec = collector(maps, lib).collect_test(1, active=set(), window_serial=-1, window_allocs=False,
                                            windows=set(), single_client=True)
    assert rec.blocks == {SA: [(10, 0, 1)]}
    assert len(maps["blocks"]) == 0
    assert ("lookup_and_delete_batch", maps["blocks"].map_fd) in lib.calls
    assert ("delete_batch", maps["blocks"].map_fd) not in lib.calls


@pytest.mark.parametrize("lookup_and_delete", [True, False])   # False: kernels before 5.14
def test_a_running_processs_ring_is_spilled_into_the_block_map(lookup_and_delete):
    maps, lib = fake_maps()
    lib.lookup_and_delete = lookup_and_delete
    track(maps, 202, serial=SB, test_id=1, flags=abi.TF_ALLOCS | abi.TF_RING,
          ring=[(0xB1, 7, 11), (0, 5, 12), (0xB2, 9, 13)], alloc_blocks=2)
    track(maps, 203, serial=SC, test_id=1, flags=abi.TF_ALLOCS, ring=[(0xC1, 1, 14)])   # ring off: stale slots
    track(maps, 204, serial=SD, test_id=2, flags=abi.TF_ALLOCS | abi.TF_RING, ring=[(0xD1, 3, 15)])
    c = collector(maps, lib)
    assert c.ring_stacks() == {11, 13, 15}
    running = c.untrack_test(1)
    assert sorted(running) == [SB, SC] and running[SB]["alloc_blocks"] == 2
    assert remaining_blocks(maps) == [(202, 0xB1, SB, 7, 11), (202, 0xB2, SB, 9, 13)]
    assert [int(k.value) for k in maps["tracked"].keys()] == [204]


def test_stacks_are_collected_only_when_unreferenced_and_unused_since_the_walk():
    maps, lib = fake_maps()
    track(maps, 301, serial=SC, test_id=2, flags=abi.TF_ALLOCS | abi.TF_RING, ring=[(0xC9, 1, 24)])
    block(maps, 301, 0xC1, size=1, serial=SC, stack=21)      # stays: its stack is referenced
    proc(maps, SA, tgid=201, test_id=1)
    block(maps, 201, 0xA1, size=1, serial=SA, stack=22)      # taken with its test
    t0 = time.monotonic_ns()
    for h, used in ((21, 1), (22, 1), (23, t0 + 5), (24, 1), (25, 1)):
        stack(maps, h, used=used)
    counters = maps["counters"]
    c = collector(maps, lib)
    assert c.stack_gc_at == 16                               # max(16, max_stacks // 2)
    counters[abi.CTR_NEW_STACKS] = counters.Leaf(15)
    sweep = c.sweep_blocks({SA: {}}, -1, live={SC}, t0=t0, windows=set(), single_client=False)
    assert sweep.referenced == {21}
    c.collect_stack_garbage(sweep)
    assert len(maps["stacks"]) == 5                          # below the threshold: nothing collected
    counters[abi.CTR_NEW_STACKS] = counters.Leaf(20)
    c.collect_stack_garbage(sweep)
    # 22 (its block was taken) and 25 go; 21 (a block), 23 (used since the walk began), 24 (a ring) stay
    assert sorted(int(k.value) for k in maps["stacks"].keys()) == [21, 23, 24]
    assert c.stacks_deleted == 2
    assert c.stack_gc_at == max(8 // 2, (20 - 2) + 8 // 4)


def test_plain_ip_stacks_are_mapped_back_to_build_id_stacks():
    maps, lib = fake_maps()
    proc(maps, SA, tgid=201, test_id=1)
    # the kernel gave two stacks as plain ips; the image's rawcache knows the first one's ips
    stack(maps, 31, [(abi.BUILD_ID_IP, 0x1100), (abi.BUILD_ID_IP, 0x2200)])
    stack(maps, 32, [(abi.BUILD_ID_IP, 0x1500)])
    stack(maps, 33, [(abi.BUILD_ID_VALID, 0x100), (abi.BUILD_ID_VALID, 0x200)])
    block(maps, 201, 0xA1, size=10, serial=SA, stack=31)
    block(maps, 201, 0xA2, size=20, serial=SA, stack=33)
    block(maps, 201, 0xA3, size=5, serial=SA, stack=32)
    rc = maps["rawcache"]
    v = rc.Leaf(h=33, n=2)
    v.ip[0], v.ip[1] = 0x1100, 0x2200
    rc[rc.Key(serial=SA, rawhash=abi.fnv_ips([0x1100, 0x2200]))] = v
    rc[rc.Key(serial=OLD, rawhash=1)] = rc.Leaf(h=33, n=0)    # garbage
    rc[rc.Key(serial=SC, rawhash=2)] = rc.Leaf(h=33, n=0)     # a live image's
    track(maps, 301, serial=SC, test_id=2)
    rec = collector(maps, lib).collect_test(1, active=set(), window_serial=-1, window_allocs=False,
                                            windows=set(), single_client=True)
    # 31 is 33 (same ips); 32's ip is placed in 33's module: load bias 0x1100 - 0x100
    remapped = hash(("remapped", SA, ((abi.BUILD_ID_VALID, BID.hex(), 0x1500 - 0x1000),)))
    assert by_stack(rec.blocks[SA]) == sorted([(30, 33, 2), (5, remapped, 1)], key=lambda t: t[1])
    assert rec.stacks[remapped] == [(abi.BUILD_ID_VALID, BID.hex(), 0x500)]
    assert rec.stacks[33] == [(abi.BUILD_ID_VALID, BID.hex(), 0x100), (abi.BUILD_ID_VALID, BID.hex(), 0x200)]
    assert [int(k.serial) for k in rc.keys()] == [SC]


def test_the_rawcache_is_walked_only_when_a_stack_is_made_of_plain_ips():
    maps, lib = fake_maps()
    proc(maps, SA, tgid=201, test_id=1)
    stack(maps, 33, [(abi.BUILD_ID_VALID, 0x100), (abi.BUILD_ID_VALID, 0x200)])
    block(maps, 201, 0xA2, size=20, serial=SA, stack=33)
    rc = maps["rawcache"]
    rc[rc.Key(serial=OLD, rawhash=1)] = rc.Leaf(h=33, n=0)    # garbage: left to the LRU map's eviction
    rc[rc.Key(serial=SA, rawhash=2)] = rc.Leaf(h=33, n=0)
    rec = collector(maps, lib).collect_test(1, active=set(), window_serial=-1, window_allocs=False,
                                            windows=set(), single_client=True)
    assert by_stack(rec.blocks[SA]) == [(20, 33, 1)]
    assert sorted(int(k.serial) for k in rc.keys()) == sorted([OLD, SA])


def test_select_batches_and_skips_keys_deleted_meanwhile(monkeypatch):
    monkeypatch.setattr(collection, "BATCH_CHUNK", 3)
    maps, lib = fake_maps()
    t = maps["procs"]
    for s in range(1, 9):
        proc(maps, s, tgid=s, test_id=s % 2)
    c = collector(maps, lib)

    def pick(k, v):
        s = collection.int_of(k)
        if s == 4:
            del t[5]        # a free while the walk runs: gone before the chunk's delete
        if v.test_id == 1:
            return s
        return DELETE if s in (2, 6) else None

    assert list(c.select(t, pick)) == [1, 3, 5, 7]
    assert sorted(int(k.value) for k in t.keys()) == [4, 8]
    assert sum(1 for name, _ in lib.calls if name == "lookup_batch") == 3


def test_a_window_snapshot_leaves_the_blocks():
    maps, lib = fake_maps()
    block(maps, 400, 0xE1, size=4, serial=WINDOW, stack=16, ext_ip=0x77)
    block(maps, 401, 0xE2, size=8, serial=WINDOW + 1, stack=16)
    c = collector(maps, lib)
    assert c.window_blocks(WINDOW) == [(4, 16, 0x77)]
    assert len(maps["blocks"]) == 2
    inproc, stacks = c.collect_window(WINDOW, windows={WINDOW, WINDOW + 1}, single_client=False)
    assert inproc == [(4, 16, 0x77)] and stacks == {}
    assert [int(v.serial) for v in maps["blocks"].values()] == [WINDOW + 1]


def test_open_windows_blocks_stay_whatever_the_time():
    """Window serials are 1 << 62 | n: after 2^54 ns of uptime image serials
    pass them, and only the open-window set keeps a window's blocks."""
    maps, lib = fake_maps()
    block(maps, 400, 0xE1, size=4, serial=WINDOW, stack=16)
    block(maps, 401, 0xE2, size=8, serial=WINDOW + 1, stack=17)
    c = collector(maps, lib)
    late = 1 << 56
    sweep = c.sweep_blocks({}, -1, live=set(), t0=late, windows={WINDOW}, single_client=False)
    assert sweep.referenced == {16}
    assert [int(v.serial) for v in maps["blocks"].values()] == [WINDOW]
    c.sweep_blocks({}, -1, live=set(), t0=late, windows=set(), single_client=True)
    assert len(maps["blocks"]) == 0
