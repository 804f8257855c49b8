#!/usr/bin/env python3
"""The cost of leak kinds (issue 13, "Exactness and speed"): pausing each
exiting process of a test and classifying the blocks it still holds.

    flock /tmp/ebpf.lock .venv/bin/python bench/kinds.py [--quick] [--only small,heap,many,real] [--merge]

Runs bench/setup.sh first (the compiler, sqlite3, xz-utils; --no-setup skips it).

Sections (see bench/README.md, "Leak kinds"):
  small  pause+scan added per exiting small process: bench/kinds_small.c run N
         times in each test of one pytest session, tests alternating between
         `leak_budget(None, kinds="all")` (no pause) and the default kinds; the
         per-process difference of medians, and the Pauser's own seconds;
  heap   a ~100 MB heap (bench/kinds_heap.c: 1,000,000 blocks of 96 B and
         8 of 1 MiB) stopped at exit: exitpause.scan and roots.scan_process
         timed on it, split into reading, classify's phases and the rest; and
         the same program under the plugin, default kinds against kinds=all;
  many   1,000 short-lived processes in one test: untraced, --ebpf-leaks-kinds=all
         and the default kinds, whole sessions interleaved;
  real   sqlite3, sort, xz: untraced, kinds=all and default kinds side by side.

Every pytest session is `python -m pytest --ebpf-leaks ...` on a generated
test file (the plugin as a user runs it), PYTHONPATH set to this checkout.
Writes bench/kinds.json, and its tables into bench/RESULTS.md (between the
`<!-- kinds.py -->` markers; run.py keeps them) and prints them.
Run as root (eBPF), with no other tracer loaded (bench/README.md).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import run as R  # noqa: E402  (bench/run.py: machine info, the foreign-uprobe gate, input generators)

SECTIONS = ("small", "heap", "many", "real")
FULL = dict(small_n=100, small_rounds=6, heap_chains=100_000, heap_runs=5, heap_e2e_runs=3,
            many_n=1000, many_rounds=3, sqlite_rows=100_000, sort_mb=10, xz_kb=600, real_runs=4, real_rounds=2)
QUICK = dict(small_n=50, small_rounds=3, heap_chains=100_000, heap_runs=3, heap_e2e_runs=1,
             many_n=1000, many_rounds=1, sqlite_rows=100_000, sort_mb=10, xz_kb=600, real_runs=2, real_rounds=1)
MARK_BEGIN, MARK_END = "<!-- kinds.py -->", "<!-- /kinds.py -->"


def log(msg: str) -> None:
    print(f"[kinds {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def med(xs):
    return statistics.median(xs) if xs else None


def ms(x):
    return None if x is None else round(x * 1000, 3)


def build(name: str) -> Path:
    src = BENCH / f"{name}.c"
    exe = OUT / name
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["cc", "-O2", "-o", str(exe), str(src)], check=True)
    return exe


# --------------------------------------------------------------------------
# pytest sessions on generated test files
# --------------------------------------------------------------------------

# Loaded by the generated conftest: the Pauser's own time per paused process
# (tracer/exitpause.py: Pauser.at_exit from the EV_EXIT_STOPPED event to the
# SIGCONT; Outcome.seconds of the scan), written at the session's end.
PROBE = '''
import json, os, time

# nothing here may import the plugin's modules (capstone, numpy) at collection:
# the plugin would take them for the tests' extension modules and restart
# pytest with PYTHONMALLOC=malloc (README, "C extension modules"), which a plain
# test session never pays. The wrapping is done at session start, once the
# plugin has imported them itself.
_rec = {"at_exit": [], "scan": [], "blocks": [], "wait_stopped": [], "take_blocks": [], "stop_registers": [],
        "registers": [], "scan_process": [], "stop_waits": []}
_pausers = []


def _timed(key, fn):
    def w(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            _rec[key].append(time.perf_counter() - t0)
    return w


_orig = {}


def scan(pid, blocks, *a, **k):
    from pytest_memleak_ebpf.kinds import roots
    if not hasattr(roots, "_bench_scan_process"):
        roots._bench_scan_process = roots.scan_process
        roots.scan_process = _timed("scan_process", roots.scan_process)
    out = _orig["scan"](pid, blocks, *a, **k)
    _rec["scan"].append(out.seconds)
    _rec["blocks"].append(len(blocks))
    return out


def scan_stopped(self, tgid, serial):
    if not hasattr(self, "_bench_wrapped"):
        self._bench_wrapped = True
        self.take_blocks = _timed("take_blocks", self.take_blocks)
        self.stop_registers = _timed("stop_registers", self.stop_registers)
        _pausers.append(self)
    n = len(_rec["wait_stopped"])
    try:
        return _orig["scan_stopped"](self, tgid, serial)
    finally:
        # a pause that did not wait for /proc to show the stop (the BPF record
        # of it was there) waited 0 s: per-pause medians stay per pause
        _rec["stop_waits"].append(len(_rec["wait_stopped"]) - n)
        if len(_rec["wait_stopped"]) == n:
            _rec["wait_stopped"].append(0.0)


def pytest_sessionstart(session):
    from pytest_memleak_ebpf.tracer import exitpause, watchdog
    _orig.update(scan=exitpause.scan, scan_stopped=exitpause.Pauser._scan_stopped)
    exitpause.Pauser.at_exit = _timed("at_exit", exitpause.Pauser.at_exit)
    exitpause.Pauser._scan_stopped = scan_stopped
    # the registers: the BPF record of the stop, or ptrace through the watchdog
    exitpause.Pauser.registers = _timed("registers", exitpause.Pauser.registers)
    exitpause.wait_stopped = _timed("wait_stopped", exitpause.wait_stopped)
    exitpause.scan = scan


def pytest_sessionfinish(session):
    with open(os.environ["KINDS_BENCH_PROBE"], "w") as f:
        sources = {k: sum(p.register_sources.get(k, 0) for p in _pausers) for k in ("bpf", "ptrace")}
        json.dump(dict(_rec, pythonmalloc=os.environ.get("PYTHONMALLOC"), register_sources=sources), f)
'''

# the test helpers: each run of a command timed inside the test
HELPERS = '''
import json, os, resource, subprocess, time
import pytest

OUT = os.environ["KINDS_BENCH_OUT"]


def _child_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(key, cmd, n=1, stdin=None, stdout=subprocess.DEVNULL):
    # each run: its wall time, and its CPU time (user + system of the child;
    # the pause and the scan run in pytest, not in it)
    ts, cpu = [], []
    for _ in range(n):
        fin = open(stdin, "rb") if stdin else None
        fout = open(stdout, "wb") if isinstance(stdout, str) else stdout
        try:
            c0 = _child_cpu()
            t0 = time.perf_counter()
            subprocess.run(cmd, stdin=fin, stdout=fout, check=True)
            ts.append(time.perf_counter() - t0)
            cpu.append(_child_cpu() - c0)
        finally:
            for fh in (fin, fout if isinstance(stdout, str) else None):
                if fh:
                    fh.close()
    with open(OUT, "a") as f:
        f.write(json.dumps({"key": key, "n": n, "loop_s": sum(ts), "times": ts, "cpu": cpu}) + "\\n")
'''


class Session:
    """A work directory with a generated test file, and timed pytest runs on it."""

    def __init__(self, name: str, tests: str, warm: list, env: dict | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix=f"kinds-{name}-", dir=OUT))
        (self.dir / "pytest.ini").write_text("[pytest]\n")   # rootdir here, no config from above
        (self.dir / "conftest.py").write_text(PROBE)
        (self.dir / "bench_helpers.py").write_text(HELPERS)
        # the first test runs each program once: its exec pause (first exec of an
        # executable, README "How it works") stays out of the timed tests
        warmup = ("@pytest.mark.leak_budget(None)\ndef test_0_warmup():\n"
                  + "".join(f"    subprocess.run({c!r}, stdout=subprocess.DEVNULL)\n" for c in warm))
        (self.dir / "test_kinds_bench.py").write_text(
            "import os, subprocess\nfrom bench_helpers import timed, pytest\n\n" + warmup + "\n\n" + tests)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        self.env.update(env or {})
        self.env["PYTHONPATH"] = os.pathsep.join([str(self.dir), R.CODE["path"]])
        self.env["LC_ALL"] = "C"

    def run(self, mode: str, extra=()) -> dict:
        """One session: mode "off" (no plugin), "all" (--ebpf-leaks-kinds=all) or
        "default" (--ebpf-leaks, default kinds; markers may change a test's)."""
        out, probe, rep = self.dir / "times.jsonl", self.dir / "probe.json", self.dir / "leaks.json"
        for p in (out, probe, rep):
            p.unlink(missing_ok=True)
        args = {"off": [], "all": ["--ebpf-leaks", "--ebpf-leaks-kinds=all"], "default": ["--ebpf-leaks"]}[mode]
        if mode != "off":
            args += [f"--ebpf-leaks-json={rep}"]
        env = dict(self.env, KINDS_BENCH_OUT=str(out), KINDS_BENCH_PROBE=str(probe))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, *extra, "test_kinds_bench.py"]
        wall, cpu = R.gated(lambda: R.run_proc(cmd, cwd=self.dir, env=env, what=f"pytest ({mode})"))
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        res = {"mode": mode, "wall_s": wall, "cpu_s": cpu, "records": recs,
               "probe": json.loads(probe.read_text()) if probe.exists() else None,
               "report": json.loads(rep.read_text()) if rep.exists() else None}
        return res

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def processes(report: dict | None, comm: str | None = None) -> list[dict]:
    if not report:
        return []
    return [p for t in report["tests"] for p in t["processes"] if comm is None or p["comm"] == comm]


