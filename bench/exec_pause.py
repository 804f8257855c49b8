"""The cost of the exec pause (issue 14): a tracked process that execs an
executable the session has not resolved is stopped at exec until its
allocator is resolved (and probed); an executable seen before runs with no
pause.

Measures, with the session's tracer loaded and a test open (tracer.core used
directly, as the plugin does):
  * first exec: wall time of running a never-seen executable (a fresh copy
    of a small glibc program: a new inode) against running one already
    resolved, and how long the process stayed stopped (the tracer's own sum);
    also for a program linked with jemalloc (a first exec that probes a new
    allocator) when libjemalloc is installed;
  * 1,000 runs: a test that runs the same binary 1,000 times, with the tracer
    (one pause, then none) and without any tracer.

Run as root, under the machine-wide lock:
  flock /tmp/ebpf.lock .venv/bin/python bench/exec_pause.py [--quick]
Writes bench/exec_pause.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "fixtures", "alloc"))

import builds  # noqa: E402

PROGRAM = "#include <stdlib.h>\nint main(void) { free(malloc(64)); return 0; }\n"


def _run(exe: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([exe], check=True)
    return time.perf_counter() - t0


def _ms(xs) -> float:
    return round(statistics.median(xs) * 1000, 3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    fresh_n = 10 if args.quick else 40
    runs = 1000

    from pytest_memleak_ebpf.tracer import Tracer

    work = tempfile.mkdtemp(prefix="exec-pause-")
    try:
        src = os.path.join(work, "p.c")
        with open(src, "w") as f:
            f.write(PROGRAM)
        base = os.path.join(work, "p")
        subprocess.run(["gcc", "-O1", "-o", base, src], check=True)
        copies = []
        for i in range(fresh_n):
            c = os.path.join(work, f"p{i:03d}")
            shutil.copy2(base, c)
            copies.append(c)
        jem = None
        if not builds.missing(("libjemalloc-dev",)):
            jem = os.path.join(work, "pj")
            subprocess.run(["gcc", "-O1", "-o", jem, src, "-Wl,--no-as-needed", "-ljemalloc"], check=True)

        # without any tracer: the same binary 1,000 times
        for _ in range(20):
            _run(base)
        t0 = time.perf_counter()
        for _ in range(runs):
            _run(base)
        untraced = time.perf_counter() - t0

        tracer = Tracer()
        try:
            tracer.add_root(os.getpid())
            test = tracer.begin_test()
            _run(base)                           # resolved from now on
            ep = tracer.exec_pauses
            seen = [_run(base) for _ in range(fresh_n)]
            p0, s0 = ep.pauses, ep.pause_seconds
            first = [_run(c) for c in copies]
            stopped = (ep.pause_seconds - s0) / max(1, ep.pauses - p0)
            jem_first = jem_stopped = None
            if jem:
                p0, s0 = ep.pauses, ep.pause_seconds
                jem_first = _run(jem)
                jem_stopped = (ep.pause_seconds - s0) / max(1, ep.pauses - p0)
            tracer.end_test(test)

            test = tracer.begin_test()
            one = os.path.join(work, "p1000")
            shutil.copy2(base, one)
            p0 = ep.pauses
            t0 = time.perf_counter()
            for _ in range(runs):
                _run(one)
            traced = time.perf_counter() - t0
            pauses_1000 = ep.pauses - p0
            raw = tracer.end_test(test)
            nprocs = len(raw.processes)
        finally:
            tracer.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    res = {
        "first_exec_ms": _ms(first),
        "resolved_exec_ms": _ms(seen),
        "first_exec_extra_ms": round(_ms(first) - _ms(seen), 3),
        "stopped_ms": round(stopped * 1000, 3),
        "first_exec_new_allocator_ms": round(jem_first * 1000, 3) if jem_first else None,
        "stopped_new_allocator_ms": round(jem_stopped * 1000, 3) if jem_stopped else None,
        "runs": runs,
        "runs_pauses": pauses_1000,
        "runs_processes": nprocs,
        "runs_traced_s": round(traced, 3),
        "runs_untraced_s": round(untraced, 3),
        "runs_per_exec_ms": {"traced": round(traced / runs * 1000, 3), "untraced": round(untraced / runs * 1000, 3)},
        "fresh_executables": fresh_n,
        "quick": args.quick,
    }
    print(json.dumps(res, indent=2))
    with open(os.path.join(HERE, "exec_pause.json"), "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
