#!/usr/bin/env python3
"""What probing CPython's pymalloc in a test's window costs (issue 15): the
two ways to have its probes only in the pytest process, only while a window
is open, measured side by side.

    flock /tmp/ebpf.lock .venv/bin/python bench/pymalloc_window.py [--windows 200] [--objects 200000]

- attach per window (what the plugin does): a pid-filtered uprobe link made
  at window open, released at close. Measured: the open and close calls
  (what the test waits for) and how long each release takes off its path.
- kept and toggled: the links stay for the whole session and the window
  only flips recording on and off. Its price is paid by every Python
  allocation of pytest outside the windows: timed as a loop making and
  dropping `--objects` small objects, with no link, with the links kept (not
  recording) and inside a window (recording).

Writes bench/pymalloc_window.json and prints a table. Run as root, with no
other tracer loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def alloc_loop(n: int) -> float:
    """Seconds (thread CPU) to make and drop n small objects (pymalloc)."""
    t0 = time.thread_time()
    for i in range(n):
        x = (i, i + 1)      # a tuple: one pymalloc block each
        del x
    return time.thread_time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=200)
    ap.add_argument("--objects", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args(argv)
    from pytest_memleak_ebpf.tracer import Tracer
    from pytest_memleak_ebpf.tracer import core

    tr = Tracer()
    tr.add_root(os.getpid())
    problem = tr.enable_pymalloc_probes()
    if problem:
        raise SystemExit(f"pymalloc cannot be probed here: {problem}")
    c = tr._local
    releases: list[float] = []
    real_detach = tr._detach_later

    def timed_detach(links):
        def run(fds=list(links)):
            t0 = time.monotonic()
            for fd in fds:
                os.close(fd)
            releases.append(time.monotonic() - t0)
        if links:
            th = threading.Thread(target=run, daemon=True)
            th.start()
            tr._detaching.append(th)

    tr._detach_later = timed_detach
    opens, closes = [], []
    try:
        for _ in range(a.windows):
            t0 = time.monotonic()
            tr.open_window()
            t1 = time.monotonic()
            tr.close_window()
            t2 = time.monotonic()
            tr.collect_window()
            opens.append(t1 - t0)
            closes.append(t2 - t1)
        for th in tr._detaching:
            th.join()
        tr._detach_later = real_detach
        # the loop: no link / links kept, not recording / inside a window
        plain, kept, inside = [], [], []
        for _ in range(a.runs):
            plain.append(alloc_loop(a.objects))
            tr._attach_pymalloc(c)              # links without a window: recording off
            kept.append(alloc_loop(a.objects))
            links, c.pymalloc_links = c.pymalloc_links, None
            for fd in links:
                os.close(fd)
            tr.open_window()
            inside.append(alloc_loop(a.objects))
            tr.close_window()
            tr.collect_window()
    finally:
        tr.close()
    med = statistics.median
    res = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "attach_mode": tr.attach_mode, "windows": a.windows,
        "objects": a.objects, "runs": a.runs,
        "open_ms_median": med(opens) * 1e3, "close_ms_median": med(closes) * 1e3,
        "release_ms_median": med(releases) * 1e3 if releases else None,
        "loop_ns_per_object": {"no link": med(plain) / a.objects * 1e9,
                               "links kept, not recording": med(kept) / a.objects * 1e9,
                               "in a window, recording": med(inside) / a.objects * 1e9},
    }
    per = res["loop_ns_per_object"]
    lines = [f"pymalloc probes in the windows ({tr.attach_mode} links, {a.windows} windows, medians)", "",
             "| what | cost |", "|---|---|",
             f"| open a window (attach the pid-filtered links) | {res['open_ms_median']:.3f} ms |",
             f"| close a window (recording off; the release handed to a thread) | {res['close_ms_median']:.3f} ms |",
             f"| the links' release, off the test's path | {res['release_ms_median']:.1f} ms |",
             f"| a small Python object made and dropped, no link | {per['no link']:.0f} ns |",
             f"| the same with the links kept, not recording (the kept-and-toggled way, outside the windows) | "
             f"{per['links kept, not recording']:.0f} ns |",
             f"| the same inside a window (recording) | {per['in a window, recording']:.0f} ns |"]
    res["table"] = lines
    (ROOT / "bench" / "pymalloc_window.json").write_text(json.dumps(res, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