def classified_count(report, comm=None) -> dict:
    ps = processes(report, comm)
    reasons = sorted({p.get("reason", "") for p in ps if not p.get("classified")})
    return {"processes": len(ps), "classified": sum(1 for p in ps if p.get("classified")),
            "reasons": reasons}


# --------------------------------------------------------------------------
# small: pause+scan per exiting small process
# --------------------------------------------------------------------------

def bench_small(cfg: dict, res: dict) -> None:
    prog = build("kinds_small")
    n, rounds = cfg["small_n"], cfg["small_rounds"]
    tests = []
    for i in range(rounds):
        for key in ("all", "default") if i % 2 == 0 else ("default", "all"):
            mark = '@pytest.mark.leak_budget(None, kinds="all")' if key == "all" else "@pytest.mark.leak_budget(None)"
            tests.append(f"{mark}\ndef test_{key}_{i}():\n    timed({key!r}, [{str(prog)!r}], n={n})\n")
    s = Session("small", "\n\n".join(tests), [[str(prog)]])
    try:
        s.run("off")   # warm-up: bytecode, page cache
        r = s.run("default")
    finally:
        s.close()
    times = {k: [t for rec in r["records"] if rec["key"] == k for t in rec["times"][1:]] for k in ("all", "default")}
    m_all, m_def = med(times["all"]), med(times["default"])
    pr = r["probe"] or {}
    scans = pr.get("scan", [])
    res["small"] = {
        "what": f"{prog.name} (exits holding 2 blocks: 1 reachable, 1 lost) run {n} times in each of "
                f"{rounds} tests per kinds setting, alternating, one session",
        "runs_per_setting": len(times["all"]),
        "per_process_ms": {"kinds_all": ms(m_all), "default_kinds": ms(m_def)},
        "added_per_process_ms": ms(m_def - m_all),
        "pauser_at_exit_ms": ms(med(pr.get("at_exit", []))),
        "pauser_scan_ms": ms(med(scans)),
        "pauser_split_ms": {k: ms(med(v)) for k, v in pr.items() if isinstance(v, list)
                            and k not in ("blocks", "stop_waits")},
        "pauses_that_waited_for_the_stop": sum(1 for w in pr.get("stop_waits", []) if w),
        "register_sources": pr.get("register_sources"),
        "pythonmalloc": pr.get("pythonmalloc"),
        "pauses": len(pr.get("at_exit", [])),
        "blocks_per_scan": med(pr.get("blocks", [])),
        "classified": classified_count(r["report"], prog.name[:15]),
        "session_wall_s": round(r["wall_s"], 3),
    }
    log(f"small: {res['small']}")


