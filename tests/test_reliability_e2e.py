"""Reliability end to end: capacity limits never pass silently, faults leave
nothing behind, sessions are isolated, load figures stay exact."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.ebpf

LOAD = r"""
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>
static int per_thread;
static void *worker(void *arg) {
    void **keep = malloc(sizeof(void *) * per_thread);
    for (int i = 0; i < per_thread; i++) keep[i] = malloc(24);
    for (int i = 0; i < per_thread; i++) if (i % 2) free(keep[i]);
    free(keep);
    return 0;   /* leaks per_thread/2 blocks of 24 B */
}
int main(int argc, char **argv) {
    const char *mode = argv[1];
    if (!strcmp(mode, "threads")) {         /* threads T N */
        int t = atoi(argv[2]); per_thread = atoi(argv[3]);
        pthread_t th[64];
        pthread_attr_t a;  /* small stacks: glibc caches all 16, so each keeps its 272 B DTV block */
        pthread_attr_init(&a);
        pthread_attr_setstacksize(&a, 256 * 1024);
        for (int i = 0; i < t; i++) pthread_create(&th[i], &a, worker, 0);
        for (int i = 0; i < t; i++) pthread_join(th[i], 0);
    } else if (!strcmp(mode, "live")) {     /* live N: N blocks of 8 B live at exit */
        int n = atoi(argv[2]);
        for (int i = 0; i < n; i++) malloc(8);
    } else if (!strcmp(mode, "procs")) {    /* procs N: N short-lived children, each leaks 1 block of 40 B */
        int n = atoi(argv[2]);
        for (int i = 0; i < n; i++) {
            pid_t p = fork();
            if (p == 0) { malloc(40); _exit(0); }
            waitpid(p, 0, 0);
        }
    } else if (!strcmp(mode, "sleep")) {
        malloc(16);
        sleep(atoi(argv[2]));
    } else if (!strcmp(mode, "spill")) {    /* 12 blocks of 16 B: 4 pushed out of the ring into the map */
        for (int i = 0; i < 12; i++) malloc(16);
        sleep(atoi(argv[2]));
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def load(cbuild):
    return cbuild("load", LOAD)


def _tests(doc):
    return {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}


def _own(t, exe):
    return [p for p in t["processes"] if p["exe"] == exe]


def test_full_maps_are_never_a_silent_pass(pytester, run_plugin, load):
    pytester.makepyfile(test_cap=f"""
        import subprocess, pytest
        @pytest.mark.leak_budget(None)
        def test_many_blocks():
            subprocess.run([{load!r}, "live", "200"], check=True)
    """)
    result, doc = run_plugin("--ebpf-leaks-max-blocks=64")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "leak tracking incomplete:" in out and "--ebpf-leaks-max-blocks" in out
    t = doc["tests"][0]
    assert t["tracking_complete"] is False and t["processes"][0]["tracking"]["lost_blocks"] > 0
    # as a warning only
    result, doc = run_plugin("--ebpf-leaks-max-blocks=64", "--ebpf-leaks-on-incomplete=warn")
    result.assert_outcomes(passed=1, warnings=1)
    assert "leak tracking incomplete" in result.stdout.str()


def test_load_figures_are_exact(pytester, run_plugin, load):
    pytester.makepyfile(test_load=f"""
        import subprocess, pytest
        L = {load!r}
        @pytest.mark.leak_budget(None)
        def test_threads():
            subprocess.run([L, "threads", "16", "100000"], check=True)
        @pytest.mark.leak_budget(None)
        def test_thousand_processes():
            subprocess.run([L, "procs", "1000"], check=True)
        @pytest.mark.leak_budget(None)
        def test_million_live_blocks():
            subprocess.run([L, "live", "1000000"], check=True)
    """)
    result, doc = run_plugin("--ebpf-leaks-max-blocks=2000000", "--durations=3")
    result.assert_outcomes(passed=3)
    t = _tests(doc)
    (th,) = _own(t["test_threads"], load)
    # 16 threads x 50,000 leaked 24 B blocks + 16 x 272 B thread DTV blocks (glibc; see fixtures/expected.py)
    assert th["outstanding"] == {"bytes": 16 * 50000 * 24 + 16 * 272, "blocks": 16 * 50000 + 16}
    assert th["allocated"]["blocks"] == 16 * (100000 + 1) + 16
    procs = _own(t["test_thousand_processes"], load)
    assert len(procs) == 1001
    children = [p for p in procs if p["ppid"] != procs[0]["ppid"] or p is not procs[0]]
    kids = [p for p in procs if p["outstanding"] == {"bytes": 40, "blocks": 1}]
    assert len(kids) == 1000 and all(p["exit_code"] == 0 for p in kids)
    (live,) = _own(t["test_million_live_blocks"], load)
    assert live["outstanding"] == {"bytes": 8_000_000, "blocks": 1_000_000}
    assert all(x["tracking_complete"] for x in doc["tests"])


def test_sessions_are_isolated(pytester, ebpf, load, tmp_path):
    """Two sessions at once: each sees only its own tests' processes."""
    for i, n in ((1, 111), (2, 222)):
        d = tmp_path / f"s{i}"
        d.mkdir()
        (d / f"test_s{i}.py").write_text(
            "import subprocess, time, pytest\n"
            "@pytest.mark.leak_budget(None)\n"
            f"def test_x():\n"
            f"    for _ in range(20):\n"
            f"        subprocess.run([{load!r}, 'live', '{n}'], check=True)\n"
            f"        time.sleep(0.05)\n")
    procs = [subprocess.Popen([sys.executable, "-m", "pytest", "--ebpf-leaks", "-p", "no:cacheprovider", "-q",
                               f"--ebpf-leaks-json={tmp_path / f's{i}.json'}", str(tmp_path / f"s{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in (1, 2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()
    for i, n in ((1, 111), (2, 222)):
        doc = json.loads((tmp_path / f"s{i}.json").read_text())
        (t,) = doc["tests"]
        assert len(t["processes"]) == 20
        assert all(p["outstanding"] == {"bytes": 8 * n, "blocks": n} for p in t["processes"])


# the allocator entry programs of every attach mode (session, multi, perf): one per session
ENTRY_PROGS = ("alloc_session", "alloc_entry", "malloc_entry")
OUR_PROGS = (*ENTRY_PROGS, "malloc_session", "alloc_return", "malloc_return", "free_entry", "calloc_entry",
             "realloc_entry")


OUR_MAPS = ("tracked", "pidmap", "allocmap", "procs", "blocks", "handoffs", "stacks", "rawcache")


def _bpf_progs(kind="prog", names=OUR_PROGS):
    """{id: set of pids holding it} for BPF programs (or maps) with our names."""
    out = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True).stdout
    progs = {}
    for p in json.loads(out or "[]"):
        if p.get("name") in names:
            progs[p["id"]] = {x["pid"] for x in p.get("pids", [])}
    return progs


def _bpf_maps():
    return _bpf_progs("map", OUR_MAPS)


def _uprobe_events():
    for path in ("/sys/kernel/tracing/uprobe_events", "/sys/kernel/debug/tracing/uprobe_events"):
        if os.path.exists(path):
            return [e for e in open(path).read().splitlines() if "libc" in e]
    return []


def _leftovers(before, dead_pid, now=_bpf_progs):
    """Programs (maps) of the dead session still loaded (other sessions may run concurrently)."""
    return [pid for pid, holders in now().items()
            if pid not in before and (not holders or dead_pid in holders)]


def test_sigkill_leaves_nothing_behind_and_sigint_reports(pytester, ebpf, load, tmp_path):
    before, maps_before = _bpf_progs(), _bpf_maps()
    events_before = _uprobe_events()
    (tmp_path / "test_slow.py").write_text(
        "import subprocess\n"
        f"def test_slow():\n    subprocess.run([{load!r}, 'sleep', '30'])\n")
    for sig in (signal.SIGKILL, signal.SIGINT):
        report = tmp_path / f"r{int(sig)}.json"
        p = subprocess.Popen([sys.executable, "-m", "pytest", "--ebpf-leaks", "-p", "no:cacheprovider", "-s",
                              f"--ebpf-leaks-json={report}", str(tmp_path / "test_slow.py")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline and not _children_named(p.pid, "load"):
            time.sleep(0.05)
        assert _children_named(p.pid, "load"), "the test's process did not start"
        assert _leftovers(before, p.pid) and _leftovers(maps_before, p.pid, _bpf_maps), \
            "the session's program and maps are not visible to bpftool: nothing would be checked"
        time.sleep(0.3)
        if sig == signal.SIGINT:
            os.killpg(p.pid, signal.SIGINT)   # Ctrl-C reaches the whole foreground group
        else:
            os.kill(p.pid, sig)
        out, _ = p.communicate(timeout=60)
        if sig == signal.SIGKILL:
            os.killpg(p.pid, signal.SIGKILL)  # the orphaned sleeper
        else:
            text = out.decode()
            assert "KeyboardInterrupt" in text and "was interrupted; so far:" in text, text
            doc = json.loads(report.read_text())
            (t,) = doc["tests"]
            assert t["interrupted"] is True and t["outcome"] == "error"
            (lp,) = [x for x in t["processes"] if x["comm"] == "load"]
            assert lp["outstanding"]["blocks"] >= 1
        deadline = time.time() + 20   # the kernel frees programs asynchronously after the fds close
        while time.time() < deadline and (_leftovers(before, p.pid) or _leftovers(maps_before, p.pid, _bpf_maps)):
            time.sleep(0.2)
        assert not _leftovers(before, p.pid), f"BPF programs survived {sig!r}"
        assert not _leftovers(maps_before, p.pid, _bpf_maps), f"BPF maps survived {sig!r}"
        assert _uprobe_events() == events_before, "uprobe events survived"


def _children_named(pid, comm):
    out = subprocess.run(["pgrep", "-s", str(pid), "-x", comm], capture_output=True, text=True).stdout
    return out.split()


def test_wait_for_processes(pytester, run_plugin, load):
    pytester.makepyfile(test_wait=f"""
        import subprocess, pytest
        @pytest.mark.leak_budget(None)
        def test_bg():
            subprocess.Popen([{load!r}, "sleep", "1"])
    """)
    result, doc = run_plugin("--ebpf-leaks-wait=10")
    (p,) = [x for x in doc["tests"][0]["processes"] if x["comm"] == "load"]
    assert p["running_at_test_end"] is False and p["exit_code"] == 0
    assert p["outstanding"] == {"bytes": 16, "blocks": 1}
    result = pytester.runpytest_subprocess("--ebpf-leaks", "--ebpf-leaks-wait=soon")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--ebpf-leaks-wait: 'soon' is not a number of seconds" in result.stderr.str()


def test_xdist_gives_the_same_verdicts_numbers_and_json(pytester, run_plugin, load):
    pytester.makepyfile(test_dist=f"""
        import subprocess, pytest
        L = {load!r}
        @pytest.mark.parametrize("n", [0, 1, 5, 17, 100, 250])
        def test_live(n):
            subprocess.run([L, "live", str(n)], check=True)
        @pytest.mark.leak_budget("1 KiB")
        @pytest.mark.parametrize("n", [10, 200])
        def test_budget(n):
            subprocess.run([L, "live", str(n)], check=True)
    """)
    import xml.etree.ElementTree as ET

    runs = {}
    for n in ("0", "2", "4"):
        junit = pytester.path / f"junit{n}.xml"
        result, doc = run_plugin("-n", n, f"--junitxml={junit}")
        result.assert_outcomes(passed=2, failed=6)
        assert "ebpf leak summary" in result.stdout.str() and "8 tests checked, 6 over budget" in result.stdout.str()
        entries = {t["nodeid"]: (t["outcome"], t["over_budget"], t["leaked"],
                                 sorted((p["comm"], p["outstanding"]["bytes"], p["outstanding"]["blocks"])
                                        for p in t["processes"])) for t in doc["tests"]}
        cases = {}
        for c in ET.parse(junit).getroot().iter("testcase"):
            f = c.find("failure")
            props = {p.get("name"): p.get("value") for p in c.iter("property")}
            cases[c.get("name")] = (f.get("message") if f is not None else None, props)
        runs[n] = (entries, cases)
    assert runs["0"] == runs["2"] == runs["4"]
    entries, cases = runs["0"]
    assert len(entries) == 8
    assert cases["test_live[100]"][0] == "leak budget exceeded: 800 B in 100 blocks leaked by 1 of 1 process (budget 0 B)"
    assert cases["test_live[100]"][1]["leak_bytes"] == "800"


def test_thread_slots_and_pid_bits_are_released_in_the_kernel(ebpf, load):
    """The hand-off slots of a thread are deleted by the BPF program when the
    thread exits, and a process's pid bit when it ends: nothing piles up in the
    session's maps however many threads and processes the tests launch."""
    from pytest_memleak_ebpf.tracer import Tracer

    t = Tracer()
    try:
        t.add_root(os.getpid())
        tid = t.begin_test()
        subprocess.run([load, "threads", "16", "200"], check=True)
        subprocess.run([load, "procs", "50"], check=True)
        ho = t.bpf[b"handoffs"]
        stale = [int(k.tid) for k in ho.keys() if not os.path.exists(f"/proc/{int(k.tid)}")]
        assert stale == [], f"hand-off slots of threads that exited: {stale[:10]}"
        assert _bits(t, b"pidmap") == [os.getpid()]
        assert _bits(t, b"allocmap") == []      # the test's processes' bits (the root has none)
        left = subprocess.Popen(["sleep", "0.3"])   # still running at the test's end
        assert left.pid in _bits(t, b"allocmap")
        raw = t.end_test(tid)
        procs = [p for p in raw.processes if p["comm"] == "load"]
        assert len(procs) == 52        # `load threads`, `load procs` and its 50 children
        assert all(p["exited"] for p in procs)
        assert left.pid in _bits(t, b"allocmap")  # untracked, its bit stays until it ends
        left.wait()
        assert _bits(t, b"allocmap") == []
    finally:
        t.close()


def _bits(t, name):
    """The pids whose bit is set in a pid bitmap of the tracer's."""
    return [w * 64 + b for w, v in ((int(k.value), int(v.value)) for k, v in t.bpf[name].items()) if v
            for b in range(64) if v >> b & 1]


def test_xdist_workers_share_the_controllers_program(pytester, run_plugin, load):
    """With -n 3 the controller loads the only BPF program and every worker
    checks its tests through it: each allocation on the machine runs one
    program, not one per worker."""
    pytester.makepyfile(test_shared=f"""
        import glob, json, os, subprocess, pytest
        L = {load!r}
        ENTRY = {ENTRY_PROGS!r}

        def holders(prog_id):
            pids = set()
            for fi in glob.glob("/proc/[0-9]*/fdinfo/*"):
                try:
                    if f"prog_id:\\t{{prog_id}}\\n" in open(fi).read():
                        pids.add(int(fi.split("/")[2]))
                except OSError:
                    pass
            return pids

        @pytest.mark.leak_budget("1 MiB")   # bpftool's own
        @pytest.mark.parametrize("n", range(3))
        def test_one_program(n):
            out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True).stdout
            progs = [p["id"] for p in json.loads(out) if p.get("name") in ENTRY]
            assert len(progs) == 1, progs
            assert holders(progs[0]) == {{os.getppid()}}

        @pytest.mark.parametrize("n", range(6))
        def test_live(n):
            subprocess.run([L, "live", str(n + 1)], check=True)
    """)
    result, doc = run_plugin("-n", "3")
    result.assert_outcomes(passed=3, failed=6)
    out = result.stdout.str()
    assert "the controller's tracer serves every xdist worker" in out
    assert doc["session"]["workers"] == 3
    leaked = sorted(t["leaked"]["bytes"] for t in doc["tests"] if "test_live" in t["nodeid"])
    assert leaked == [8 * (n + 1) for n in range(6)]


def test_xdist_worker_that_dies_is_dropped_and_the_rest_stay_exact(pytester, run_plugin, load):
    """A worker killed mid-test (its connection to the controller's tracer
    closes): its test is dropped, the replacement worker and the other
    worker's tests keep exact figures."""
    pytester.makepyfile(test_die=f"""
        import os, subprocess, pytest
        L = {load!r}
        def test_a_dies():
            subprocess.run([L, "live", "3"], check=True)
            os._exit(3)
        @pytest.mark.parametrize("n", range(8))
        def test_live(n):
            subprocess.run([L, "live", str(n + 1)], check=True)
    """)
    result, doc = run_plugin("-n", "2")
    out = result.stdout.str()
    assert "crashed" in out, out
    leaked = sorted(t["leaked"]["bytes"] for t in doc["tests"] if "test_live" in t["nodeid"])
    assert leaked == [8 * (n + 1) for n in range(8)]
    assert doc["session"]["workers"] == 3


SITES = "#include <stdlib.h>\n" + "".join(
    f"__attribute__((noinline)) static void s{i}(void) {{ void *p = malloc(8); __asm__ volatile(\"\" :: \"r\"(p) : \"memory\"); free(p); }}\n"
    for i in range(64)) + """
__attribute__((noinline)) static void leak_site(void) { void *p = malloc(24); __asm__ volatile("" :: "r"(p) : "memory"); }
static void (*sites[64])(void) = {""" + ", ".join(f"s{i}" for i in range(64)) + """};
__attribute__((noinline)) static void rec(int d, int i) { if (d) rec(d - 1, i); else sites[i](); __asm__ volatile(""); }
int main(int argc, char **argv) {   /* sites DEPTH N: N freed blocks, each its own stack, then one 24 B leak */
    int depth = atoi(argv[1]), n = atoi(argv[2]);
    for (int i = 0; i < n && i < 64; i++) rec(depth, i);
    leak_site();
    return 0;
}
"""


def test_stacks_are_collected_between_tests_when_the_map_fills(pytester, run_plugin, cbuild):
    """Stacks are shared, so a test's end does not take them: once the stack
    map is half full the unreferenced ones are collected. With room for 64
    stacks, 8 tests of 32+ new stacks each (the call depth differs per test)
    would overflow it without that;
    every test stays complete and exact, its leaking stack named."""
    prog = cbuild("sites", SITES)
    pytester.makepyfile(test_sites=f"""
        import subprocess, pytest
        @pytest.mark.leak_budget("1 KiB")
        @pytest.mark.parametrize("i", range(8))
        def test_sites(i):
            subprocess.run([{str(prog)!r}, str(i), "32"], check=True)
    """)
    result, doc = run_plugin("--ebpf-leaks-max-stacks=64")
    result.assert_outcomes(passed=8)
    assert "leak tracking incomplete" not in result.stdout.str()
    for t in doc["tests"]:
        assert t["tracking_complete"] and not t["incomplete"], t
        (p,) = t["processes"]
        assert p["outstanding"] == {"bytes": 24, "blocks": 1}, t["nodeid"]
        assert p["tracking"]["lost_stacks"] == 0
        (st,) = [s for s in p["stacks"] if not s["suppressed"]]
        assert st["captured"] and any(f["function"] == "leak_site" for f in st["frames"]), st


def test_collecting_a_window_leaves_other_tests_blocks(ebpf, load):
    """Under xdist a worker collects its in-process window while other
    workers' tests run: their processes' live blocks must stay in the map."""
    from pytest_memleak_ebpf.tracer import Tracer

    t = Tracer()
    try:
        t.add_root(os.getpid())
        tid = t.begin_test()
        p = subprocess.Popen([load, "spill", "3"])
        table = t._maps.table
        # the table store holds all 12 blocks; the hash store, the 4 pushed out of the ring
        stored = (lambda: table.count()) if table is not None else (lambda: len(t._maps.blocks.items()))
        want = 12 if table is not None else 4
        deadline = time.time() + 5
        while time.time() < deadline and stored() < want:
            time.sleep(0.02)
        assert stored() == want, "the sleeper's blocks are not in the store"
        t.open_window()
        t.close_window()
        t.collect_window()
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        raw = t.end_test(tid)
        (lp,) = [x for x in raw.processes if x["comm"] == "load"]
        assert sum(b for b, _h, _n in raw.blocks[lp["serial"]]) == 12 * 16
        assert lp["signal"] == signal.SIGKILL
    finally:
        t.close()


def test_xdist_running_processes_and_wait(pytester, run_plugin, load, tmp_path):
    """Under xdist (the controller's tracer, tests of two workers at once): a
    process left running is reported as running by its own test only, and
    --ebpf-leaks-wait waits for it."""
    pidfile = tmp_path / "bg.pid"
    pytester.makepyfile(test_bg=f"""
        import subprocess, time, pytest
        L = {load!r}
        @pytest.mark.leak_budget(None)
        def test_bg():
            p = subprocess.Popen([L, "sleep", "1"])
            open({str(pidfile)!r}, "w").write(str(p.pid))
            deadline = time.time() + 10   # until it sleeps: its block is allocated
            while time.time() < deadline and open(f"/proc/{{p.pid}}/syscall").read().split()[0] not in ("35", "230"):
                time.sleep(0.01)
        @pytest.mark.parametrize("n", range(6))
        def test_live(n):
            subprocess.run([L, "live", str(n + 1)], check=True)
    """)
    for wait in (None, "10"):
        result, doc = run_plugin("-n", "2", *([f"--ebpf-leaks-wait={wait}"] if wait else []))
        bg = int(pidfile.read_text())
        tests = {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}
        (p,) = [x for x in tests["test_bg"]["processes"] if x["pid"] == bg]
        assert p["outstanding"] == {"bytes": 16, "blocks": 1}
        if wait:
            assert p["running_at_test_end"] is False and p["exit_code"] == 0
        else:
            assert p["running_at_test_end"] is True
        others = [x for name, t in tests.items() if name != "test_bg" for x in t["processes"]]
        assert bg not in {x["pid"] for x in others}
        assert sorted(t["leaked"]["bytes"] for n, t in tests.items() if n.startswith("test_live")) == \
            [8 * (n + 1) for n in range(6)]
        time.sleep(1.2)   # the sleeper of the run without wait
