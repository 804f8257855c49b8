#!/usr/bin/env python3
"""BPF program time per malloc+free pair, per churn pattern (issue 17).

    flock /tmp/ebpf.lock .venv/bin/python bench/progtime.py [--rev REV] [--store table|hash] [--json OUT]
    flock /tmp/ebpf.lock .venv/bin/python bench/progtime.py --source A.bpf.c --source B.bpf.c [--rounds 5]

The tracer's programs' own run time, from the kernel's BPF statistics
(kernel.bpf_stats_enabled, on only while this runs): run_time_ns / run_cnt
of each of the tracer's programs over one churn run per pattern (the LIFO
pair, a rotating live set of 64, 1 and 4 threads keeping 16 live each), as
ns per pair = the programs' summed time / N. Unlike bench/run.py's CPU
medians, this leaves out the traps themselves and does not move with other
processes competing for the CPUs, so two revisions' store costs compare in
one run. (The statistics add two clock reads to every program run: the
figures are a little higher than the programs' time without them.)
Needs root. --rev measures the plugin as committed at REV (bench/run.py's export).

--source (repeatable): BPF sources to compare (variants of bpf/memleak.bpf.c
built to attribute cost, or another tree's), each compiled against this
tree's bpf/memleak.h; "-" is this tree's own source. --rounds R: every
source is loaded and measured once per round, rounds interleaved (A B A B
...), and each figure is the median of its R runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

PATTERNS = {"LIFO pair": [], "rotating, 64 live": ["-k", "64"], "1 thread × 16 live": ["-t", "1", "-k", "16"],
            "4 threads × 16 live": ["-t", "4", "-k", "16"]}


def progs() -> dict:
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True, check=True).stdout
    return {p["id"]: p for p in json.loads(out)}


def measure(T, churn: Path, out_dir: Path, n: int, source: Path | None = None) -> dict:
    """One load of the tracer (source: another BPF source), one churn run per pattern."""
    before = set(progs())
    tr = T.Tracer(source=source)
    mine = set(progs()) - before
    tr.add_root(os.getpid())
    res = {}
    try:
        for name, pargs in PATTERNS.items():
            p0 = progs()
            tid = tr.begin_test()
            with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".ns") as f:
                subprocess.run([str(churn), str(n), *pargs, "-o", f.name], check=True)
                cpu_ns = int(open(f.name).read().split()[1])
            tr.end_test(tid)
            p1 = progs()
            per = {}
            for i in sorted(mine):
                cnt = p1[i].get("run_cnt", 0) - p0[i].get("run_cnt", 0)
                ns = p1[i].get("run_time_ns", 0) - p0[i].get("run_time_ns", 0)
                if cnt:
                    per[p1[i]["name"]] = {"runs": cnt, "ns_per_run": round(ns / cnt, 1), "ns": ns}
            alloc = sum(v["ns"] for k, v in per.items() if not k.startswith(("tracepoint", "exit_pause")))
            res[name] = {"bpf_ns_per_pair": round(alloc / n, 1), "cpu_us_per_pair": round(cpu_ns / n / 1000, 3),
                         "programs": per}
    finally:
        tr.close()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", default="")
    ap.add_argument("--store", choices=("table", "hash"), default=None)
    ap.add_argument("--source", action="append", default=[])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("-n", type=int, default=200_000)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    import run as R
    if args.rev:
        R.use_revision(args.rev)
    if args.store:
        os.environ["PYTEST_MEMLEAK_EBPF_BLOCK_STORE"] = args.store
    churn = R.build("churn")
    from pytest_memleak_ebpf import tracer as T
    sources = [None if s == "-" else Path(s).resolve() for s in args.source] or [None]
    labels = [s.name if s else "as-is" for s in sources]
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=1"], check=True)
    try:
        for r in range(args.rounds):
            for label, src in zip(labels, sources):
                res = measure(T, churn, R.OUT, args.n, src)
                runs[label].append(res)
                for name, v in res.items():
                    print(f"[{r + 1}] {label:28} {name:22} BPF {v['bpf_ns_per_pair']:6.1f} ns/pair   "
                          f"loop CPU {v['cpu_us_per_pair']:.3f} µs/pair", flush=True)
    finally:
        subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=0"])
    out = {"code": R.CODE.get("source", "working tree"), "store": args.store or "default", "n": args.n,
           "rounds": args.rounds}
    if len(sources) == 1 and args.rounds == 1:
        out["patterns"] = runs[labels[0]][0]
    else:
        out["sources"] = {}
        print("\nmedians of", args.rounds, "round(s), BPF ns per pair:")
        print(f"{'':28} " + " ".join(f"{p:>20}" for p in PATTERNS))
        for label in labels:
            med = {p: statistics.median(x[p]["bpf_ns_per_pair"] for x in runs[label]) for p in PATTERNS}
            out["sources"][label] = {"median_bpf_ns_per_pair": med, "runs": runs[label]}
            print(f"{label:28} " + " ".join(f"{med[p]:20.1f}" for p in PATTERNS), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
