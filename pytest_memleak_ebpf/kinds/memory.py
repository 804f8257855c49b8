"""Read a stopped process: its mappings and its memory.

* its mappings: :func:`pytest_memleak_ebpf.procmaps.read_regions`;
* :class:`ProcessMemory` reads memory with ``process_vm_readv`` (one call for
  many ranges), falling back to ``/proc/PID/mem`` when that fails;
* its threads' registers: :mod:`.ptrace`.
"""

from __future__ import annotations

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
