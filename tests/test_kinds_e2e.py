"""Leak kinds end to end: the plugin pauses each process a test launches at
its exit, scans it and classifies its blocks; the figures are compared with
valgrind memcheck's LEAK SUMMARY (`--leak-check=full --run-libc-freeres=no
--run-cxx-freeres=no`, tests/kinds_harness.py) of the same program.

* the kinds fixtures (tests/fixtures/kinds/): all four kinds equal in bytes
  and blocks;
* a forked child (fork without exec): the parent's figures equal valgrind's;
  the child's are valgrind's minus the blocks it inherited (they stay the
  parent's here);
* well-kept distro programs: the verdict at the default budget, default
  suppressions on (they never hide a lost stack: a 24-byte block sort's glibc
  loses is reported, as valgrind does), equals "valgrind finds definitely or
  indirectly lost memory", per-kind agreement counted and printed;
* kinds=all: no pause, every outstanding block counts (today's figures).

Loads eBPF and runs valgrind: under the machine-wide lock."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import kinds_harness as harness  # noqa: E402
from test_kinds_real_programs import _programs, program_inputs  # noqa: E402
from test_kinds_valgrind import CXX_HEURISTICS, EXPECTED  # noqa: E402
from pytest_memleak_ebpf.tracer.exitpause import SCAN_SECONDS, WATCHDOG_SECONDS, process_state  # noqa: E402

pytestmark = [pytest.mark.ebpf,
              pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")]
FOUR = harness.KINDS


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return harness.build(tmp_path_factory.mktemp("kinds_e2e"))


def _ours(p) -> tuple:
    return tuple((p["reachability"][k]["bytes"], p["reachability"][k]["blocks"]) for k in FOUR)


def _by_test(doc) -> dict:
    return {t["nodeid"].split("[", 1)[1].rstrip("]"): t for t in doc["tests"]}


def test_fixture_cases_match_valgrind(built, pytester, run_plugin):
    runs = [(str(built["cases"]), c) for c in EXPECTED] + [(str(built["cases_cxx"]), c) for c in CXX_HEURISTICS]
    pytester.makepyfile(test_cases=f"""
import subprocess, pytest
@pytest.mark.parametrize("argv", {[list(r) for r in runs]!r}, ids=lambda a: a[1])
def test_case(argv):
    subprocess.run(argv, check=True)
""")
    result, doc = run_plugin("--ebpf-leaks-budget=1GiB")
    assert result.ret == 0, result.stdout.str()
    tests = _by_test(doc)
    for prog, case in runs:
        (p,) = tests[case]["processes"]
        assert p["classified"], (case, p.get("reason"))
        theirs = harness.run_valgrind([prog, case])
        assert _ours(p) == tuple(theirs.kinds[k] for k in FOUR), (case, _ours(p), str(theirs))
        assert p["reachability"]["unclassified"] == {"bytes": 0, "blocks": 0}
        # leaked: the lost kinds' stacks that no (default) suppression hides
        lost = [s for s in p["stacks"] if s["kind"] in ("definite", "indirect")]
        assert sum(s["bytes"] for s in lost) == sum(p["reachability"][k]["bytes"] for k in ("definite", "indirect"))
        shown = [s for s in lost if not s["suppressed"]]
        assert p["leaked"] == {"bytes": sum(s["bytes"] for s in shown), "blocks": sum(s["blocks"] for s in shown)}
        if prog.endswith("cases"):
            assert _ours(p) == EXPECTED[case]


# the inner session's conftest: no registers through ptrace (the watchdog's)
PTRACE_OFF = """
def pytest_sessionstart(session):
    from pytest_memleak_ebpf.tracer import watchdog

    def registers(self, pid, timeout):
        raise OSError("ptrace is off in this test")
    watchdog.Watchdog.registers = registers
