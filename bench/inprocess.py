#!/usr/bin/env python3
"""In-process checking overhead on an extension-heavy test run.

Runs a generated suite of N tests calling the example project's C extension
(kvext.parse_pairs, clean) under: plain pytest, --ebpf-leaks with in-process
checking off, --ebpf-leaks (extensions mode: pymalloc kept, its functions
probed in each test's window), and --ebpf-leaks in a session started with
PYTHONMALLOC=malloc (every Python allocation meets the libc probes, as after
the restart used where pymalloc cannot be probed). Medians of several whole-session runs (wall and CPU of
the pytest process tree). Writes bench/inprocess.json and prints a table.

    .venv/bin/python bench/inprocess.py [--tests 300] [--runs 3]
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEST = '''
import pytest, kvext
@pytest.mark.parametrize("i", range({n}))
def test_parse(i):
    d = kvext.parse_pairs(";".join(f"k{{j}}={{j * i}}" for j in range(50)))
    assert len(d) == 50
'''


def session(cwd, args):
    env = dict(os.environ)
    while args and args[0].startswith("ENV:"):
        key, _, value = args[0][4:].partition("=")
        env[key] = value
        args = args[1:]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=cwd,
                       capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"pytest {' '.join(args)} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-inprocess-")
    try:
        ex = os.path.join(work, "example_project")
        shutil.copytree(os.path.join(ROOT, "example_project"), ex,
                        ignore=shutil.ignore_patterns("build", "__pycache__"))
        subprocess.run(["make", "-s", "-C", ex, f"PYTHON={sys.executable}"], check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(ex, "tests", "test_bench_ext.py"), "w") as f:
            f.write(TEST.format(n=a.tests))
        target = "tests/test_bench_ext.py"
        cases = {
            "plain pytest": [target],
            "--ebpf-leaks --ebpf-leaks-in-process=off": ["--ebpf-leaks", "--ebpf-leaks-in-process=off", target],
            "--ebpf-leaks (in-process: extensions, pymalloc probed in the windows)": ["--ebpf-leaks", target],
            "--ebpf-leaks with PYTHONMALLOC=malloc (in-process: extensions)":
                ["ENV:PYTHONMALLOC=malloc", "--ebpf-leaks", target],
        }
        res = {}
        for name, args in cases.items():
            session(ex, args)  # warm-up
            samples = [session(ex, args) for _ in range(a.runs)]
            res[name] = {"wall_s": statistics.median(s[0] for s in samples),
                         "cpu_s": statistics.median(s[1] for s in samples),
                         "samples": samples}
        base = res["plain pytest"]
        off = res["--ebpf-leaks --ebpf-leaks-in-process=off"]
        lines = [f"In-process overhead, {a.tests} tests calling a C extension (medians of {a.runs} sessions)", "",
                 "| session | wall (s) | CPU (s) | per test vs in-process off (ms, CPU) |", "|---|---|---|---|"]
        for name, r in res.items():
            per = (r["cpu_s"] - off["cpu_s"]) / a.tests * 1000
            lines.append(f"| {name} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
                         f"{per:+.2f} |" if name != "plain pytest" else
                         f"| {name} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | — |")
        print("\n".join(lines))
        out = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tests": a.tests, "runs": a.runs, "results": res,
               "table": lines}
        with open(os.path.join(ROOT, "bench", "inprocess.json"), "w") as f:
            json.dump(out, f, indent=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
