"""A ptraced process (a debugger, strace) is never stopped at exec -- the
stop would go to its tracer. Its allocator is resolved while it runs: when
that object had to be probed then, what it allocated before the probes went
in was not seen, and the process is flagged (not covered, with the reason);
when the object was probed already, nothing is missed and it counts exactly.
The tracer here is a few lines of ptrace (PTRACE_TRACEME, then PTRACE_CONT
at every stop), so the test needs no debugger installed."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_allocators_e2e import C_LEAK, _need, exes  # noqa: E402,F401 - exes: the fixture

pytestmark = pytest.mark.ebpf

TRACED_RUN = r'''
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]

def run_traced(path, hold_at_exit=0.0):
    """hold_at_exit: seconds the child is held at its exit (PTRACE_EVENT_EXIT:
    its memory and /proc entries are still there), so that a process which
    ends at once is still there to be resolved."""
    pid = os.fork()
    if pid == 0:
        libc.ptrace(0, 0, None, None)                     # PTRACE_TRACEME
        os.execv(path, [path])
    first = True
    while True:
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        if os.WIFSIGNALED(status):
            return -os.WTERMSIG(status)
        sig = os.WSTOPSIG(status)
        if first and hold_at_exit:
            libc.ptrace(0x4200, pid, None, ctypes.c_void_p(0x40))   # PTRACE_SETOPTIONS: PTRACE_O_TRACEEXIT
        first = False
        if status >> 16 == 6:                                 # PTRACE_EVENT_EXIT
            time.sleep(hold_at_exit)
        libc.ptrace(7, pid, None, ctypes.c_void_p(0 if sig == 5 else sig))   # PTRACE_CONT
'''


def test_a_ptraced_process_is_not_stopped_and_is_flagged_when_probed_late(pytester, run_plugin, exes):
    """Traced first (mimalloc probed while it runs: flagged), then untraced
    (stopped at exec: its pause is answered after the first's, so the probes
    are in when it resumes; exact), then traced again (it execs after the
    probes went in: exact)."""
    leaky, _ = _need(exes, "link-mimalloc")
    pytester.makepyfile(test_inner=TRACED_RUN + f"""
import subprocess, pytest
@pytest.mark.leak_budget(None)
def test_traced():
    assert run_traced({leaky!r}) == 0
    subprocess.run([{leaky!r}], check=True)
    assert run_traced({leaky!r}) == 0
""")
    result, doc = run_plugin("--ebpf-leaks-kinds=all")
    result.assert_outcomes(passed=1)
    first, plain, again = doc["tests"][0]["processes"]
    # flagged: mimalloc, or "other" when it had exited before it could be resolved (/proc/PID gone)
    assert first["allocator"]["kind"] in ("mimalloc", "other") and not first["allocator"]["covered"]
    for p in (plain, again):
        assert p["allocator"]["kind"] == "mimalloc" and p["allocator"]["covered"], p["allocator"]
        assert p["leaked"] == C_LEAK
    # with a budget, the flagged process makes the test incomplete, saying why (held at its exit:
    # one that ends before it can be resolved is flagged too, for that reason)
    pytester.makepyfile(test_inner=TRACED_RUN + f"""
def test_traced():
    assert run_traced({leaky!r}, hold_at_exit=0.5) == 0
""")
    result, doc = run_plugin("--ebpf-leaks-kinds=all", "--ebpf-leaks-budget=1MiB")
    out = result.stdout.str()
    assert result.ret != 0, out
    (why,) = doc["tests"][0]["incomplete"]
    assert why.endswith("allocations not visible, traced by another process (ptrace), so not stopped at exec: "
                        "its allocator was probed after it had started"), why
    assert why in out


def test_a_process_traced_while_another_run_probes_its_allocator_is_flagged(pytester, run_plugin, exes):
    """Two traced runs back to back: the second may exec before the first's
    resolution has put the probes in. It is judged by when it exec'd (its
    image serial) against when the probes were in: exact if after, flagged if
    before -- never counted as covered with its first allocations missed."""
    leaky, _ = _need(exes, "link-jemalloc")
    pytester.makepyfile(test_inner=TRACED_RUN + f"""
import pytest
@pytest.mark.leak_budget(None)
def test_traced():
    for _ in range(4):
        assert run_traced({leaky!r}) == 0
""")
    result, doc = run_plugin("--ebpf-leaks-kinds=all")
    result.assert_outcomes(passed=1)
    procs = doc["tests"][0]["processes"]
    assert len(procs) == 4 and not procs[0]["allocator"]["covered"]
    for p in procs:
        if p["allocator"]["covered"]:
            assert p["leaked"] == C_LEAK, p