"""


def _stop_registers_in_bpf() -> bool:
    from pytest_memleak_ebpf.tracer import kernel_offsets, loading

    return loading.has_task_pt_regs() and any(f.startswith("-DOFF_TASK_FSBASE=") for f in kernel_offsets.cflags())


@pytest.mark.skipif(not _stop_registers_in_bpf(), reason="this kernel has no bpf_task_pt_regs or no BTF offset "
                                                         "of fs_base: the registers come through ptrace")
def test_the_registers_at_the_stop_come_from_the_bpf_program(built, cbuild, pytester, run_plugin):
    """With ptrace's registers unavailable, a single-threaded process is
    classified from the registers the BPF program copied at its stop:
    tests/fixtures/kinds/in_register.c keeps its one pointer to a block in
    rbx at _exit (valgrind: 100 bytes still reachable, 50 lost; without the
    registers both would be lost), and the kinds fixtures (all
    single-threaded but `thread`) equal valgrind's. A process with two
    threads still needs ptrace: unclassified here, saying why."""
    reg = cbuild("in_register", (harness.FIXTURES / "in_register.c").read_text())
    single = [c for c in EXPECTED if c != "thread"]
    runs = [[reg, "-"]] + [[str(built["cases"]), c] for c in single] + [[str(built["cases"]), "thread"]]
    pytester.makeconftest(PTRACE_OFF)
    pytester.makepyfile(test_regs=f"""
import subprocess, pytest
@pytest.mark.parametrize("argv", {runs!r}, ids=lambda a: a[1])
def test_case(argv):
    subprocess.run(argv[:1] if argv[1] == "-" else argv, check=True)
""")
    result, doc = run_plugin("--ebpf-leaks-budget=1GiB")
    assert result.ret == 0, result.stdout.str()
    tests = _by_test(doc)
    (p,) = tests["-"]["processes"]
    assert p["classified"], p.get("reason")
    assert _ours(p) == tuple(harness.run_valgrind([reg]).kinds[k] for k in FOUR) == ((50, 1), (0, 0), (0, 0), (100, 1))
    for case in single:
        (p,) = tests[case]["processes"]
        assert p["classified"], (case, p.get("reason"))
        assert _ours(p) == EXPECTED[case], (case, _ours(p))
    (p,) = tests["thread"]["processes"]
    assert not p["classified"] and "ptrace is off in this test" in p["reason"], p


def test_a_pointer_left_in_the_exit_paths_frames_is_no_root(built, pytester, run_plugin):
    """tests/fixtures/kinds/stale.c at 12 depths: the lost block's pointer is
    left in a dead stack slot, at some depths one that exit's frames reserve
    and never write; paused at _exit, the block is definitely lost at every
    depth, as valgrind says (tests/test_kinds_valgrind.py)."""
    argv = [str(built["stale"])]
    pytester.makepyfile(test_stale=f"""
import subprocess, pytest
@pytest.mark.parametrize("depth", range(12))
def test_stale(depth):
    subprocess.run({argv!r} + [str(depth)], check=True)
""")
    result, doc = run_plugin()
    assert result.ret == 1
    for t in doc["tests"]:
        (p,) = t["processes"]
        assert _ours(p) == ((77, 1), (0, 0), (0, 0), (0, 0)), (t["nodeid"], _ours(p))
        assert p["leaked"] == {"bytes": 77, "blocks": 1}
    result.assert_outcomes(failed=12)


def test_forked_child(built, pytester, run_plugin):
    argv = [str(built["cases"]), "fork"]
    pytester.makepyfile(test_fork=f"""
import subprocess
def test_fork():
    subprocess.run({argv!r}, check=True)
""")
    result, doc = run_plugin("--ebpf-leaks-budget=1GiB")
    assert result.ret == 0, result.stdout.str()
    procs = doc["tests"][0]["processes"]
    assert len(procs) == 2
    pids = {p["pid"] for p in procs}
    (child,) = [p for p in procs if p["ppid"] in pids]
    (parent,) = [p for p in procs if p is not child]
    vg_root, vg_child = harness.run_valgrind_tree(argv).values()
    assert _ours(parent) == tuple(vg_root.kinds[k] for k in FOUR) == ((200, 1), (0, 0), (0, 0), (192, 1))
    inherited = {k: vg_root.kinds[k] for k in FOUR}
    assert _ours(child) == tuple((vg_child.kinds[k][0] - inherited[k][0], vg_child.kinds[k][1] - inherited[k][1])
                                 for k in FOUR) == ((208, 1), (0, 0), (0, 0), (0, 0))


def test_kinds_all_counts_every_outstanding_block_without_a_pause(built, pytester, run_plugin):
    argv = [str(built["cases"]), "list"]
    pytester.makepyfile(test_all=f"""
