"""Read a stopped process: its mappings, its memory, every thread's registers.

* its mappings: :func:`pytest_memleak_ebpf.procmaps.read_regions`;
* :class:`ProcessMemory` reads memory with ``process_vm_readv`` (one call for
  many ranges), falling back to ``/proc/PID/mem`` when that fails;
* :func:`thread_registers` attaches to every thread with ``PTRACE_SEIZE`` +
  ``PTRACE_INTERRUPT``, reads its general-purpose registers with
  ``PTRACE_GETREGS`` and detaches.  On a process group-stopped by SIGSTOP the
  seize turns each thread's group-stop into a ptrace-stop at once, and the
  detach puts it back into the group-stop: the process stays stopped and a
  later SIGCONT resumes it (tests/test_kinds_memory.py checks both).

x86-64 Linux only (the register layout is ``struct user_regs_struct``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

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


# --- ptrace --------------------------------------------------------------------

PTRACE_GETREGS = 12
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207

#: ``struct user_regs_struct`` (x86-64), in order.
USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
             "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base",
             "ds", "es", "fs", "gs")
#: The general-purpose registers memcheck scans (VG_(apply_to_GP_regs) on amd64).
GP_REGS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
           "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

_ptrace = _libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]

_WALL = 0x40000000


class PtraceError(OSError):
    pass


def _pt(req, tid, addr=None, data=None):
    ctypes.set_errno(0)
    r = _ptrace(req, tid, addr, data)
    if r == -1 and ctypes.get_errno():
        e = ctypes.get_errno()
        raise PtraceError(e, f"ptrace({req:#x}, {tid}): {os.strerror(e)}")
    return r


def thread_ids(pid: int) -> List[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def _wait_trap(tid: int):
    """Reap the ptrace-stop notification of a seized+interrupted thread."""
    while True:
        try:
            os.waitpid(tid, _WALL)
            return
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def thread_state(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            s = f.read()
    except FileNotFoundError:
        return ""
    return s[s.rindex(")") + 2]


def thread_registers(pid: int, settle: float = 1.0) -> Dict[int, Dict[str, int]]:
    """``{tid: {register: value}}`` of every thread of a stopped process.

    Each thread is seized, interrupted, read and detached in turn; a thread
    that vanished meanwhile is left out.  Threads that were group-stopped go
    back into the group-stop when detached: the kernel does that on their way
    out of the ptrace-stop, in kernel mode (state ``R`` for a moment, no user
    code runs); this waits up to ``settle`` seconds until they show ``T``
    again, so callers see the process as they left it."""
    out: Dict[int, Dict[str, int]] = {}
    was_stopped = [t for t in thread_ids(pid) if thread_state(pid, t) == "T"]
    for tid in thread_ids(pid):
        try:
            _pt(PTRACE_SEIZE, tid, None, None)
        except PtraceError as exc:
            if exc.errno == errno.ESRCH:
                continue
            raise
        try:
            _pt(PTRACE_INTERRUPT, tid, None, None)
            _wait_trap(tid)
            regs = (ctypes.c_ulong * len(USER_REGS))()
            _pt(PTRACE_GETREGS, tid, None, ctypes.addressof(regs))
            out[tid] = dict(zip(USER_REGS, regs))
        finally:
            try:
                _pt(PTRACE_DETACH, tid, None, None)
            except PtraceError:
                pass
    deadline = time.monotonic() + settle
    for tid in was_stopped:
        while thread_state(pid, tid) not in ("T", "", "Z", "X") and time.monotonic() < deadline:
            time.sleep(0.0005)
    return out


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (``T`` when stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return s[s.rindex(")") + 2]
