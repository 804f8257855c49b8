"""Read a stopped process: its mappings and its memory.

* its mappings: :func:`pytest_memleak_ebpf.procmaps.read_regions`;
* :class:`ProcessMemory` reads memory with ``process_vm_readv`` (one call for
  many ranges), falling back to ``/proc/PID/mem`` when that fails;
  :meth:`ProcessMemory.prefetch` reads many ranges at once into one buffer
  that later reads inside them are served from (a scan reads the same small
  mappings several times: the allocator's structures, the exit path's frames,
  the roots);
* its threads' registers: :mod:`.ptrace`.
"""

from __future__ import annotations

import bisect
import ctypes
import os
from typing import List, Sequence, Tuple

import numpy as np

_libc = ctypes.CDLL(None, use_errno=True)


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.restype = ctypes.c_ssize_t
_process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong,
                              ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.c_ulong]
_IOV_MAX = 1024
_CHUNK = 64 << 20


class ProcessMemory:
    """Reads another process' memory (it should be stopped)."""

    def __init__(self, pid: int):
        self.pid = pid
        self._mem = None
        self.used_proc_mem = False
        # prefetched ranges, sorted: starts, ends, offsets into _buf
        self._lo: List[int] = []
        self._hi: List[int] = []
        self._off: List[int] = []
        self._buf = np.zeros(0, dtype=np.uint8)

    def _read_direct(self, ranges: Sequence[Tuple[int, int]]):
        """Read the ``(addr, length)`` ranges into one new numpy buffer with
        as few ``process_vm_readv`` calls as can be; returns (buffer, offset
        of each range, whether each was read wholly). A read stops at the
        first range that fails: the ranges after it are asked again."""
        total = sum(n for _, n in ranges)
        buf = np.empty(total, dtype=np.uint8)
        base = buf.ctypes.data
        offs, o = [], 0
        for _, n in ranges:
            offs.append(o)
            o += n
        ok = [False] * len(ranges)
        i = 0
        while i < len(ranges):
            part = range(i, min(len(ranges), i + _IOV_MAX))
            local = (_IOVec * len(part))()
            remote = (_IOVec * len(part))()
            for j, k in enumerate(part):
                local[j].iov_base = base + offs[k]
                local[j].iov_len = ranges[k][1]
                remote[j].iov_base = ranges[k][0]
                remote[j].iov_len = ranges[k][1]
            r = _process_vm_readv(self.pid, local, len(part), remote, len(part), 0)
            if r < 0:
                r = 0
            nxt = part.stop
            for k in part:
                n = ranges[k][1]
                if r >= n:
                    ok[k] = True
                    r -= n
                else:
                    nxt = k + 1          # skip the one that failed, go on after it
                    break
            i = nxt
        return buf, offs, ok

    def prefetch(self, ranges: Sequence[Tuple[int, int]]) -> int:
        """Read the disjoint ``(addr, length)`` ranges into one buffer, which
        later reads inside them are served from (a range that cannot be read
        wholly is left out: read as before when asked for); returns the
        bytes kept."""
        ranges = sorted((a, n) for a, n in ranges if n > 0)
        buf, offs, ok = self._read_direct(ranges)
        self._lo = [a for (a, _), g in zip(ranges, ok) if g]
        self._hi = [a + n for (a, n), g in zip(ranges, ok) if g]
        self._off = [f for f, g in zip(offs, ok) if g]
        self._buf = buf
        return sum(h - lo for lo, h in zip(self._lo, self._hi))

    def _cached(self, addr: int, n: int):
        """The prefetched bytes of [addr, addr + n) (a numpy uint8 view), or None."""
        i = bisect.bisect_right(self._lo, addr) - 1
        if i >= 0 and addr + n <= self._hi[i]:
            o = self._off[i] + addr - self._lo[i]
            return self._buf[o:o + n]
        return None

    def words_many(self, ranges: Sequence[Tuple[int, int]], one_buffer: bool = False) -> List[np.ndarray]:
        """The aligned 8-byte words of each ``(addr, length)`` (addr
        8-aligned), as uint64 arrays (views of the prefetched buffer when it
        holds them: do not write to them); a range that cannot be read
        wholly comes back shorter. ``one_buffer``: unless the prefetched
        buffer holds them all, every range is read into one new buffer, in
        order (classify then joins them without a copy)."""
        out: List[np.ndarray] = [None] * len(ranges)   # type: ignore[list-item]
        todo = []
        for i, (addr, n) in enumerate(ranges):
            if n < 8:
                out[i] = np.zeros(0, dtype=np.uint64)
                continue
            c = self._cached(addr, n)
            if c is not None and c.ctypes.data % 8 == 0:
                out[i] = c[:n // 8 * 8].view(np.uint64)
            else:
                todo.append(i)
        if todo and one_buffer:
            todo = [i for i, (_, n) in enumerate(ranges) if n >= 8]
        if todo:
            # straight into one buffer, in pieces of at most _CHUNK
            pieces = []                      # (range index, addr, length)
            for i in todo:
                addr, n = ranges[i]
                for off in range(0, n, _CHUNK):
                    pieces.append((i, addr + off, min(_CHUNK, n - off)))
            buf, offs, ok = self._read_direct([(a, n) for _, a, n in pieces])
            whole = {i: True for i in todo}
            first = {}
            for (i, _, _), o, g in zip(pieces, offs, ok):
                whole[i] &= g
                first.setdefault(i, o)
            slow = [i for i in todo if not whole[i]]
            for i in todo:
                if whole[i]:
                    n = ranges[i][1]
                    out[i] = buf[first[i]:first[i] + n // 8 * 8].view(np.uint64)
            if slow:
                for i, d in zip(slow, self.read_many([ranges[i] for i in slow])):
                    out[i] = np.frombuffer(d[:len(d) // 8 * 8], dtype=np.uint64)
        return out

    def close(self):
        if self._mem is not None:
            self._mem.close()
            self._mem = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _readv(self, ranges: Sequence[Tuple[int, int]], bufs) -> List[int]:
        """process_vm_readv of many ranges; returns bytes read per range."""
        got = [0] * len(ranges)
        for i0 in range(0, len(ranges), _IOV_MAX):
            part = ranges[i0:i0 + _IOV_MAX]
            local = (_IOVec * len(part))()
            remote = (_IOVec * len(part))()
            for j, (addr, n) in enumerate(part):
                local[j].iov_base = ctypes.addressof(bufs[i0 + j])
                local[j].iov_len = n
                remote[j].iov_base = addr
                remote[j].iov_len = n
            r = _process_vm_readv(self.pid, local, len(part), remote, len(part), 0)
            if r < 0:
                continue
            # partial reads stop at the first range that failed
            for j, (_, n) in enumerate(part):
                take = min(n, r)
                got[i0 + j] = take
                r -= take
                if take < n:
                    break
        return got

    def _proc_mem(self, addr: int, n: int) -> bytes:
        if self._mem is None:
            self._mem = open(f"/proc/{self.pid}/mem", "rb", buffering=0)
        self.used_proc_mem = True
        try:
            return os.pread(self._mem.fileno(), n, addr)
        except OSError:
            return b""

    def read_many(self, ranges: Sequence[Tuple[int, int]]) -> List[bytes]:
        """Read each ``(addr, length)``; a range that cannot be read (wholly)
        comes back shorter, possibly empty."""
        if self._lo:
            cached = [self._cached(a, n) for a, n in ranges]
            if all(c is not None for c in cached):
                return [c.tobytes() for c in cached]
        pieces: List[Tuple[int, int, int]] = []  # (range index, addr, len)
        for i, (addr, n) in enumerate(ranges):
            off = 0
            while off < n:
                step = min(_CHUNK, n - off)
                pieces.append((i, addr + off, step))
                off += step
        bufs = [ctypes.create_string_buffer(n) for _, _, n in pieces]
        got = self._readv([(a, n) for _, a, n in pieces], bufs)
        out: List[List[bytes]] = [[] for _ in ranges]
        short = [False] * len(ranges)
        for (i, a, n), buf, g in zip(pieces, bufs, got):
            if short[i]:
                continue
            data = buf.raw[:g]
            if g < n:
                data += self._proc_mem(a + g, n - g)
                short[i] = len(data) < n
            out[i].append(data)
        return [b"".join(p) for p in out]

    def read(self, addr: int, n: int) -> bytes:
        return self.read_many([(addr, n)])[0]

    def read_words(self, addr: int, n_bytes: int) -> np.ndarray:
        """The aligned 8-byte words of ``[addr, addr+n_bytes)`` (addr 8-aligned)."""
        data = self.read(addr, n_bytes)
        return np.frombuffer(data[:len(data) // 8 * 8], dtype=np.uint64).copy()


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (``T`` when stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return s[s.rindex(")") + 2]
