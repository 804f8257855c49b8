"""The exec-pause watchdog: a process of its own session that continues
(SIGCONT) every process the session stopped at exec and has not continued
yet, when the pytest process that loaded the tracer dies.

Run as a script (``python -I -S watchdog.py MAP_FD PIPE_FD``), started by
tracer.core with the BPF ``pending`` map's fd (tgid -> key of an image stopped
at exec) and the read end of a pipe only pytest holds the write end of. When
the pipe reads EOF -- pytest closed the tracer, exited or was killed -- it
walks the map (the bpf syscall, BPF_MAP_GET_NEXT_KEY: the map stays alive
while this process holds its fd) and continues each process in it, then
exits. Imports nothing of the package (no BCC): it starts in milliseconds.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_NR_BPF = 321                  # x86-64
_BPF_MAP_GET_NEXT_KEY = 4


class _MapAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("next_key", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def pending_tgids(map_fd: int) -> list[int]:
    """Every key (a u32 tgid) of the map."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    out: list[int] = []
    key, nxt = ctypes.c_uint32(0), ctypes.c_uint32(0)
    attr = _MapAttr(map_fd=map_fd, key=0, next_key=ctypes.addressof(nxt))
    while len(out) < 1 << 20:
        if libc.syscall(_NR_BPF, _BPF_MAP_GET_NEXT_KEY, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
            break
        out.append(nxt.value)
        key.value = nxt.value
        attr.key = ctypes.addressof(key)
    return out


def continue_all(map_fd: int) -> list[int]:
    done = []
    for tgid in pending_tgids(map_fd):
        try:
            os.kill(tgid, signal.SIGCONT)
            done.append(tgid)
        except OSError:
            pass
    return done


def main(argv: list[str]) -> int:
    map_fd, pipe_fd = int(argv[1]), int(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while True:
        try:
            if not os.read(pipe_fd, 4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    continue_all(map_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