# --------------------------------------------------------------------------
# heap: a 100 MB heap
# --------------------------------------------------------------------------

def heap_expected(chains: int, lost_every: int) -> dict:
    lost = sum(1 for c in range(chains) if c % lost_every == 0)
    possible = sum(1 for c in range(chains) if c % lost_every and c % 20 == 5)
    reach = chains - lost - possible
    big = 1 << 20
    return {"definite": (lost * 96 + 4 * big, lost + 4), "indirect": (lost * 9 * 96, lost * 9),
            "possible": (possible * 10 * 96, possible * 10),
            "reachable": (reach * 10 * 96 + 4 * big + 8 * chains, reach * 10 + 5)}


def scan_once(pid: int, blocks, starts, sizes) -> dict:
    """exitpause.scan (the Pauser's path, from the block list to the per-block
    kinds), then roots.scan_process with its time split."""
    import importlib

    from pytest_memleak_ebpf.kinds import memory as M
    from pytest_memleak_ebpf.kinds import roots
    from pytest_memleak_ebpf.tracer import exitpause

    t0 = time.perf_counter()
    out = exitpause.scan(pid, blocks, limit=600.0)
    whole = time.perf_counter() - t0
    if out.kinds is None:
        raise R.BenchError(f"the scan failed: {out.reason}")
    # the split: wrap what scan_process calls (module attributes, restored after)
    split = {"registers": 0.0, "read": 0.0, "classify": 0.0}
    phases: dict = {}
    PM = M.ProcessMemory
    orig = (roots.classify, PM.read_many, roots.thread_registers, PM.prefetch, PM.words_many)
    depth = [0]

    def timed(key, fn):
        def w(*a, **k):
            t = time.perf_counter()
            depth[0] += 1
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0 or key != "read":     # a read inside a read counts once
                    split[key] += time.perf_counter() - t
        return w

    C = importlib.import_module("pytest_memleak_ebpf.kinds.classify")

    def classify(*a, **k):
        return C.classify(*a, timings=phases, **k)

    roots.classify = timed("classify", classify)
    PM.read_many, PM.prefetch, PM.words_many = timed("read", orig[1]), timed("read", orig[3]), timed("read", orig[4])
    roots.thread_registers = timed("registers", orig[2])
    try:
        t0 = time.perf_counter()
        sc = roots.scan_process(pid, starts, sizes)
        total = time.perf_counter() - t0
    finally:
        roots.classify, PM.read_many, roots.thread_registers, PM.prefetch, PM.words_many = orig
    return {"exitpause_scan_s": whole, "outcome_seconds": out.seconds, "scan_process_s": total,
            "registers_s": split["registers"], "read_s": split["read"], "classify_s": split["classify"],
            "classify_phases_s": phases, "rest_s": total - sum(split.values()),
            "summary": sc.classification.summary(), "root_bytes": sc.root_bytes}


