"""Self-test of the leak fixtures and of the oracle (tests/oracle.py).

Every expectation in tests/fixtures/expected.py is checked three ways:

* natively: the fixture exits with the documented status (each fixture
  also checks its own libc assumptions and exits 99 if one fails);
* under valgrind (``oracle.run_valgrind``): the process tree and every
  process' "in use at exit" match the *valgrind view* of the case exactly;
* natively under gdb (``oracle.run_native_trace``, breakpoints on libc's
  allocator entry points, i.e. the plugin's vantage point): the launched
  process' in-use heap matches the *contract view* exactly -- this also
  covers what valgrind cannot run (pvalloc) or sees differently (C++
  aligned new).

No root needed.  The valgrind/gdb runs are done up front, in parallel, for
the cases selected in this session.
"""

from __future__ import annotations

import concurrent.futures
import os
import pty
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import oracle  # noqa: E402

expected = oracle.load_expected()

ALL_CASES = list(expected.CASES.values())
VG_CASES = [c for c in ALL_CASES if c.valgrind]
NATIVE_CASES = [c for c in ALL_CASES if c.native]
#: cases re-run against a private copy of libc (what the oracles fall back
#: to while the plugin has libc probed): the numbers must not change
PRIVATE_LIBC_IDS = ["alloc_family", "fork_noexec", "exec_chain-2-leak_n", "spawn-all",
                    "threads-main_exit-4-3-48", "exits-segv", "cxx_new", "stdio_only",
                    "alloc_family-pvalloc_odd"]
VG_PRIVATE_CASES = [c for c in VG_CASES if c.id in PRIVATE_LIBC_IDS]
NATIVE_PRIVATE_CASES = [c for c in NATIVE_CASES if c.id in PRIVATE_LIBC_IDS]

needs_valgrind = pytest.mark.skipif(
    not oracle.valgrind_available(), reason="valgrind not installed"
)
needs_gdb = pytest.mark.skipif(not oracle.gdb_available(), reason="gdb/nm not installed")


def _ids(cases):
    return [c.id for c in cases]


# ---- helpers ---------------------------------------------------------------


class _Stdout:
    """Context manager giving the fd-1 kind a case needs."""

    def __init__(self, kind: str, tmp: Path):
        self.kind, self.tmp = kind, tmp
        self._close = []

    def __enter__(self):
        if self.kind == "pipe":
            return subprocess.PIPE
        if self.kind == "devnull":
            return subprocess.DEVNULL
        if self.kind == "file":
            f = open(self.tmp / f"stdout-{os.getpid()}-{id(self)}", "wb")
            self._close.append(f.close)
            return f
        if self.kind == "pty":
            master, slave = pty.openpty()
            self._close += [lambda: os.close(master), lambda: os.close(slave)]
            return slave
        raise ValueError(self.kind)

    def __exit__(self, *exc):
        for c in self._close:
            c()


def _run_all(cases, fn, workers):
    """Run fn(case) for every case in parallel; id -> result or exception."""
    out = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as ex:
        futs = {ex.submit(fn, c): c.id for c in cases}
        for fut in concurrent.futures.as_completed(futs):
            try:
                out[futs[fut]] = fut.result()
            except (Exception, pytest.skip.Exception) as e:  # reported by the test
                out[futs[fut]] = e
    return out


def _selected(request, fixture_name, cases):
    wanted = set()
    for item in request.session.items:
        if fixture_name in getattr(item, "fixturenames", ()):
            cs = getattr(item, "callspec", None)
            if cs is not None and "case" in cs.params:
                wanted.add(cs.params["case"].id)
    return [c for c in cases if c.id in wanted]


def _workers():
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


def _retrying(fn, *args, attempts=6, pause=5.0, **kw):
    """Call fn; while the plugin's tracer (another test process) has uprobes
    in libc, wait and retry; finally skip -- an environmental condition,
    not a wrong expectation."""
    for i in range(attempts):
        try:
            return fn(*args, **kw)
        except oracle.UprobeInterference as e:
            last = e
            time.sleep(pause)
    pytest.skip(f"libc is being traced by someone else: {last}")


def _result(results, case):
    r = results[case.id]
    if isinstance(r, BaseException):
        if isinstance(r, pytest.skip.Exception):
            pytest.skip(str(r))
        raise r
    return r


