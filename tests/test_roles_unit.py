"""The plugin's roles, growth mode and restart logic without root: fakes for
the engine, the config and the interpreter's allocator state."""

import asyncio
import os
import sys
from types import SimpleNamespace

import pytest

from pytest_memleak_ebpf import growth, inprocess, reexec, roles
from pytest_memleak_ebpf.marks import Budget

from fake_engine import FakeEngine

# -- growth mode -------------------------------------------------------------


def fake_item(fn, **funcargs):
    return SimpleNamespace(obj=fn, funcargs=dict(funcargs, unused="x"),
                           _fixtureinfo=SimpleNamespace(argnames=tuple(funcargs)))


def test_growth_runs_warmup_then_measured_repetitions():
    engine = FakeEngine()
    seen = []

    def body(tmp):
        engine.n += 1
        seen.append(tmp)
        engine.calls.append("run")

    done = growth.run_repetitions(engine, fake_item(body, tmp="t"), Budget(0, None, warmup=2, repeat=3))
    assert done is True and seen == ["t"] * 5
    assert engine.calls == ["run", "run", "open", "run", "snapshot", "run", "snapshot", "run", "snapshot", "close",
                            ("growth", 2, 3, [{"bytes": 30, "blocks": 3}, {"bytes": 40, "blocks": 4},
                                              {"bytes": 50, "blocks": 5}])]
    assert engine.freeze is False   # each snapshot follows a full collection of every object


def test_growth_closes_the_window_when_the_body_fails():
    engine = FakeEngine()

    def body():
        engine.n += 1
        if engine.n == 2:
            raise AssertionError("second repetition fails")

    with pytest.raises(AssertionError, match="second repetition fails"):
        growth.run_repetitions(engine, fake_item(body), Budget(0, None, warmup=0, repeat=3))
    assert engine.calls == ["open", "snapshot", "close", ("growth", 0, 3, [{"bytes": 10, "blocks": 1}])]


def test_growth_leaves_coroutine_tests_to_their_plugin():
    engine = FakeEngine()

    async def body():
        await asyncio.sleep(0)

    assert growth.run_repetitions(engine, fake_item(body), Budget(0, None, warmup=1, repeat=3)) is None
    assert engine.calls == []


# -- the PYTHONMALLOC=malloc restart -------------------------------------------


@pytest.fixture
def pymalloc(monkeypatch):
    """The interpreter's allocator as the plugin sees it (set .active / .free_threaded)."""
    state = SimpleNamespace(active=True, free_threaded=False, modules=[])
    monkeypatch.setattr(inprocess, "pymalloc_active", lambda: state.active)
    monkeypatch.setattr(inprocess, "free_threaded", lambda: state.free_threaded)
    monkeypatch.setattr(inprocess, "extension_modules", lambda own=frozenset(): list(state.modules))
    monkeypatch.delenv(reexec.REEXEC_ENV, raising=False)
    return state


def test_restart_reason(pymalloc):
    assert reexec.restart_reason("extensions", frozenset()) is None
    assert reexec.restart_reason("all", frozenset()) == "(--ebpf-leaks-in-process=all) "
    pymalloc.modules = [f"/x/m{i}.cpython-311-x86_64-linux-gnu.so" for i in (6, 1, 5, 2, 4, 3)]
    assert reexec.restart_reason("extensions", frozenset()) == "(extension modules loaded: m1, m2, m3, m4, m5) "
    assert reexec.restart_reason("all", frozenset()) == "(extension modules loaded: m1, m2, m3, m4, m5) "
    assert reexec.restart_reason("off", frozenset()) is None
    pymalloc.active = False
    assert reexec.restart_reason("all", frozenset()) is None


def test_notes_without_restart(pymalloc, monkeypatch):
    assert reexec.in_process_notes() == [reexec._PYMALLOC_NOTE]
    pymalloc.active = False
    assert reexec.in_process_notes() == ["PYTHONMALLOC=malloc: Python objects are visible to the tracer"]
    monkeypatch.setenv(reexec.REEXEC_ENV, "done")
    assert reexec.in_process_notes(restart=True) == [
        "pytest was restarted with PYTHONMALLOC=malloc so Python objects made by extensions are visible"]
    pymalloc.free_threaded = True
    assert reexec.in_process_notes(restart=True) == [
        "free-threaded CPython: Python objects come from mimalloc, which libc probes cannot see; "
        "in-process checking covers raw malloc-family blocks only"]