def heap_case(cfg: dict, lost_every: int) -> dict:
    import numpy as np

    prog = build("kinds_heap")
    chains = cfg["heap_chains"]
    lst = OUT / f"kinds_heap-{os.getpid()}.list"
    from pytest_memleak_ebpf.tracer import exitpause
    p = subprocess.Popen([str(prog), str(chains), str(lost_every), str(lst)])
    try:
        if not exitpause.wait_stopped(p.pid, 120):
            raise R.BenchError("kinds_heap did not stop")
        raw = np.fromfile(lst, dtype=np.uint64).reshape(-1, 2)
        starts, sizes = raw[:, 0].copy(), raw[:, 1].copy()
        blocks = list(zip(starts.tolist(), sizes.tolist()))
        with open(f"/proc/{p.pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024
        runs = [R.gated(lambda: scan_once(p.pid, blocks, starts, sizes)) for _ in range(cfg["heap_runs"])]
    finally:
        os.kill(p.pid, signal.SIGCONT)
        p.wait()
        lst.unlink(missing_ok=True)
    expected = {k: list(v) for k, v in heap_expected(chains, lost_every).items()}
    got = {k: list(v) for k, v in runs[-1]["summary"].items()}
    keys = ("exitpause_scan_s", "outcome_seconds", "scan_process_s", "registers_s", "read_s", "classify_s", "rest_s")
    phase_keys = sorted({k for r in runs for k in r["classify_phases_s"]})
    return {
        "blocks": int(starts.size), "block_bytes": int(sizes.sum()), "rss_bytes": rss,
        "root_bytes": runs[-1]["root_bytes"], "lost_every": lost_every,
        "first": {k: round(runs[0][k], 4) for k in keys},
        "median": {k: round(med([r[k] for r in runs]), 4) for k in keys},
        "classify_phases_median_s": {k: round(med([r["classify_phases_s"].get(k, 0.0) for r in runs]), 4)
                                     for k in phase_keys},
        "runs": len(runs), "samples_exitpause_scan_s": [round(r["exitpause_scan_s"], 4) for r in runs],
        "summary": got, "expected": expected, "exact": got == expected,
    }


def bench_heap(cfg: dict, res: dict) -> None:
    out = res.setdefault("heap", {})
    out["cases"] = {}
    for key, every, what in (("mixed", 10, "1 chain in 10 lost, 1 in 20 possibly lost, the rest reachable"),
                             ("all_lost", 1, "every chain lost (the clique pass over 1,000,000 blocks)")):
        d = heap_case(cfg, every)
        d["what"] = what
        out["cases"][key] = d
        log(f"heap {key}: {d['median']} exact={d['exact']}")
    # the same program under the plugin, exiting normally: default kinds vs kinds=all
    prog = build("kinds_heap")
    n = cfg["heap_e2e_runs"]
    tests = []
    for i in range(n):
        for key in ("all", "default"):
            mark = '@pytest.mark.leak_budget(None, kinds="all")' if key == "all" else "@pytest.mark.leak_budget(None)"
            tests.append(f"{mark}\ndef test_{key}_{i}():\n    timed({key!r}, [{str(prog)!r}, "
                         f"'{cfg['heap_chains']}', '10', '-'])\n")
    s = Session("heap", "\n\n".join(tests), [[str(prog), "1", "10", "-"]])
    try:
        r = s.run("default")
    finally:
        s.close()
    t = {k: [x for rec in r["records"] if rec["key"] == k for x in rec["times"]] for k in ("all", "default")}
    pr = r["probe"] or {}
    # the pauses of the big process (the warm-up test's is tiny)
    big = [i for i, b in enumerate(pr.get("blocks", [])) if b > 1000]
    pick = lambda key: [pr[key][i] for i in big if i < len(pr.get(key, []))]  # noqa: E731
    out["plugin"] = {
        "what": f"kinds_heap {cfg['heap_chains']} 10 - (exits normally) in one session, {n} test(s) per setting",
        "process_s": {"kinds_all": round(med(t["all"]), 3), "default_kinds": round(med(t["default"]), 3)},
        "added_s": round(med(t["default"]) - med(t["all"]), 3),
        "pauser_s": {k: round(med(pick(k)), 3) for k in ("at_exit", "wait_stopped", "take_blocks", "registers", "scan",
                                                          "scan_process") if pick(k)},
        "blocks_per_scan": med(pick("blocks")),
        "classified": classified_count(r["report"], "kinds_heap"),
        "reachability": (processes(r["report"], "kinds_heap") or [{}])[-1].get("reachability"),
    }
    log(f"heap plugin: {out['plugin']}")


# --------------------------------------------------------------------------
# many: 1,000 short-lived processes in one test
# --------------------------------------------------------------------------

def bench_many(cfg: dict, res: dict) -> None:
    prog = build("kinds_small")
    n = cfg["many_n"]
    s = Session("many", f"@pytest.mark.leak_budget(None)\ndef test_many():\n    timed('many', [{str(prog)!r}], n={n})\n",
                [[str(prog)]])
    runs: dict[str, list] = {"off": [], "all": [], "default": []}
    try:
        s.run("off")   # warm-up
        for i in range(cfg["many_rounds"]):
            for mode in ("off", "all", "default") if i % 2 == 0 else ("default", "all", "off"):
                r = s.run(mode)
                runs[mode].append(r)
                log(f"many {mode}: loop {r['records'][0]['loop_s']:.3f} s, session {r['wall_s']:.2f} s")
    finally:
        s.close()
    loop = {m: med([r["records"][0]["loop_s"] for r in rs]) for m, rs in runs.items()}
    wall = {m: med([r["wall_s"] for r in rs]) for m, rs in runs.items()}
    last = runs["default"][-1]
    res["many"] = {
        "what": f"one test running {prog.name} {n} times (subprocess.run), a session per setting, "
                f"{cfg['many_rounds']} round(s) interleaved",
        "loop_s": {m: round(v, 3) for m, v in loop.items()},
        "session_wall_s": {m: round(v, 3) for m, v in wall.items()},
        "loop_samples_s": {m: [round(r["records"][0]["loop_s"], 3) for r in rs] for m, rs in runs.items()},
        "default_over_all_loop": round(loop["default"] / loop["all"], 3),
        "default_over_all_session": round(wall["default"] / wall["all"], 3),
        "all_over_off_loop": round(loop["all"] / loop["off"], 3),
        "per_process_ms": {m: round(v / n * 1000, 3) for m, v in loop.items()},
        "pauses": len((last["probe"] or {}).get("at_exit", [])),
        "pauser_at_exit_ms": ms(med((last["probe"] or {}).get("at_exit", []))),
        "pauser_split_ms": {k: ms(med(v)) for k, v in (last["probe"] or {}).items()
                            if isinstance(v, list) and k not in ("blocks", "stop_waits")},
        "pauses_that_waited_for_the_stop": sum(1 for w in (last["probe"] or {}).get("stop_waits", []) if w),
        "register_sources": (last["probe"] or {}).get("register_sources"),
        # the block map holds every exited process's blocks until the test ends: does listing one
        # process's blocks grow with it?
        "take_blocks_ms_first_last_100": [ms(med((last["probe"] or {}).get("take_blocks", [])[1:101])),
                                          ms(med((last["probe"] or {}).get("take_blocks", [])[-100:]))],
        "classified": classified_count(last["report"]),
    }
    log(f"many: {res['many']}")


# --------------------------------------------------------------------------
# real: sqlite3, sort, xz
# --------------------------------------------------------------------------

def bench_real(cfg: dict, res: dict) -> None:
    work = Path(tempfile.mkdtemp(prefix="kinds-real-", dir=OUT))
    try:
        sql = work / "script.sql"
        R.gen_sqlite(sql, cfg["sqlite_rows"])
        sort_in = work / "lines.txt"
        R.gen_lines(sort_in, cfg["sort_mb"] * 1_000_000, 1)
        xz_in = work / "xz-input.txt"
        R.gen_lines(xz_in, cfg["xz_kb"] * 1000, 2)
        db = work / "bench.db"
        progs = {
            "sqlite3": (f"sqlite3 db < script.sql ({cfg['sqlite_rows']:,}-row insert via a recursive CTE, "
                        f"2 indexes, 2 queries)",
                        f"    if os.path.exists({str(db)!r}):\n        os.unlink({str(db)!r})\n"
                        f"    timed('sqlite3', ['sqlite3', {str(db)!r}], stdin={str(sql)!r})\n"),
            "sort": (f"sort -o out in ({cfg['sort_mb']} MB of random text lines, LC_ALL=C)",
                     f"    timed('sort', ['sort', '-o', {str(work / 'sorted.txt')!r}, {str(sort_in)!r}])\n"),
            "xz": (f"xz -9 -T1 -c in > out ({cfg['xz_kb']} kB of random text lines)",
                   f"    timed('xz', ['xz', '-9', '-T1', '-c', {str(xz_in)!r}], stdout={str(work / 'out.xz')!r})\n"),
        }
        tests = []
        for i in range(cfg["real_runs"]):
            for key, (_, body) in progs.items():
                tests.append(f"@pytest.mark.leak_budget(None)\ndef test_{key}_{i}():\n{body}")
        s = Session("real", "\n\n".join(tests), [["sqlite3", "--version"], ["sort", "--version"], ["xz", "--version"]])
        runs: dict[str, list] = {"off": [], "all": [], "default": []}
        try:
            s.run("off")   # warm-up: page cache
            for i in range(cfg["real_rounds"]):
                for mode in ("off", "all", "default") if i % 2 == 0 else ("default", "all", "off"):
                    r = s.run(mode)
                    runs[mode].append(r)
                    log(f"real {mode}: session {r['wall_s']:.2f} s")
        finally:
            s.close()
        out = {}
        for key, (what, _) in progs.items():
            t = {m: med([x for r in rs for rec in r["records"] if rec["key"] == key for x in rec["times"]])
                 for m, rs in runs.items()}
            c = {m: med([x for r in rs for rec in r["records"] if rec["key"] == key for x in rec.get("cpu", [])])
                 for m, rs in runs.items()}
            rep = runs["default"][-1]["report"]
            ps = processes(rep, key)
            out[key] = {
                "what": what,
                "s": {m: round(v, 4) for m, v in t.items()},
                "cpu_s": {m: round(v, 4) for m, v in c.items()},
                "slowdown_all_cpu": round(c["all"] / c["off"], 3),
                "slowdown_default_cpu": round(c["default"] / c["off"], 3),
                "slowdown_all": round(t["all"] / t["off"], 3),
                "slowdown_default": round(t["default"] / t["off"], 3),
                "default_over_all": round(t["default"] / t["all"], 3),
                "added_by_kinds_ms": ms(t["default"] - t["all"]),
                "samples": sum(len(rec["times"]) for r in runs["off"] for rec in r["records"] if rec["key"] == key),
                "classified": classified_count(rep, key),
                "outstanding_at_exit": ps[-1]["outstanding"] if ps else None,
                "reachability": ps[-1].get("reachability") if ps else None,
            }
        res["real"] = {"programs": out, "sessions_per_setting": cfg["real_rounds"], "runs_per_session": cfg["real_runs"]}
        log(f"real: {json.dumps(out)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

def _f(x, nd=2, unit=""):
    if x is None:
        return "–"
    return f"{x:,.{nd}f}{unit}"


_SPLIT = ("wait_stopped", "take_blocks", "stop_registers", "registers", "scan_process")


def _sources_text(src) -> str:
    if not src:
        return ""
    return f" ({src.get('bpf', 0)} from the BPF record of the stop, {src.get('ptrace', 0)} through ptrace)"


def _waits_text(d: dict) -> str:
    w = d.get("pauses_that_waited_for_the_stop")
    if w is None:
        return ""
    return (f" (0 when the BPF record of the stop was there at once; {w} of {d.get('pauses')} pauses waited for "
            f"/proc to show it)")


def _split_text(sp: dict, src=None, d=None) -> str:
    if not sp:
        return ""
    return (f"Per pause, in the Pauser (ms): waiting for the stop {_f(sp.get('wait_stopped'), 3)}"
            f"{_waits_text(d or {})}, listing the "
            f"process's blocks from the BPF map (take_blocks) {_f(sp.get('take_blocks'), 3)}, taking the BPF "
            f"record of the registers at the stop {_f(sp.get('stop_registers'), 3)}, the threads' registers "
            f"{_f(sp.get('registers'), 3)}{_sources_text(src)}, roots.scan_process "
            f"{_f(sp.get('scan_process'), 3)}; the rest (SIGCONT, the kinds dict) "
            f"{_f((sp.get('at_exit') or 0) - sum(sp.get(k) or 0 for k in _SPLIT), 3)}.")


def markdown(res: dict) -> str:
    mi = res.get("machine", {})
    L = [MARK_BEGIN, "## Leak kinds: the pause and the scan (`bench/kinds.py`, issue 13)\n"]
    L.append(f"Written by `bench/kinds.py{' --quick' if res.get('quick') else ''}`; sections run at: "
             + ", ".join(f"{k} {v['date']} ({v['seconds']:.0f} s, load {v['loadavg']})"
                         for k, v in res.get("sections", {}).items())
             + f". Machine: {mi.get('cpu')}, {mi.get('cores')} cores; kernel {mi.get('kernel')}; "
               f"glibc {mi.get('glibc')}; Python {mi.get('python')}; commit {mi.get('git_commit')}"
               f"{' (+ uncommitted changes)' if mi.get('git_dirty') else ''}. Medians; wall time.\n")
    L.append("| target (issue 13) | measured | met |")
    L.append("|---|---|---|")
    for t in targets(res):
        L.append(f"| {t['target']} | {t['measured']} | {t['met']} |")
    L.append("")
    sm = res.get("small")
    if sm:
        L.append(f"**Per exiting small process** — {sm['what']}: {_f(sm['per_process_ms']['kinds_all'], 3)} ms "
                 f"a process with kinds=all, {_f(sm['per_process_ms']['default_kinds'], 3)} ms with the default "
                 f"kinds: **+{_f(sm['added_per_process_ms'], 3)} ms**. The Pauser's own time per pause (event to "
                 f"SIGCONT) {_f(sm['pauser_at_exit_ms'], 3)} ms, of which the scan (Outcome.seconds) "
                 f"{_f(sm['pauser_scan_ms'], 3)} ms; {sm['pauses']} pauses, "
                 f"{sm['classified']['classified']}/{sm['classified']['processes']} processes classified. "
                 + _split_text(sm.get("pauser_split_ms") or {}, sm.get("register_sources"), sm) + "\n")
    hp = res.get("heap")
    if hp:
        L.append("**A 100 MB heap** (`kinds_heap`: 1,000,000 blocks of 96 B in chains of 10 and 8 of 1 MiB, "
                 "stopped at exit; seconds, median of the runs, first run in brackets):\n")
        L.append("| case | blocks | exitpause.scan (the Pauser's path) | scan_process | registers | reading "
                 "(process_vm_readv: prefetch, words_many, read_many) | classify | of which: blocks / pointers / marking / cliques | rest | "
                 "kinds exact |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for key, d in hp.get("cases", {}).items():
            m, f0, ph = d["median"], d["first"], d["classify_phases_median_s"]
            L.append(f"| {d['what']} | {d['blocks']:,} ({d['block_bytes'] / 1e6:.0f} MB) | "
                     f"{_f(m['exitpause_scan_s'], 3)} ({_f(f0['exitpause_scan_s'], 3)}) | "
                     f"{_f(m['scan_process_s'], 3)} ({_f(f0['scan_process_s'], 3)}) | {_f(m['registers_s'], 3)} | "
                     f"{_f(m['read_s'], 3)} | {_f(m['classify_s'], 3)} | "
                     + " / ".join(_f(ph.get(k), 3) for k in ("blocks", "pointers", "marking", "cliques"))
                     + f" | {_f(m['rest_s'], 3)} | {'yes' if d['exact'] else 'NO: ' + json.dumps(d['summary'])} |")
        pl = hp.get("plugin")
        if pl:
            L.append("")
            L.append(f"Under the plugin ({pl['what']}): {_f(pl['process_s']['kinds_all'], 3)} s with kinds=all, "
                     f"{_f(pl['process_s']['default_kinds'], 3)} s with the default kinds (+{_f(pl['added_s'], 3)} s); "
                     f"the Pauser's time per pause {_f(pl['pauser_s'].get('at_exit'), 3)} s: listing the "
                     f"process's blocks from the BPF map (take_blocks) {_f(pl['pauser_s'].get('take_blocks'), 3)} s "
                     f"({_f(pl['blocks_per_scan'], 0)} blocks), registers {_f(pl['pauser_s'].get('registers'), 3)} s, "
                     f"the scan (exitpause.scan) {_f(pl['pauser_s'].get('scan'), 3)} s, of which scan_process "
                     f"{_f(pl['pauser_s'].get('scan_process'), 3)} s.")
        L.append("")
    mn = res.get("many")
    if mn:
        L.append(f"**1,000 short-lived processes** — {mn['what']}: loop time in the test "
                 f"(whole session in brackets), seconds:\n")
        L.append("| untraced | --ebpf-leaks-kinds=all | default kinds | default ÷ all | all ÷ untraced |")
        L.append("|---|---|---|---|---|")
        lo, sw = mn["loop_s"], mn["session_wall_s"]
        L.append(f"| {_f(lo['off'], 3)} ({_f(sw['off'], 2)}) | {_f(lo['all'], 3)} ({_f(sw['all'], 2)}) | "
                 f"{_f(lo['default'], 3)} ({_f(sw['default'], 2)}) | {_f(mn['default_over_all_loop'], 2)}× "
                 f"({_f(mn['default_over_all_session'], 2)}×) | {_f(mn['all_over_off_loop'], 2)}× |")
        sp = mn.get("pauser_split_ms") or {}
        if sp:
            fl = mn.get("take_blocks_ms_first_last_100") or [None, None]
            L.append("")
            L.append(f"Per pause (default kinds, ms): {_f(sp.get('at_exit'), 3)} in the Pauser — waiting for the "
                     f"stop {_f(sp.get('wait_stopped'), 3)}{_waits_text(mn)}, listing the blocks from the BPF map "
                     f"{_f(sp.get('take_blocks'), 3)} (first 100 processes {_f(fl[0], 3)}, last 100 {_f(fl[1], 3)}: the "
                     f"map holds every exited process's blocks until the test ends), registers "
                     f"{_f(sp.get('registers'), 3)}{_sources_text(mn.get('register_sources'))}, scan_process {_f(sp.get('scan_process'), 3)}; "
                     f"{mn['classified']['classified']}/{mn['classified']['processes']} processes classified.")
        L.append("")
    rl = res.get("real")
    if rl:
        L.append(f"**Real programs** — each run timed inside its test; {rl['sessions_per_setting']} session(s) per "
                 f"setting × {rl['runs_per_session']} runs, interleaved; seconds:\n")
        L.append("| program | untraced | kinds=all | default kinds | slowdown all / default | the program's "
                 "CPU time: untraced / all / default (slowdowns) | added by the pause and scan | blocks at exit: "
                 "lost / possible / reachable / unclassified |")
        L.append("|---|---|---|---|---|---|---|---|")
        for key, d in rl["programs"].items():
            rc = d.get("reachability") or {}
            kinds = " / ".join(
                f"{sum(rc.get(k, {}).get('blocks', 0) for k in ks):,}"
                for ks in (("definite", "indirect"), ("possible",), ("reachable",), ("unclassified",)))
            L.append(f"| {d['what']} | {_f(d['s']['off'], 3)} | {_f(d['s']['all'], 3)} | "
                     f"{_f(d['s']['default'], 3)} | {_f(d['slowdown_all'], 2)}× / {_f(d['slowdown_default'], 2)}× | "
                     + (f"{_f(d['cpu_s']['off'], 3)} / {_f(d['cpu_s']['all'], 3)} / {_f(d['cpu_s']['default'], 3)} "
                        f"({_f(d['slowdown_all_cpu'], 2)}× / {_f(d['slowdown_default_cpu'], 2)}×)" if "cpu_s" in d else "–")
                     + f" | {_f(d['added_by_kinds_ms'], 1)} ms | {kinds} |")
        L.append("")
    if res.get("errors"):
        L.append("Errors: " + "; ".join(res["errors"]) + "\n")
    L.append(MARK_END)
    return "\n".join(L)


def targets(res: dict) -> list[dict]:
    out = []

    def row(target, measured, ok):
        out.append({"target": target, "measured": measured, "met": "–" if ok is None else ("yes" if ok else "no")})
    sm = res.get("small")
    if sm:
        a = sm["added_per_process_ms"]
        row("pause+scan ≤ 2 ms per exiting small process", f"+{_f(a, 3)} ms", a is not None and a <= 2)
    hp = res.get("heap", {}).get("cases", {})
    for key, d in hp.items():
        m = d["median"]
        row(f"100 MB heap scanned in < 1 s ({key.replace('_', ' ')})",
            f"{_f(m['exitpause_scan_s'], 3)} s (scan_process {_f(m['scan_process_s'], 3)} s)",
            m["exitpause_scan_s"] < 1)
    mn = res.get("many")
    if mn:
        row("1,000 short-lived processes: default kinds ≤ 1.5× kinds=all",
            f"{_f(mn['default_over_all_loop'], 2)}× (session {_f(mn['default_over_all_session'], 2)}×)",
            mn["default_over_all_loop"] <= 1.5)
    rl = res.get("real")
    if rl:
        row("sqlite3 / sort / xz slowdown, kinds=all and default side by side",
            "; ".join(f"{k} {_f(d['slowdown_all'], 2)}× / {_f(d['slowdown_default'], 2)}×"
                      for k, d in rl["programs"].items()), None)
    return out


def write_results_md(md: str, path: Path) -> None:
    text = path.read_text() if path.exists() else ""
    if MARK_BEGIN in text and MARK_END in text:
        a = text.index(MARK_BEGIN)
        b = text.index(MARK_END) + len(MARK_END)
        text = text[:a] + md + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + md + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=textwrap.dedent(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer runs")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--merge", action="store_true", help="keep the other sections' results from bench/kinds.json")
    ap.add_argument("--json", default=str(BENCH / "kinds.json"))
    ap.add_argument("--md", default=str(BENCH / "RESULTS.md"))
    ap.add_argument("--render-only", action="store_true", help="rewrite the RESULTS.md section from kinds.json")
    ap.add_argument("--no-setup", action="store_true", help="skip bench/setup.sh (compiler, sqlite3, xz-utils)")
    args = ap.parse_args(argv)
    if args.render_only:
        md = markdown(json.loads(Path(args.json).read_text()))
        write_results_md(md, Path(args.md))
        print(md)
        return 0
    if os.geteuid() != 0:
        print("bench/kinds.py: must run as root (eBPF)", file=sys.stderr)
        return 2
    only = [s for s in args.only.split(",") if s] or list(SECTIONS)
    bad = set(only) - set(SECTIONS)
    if bad:
        ap.error(f"unknown section(s): {', '.join(sorted(bad))}")
    if not args.no_setup:
        subprocess.run(["bash", str(BENCH / "setup.sh")], check=True)
    OUT.mkdir(exist_ok=True)
    cfg = dict(QUICK if args.quick else FULL)
    res: dict = {}
    if args.merge and Path(args.json).is_file():
        res = json.loads(Path(args.json).read_text())
    res.update({"quick": args.quick, "config": cfg, "machine": R.machine_info()})
    res.setdefault("sections", {})
    R.GATE.start()   # before any tracer is loaded
    funcs = {"small": bench_small, "heap": bench_heap, "many": bench_many, "real": bench_real}
    try:
        for s in only:
            la = R.loadavg()
            log(f"== {s} (load average {la})")
            t0 = time.monotonic()
            meta = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "loadavg": la,
                    "quick": args.quick}
            try:
                funcs[s](cfg, res)
            except Exception as e:  # noqa: BLE001 - reported in both files
                meta["error"] = f"{type(e).__name__}: {e}"
                log(f"{s} failed: {e}")
            meta["seconds"] = round(time.monotonic() - t0, 1)
            meta["gate"] = R.GATE.as_dict()
            res["sections"][s] = meta
    finally:
        R.GATE.stop()
    res["errors"] = [f"{s}: {m['error']}" for s, m in res["sections"].items() if m.get("error")]
    res["targets"] = targets(res)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    write_results_md(md, Path(args.md))
    print(md)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
