"""End-to-end: every allocator a process really uses is found at exec and
probed before its first allocation, or the process is flagged (issue 14).
The fixtures (tests/fixtures/alloc/builds.py) are leak6.c and leaknew.cpp
built the twelve ways; numbers are asserted exactly. They run with
--ebpf-leaks-kinds=all: their blocks stay reachable through a global (valgrind
says "still reachable"), and what these tests check is that every allocator's
calls are counted, block for block. Leak kinds under each allocator:
kinds.c (known lost and reachable blocks) built the same ways, classified
with the allocator's memory kept out of the roots (kinds/allocmem.py)."""

import os
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures", "alloc"))
import builds  # noqa: E402

pytestmark = pytest.mark.ebpf

CONFIGS = {c.name: c for c in builds.C_CONFIGS + builds.CXX_CONFIGS}

# leak6.c: 6,756 B in 6 blocks outstanding; 8 calls allocating 6,906 B in its lifetime.
# leaknew.cpp: 3,756 B in 4 blocks; 7 operator new calls, 6,312 B.
C_LEAK, C_ALLOC = {"bytes": 6756, "blocks": 6}, {"bytes": 6906, "blocks": 8}
CXX_LEAK, CXX_ALLOC = {"bytes": 3756, "blocks": 4}, {"bytes": 6312, "blocks": 7}
# libstdc++'s emergency exception pool (a default suppression): in every process
# that loads libstdc++ (C++ programs, and jemalloc/tcmalloc, which need it)
POOL = 72704
# allocators whose start-up allocates nothing but that pool: absolute figures
QUIET = {"glibc", "jemalloc", "mimalloc", "musl", "static-musl"}

# (malloc and free referenced, never called: a static program links them)
BASELINE_C = ("#include <stdlib.h>\nvoid *(*volatile keep_m)(size_t) = malloc;\n"
              "void (*volatile keep_f)(void *) = free;\nint main(void) { return 0; }\n")
BASELINE_CXX = ("#include <new>\nvoid *(*volatile keep_n)(std::size_t) = ::operator new;\n"
                "void (*volatile keep_d)(void *) = ::operator delete;\nint main() { return 0; }\n")


@pytest.fixture(scope="module")
def exes(tmp_path_factory):
    """name -> (the leaking program, a program doing nothing built the same
    way, in a directory of the same length: static glibc keeps its path)."""
    root = tmp_path_factory.mktemp("alloc")
    a, b = root / "a", root / "b"
    a.mkdir()
    b.mkdir()
    built = {}
    for name, cfg in CONFIGS.items():
        if builds.missing(cfg.packages):
            continue
        src = b / ("base.cpp" if cfg.compiler == "g++" else "base.c")
        src.write_text(BASELINE_CXX if cfg.compiler == "g++" else BASELINE_C)
        built[name] = (builds.build(cfg, str(a)), builds.build(cfg, str(b), source=str(src)))
    return built


def _need(exes, name):
    if name not in exes:
        miss = builds.missing(CONFIGS[name].packages)
        if os.environ.get("CI"):
            pytest.fail(f"{name}: packages missing: {miss}")
        pytest.skip(f"{name}: packages missing: {miss}")
    return exes[name]


def _inner(programs, budget="0", runs=1, name="test_it"):
    """An inner test running each (exe, env) of `programs` `runs` times."""
    return f"""
import os, subprocess, pytest
@pytest.mark.leak_budget({budget})
def {name}():
    for _ in range({runs}):
        for exe, extra in {programs!r}:
            env = {{k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LD_LIBRARY_PATH")}}
            env.update(extra)
            subprocess.run([exe], env=env, check=True)
"""


def _env(cfg):
    return {"LD_PRELOAD": cfg.preload} if cfg.preload else {}


def _minus(x, y):
    return {"bytes": x["bytes"] - y["bytes"], "blocks": x["blocks"] - y["blocks"]}


