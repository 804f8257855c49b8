"""The watchdog: a process of its own session that continues (SIGCONT) every
process this session stopped -- at exec (execpause.py: its allocator is
resolved and probed), at exit (exitpause.py: its memory is scanned) or at
its test's end (still running: scanned in place) -- once it has been stopped
longer than the time limit, and every one still stopped when the pytest
process that loaded the tracer dies (closes its pipe: pytest ended, or was
killed, even while stopped itself).

Every process the session stops is a key (its tgid) of the BPF ``pending``
map *before* the stop: written by the BPF program for both pauses it sends
(memleak.bpf.c exec_allocator, exit_pause), by userspace for a process it
stops at its test's end; the one who continues it deletes the key. So the
watchdog needs no message to know a stopped process: it walks the map (it
holds the map's fd, which keeps the map alive) every POLL_SECONDS, notes
when it first saw each key, and continues and deletes a key seen for over
the limit.

Run as a script (``python -I -S watchdog.py MAP_FD LIMIT``; the standard
library only: it starts in milliseconds), with stdin and stdout pipes to
pytest (the client, :class:`Watchdog`). On stdin, ``?PID`` asks for the
thread registers of the stopped process PID: answered with a JSON line
(``{tid: {register: value}}``, or ``{"error": text}``), read through
kinds/ptrace.py, loaded from its file -- ptrace must come from a process that
is not the tracee's parent (pytest's own waitpid of a child would take the
ptrace-stop notifications of a tracer in its thread group). EOF on stdin:
every key left is continued, then the watchdog exits.

It also closes file descriptors for pytest (:meth:`Watchdog.release`): the
pymalloc links of a closed in-process window, sent over a socket
(SCM_RIGHTS). The last close of a uprobe link waits for an RCU grace period
(~50 ms); done here it is off the test's path, and without a thread of
pytest's own that would run Python code beside the next test (a test that
compares ``sys.getrefcount(None)`` before and after a call sees every
bytecode another thread runs).
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

_NR_BPF = 321                  # x86-64
_BPF_MAP_DELETE_ELEM = 3
_BPF_MAP_GET_NEXT_KEY = 4
POLL_SECONDS = 0.05


class _MapAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("next_key", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def pending_tgids(map_fd: int) -> list[int]:
    """Every key (a u32 tgid) of the map."""
    out: list[int] = []
    key, nxt = ctypes.c_uint32(0), ctypes.c_uint32(0)
    attr = _MapAttr(map_fd=map_fd, key=0, next_key=ctypes.addressof(nxt))
    while len(out) < 1 << 20:
        if _libc.syscall(_NR_BPF, _BPF_MAP_GET_NEXT_KEY, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
            break
        out.append(nxt.value)
        key.value = nxt.value
        attr.key = ctypes.addressof(key)
    return out


def _delete(map_fd: int, tgid: int) -> None:
    key = ctypes.c_uint32(tgid)
    attr = _MapAttr(map_fd=map_fd, key=ctypes.addressof(key))
    _libc.syscall(_NR_BPF, _BPF_MAP_DELETE_ELEM, ctypes.byref(attr), ctypes.sizeof(attr))


def _continue(map_fd: int, tgid: int) -> bool:
    _delete(map_fd, tgid)
    try:
        os.kill(tgid, signal.SIGCONT)
        return True
    except OSError:
        return False


def continue_all(map_fd: int) -> list[int]:
    return [tgid for tgid in pending_tgids(map_fd) if _continue(map_fd, tgid)]


def _ptrace_module():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kinds", "ptrace.py")
    spec = importlib.util.spec_from_file_location("_memleak_ebpf_ptrace", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _registers(pid: int, ptrace) -> dict:
    try:
        return {str(t): r for t, r in ptrace.thread_registers(pid).items()}
    except Exception as exc:   # noqa: BLE001 - any failure is the answer
        return {"error": f"{type(exc).__name__}: {exc}"}


def _close_received(sock: socket.socket) -> None:
    """Close every descriptor waiting on `sock` (Watchdog.release)."""
    while True:
        try:
            # a non-blocking socket (main): recv_fds drops its flags argument (CPython 3.11)
            _, fds, _, _ = socket.recv_fds(sock, 16, 256)
        except OSError:          # BlockingIOError: nothing more waiting
            return
        if not fds:
            return
        # each last close waits for a grace period: side by side the waits overlap
        for fd in fds:
            threading.Thread(target=_close_quietly, args=(fd,), daemon=True).start()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def serve(map_fd: int, limit: float, rfd: int, wfd: int, release: socket.socket | None = None) -> None:
    """The watchdog's loop (see the module's text); returns at EOF of rfd."""
    first_seen: dict[int, float] = {}
    buf = b""
    ptrace = None
    next_poll = 0.0
    while True:
        now = time.monotonic()
        if now >= next_poll:
            keys = set(pending_tgids(map_fd))
            first_seen = {t: first_seen.get(t, now) for t in keys}
            for tgid, seen in list(first_seen.items()):
                if now - seen > limit:
                    _continue(map_fd, tgid)
                    del first_seen[tgid]
            next_poll = now + POLL_SECONDS
        try:
            ready = select.select([rfd] + ([release] if release is not None else []), [], [],
                                  max(0.0, next_poll - time.monotonic()))[0]
        except InterruptedError:
            continue
        if release is not None and release in ready:
            _close_received(release)
        if rfd not in ready:
            continue
        try:
            chunk = os.read(rfd, 4096)
        except InterruptedError:
            continue
        except OSError:
            chunk = b""
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.startswith(b"?") and line[1:].strip().isdigit():
                if ptrace is None:
                    ptrace = _ptrace_module()
                answer = _registers(int(line[1:]), ptrace)
                try:
                    os.write(wfd, json.dumps(answer).encode() + b"\n")
                except OSError:
                    pass


def main(argv: list[str]) -> int:
    map_fd, limit = int(argv[1]), float(argv[2])
    release = socket.socket(fileno=int(argv[3])) if len(argv) > 3 else None
    if release is not None:
        release.setblocking(False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        serve(map_fd, limit, sys.stdin.fileno(), sys.stdout.fileno(), release)
    finally:
        continue_all(map_fd)
    return 0


class Watchdog:
    """pytest's side: starts the watchdog on the `pending` map's fd, asks it
    for registers, and closes its pipe (the watchdog then continues every
    process still pending and exits)."""

    def __init__(self, map_fd: int, limit: float):
        self.limit = limit
        self._release, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), str(map_fd),
                                          f"{limit:g}", str(theirs.fileno())], pass_fds=(map_fd, theirs.fileno()),
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         start_new_session=True, close_fds=True)
        finally:
            theirs.close()
        self._out = b""

    def release(self, fds: list[int]) -> None:
        """Close `fds` here at once and have the watchdog drop the last
        reference (what waits for the kernel happens there). Where it cannot
        be sent, closed here, waiting."""
        for i in range(0, len(fds), 200):
            part = fds[i:i + 200]
            try:
                socket.send_fds(self._release, [b"x"], part)
            except OSError:
                pass     # closed below all the same: the wait is then ours
            for fd in part:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def registers(self, pid: int, timeout: float) -> dict[int, dict[str, int]]:
        """The thread registers of the stopped process `pid` (read by the
        watchdog); OSError when it cannot."""
        try:
            self.proc.stdin.write(f"?{pid}\n".encode())
            self.proc.stdin.flush()
        except (OSError, ValueError) as exc:
            raise OSError(f"the watchdog is gone ({exc})") from None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._out:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise OSError(f"no registers of pid {pid} within {timeout:g} s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise OSError("the watchdog is gone")
            self._out += chunk
        line, self._out = self._out.split(b"\n", 1)
        answer = json.loads(line)
        if "error" in answer:
            raise OSError(answer["error"])
        return {int(t): r for t, r in answer.items()}

    def close(self) -> None:
        try:
            self._release.close()
        except OSError:
            pass
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            self.proc.stdout.close()
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv))