# ---- session fixtures ------------------------------------------------------


@pytest.fixture(scope="session")
def built():
    return oracle.build_fixtures()


@pytest.fixture(scope="session")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("oracle-out")


@pytest.fixture(scope="session")
def vg_results(request, built, outdir):
    if not oracle.valgrind_available():
        pytest.skip("valgrind not installed")

    def run(case):
        with _Stdout(case.stdout, outdir) as so:
            return _retrying(oracle.run_valgrind, case.argv(built), stdout=so, timeout=300)

    return _run_all(_selected(request, "vg_results", VG_CASES), run, _workers())


@pytest.fixture(scope="session")
def native_results(request, built, outdir):
    if not oracle.gdb_available():
        pytest.skip("gdb not installed")

    def run(case):
        with _Stdout(case.stdout, outdir) as so:
            return _retrying(oracle.run_native_trace, case.argv(built), stdout=so,
                             timeout=300)

    return _run_all(_selected(request, "native_results", NATIVE_CASES), run, _workers())


@pytest.fixture(scope="session")
def vg_private_results(request, built, outdir):
    if not oracle.valgrind_available():
        pytest.skip("valgrind not installed")

    def run(case):
        with _Stdout(case.stdout, outdir) as so:
            return oracle.run_valgrind(case.argv(built), stdout=so, timeout=300,
                                       private_libc=True)

    return _run_all(_selected(request, "vg_private_results", VG_PRIVATE_CASES), run,
                    _workers())


@pytest.fixture(scope="session")
def native_private_results(request, built, outdir):
    if not oracle.gdb_available():
        pytest.skip("gdb not installed")

    def run(case):
        with _Stdout(case.stdout, outdir) as so:
            return oracle.run_native_trace(case.argv(built), stdout=so, timeout=300,
                                           private_libc=True)

    return _run_all(_selected(request, "native_private_results", NATIVE_PRIVATE_CASES),
                    run, _workers())


# ---- build -----------------------------------------------------------------


def test_build_fixtures_is_complete_and_idempotent(built):
    assert set(built) == set(oracle.fixture_sources())
    for name, exe in built.items():
        assert exe.is_file() and os.access(exe, os.X_OK), name
    mtimes = {n: p.stat().st_mtime_ns for n, p in built.items()}
    again = oracle.build_fixtures()
    assert {n: p.stat().st_mtime_ns for n, p in again.items()} == mtimes
    # every case refers to a real fixture
    for case in ALL_CASES:
        case.argv(built)


def test_expectations_are_consistent():
    for case in ALL_CASES:
        roles = [p.role for p in case.procs]
        assert len(set(roles)) == len(roles), case.id
        assert case.procs[0].parent is None, case.id
        assert all(p.parent in roles for p in case.procs[1:]), case.id
        for p in case.procs:
            assert p.bytes >= 0 and p.blocks >= 0
            assert 0 <= p.overhead[0] <= p.bytes and 0 <= p.overhead[1] <= p.blocks
            assert p.blocks > 0 or p.bytes == 0, (case.id, p.role)


# ---- native runs -----------------------------------------------------------


@pytest.mark.parametrize("case", ALL_CASES, ids=_ids(ALL_CASES))
def test_native_exit_status(case, built, tmp_path):
    with _Stdout(case.stdout, tmp_path) as so:
        proc = subprocess.run(case.argv(built), stdin=subprocess.DEVNULL,
                              stdout=so, stderr=subprocess.PIPE, timeout=60)
    assert b"fixture assumption failed" not in proc.stderr, proc.stderr
    assert proc.returncode == case.returncode, proc.stderr


@needs_gdb
@pytest.mark.parametrize("case", NATIVE_CASES, ids=_ids(NATIVE_CASES))
def test_native_trace_matches_contract(case, native_results):
    r = _result(native_results, case)
    assert r.returncode == case.returncode
    root = case.root
    ok_bytes = {root.bytes} | ({root.alt_bytes} if root.alt_bytes is not None else set())
    assert r.in_use_bytes in ok_bytes and r.in_use_blocks == root.blocks, (
        f"{case.id}: native {r.in_use} sizes={r.sizes}, expected {root.contract}"
    )