@pytest.mark.parametrize("name", [n for n in CONFIGS if "stripped" not in n])
def test_each_allocator_is_probed_and_counts_exactly(pytester, run_plugin, exes, name):
    cfg = CONFIGS[name]
    leaky, base = _need(exes, name)
    pytester.makepyfile(test_inner=_inner([(base, _env(cfg)), (leaky, _env(cfg))], budget="None"))
    result, doc = run_plugin("--ebpf-leaks-kinds=all")
    result.assert_outcomes(passed=1)
    t = doc["tests"][0]
    assert t["tracking_complete"] and t["incomplete"] == []
    b, p = t["processes"]
    module = cfg.module or leaky
    for proc, exe in ((b, base), (p, leaky)):
        assert proc["allocator"] == {"kind": cfg.kind, "module": cfg.module or exe, "covered": True}
    assert module
    cxx = cfg.compiler == "g++"
    leak, alloc = (CXX_LEAK, CXX_ALLOC) if cxx else (C_LEAK, C_ALLOC)
    # a clean program under each allocator leaks nothing (start-up blocks are defaults)
    assert b["leaked"] == {"bytes": 0, "blocks": 0}
    assert p["leaked"] == leak
    assert _minus(p["outstanding"], b["outstanding"]) == leak
    assert _minus(p["allocated"], b["allocated"]) == alloc
    if cfg.kind in QUIET:
        pool = cxx or cfg.kind == "jemalloc"
        assert b["outstanding"] == {"bytes": POOL if pool else 0, "blocks": 1 if pool else 0}
        assert b["allocated"] == b["outstanding"]


@pytest.mark.parametrize("name", ["static-glibc-stripped", "static-musl-stripped"])
def test_a_stripped_static_program_is_flagged(pytester, run_plugin, exes, name):
    cfg = CONFIGS[name]
    leaky, _ = _need(exes, name)
    pytester.makepyfile(test_inner=_inner([(leaky, {})], budget="0", name="test_strict")
                        + _inner([(leaky, {})], budget="None", name="test_report_only"))
    result, doc = run_plugin("--ebpf-leaks-kinds=all")
    out = result.stdout.str()
    result.assert_outcomes(passed=1, failed=1)
    strict, lax = doc["tests"]
    why = "static executable without a symbol table (stripped): its malloc cannot be located"
    for t in (strict, lax):
        (p,) = t["processes"]
        assert p["allocator"] == {"kind": cfg.kind, "module": None, "covered": False}
        assert p["allocated"] == {"bytes": 0, "blocks": 0}
    line = f"({name[:15]}, {leaky}): allocations not visible, {why}"
    assert not strict["tracking_complete"] and len(strict["incomplete"]) == 1
    assert strict["incomplete"][0].endswith(line)
    assert lax["tracking_complete"] and lax["incomplete"] == []
    # the failure text and the summary name the process and why
    # (the summary's line is cut to the terminal's width, which CI runs narrower)
    pid = strict["processes"][0]["pid"]
    assert f"leak tracking incomplete: pid {pid} {line}" in out, out
    assert f"test_inner.py::test_strict: leak tracking incomplete: pid {pid} (" in out, out