def test_restart_execs_pytest_with_pythonmalloc(pymalloc, monkeypatch, capsys):
    execs = []
    closed = []

    def execve(path, argv, env):
        execs.append((path, argv, env["PYTHONMALLOC"], env[reexec.REEXEC_ENV]))
        raise OSError(8, "Exec format error")

    monkeypatch.setattr(os, "execve", execve)
    notes = reexec.in_process_notes(restart=True, why="(extension modules loaded: kvext) ",
                                    before_exec=lambda: closed.append(True))
    assert execs == [(sys.executable, list(sys.orig_argv), "malloc", "done")] and closed == [True]
    assert capsys.readouterr().out == ("ebpf-leaks: restarting pytest with PYTHONMALLOC=malloc (extension modules "
                                       "loaded: kvext) (set PYTEST_MEMLEAK_EBPF_REEXEC=0 to skip)\n")
    assert notes == ["could not restart pytest with PYTHONMALLOC=malloc ([Errno 8] Exec format error)",
                     reexec._PYMALLOC_NOTE]


def test_restart_opt_out(pymalloc, monkeypatch, capsys):
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("restarted despite the opt-out"))
    monkeypatch.setenv(reexec.REEXEC_ENV, "0")
    assert reexec.in_process_notes(restart=True, why="(x) ") == [reexec._PYMALLOC_NOTE]
    assert capsys.readouterr().out == ""


# -- roles -------------------------------------------------------------------


def config(**options):
    opts = {"dist": "no", "numprocesses": None, **options}
    return SimpleNamespace(getoption=lambda name, default=None: opts.get(name, default))


def test_which_role():
    assert not roles.is_xdist_controller(config())
    assert not roles.is_xdist_controller(config(dist="load"))          # -d without -n: no workers here
    assert roles.is_xdist_controller(config(dist="load", numprocesses=2))
    worker = config(dist="load", numprocesses=2)
    worker.workerinput = {}
    assert roles.is_xdist_worker(worker) and not roles.is_xdist_controller(worker)
    assert not roles.is_xdist_worker(config())


def report(when, outcome):
    return SimpleNamespace(when=when, failed=outcome == "failed", skipped=outcome == "skipped")


@pytest.mark.parametrize("setup, call, teardown, expected", [
    ("passed", "passed", "passed", "passed"),
    ("failed", None, "passed", "error"),
    ("skipped", None, "passed", "skipped"),
    ("passed", "skipped", "passed", "skipped"),
    ("passed", "failed", "passed", "failed"),
    ("passed", "failed", "failed", "failed"),
    ("passed", "passed", "failed", "error"),
])
def test_json_outcome(setup, call, teardown, expected):
    reports = [report(w, o) for w, o in (("setup", setup), ("call", call), ("teardown", teardown)) if o]
    assert roles._outcome(reports) == expected


def test_marker_failure_keeps_its_reported_name():
    # pytest shows "<module>.<name>: <message>" in the terminal and in JUnit's failure message
    assert f"{roles._MarkerFailure.__module__}.{roles._MarkerFailure.__qualname__}" == \
        "pytest_memleak_ebpf.plugin._MarkerFailure"


def test_no_restart_when_pymalloc_is_probed(pymalloc, monkeypatch, capsys):
    """pymalloc's functions probed in the windows: Python objects are seen,
    nothing restarts; a reason it cannot be probed is shown, and the restart
    happens as before."""
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("restarted although pymalloc is probed"))
    assert reexec.restart_reason("all", frozenset(), probed=True) is None
    assert reexec.in_process_notes(probe_problem=None, restart=True, why="(x) ") == [reexec.PYMALLOC_PROBED_NOTE]
    assert capsys.readouterr().out == ""
    monkeypatch.setenv(reexec.REEXEC_ENV, "0")
    assert reexec.in_process_notes(probe_problem="the perf attach mode cannot probe one process only",
                                   restart=True, why="(x) ") == [
        "pymalloc cannot be probed here: the perf attach mode cannot probe one process only", reexec._PYMALLOC_NOTE]
