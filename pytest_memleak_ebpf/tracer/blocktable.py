"""The live-block table (bpf/memleak.h: bucket_t), read in place.

The BPF program keeps a tracked image's live blocks in a preallocated,
open-addressed array map (BPF_F_MMAPABLE): buckets of TABLE_WAYS slots, each
field a column of its bucket. An image's blocks are in the two regions its
serial hashes to, so one image's blocks (an exiting process's, for its leak
kinds scan; a finished test's) are read from those regions only, not from the
whole table. A slot is a block while its serial is set (the program writes it
last when it records a block and clears it first when it forgets one).

Userspace clears only the slots of images that can no longer change: finished
or untracked images, and images gone at exec -- the program never writes a
slot of theirs again, and claims only free slots (addr 0): serial first, then
addr, as the program does.
"""

from __future__ import annotations

import mmap
import threading

import numpy as np

from . import abi

MASK64 = (1 << 64) - 1
WAYS = abi.TABLE_WAYS
# the bucket's columns, in bucket_t's order
ADDR, SERIAL, SIZE, TS, STACK = range(5)
_COLUMNS = ("addr", "serial", "size", "ts", "stack")


def mix32(x: int) -> int:
    """The BPF program's hash (memleak.bpf.c: mix32)."""
    return ((x * abi.TABLE_MIX) & MASK64) >> 32


def _check_layout() -> None:
    st = abi.HEADER.struct("bucket_t")
    for i, name in enumerate(_COLUMNS):
        if getattr(st, name).offset != i * WAYS * 8:
            raise RuntimeError(f"bucket_t.{name} is not column {i}: tracer/blocktable.py and memleak.h disagree")


_check_layout()


class BlockTable:
    """The table as a (buckets, 5, WAYS) array of u64 over `buf` (the
    mmapped map, or any writable buffer), regions of `region_buckets`."""

    def __init__(self, buf, buckets: int, region_buckets: int):
        if buckets & (buckets - 1) or region_buckets & (region_buckets - 1) or buckets % region_buckets:
            raise ValueError(f"table geometry {buckets}/{region_buckets}: not powers of 2")
        self.buckets, self.region_buckets = buckets, region_buckets
        self.regions = buckets // region_buckets
        self._buf = buf
        self._local = threading.local()
        self.a = np.frombuffer(buf, dtype="<u8", count=buckets * 5 * WAYS).reshape(buckets, 5, WAYS)

    @classmethod
    def from_map(cls, table, region_buckets: int) -> "BlockTable":
        """Over a BCC array map created with BPF_F_MMAPABLE."""
        buckets = int(table.max_entries)
        size = buckets * ctypes_sizeof_bucket()
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        mm = mmap.mmap(table.map_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return cls(mm, buckets, region_buckets)

    def close(self) -> None:
        self.a = None
        if isinstance(self._buf, mmap.mmap):
            try:
                self._buf.close()
            except BufferError:
                pass   # a view still exported: the mapping goes with the last one

    # -- where an image's blocks are (memleak.bpf.c: table_bucket) --------------

    def image_regions(self, serial: int) -> tuple[int, ...]:
        n = self.regions
        r0 = mix32(serial) & (n - 1)
        r1 = mix32(serial ^ abi.TABLE_MIX2) & (n - 1)
        if n > 1 and r1 == r0:
            r1 ^= 1
        return (r0,) if r1 == r0 else (r0, r1)

    def bucket_of(self, serial: int, addr: int, choice: int) -> int:
        """The bucket index of a block's first (0) or second (1) choice."""
        r0 = mix32(serial) & (self.regions - 1)
        b0 = mix32(addr) & (self.region_buckets - 1)
        if not choice:
            return r0 * self.region_buckets + b0
        r = mix32(serial ^ abi.TABLE_MIX2) & (self.regions - 1)
        b = mix32(addr ^ abi.TABLE_MIX2) & (self.region_buckets - 1)
        if self.regions > 1 and r == r0:
            r ^= 1
        if self.regions == 1 and self.region_buckets > 1 and b == b0:
            b ^= 1
        return r * self.region_buckets + b

    # -- reads ----------------------------------------------------------------

    def _scratch(self) -> np.ndarray:
        """This thread's (region_buckets, WAYS) bool buffer for one region's compare."""
        m = getattr(self._local, "mask", None)
        if m is None:
            m = self._local.mask = np.empty((self.region_buckets, WAYS), dtype=bool)
        return m

    def take(self, serials, *, remove: bool) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """{serial: (addresses, sizes, stacks)} of these images' blocks, read
        from their regions only; remove: their slots are freed (only for images
        that can no longer change)."""
        serials = {int(s) for s in serials if s}
        out: dict[int, list] = {}
        if not serials or self.a is None:
            return {}
        regions: dict[int, set[int]] = {}
        for s in serials:
            for r in self.image_regions(s):
                regions.setdefault(r, set()).add(s)
        rb = self.region_buckets
        for r, mine in sorted(regions.items()):
            sub = self.a[r * rb:(r + 1) * rb]
            ser = sub[:, SERIAL, :]
            # the slots' flat indices (bucket * WAYS + way): one compare over
            # the serial column, then the other columns at those slots only
            # (boolean masks over every column cost several times more)
            if len(mine) == 1:
                (one,) = mine
                m = self._scratch()
                np.equal(ser, np.uint64(one), out=m)      # no temporary: it is 64 KiB
                if not m.any():
                    continue
                idx = np.flatnonzero(m)
            else:
                idx = np.flatnonzero(np.isin(ser, np.fromiter(mine, dtype=np.uint64)))
            if not idx.size:
                continue
            bk, way = idx // WAYS, idx % WAYS
            got_ser = ser[bk, way]
            cols = (sub[bk, ADDR, way], sub[bk, SIZE, way], sub[bk, STACK, way])
            if remove:
                ser[bk, way] = 0            # serial first, then the address (as the program does)
                sub[bk, ADDR, way] = 0
            if len(mine) == 1:
                out.setdefault(one, []).append(cols)
                continue
            for s in mine:
                sel = got_ser == np.uint64(s)
                if sel.any():
                    out.setdefault(s, []).append(tuple(c[sel] for c in cols))
        return {s: parts[0] if len(parts) == 1 else tuple(np.concatenate([p[i] for p in parts]) for i in range(3))
                for s, parts in out.items()}

    def live_stacks(self) -> set[int]:
        """The stacks of every block in the table (a whole-table read: for the
        stack collection, which runs when the stack map is half full)."""
        if self.a is None:
            return set()
        ser = self.a[:, SERIAL, :]
        return set(np.unique(self.a[:, STACK, :][ser != 0]).tolist()) - {0}

    def sweep(self, keep) -> int:
        """Free the slots of every image keep(serials array) -> bool array
        says go (a whole-table read: when the program could not list an image
        gone at exec). Returns the number freed."""
        if self.a is None:
            return 0
        ser = self.a[:, SERIAL, :]
        present = np.unique(ser[ser != 0])
        if not len(present):
            return 0
        gone = present[~np.asarray(keep(present), dtype=bool)]
        if not len(gone):
            return 0
        mask = np.isin(ser, gone)
        n = int(mask.sum())
        ser[mask] = 0
        self.a[:, ADDR, :][mask] = 0
        return n

    def count(self) -> int:
        """Blocks in the table now."""
        return 0 if self.a is None else int(np.count_nonzero(self.a[:, SERIAL, :]))


def ctypes_sizeof_bucket() -> int:
    import ctypes
    return ctypes.sizeof(abi.HEADER.struct("bucket_t"))