def test_a_thousand_runs_pay_one_pause_and_ld_preload_is_part_of_the_key(pytester, run_plugin, exes):
    leaky, _ = _need(exes, "glibc")
    pytester.makepyfile(test_inner=_inner([(leaky, {})], budget="None", runs=1000))
    result, doc = run_plugin("--ebpf-leaks-kinds=all")
    result.assert_outcomes(passed=1)
    (t,) = doc["tests"]
    assert len(t["processes"]) == 1000
    assert doc["session"]["exec_pauses"] == 1
    for p in t["processes"]:
        assert p["allocator"]["kind"] == "glibc" and p["allocator"]["covered"]
        assert (p["outstanding"], p["allocated"]) == (C_LEAK, C_ALLOC)

    if "preload-jemalloc" not in exes:
        return
    # the same executable with and without LD_PRELOAD: two answers, two pauses
    pytester.makepyfile(test_inner=_inner([(leaky, {}), (leaky, {"LD_PRELOAD": builds.JEMALLOC}), (leaky, {})],
                                          budget="None", runs=3))
    result, doc = run_plugin("--ebpf-leaks-kinds=all")
    result.assert_outcomes(passed=1)
    (t,) = doc["tests"]
    assert doc["session"]["exec_pauses"] == 2
    kinds = [p["allocator"]["kind"] for p in t["processes"]]
    assert kinds == ["glibc", "jemalloc", "glibc"] * 3
    for p in t["processes"]:
        assert p["leaked"] == C_LEAK
    assert doc["session"]["allocators"] == {builds.LIBC: "glibc", builds.JEMALLOC: "jemalloc"}


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _find(comm_path):
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.readlink(f"/proc/{d}/exe") == comm_path:
                    return int(d)
            except OSError:
                pass
    return None


def test_a_paused_process_is_continued_when_pytest_is_killed(pytester, ebpf, exes, tmp_path):
    """pytest SIGKILLed while a process it stopped at exec waits: the
    watchdog (its own session) continues it."""
    leaky, _ = _need(exes, "static-musl")
    mark = tmp_path / "started"
    pytester.makepyfile(test_inner=f"""
        import subprocess
        def test_wait():
            # sleep and touch resolved (paused once each) while pytest answers; then pytest
            # is stopped, and only the program's exec meets an unresolved executable
            subprocess.run(["/bin/sh", "-c", "sleep 0; touch {mark}; sleep 1; exec {leaky}"], check=True)
    """)
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "--ebpf-leaks", "--ebpf-leaks-kinds=all", "-p", "no:cacheprovider",
                             str(pytester.path)], cwd=pytester.path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not mark.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGSTOP)      # pytest cannot answer the pause now
        deadline = time.monotonic() + 10
        pid = None
        while time.monotonic() < deadline:
            pid = _find(leaky)
            if pid and _state(pid) == "T":
                break
            time.sleep(0.01)
        assert pid and _state(pid) == "T", "the program was not stopped at exec"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while _state(pid) == "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(pid) != "T"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- leak kinds under each allocator (tests/fixtures/alloc/kinds.c) --------------

KINDS_SOURCE = os.path.join(os.path.dirname(__file__), "fixtures", "alloc", "kinds.c")
FOUR = ("definite", "indirect", "possible", "reachable")
# kinds.c's own blocks (see its header): the runtime's own blocks come on top
# ("none": the program allocates nothing, its second thread runs all the same):
# reachable, but what BASE_LOST says and, under glibc, the second thread's DTV,
# possibly lost (glibc keeps a pointer 16 bytes into it; memcheck says so too)
KINDS_EXPECTED = {"definite": (1048932, 5), "indirect": (200, 5), "possible": (0, 0), "reachable": (301676, 7)}
# what an allocator loses by itself at start-up: tcmalloc's MallocExtension::Register
# leaks an 8-byte operator new[] block (valgrind says so too)
# leaks an 8-byte operator new[] block (valgrind says so too); static glibc
# keeps its loader's 40-byte search-path array (_dl_init_paths, in
# __rtld_search_dirs) and its 160-byte _dl_find_object table only in RELRO
# memory, read-only after start-up: no root, as memcheck takes roots (rw mappings)
BASE_LOST = {"tcmalloc": {"definite": (8, 1)}, "static-glibc": {"definite": (200, 2)}}
KINDS_CONFIGS = [n for n in CONFIGS if "stripped" not in n]
# every configuration paused at its exit (musl's and static programs' own _exit
# are probed when their allocator is); musl's also scanned while still running
# at their test's end
KINDS_CASES = [(n, False) for n in KINDS_CONFIGS] + [("musl", True), ("static-musl", True)]


