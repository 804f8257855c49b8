"""Every thread's registers of a stopped process, through ptrace.

:func:`thread_registers` attaches to every thread with ``PTRACE_SEIZE`` +
``PTRACE_INTERRUPT``, reads its general-purpose registers with
``PTRACE_GETREGS`` and detaches.  On a process group-stopped by SIGSTOP the
seize turns each thread's group-stop into a ptrace-stop at once, and the
detach puts it back into the group-stop: the process stays stopped and a
later SIGCONT resumes it (tests/test_kinds_process.py checks both).

The standard library only: the watchdog (tracer/watchdog.py, a script run
without site-packages) loads this file to read the registers of processes
the session stopped -- ptrace must come from a process that is not the
tracee's parent (pytest's own waitpid of a child would take the ptrace-stop
notifications of a tracer in its thread group).

x86-64 Linux only (the register layout is ``struct user_regs_struct``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from typing import Dict, List

_libc = ctypes.CDLL(None, use_errno=True)

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


