"""Unit tests of the root set and of the maps parser (fake maps, no process)."""

from __future__ import annotations

import numpy as np

from pytest_memleak_ebpf.procmaps import parse_regions
from pytest_memleak_ebpf.kinds.roots import RED_ZONE, VtableCheck, root_ranges, subtract

MAPS = """\
555555554000-555555555000 r--p 00000000 fe:00 123 /usr/bin/prog
555555555000-555555556000 r-xp 00001000 fe:00 123 /usr/bin/prog
555555557000-555555558000 rw-p 00003000 fe:00 123 /usr/bin/prog
555555558000-555555579000 rw-p 00000000 00:00 0          [heap]
7ffff7a00000-7ffff7a21000 rw-p 00000000 00:00 0
7ffff7b00000-7ffff7b10000 rw-s 00000000 00:05 77         /dev/fb0
7ffff7b10000-7ffff7b20000 rw-p 00000000 00:05 5          /dev/zero (deleted)
7ffff7b20000-7ffff7b30000 rw-s 00000000 00:19 99         /dev/shm/seg
7ffff7c00000-7ffff7c01000 ---p 00000000 00:00 0
7ffff7c01000-7ffff7e01000 rw-p 00000000 00:00 0
7ffffffde000-7ffffffff000 rw-p 00000000 00:00 0          [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]
"""


def test_parse_maps():
    maps = parse_regions(MAPS)
    assert len(maps) == 12
    m = maps[2]
    assert (m.start, m.end, m.perms, m.offset, m.inode, m.path) == (
        0x555555557000, 0x555555558000, "rw-p", 0x3000, 123, "/usr/bin/prog")
    assert m.readable and m.writable and not m.executable and m.file_backed
    assert maps[3].path == "[heap]" and not maps[3].file_backed
    assert maps[6].path == "/dev/zero (deleted)"


def test_subtract():
    assert subtract([(0, 100)], [(10, 20), (15, 30), (90, 200)]) == [(0, 10), (30, 90)]
    assert subtract([(0, 10), (20, 30)], []) == [(0, 10), (20, 30)]
    assert subtract([(0, 10)], [(0, 10)]) == []


def test_root_ranges_are_memchecks():
    maps = parse_regions(MAPS)
    heap = (0x555555558000, 0x555555579000)
    recorder = (0x7ffff7a10000, 0x7ffff7a11000)
    main_sp, thread_sp = 0x7fffffffe000, 0x7ffff7d00008
    got = root_ranges(maps, [main_sp, thread_sp], [heap, recorder])
    assert got == [
        (0x555555557000, 0x555555558000),  # the program's data
        (0x7ffff7a00000, 0x7ffff7a10000),  # anonymous, minus the excluded range
        (0x7ffff7a11000, 0x7ffff7a21000),
        # /dev/fb0 (a device) is left out, /dev/zero and /dev/shm are scanned
        (0x7ffff7b10000, 0x7ffff7b20000),
        (0x7ffff7b20000, 0x7ffff7b30000),
        # a thread's stack from its red zone up (8-aligned); the guard page is not rw
        ((thread_sp - RED_ZONE) & ~7, 0x7ffff7e01000),
        (main_sp - RED_ZONE, 0x7ffffffff000),
    ]


def test_vtable_check_is_memchecks():
    maps = parse_regions("""\
400000-401000 r--p 00000000 fe:00 1 /usr/bin/prog
401000-402000 r-xp 00001000 fe:00 1 /usr/bin/prog
402000-403000 r--p 00002000 fe:00 1 /usr/bin/prog
600000-601000 rw-p 00000000 00:00 0
""")
    mem = {}

    def put(addr, *vals):
        for i, v in enumerate(vals):
            mem[addr + 8 * i] = v

    def read(addr, n):
        return b"".join(mem.get(a, 0).to_bytes(8, "little") for a in range(addr, addr + n, 8))

    put(0x402000, 0, 0x401100, 0, 0x401200)           # two code pointers, nulls skipped
    put(0x402100, 0x401100, 0x600010, 0x401200)        # a data pointer before the second
    put(0x402200, 0x401100)                            # only one
    put(0x600000, 0x401100, 0x401200)                  # not a file mapping
    put(0x402ff0, 0x401100, 0x401200)                  # the mapping's last word is not read
    check = VtableCheck(maps, read)
    got = check(np.array([0x402000, 0x402100, 0x402200, 0x600000, 0x402ff0, 0x402fe8], dtype=np.uint64))
    assert got.tolist() == [True, False, False, False, False, False]
    put(0x402fe8, 0x401100)
    assert check(np.array([0x402fe8], dtype=np.uint64)).tolist() == [True]


def test_block_segments_of_a_few_blocks_in_plain_python_are_the_vectorised_ones(monkeypatch):
    import numpy as np

    from pytest_memleak_ebpf.kinds import roots as R
    from pytest_memleak_ebpf.procmaps import Region

    rng = np.random.default_rng(5)
    # adjacent mappings; blocks laid one after the other with gaps around `gap`
    maps = [Region(0x100000 + 0x40000 * k, 0x140000 + 0x40000 * k, "rw-p", 0, "00:00", 0, "") for k in range(4)]
    for _ in range(300):
        n = int(rng.integers(1, R.SMALL_SEGMENTS + 1))
        gap = int(rng.choice([0, 64, 1 << 12]))
        starts, sizes, at = [], [], maps[0].start + 16
        for _ in range(n):
            z = int(rng.integers(0, 0x2000))
            if at + z >= maps[-1].end:
                break
            starts.append(at)
            sizes.append(z)
            at = (at + z + 15) // 16 * 16 + int(rng.choice([0, 16, gap - 8, gap, gap + 8, 3 * gap + 16]))
            at += (-at) % 16
        starts, sizes = np.array(starts, dtype=np.uint64), np.array(sizes, dtype=np.uint64)
        small = R._block_segments(starts, sizes, maps, gap)
        monkeypatch.setattr(R, "SMALL_SEGMENTS", 0)
        assert small == R._block_segments(starts, sizes, maps, gap)
        monkeypatch.setattr(R, "SMALL_SEGMENTS", 64)