import subprocess
def test_list():
    subprocess.run({argv!r}, check=True)
""")
    result, doc = run_plugin("--ebpf-leaks-kinds=all")
    assert result.ret == 1
    (p,) = doc["tests"][0]["processes"]
    assert not p["classified"] and p["reason"] == "leak kinds were not asked for (kinds=all)"
    assert p["leaked"] == p["outstanding"] == p["reachability"]["unclassified"]
    assert p["outstanding"]["blocks"] >= 14   # the 14 list nodes, and whatever libc keeps


# the other allocators, LD_PRELOADed into the same programs (valgrind replaces
# the preloaded one by its own: --soname-synonyms). Not mimalloc: valgrind
# with mimalloc preloaded hangs in grep (over 300 s).
PRELOADS = {"jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
            "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"}
# verdicts known to differ, each with why (the test fails if another one does, or this one stops)
KNOWN_DISAGREEMENTS: set[tuple[str, str]] = set()


@pytest.mark.parametrize("alloc", ["glibc", *PRELOADS])
def test_distro_programs_verdict_matches_valgrind(tmp_path, pytester, run_plugin, capsys, alloc):
    """At the default budget and suppressions, under glibc's malloc and with
    each other allocator preloaded: the verdict equals valgrind's (definitely
    or indirectly lost memory, or not); per-kind agreement printed."""
    preload = PRELOADS.get(alloc)
    if preload and not Path(preload).exists():
        pytest.fail(f"{preload} missing: make setup installs it")
    env = {"LD_PRELOAD": preload} if preload else {}
    opts = [f"--soname-synonyms=somalloc=*{alloc}*"] if preload else []
    w = tmp_path
    program_inputs(w)
    progs = {n: [str(a) for a in argv] for n, argv in _programs(w).items() if shutil.which(str(argv[0]))}
    assert len(progs) >= 25
    pytester.makepyfile(test_progs=f"""
import os, subprocess, pytest
PROGS = {progs!r}
@pytest.mark.parametrize("name", list(PROGS))
def test_prog(name):
    subprocess.run(PROGS[name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, **{env!r}))
""")
    result, doc = run_plugin()
    tests = _by_test(doc)
    agree_verdict, agree_kinds, lines, differ = 0, {k: 0 for k in FOUR}, [], []
    for name, argv in progs.items():
        t = tests[name]
        root = t["processes"][0]
        assert root["classified"], (name, root.get("reason"))
        assert root["allocator"]["kind"] == alloc, (name, root["allocator"])
        theirs = harness.run_valgrind(argv, env=dict(os.environ, **env), opts=opts)
        vg_lost = theirs.kinds["definite"][0] + theirs.kinds["indirect"][0]
        ours_lost = root["leaked"]["bytes"]
        agree_verdict += (ours_lost > 0) == (vg_lost > 0)
        for k in FOUR:
            agree_kinds[k] += (root["reachability"][k]["bytes"], root["reachability"][k]["blocks"]) == theirs.kinds[k]
        lines.append(f"{name:10} ours {_ours(root)}  valgrind {tuple(theirs.kinds[k] for k in FOUR)}")
        if (ours_lost > 0) != (vg_lost > 0):
            differ.append(lines[-1])
            assert (alloc, name) in KNOWN_DISAGREEMENTS, lines[-1]
        else:
            assert (alloc, name) not in KNOWN_DISAGREEMENTS, f"agrees now: {lines[-1]}"
    with capsys.disabled():
        print(f"\n{alloc}: verdicts agree: {agree_verdict}/{len(progs)}; per kind (bytes and blocks equal): "
              + ", ".join(f"{k} {n}/{len(progs)}" for k, n in agree_kinds.items()))
        print("\n".join(lines))
        print("verdicts differing (known):", differ or "none")


BIG_HEAP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
void **volatile keep;
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    keep = malloc(n * sizeof(void *));
    for (long i = 0; i < n; i++) keep[i] = malloc(16);
    FILE *f = fopen(argv[2], "w");
    fprintf(f, "%d\n", getpid());
    fclose(f);
    return 0;
}
"""