# ---- valgrind runs ---------------------------------------------------------


@needs_valgrind
@pytest.mark.parametrize("case", VG_CASES, ids=_ids(VG_CASES))
def test_valgrind_matches_expected(case, vg_results):
    r = _result(vg_results, case)
    assert r.returncode == case.returncode, r.stderr[-2000:]
    problems = expected.compare(case, r.heaps.values(), r.root_pid, view="valgrind")
    assert not problems, "\n".join(problems)
    for h in r.heaps.values():
        assert h.aborted_call is None
        # parser sanity: memcheck's counters are consistent
        assert h.in_use_blocks == h.total_allocs - h.total_frees, h
        assert h.total_bytes_allocated >= h.in_use_bytes


@needs_valgrind
@pytest.mark.parametrize("case", VG_CASES, ids=_ids(VG_CASES))
def test_contract_differs_from_valgrind_only_where_documented(case, vg_results):
    r = _result(vg_results, case)
    contract = expected.compare(case, r.heaps.values(), r.root_pid, view="contract")
    differs = any(p.vg is not None for p in case.procs)
    assert bool(contract) == differs, "\n".join(contract)


@needs_valgrind
@pytest.mark.parametrize("case", VG_PRIVATE_CASES, ids=_ids(VG_PRIVATE_CASES))
def test_valgrind_with_private_libc(case, vg_private_results):
    r = _result(vg_private_results, case)
    assert r.private_libc
    assert r.returncode == case.returncode, r.stderr[-2000:]
    problems = expected.compare(case, r.heaps.values(), r.root_pid, view="valgrind")
    assert not problems, "\n".join(problems)


@needs_gdb
@pytest.mark.parametrize("case", NATIVE_PRIVATE_CASES, ids=_ids(NATIVE_PRIVATE_CASES))
def test_native_trace_with_private_libc(case, native_private_results):
    r = _result(native_private_results, case)
    assert r.private_libc
    assert r.returncode == case.returncode
    assert r.in_use == case.root.contract, r.sizes


@needs_valgrind
def test_valgrind_aborts_on_pvalloc(built):
    case = expected.get("alloc_family-pvalloc")
    r = _retrying(oracle.run_valgrind, case.argv(built))
    assert r.root.aborted_call == "pvalloc"
    assert r.returncode == 1


@needs_valgrind
def test_valgrind_logs_for_fork_and_exec(vg_results):
    # exec in place: one log, final image only, same pid
    r = _result(vg_results, expected.get("exec_chain-2-leak_n"))
    assert list(r.heaps) == [r.root_pid]
    assert r.root.exe_name == "leak_n" and r.root.command.endswith("leak_n 4 8")
    assert r.root.seq == 1

    # posix_spawn: the child's pre-exec (forked) instance leaves a header
    # without summary (seq 2), the exec'd image has the summary (seq 1)
    r = _result(vg_results, expected.get("spawn-posix_spawn"))
    (child,) = r.children(r.root_pid)
    images = [i for i in r.images if i.pid == child.pid]
    assert sorted((i.seq, i.has_summary) for i in images) == [(1, True), (2, False)]
    assert child.exe_name == "leak_n" and child.ppid == r.root_pid

    # fork without exec: the child's own log (seq 2), same command line
    r = _result(vg_results, expected.get("spawn-grandchild"))
    assert [r.depth(h.pid) for h in r.descendants()] == [0, 1, 2]
    assert {h.command for h in r.descendants()} == {r.root.command}

    # a self-directed SIGKILL still gets a summary; SIGSEGV is reported
    r = _result(vg_results, expected.get("exits-sigkill"))
    assert r.exit_signal == 9 and r.root.in_use == (579, 2)
    r = _result(vg_results, expected.get("exits-segv"))
    assert r.root.fatal_signal == 11


