"""One tracer for a whole pytest-xdist run.

The controller loads the BPF program once and marks itself a spawner: the
kernel makes every process it creates (the workers) a root from its first
instruction. It serves the tracer over an abstract Unix socket; each worker's
engine drives its own tests through RemoteTracer, which has the per-test
interface of Tracer (protocol.TracerAPI). Every allocation on the machine then runs one BPF
program however many workers there are (a program per worker made each
allocation pay once per worker).

Requests and replies are pickled builtin types and tracer dataclasses, framed
by an 8-byte length. Only processes of the controller's user may connect
(SO_PEERCRED); a worker is known by its pid, which the kernel gives.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import struct
import threading

from .probes import ProbeInfo

SOCKET_KEY = "ebpf_leaks_tracer"       # workerinput key: the server's address
_LEN = struct.Struct("<Q")
_OPS = ("begin_test", "end_test", "running", "open_window", "close_window", "window_snapshot",
        "collect_window", "set_extension_pages", "enable_pymalloc_probes")


class TracerServerError(RuntimeError):
    """The controller's tracer refused or failed a request."""


def _send(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


def _recv(sock: socket.socket):
    head = _recv_exact(sock, _LEN.size)
    if head is None:
        return None
    body = _recv_exact(sock, _LEN.unpack(head)[0])
    if body is None:
        return None
    return pickle.loads(body)


class TracerServer:
    """Serves `tracer` (a Tracer whose process called add_spawner)
    to the workers, one thread per connection. A worker that disconnects
    (ended, crashed, killed) has its test and roots dropped."""

    def __init__(self, tracer):
        self.tracer = tracer
        self.address = f"\0pytest-memleak-ebpf-{os.getpid()}-{os.urandom(6).hex()}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.bind(self.address)
        self._sock.listen(64)
        self._closed = False
        self._conns: set[socket.socket] = set()
        self.workers_served = 0
        self._thread = threading.Thread(target=self._accept, name="memleak-ebpf-server", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="memleak-ebpf-worker", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        client = None
        try:
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.getuid():
                return
            while True:
                msg = _recv(conn)
                if msg is None:
                    return
                op, args = msg
                try:
                    if op == "hello":
                        client = self.tracer.connect(pid)
                        self.workers_served += 1
                        value = self._info()
                    elif op in _OPS and client is not None:
                        value = getattr(self.tracer, op)(*args, c=client)
                    else:
                        raise ValueError(f"unknown request {op!r}")
                    reply = (True, value)
                except Exception as exc:   # reported to the worker, which fails its test
                    reply = (False, f"{type(exc).__name__}: {exc}")
                _send(conn, reply)
        except (OSError, EOFError, pickle.UnpicklingError):
            return
        finally:
            if client is not None:
                self.tracer.disconnect(client)
            self._conns.discard(conn)
            conn.close()

    def _info(self) -> dict:
        t = self.tracer
        return {
            "probes": [dataclasses.asdict(p) for p in t.probes],
            "libc": t.libc,
            "attach_mode": t.attach_mode,
            "attach_errors": dict(t.attach_errors),
            "load_seconds": t.load_seconds,
            "cached": t.cached,
            "probe_count": t.probe_count,
        }

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for conn in list(self._conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class RemoteTracer:
    """Tracer's per-test interface (protocol.TracerAPI), served by the controller. The
    worker is known by its pid: add_root() checks it is this process."""

    def __init__(self, address: str):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.connect(address)
        self._lock = threading.Lock()
        info = self._call("hello")
        self.probes = [ProbeInfo(**{**p, "aliases": tuple(p["aliases"])}) for p in info["probes"]]
        self.libc = info["libc"]
        self.attach_mode = info["attach_mode"]
        self.attach_errors = info["attach_errors"]
        self.load_seconds = info["load_seconds"]
        self.cached = info["cached"]
        self.probe_count = info["probe_count"]
        self._in_window = False

    def _call(self, op: str, *args):
        with self._lock:
            _send(self._sock, (op, args))
            reply = _recv(self._sock)
        if reply is None:
            raise TracerServerError(f"the xdist controller's tracer went away during {op}")
        ok, value = reply
        if not ok:
            raise TracerServerError(f"the xdist controller's tracer failed {op}: {value}")
        return value

    def add_root(self, tgid: int) -> None:
        if tgid != os.getpid():
            raise ValueError("a worker's root is the worker itself")

    def begin_test(self, kinds: bool = False) -> int:
        return self._call("begin_test", kinds)

    def end_test(self, test_id: int):
        return self._call("end_test", test_id)

    def running(self, test_id: int | None) -> int:
        return self._call("running", test_id) if test_id else 0

    def set_extension_pages(self, ranges) -> None:
        self._call("set_extension_pages", list(ranges))

    def enable_pymalloc_probes(self) -> str | None:
        return self._call("enable_pymalloc_probes")

    def open_window(self) -> int:
        serial = self._call("open_window")
        self._in_window = True
        return serial

    def close_window(self, scan: str | None = None) -> dict:
        """scan: classify the window's blocks (Tracer.close_window); the
        controller reads this process's memory while this thread waits for
        the reply, whose registers and stack pointer go with the request."""
        self._in_window = False
        if scan is None:
            return self._call("close_window")
        from ..kinds.inprocess import own_context

        return self._call("close_window", scan, own_context())

    def in_window(self) -> bool:
        return self._in_window

    def window_snapshot(self):
        return self._call("window_snapshot")

    def collect_window(self):
        return self._call("collect_window")

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