@pytest.fixture(scope="module")
def kinds_exes(tmp_path_factory):
    out = tmp_path_factory.mktemp("allockinds")
    return {name: builds.build(cfg, str(out), source=KINDS_SOURCE) for name, cfg in CONFIGS.items()
            if name in KINDS_CONFIGS and not builds.missing(cfg.packages)}


def _kinds_inner(exe, env, running):
    """Two tests: the program allocating nothing (its first exec, the one
    paused at exec), then kinds.c; each either run to its exit, or left
    running (reading its stdin) at the test's end."""
    return f"""
import os, subprocess, pytest
ENV = {{k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LD_LIBRARY_PATH")}}
ENV.update({env!r})
KEEP = []

def _run(*args):
    if {running!r}:
        p = subprocess.Popen([{exe!r}, "wait", *args], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert p.stdout.readline() == b"ready\\n"
        KEEP.append(p)      # its stdin closes when this session ends: then it exits
    else:
        subprocess.run([{exe!r}, *args], env=ENV, check=True)

@pytest.mark.leak_budget(None)
def test_a_none():
    _run("none")

@pytest.mark.leak_budget(None)
def test_b_kinds():
    _run()
"""


def _figures(p):
    return {k: (p["reachability"][k]["bytes"], p["reachability"][k]["blocks"]) for k in FOUR}


@pytest.mark.parametrize("name,running", KINDS_CASES)
def test_leak_kinds_under_each_allocator(pytester, run_plugin, kinds_exes, name, running):
    """Each allocator's memory is kept out of the roots: kinds.c's known lost
    and reachable blocks come out exactly, the allocator's own blocks are
    reachable."""
    if name not in kinds_exes:
        _need(kinds_exes, name)
    cfg = CONFIGS[name]
    exe = kinds_exes[name]
    pytester.makepyfile(test_inner=_kinds_inner(exe, _env(cfg), running))
    result, doc = run_plugin()
    result.assert_outcomes(passed=2)
    (base,), (prog,) = [t["processes"] for t in doc["tests"]]
    for p in (base, prog):
        assert p["allocator"]["kind"] == cfg.kind and p["allocator"]["covered"]
    for p in (base, prog):
        assert p["classified"], (name, p.get("reason"))
        assert p["reachability"]["unclassified"] == {"bytes": 0, "blocks": 0}
    own = _figures(base)
    assert {k: own[k] for k in FOUR[:2]} == dict({k: (0, 0) for k in FOUR[:2]}, **BASE_LOST.get(cfg.kind, {})), own
    assert own["possible"][1] == (0 if cfg.kind in ("musl", "static-musl") else 1), own
    want = {k: (KINDS_EXPECTED[k][0] + own[k][0], KINDS_EXPECTED[k][1] + own[k][1]) for k in FOUR}
    assert _figures(prog) == want, (name, _figures(prog), own)
    # leaked: kinds.c's lost blocks, plus what the allocator loses that no default suppression hides
    assert prog["leaked"] == {"bytes": 1048932 + 200 + base["leaked"]["bytes"],
                              "blocks": 10 + base["leaked"]["blocks"]}


def test_leak_kinds_of_a_first_exec(pytester, run_plugin, kinds_exes):
    """The first exec of an executable (the one paused at exec) is scanned
    with its allocator's kind too."""
    name = "link-jemalloc"
    _need(kinds_exes, name)
    pytester.makepyfile(test_inner=f"""
import subprocess, pytest
@pytest.mark.leak_budget(None)
def test_first():
    subprocess.run([{kinds_exes[name]!r}], check=True)
""")
    result, doc = run_plugin()
    result.assert_outcomes(passed=1)
    ((p,),) = [t["processes"] for t in doc["tests"]]
    assert p["allocator"]["kind"] == "jemalloc" and p["classified"]
    assert _figures(p)["definite"] == KINDS_EXPECTED["definite"]