class _Inner:
    """An inner pytest session with --ebpf-leaks in a subprocess, running one
    test file whose program writes its pid to `pidfile` (then these tests
    signal the session and watch the program)."""

    def __init__(self, pytester, name: str, source: str, pidfile, *args):
        import subprocess

        pytester.makepyfile(**{name: source})
        self.pidfile = pidfile
        self.proc = subprocess.Popen([sys.executable, "-m", "pytest", "--ebpf-leaks", "-p", "no:cacheprovider", "-q",
                                      *args, str(pytester.path / f"{name}.py")], cwd=pytester.path,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.deadline = time.monotonic() + 120

    def program_pid(self) -> int:
        while not (self.pidfile.exists() and self.pidfile.read_text().endswith("\n")):
            assert self.proc.poll() is None and time.monotonic() < self.deadline, "the inner session ended early"
            time.sleep(0.005)
        return int(self.pidfile.read_text())

    def wait_stopped(self, pid: int) -> float:
        """Until `pid` is stopped (paused at its exit); when that was seen."""
        while process_state(pid) not in ("T", "t"):
            assert process_state(pid) not in (None, "Z"), "the program exited without a pause"
            assert time.monotonic() < self.deadline
            time.sleep(0.001)
        return time.monotonic()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _wait_continued(pid: int, since: float, limit: float) -> float:
    """Until `pid` is no longer stopped, within `limit` seconds of `since`;
    how long after `since` that was."""
    while process_state(pid) in ("T", "t"):
        assert time.monotonic() - since < limit, "still stopped: the watchdog did not continue it"
        time.sleep(0.005)
    return time.monotonic() - since


def _runs_on_and_exits(pid: int, since: float) -> None:
    while process_state(pid) not in (None, "Z"):
        assert time.monotonic() - since < 30
        time.sleep(0.01)


def test_sigkill_of_pytest_while_a_child_is_paused_leaves_nothing_stopped(cbuild, pytester, tmp_path):
    """The inner pytest is killed (SIGKILL) while the process it paused at
    exit is being scanned: the watchdog, in its own session, resumes it at
    once (long before the scan's time limit) and it exits."""
    prog = cbuild("big_heap", BIG_HEAP)
    pidfile = tmp_path / "pid"
    inner = _Inner(pytester, "test_big", f"""
import subprocess
def test_big():
    subprocess.run([{prog!r}, "600000", {str(pidfile)!r}], check=True)
""", pidfile, "--ebpf-leaks-max-blocks=2000000")
    try:
        pid = inner.program_pid()
        inner.wait_stopped(pid)
        inner.kill()
        killed = time.monotonic()
        _wait_continued(pid, killed, SCAN_SECONDS / 2)
        _runs_on_and_exits(pid, killed)
    finally:
        inner.kill()


WAIT_TO_EXIT = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
void *volatile kept;
int main(int argc, char **argv) {
    kept = malloc(100);
    FILE *f = fopen(argv[1], "w");
    fprintf(f, "%d\n", getpid());
    fclose(f);
    while (access(argv[2], F_OK) != 0)
        usleep(1000);
    return 0;
}
"""


@pytest.mark.parametrize("then", ["killed", "stalled"])
def test_a_process_paused_at_exit_while_pytest_is_stopped_is_continued(cbuild, pytester, tmp_path, then):
    """pytest is stopped (SIGSTOP) before its child exits, so it never hears
    of the child's pause: the BPF program listed the child in `pending`
    before stopping it, and the watchdog continues it -- at once when pytest
    is then killed, at the watchdog's time limit while pytest stays stopped."""
    prog = cbuild("wait_to_exit", WAIT_TO_EXIT)
    pidfile, go = tmp_path / "pid", tmp_path / "go"
    inner = _Inner(pytester, "test_wait", f"""
import subprocess
def test_wait():
    subprocess.run([{prog!r}, {str(pidfile)!r}, {str(go)!r}], check=True)
""", pidfile)
    try:
        pid = inner.program_pid()
        inner.proc.send_signal(signal.SIGSTOP)
        go.write_text("")
        stopped = inner.wait_stopped(pid)
        if then == "killed":
            inner.kill()
        waited = _wait_continued(pid, stopped, WATCHDOG_SECONDS + 3)
        if then == "killed":
            assert waited < 2, waited
        else:
            assert WATCHDOG_SECONDS - 1 < waited, waited
            assert inner.proc.poll() is None, "pytest itself stayed stopped"
        _runs_on_and_exits(pid, stopped)
    finally:
        inner.kill()


EXITS = r"""
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
void *volatile kept;
int main(int argc, char **argv) {
    kept = malloc(100);          /* reachable */
    malloc(50);                  /* lost */
    if (!strcmp(argv[1], "abort")) abort();
    if (!strcmp(argv[1], "segv")) raise(SIGSEGV);
    if (!strcmp(argv[1], "exit_group")) syscall(SYS_exit_group, 0);
    return 0;
}
"""


def test_what_cannot_be_classified_says_why(cbuild, pytester, run_plugin):
    """abort() is paused and classified; a fatal signal, a direct exit_group
    and a ptraced process are not: their blocks are unclassified (and count),
    with the reason."""
    prog = cbuild("exits", EXITS)
    strace = shutil.which("strace")
    pytester.makepyfile(test_exits=f"""
import subprocess, pytest
@pytest.mark.parametrize("how", ["return", "abort", "segv", "exit_group", "strace"])
def test_exit(how):
    if how == "strace":
        if {strace!r} is None:
            pytest.skip("no strace")
        subprocess.run([{strace!r}, "-o", "/dev/null", {prog!r}, "return"])
    else:
        subprocess.run([{prog!r}, how])
""")
    result, doc = run_plugin("--ebpf-leaks-budget=1GiB")
    tests = _by_test(doc)
    lost, kept = {"bytes": 50, "blocks": 1}, {"bytes": 100, "blocks": 1}
    for how in ("return", "abort"):
        (p,) = tests[how]["processes"]
        assert p["classified"], (how, p.get("reason"))
        assert (p["reachability"]["definite"], p["reachability"]["reachable"]) == (lost, kept), how
        assert p["leaked"] == lost
    (p,) = tests["abort"]["processes"]
    assert p["signal"] == 6
    reasons = {"segv": "it was killed by SIGSEGV (a fatal signal: no pause at exit)",
               "exit_group": "it exited without libc _exit or abort (exit_group called directly, or no libc)"}
    for how, reason in reasons.items():
        (p,) = tests[how]["processes"]
        assert not p["classified"] and p["reason"] == reason, (how, p.get("reason"))
        assert p["reachability"]["unclassified"] == p["outstanding"] == p["leaked"] == {"bytes": 150, "blocks": 2}
    if strace:
        procs = tests["strace"]["processes"]
        (traced,) = [p for p in procs if p["exe"] == prog]
        assert not traced["classified"]
        assert traced["reason"] == "it is ptraced (a debugger or strace): not paused"
        assert traced["reachability"]["unclassified"] == {"bytes": 150, "blocks": 2}


def test_processes_are_paused_at_exit_after_an_exec_pause_during_a_window(cbuild, pytester, run_plugin,
                                                                          leakext_moddir):
    """An extension module is loaded, so each test's in-process window is
    open while its processes run; an exec pause (a new executable) stops
    recording the window's root while it resolves, and must give the root its
    leak-kinds flag back: every process after it is still paused at exit and
    classified."""
    progs = [cbuild(f"exits_{i}", EXITS) for i in range(3)]
    pytester.makeconftest(f"import sys; sys.path.insert(0, {str(leakext_moddir)!r})")
    pytester.makepyfile(test_after=f"""
import subprocess, leakext
def test_three():
    leakext.clean(10)
    for prog in {[str(p) for p in progs]!r}:
        subprocess.run([prog, "return"], check=True)
""")
    result, doc = run_plugin()
    procs = doc["tests"][0]["processes"]
    assert len(procs) == 3
    for p in procs:
        assert p["classified"], p.get("reason")
        assert _ours(p) == ((50, 1), (0, 0), (0, 0), (100, 1)), _ours(p)
