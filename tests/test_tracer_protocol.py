"""Tracer and the xdist worker's RemoteTracer implement one interface
(protocol.TracerAPI): the same methods, with the same parameters (a Tracer
method takes the client it acts for as one more, defaulted, argument), and
the server relays each request to the controller's tracer."""

import inspect
import os
import re

import pytest

from pytest_memleak_ebpf.tracer import RawTest, Tracer, protocol, server
from pytest_memleak_ebpf.tracer.probes import ProbeInfo
from pytest_memleak_ebpf.tracer.protocol import TracerAPI

METHODS = [n for n, v in vars(TracerAPI).items() if inspect.isfunction(v) and not n.startswith("_")]
ATTRIBUTES = [*TracerAPI.__annotations__, "probe_count"]


def _params(fn):
    return [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("impl", [Tracer, server.RemoteTracer])
def test_both_tracers_have_the_protocols_methods_and_signatures(impl):
    assert set(METHODS) >= {"begin_test", "end_test", "running", "open_window", "close_window", "window_snapshot",
                            "collect_window", "in_window", "set_extension_pages", "add_root", "close"}
    for name in METHODS:
        want = _params(getattr(TracerAPI, name))
        got = _params(getattr(impl, name))
        assert [(p.name, p.kind) for p in got[:len(want)]] == [(p.name, p.kind) for p in want], (impl, name)
        extra = got[len(want):]
        assert all(p.default is not inspect.Parameter.empty for p in extra), (impl, name, extra)


@pytest.mark.parametrize("impl", [Tracer, server.RemoteTracer])
def test_both_tracers_set_the_protocols_attributes(impl):
    src = inspect.getsource(impl)
    for name in ATTRIBUTES:
        assert (re.search(rf"\bself\.{name}\b(: [^=]+)? = ", src) or isinstance(getattr(impl, name, None), property)), \
            (impl, name)


def test_every_request_the_server_relays_is_a_protocol_method():
    assert set(server._OPS) <= set(METHODS)
    assert set(METHODS) - set(server._OPS) == {"add_root", "in_window", "close"}   # answered by the worker itself


class FakeTracer:
    """What TracerServer needs of the controller's Tracer."""

    probes = [ProbeInfo("malloc", "/lib/libc.so.6", 0, "entry", False, True, ("__libc_malloc",))]
    libc = "/lib/libc.so.6"
    attach_mode = "session"
    attach_errors = {"x": "y"}
    load_seconds = 0.25
    cached = True
    probe_count = 7

    def __init__(self):
        self.calls = []
        self.clients = []

    def connect(self, pid):
        self.clients.append(pid)
        return f"client-{pid}"

    def disconnect(self, c):
        self.calls.append(("disconnect", c))

    def __getattr__(self, op):
        if op not in server._OPS:
            raise AttributeError(op)

        def call(*args, c):
            self.calls.append((op, args, c))
            if op == "end_test":
                return RawTest(lost_procs=args[0])
            if op == "begin_test":
                return 41
            if op == "collect_window":
                return [(1, 2, 3)], {"alloc_blocks": 1}, {2: [(1, "ab", 5)]}
            return 0
        return call


def test_a_remote_tracer_is_served_by_the_controllers():
    fake = FakeTracer()
    srv = server.TracerServer(fake)
    try:
        remote = server.RemoteTracer(srv.address)
        assert isinstance(remote, TracerAPI)
        assert (remote.probes, remote.libc, remote.attach_mode, remote.attach_errors, remote.load_seconds,
                remote.cached, remote.probe_count) == (FakeTracer.probes, "/lib/libc.so.6", "session", {"x": "y"},
                                                       0.25, True, 7)
        me = f"client-{os.getpid()}"
        assert remote.begin_test() == 41
        assert remote.begin_test(True) == 41          # the test wants leak kinds
        assert remote.end_test(41) == RawTest(lost_procs=41)
        assert remote.running(None) == 0             # answered locally
        remote.open_window()
        assert remote.in_window()
        remote.close_window()
        assert not remote.in_window()
        assert remote.collect_window() == ([(1, 2, 3)], {"alloc_blocks": 1}, {2: [(1, "ab", 5)]})
        remote.set_extension_pages([(4096, 8192)])
        with pytest.raises(ValueError, match="a worker's root is the worker itself"):
            remote.add_root(os.getpid() + 1)
        assert fake.calls == [("begin_test", (False,), me), ("begin_test", (True,), me), ("end_test", (41,), me), ("open_window", (), me),
                              ("close_window", (), me), ("collect_window", (), me),
                              ("set_extension_pages", ([(4096, 8192)],), me)]
        remote.close()
    finally:
        srv.close()
    assert fake.clients == [os.getpid()]
    assert protocol.TracerAPI is TracerAPI


def test_the_tracers_modules_import_one_way():
    """abi <- loading <- probes; abi <- blocktable; abi <- collection; loading <- kernel_offsets;
    abi, probes <- execpause; exitpause imports none of them; watchdog imports nothing of
    the package (a script); core uses them all; protocol and server use no
    more than probes and collection: no cycle."""
    import ast
    from pathlib import Path

    pkg = Path(server.__file__).parent
    order = ["abi", "loading", "probes", "blocktable", "collection", "kernel_offsets", "execpause", "watchdog", "exitpause",
             "core", "protocol", "server"]
    allowed = {"abi": set(), "loading": {"abi"}, "probes": {"abi", "loading"}, "blocktable": {"abi"}, "collection": {"abi"},
               "kernel_offsets": {"loading"}, "execpause": {"abi", "probes"}, "watchdog": set(),
               "exitpause": set(),
               "core": {"abi", "loading", "probes", "blocktable", "collection", "execpause", "kernel_offsets", "exitpause",
                        "watchdog"},
               "protocol": {"collection", "probes"}, "server": {"probes"}}
    assert sorted(p.stem for p in pkg.glob("*.py") if p.stem != "__init__") == sorted(order)
    for name in order:
        tree = ast.parse((pkg / f"{name}.py").read_text())
        used = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                used |= {node.module} if node.module else {a.name for a in node.names}
        assert used == allowed[name], name