@needs_gdb
def test_libc_breakpoints_detects_int3(tmp_path):
    """libc_breakpoints() sees a breakpoint gdb put on pvalloc (the same kind
    of int3 a uprobe writes)."""
    script = tmp_path / "check.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(HERE)!r})\n"
        "import oracle\n"
        "print('HITS', oracle.libc_breakpoints())\n"
    )
    proc = subprocess.run(
        ["gdb", "-nx", "-q", "-batch", "-ex", "set startup-with-shell off",
         "-ex", "set breakpoint pending on", "-ex", "break pvalloc", "-ex", "run",
         "--args", sys.executable, str(script)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )
    line = next(l for l in proc.stdout.splitlines() if l.startswith("HITS"))
    assert "'pvalloc+0x0'" in line, proc.stdout


# ---- parser ----------------------------------------------------------------

_SAMPLE = """\
==4242== Memcheck, a memory error detector
==4242== Command: /usr/bin/thing --flag a b
==4242== Parent PID: 17
==4242==
this line has no prefix and is ignored
==4242== Process terminating with default action of signal 11 (SIGSEGV)
==4242== HEAP SUMMARY:
==4242==     in use at exit: 1,234,567 bytes in 1,024 blocks
==4242==   total heap usage: 10,000 allocs, 8,976 frees, 12,345,678,901 bytes allocated
==4242==
==4242== LEAK SUMMARY:
==4242==    definitely lost: 100 bytes in 1 blocks
==4242==    indirectly lost: 0 bytes in 0 blocks
==4242==      possibly lost: 2,000 bytes in 2 blocks
==4242==    still reachable: 1,232,467 bytes in 1,021 blocks
==4242==         suppressed: 0 bytes in 0 blocks
==4242== ERROR SUMMARY: 3 errors from 2 contexts (suppressed: 0 from 0)
==4243== Command: /bin/true
==4243== Parent PID: 4242
**4243** Program aborting because of call to pvalloc
==4243==     in use at exit: 0 bytes in 0 blocks
==4243==   total heap usage: 0 allocs, 0 frees, 0 bytes allocated
==4243== All heap blocks were freed -- no leaks are possible
"""


def test_parse_log_sample():
    a, b = oracle.parse_log(_SAMPLE)
    assert (a.pid, a.ppid, a.exe, a.exe_name) == (4242, 17, "/usr/bin/thing", "thing")
    assert a.command == "/usr/bin/thing --flag a b"
    assert a.in_use == (1234567, 1024)
    assert (a.total_allocs, a.total_frees, a.total_bytes_allocated) == (10000, 8976, 12345678901)
    assert a.fatal_signal == 11 and a.errors == 3
    assert a.leak_summary.definitely_lost == 100
    assert a.leak_summary.possibly_lost_blocks == 2
    assert a.leak_summary.still_reachable == 1232467
    assert a.leak_summary.kinds == {"definite": (100, 1), "indirect": (0, 0), "possible": (2000, 2),
                                    "reachable": (1232467, 1021)}
    assert (b.pid, b.ppid, b.in_use, b.aborted_call) == (4243, 4242, (0, 0), "pvalloc")
    assert b.leak_summary is None


def test_parse_log_without_summary():
    (h,) = oracle.parse_log("==7== Command: x\n==7== Parent PID: 1\n")
    assert not h.has_summary and h.in_use is None


# ---- real programs ---------------------------------------------------------


def _distro_cases(tmp: Path):
    data = tmp / "data.txt"
    data.write_text("pear\napple\nfig\n")
    js = tmp / "data.json"
    js.write_text('{"a": [1, 2, {"b": null}], "c": "d"}\n')
    return {
        "ls": ["ls", "/"],
        "sort": ["sort", str(data)],
        "sqlite3": ["sqlite3", ":memory:", "select 1"],
        "jq": ["jq", ".", str(js)],
    }


@needs_valgrind
@pytest.mark.parametrize("prog", ["ls", "sort", "sqlite3", "jq"])
def test_valgrind_on_distro_programs(prog, tmp_path):
    argv = _distro_cases(tmp_path)[prog]
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} not installed")
    r = _retrying(oracle.run_valgrind, [shutil.which(argv[0])] + argv[1:], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    root = r.root
    assert root.exe_name == argv[0]
    assert root.in_use_bytes >= 0 and root.in_use_blocks >= 0
    assert root.in_use_blocks == root.total_allocs - root.total_frees
    assert root.total_allocs > 0
    print(f"{prog}: in use at exit {root.in_use_bytes} bytes in {root.in_use_blocks} "
          f"blocks; {root.total_allocs} allocs, {root.total_frees} frees, "
          f"{root.total_bytes_allocated} bytes allocated")
