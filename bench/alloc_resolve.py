"""How long resolving a program's allocator takes: cold (a fresh
AllocatorCache and a fresh process-wide parse of ld.so.cache and the
interpreter), the first such resolution in this process, warm (the cache re-checking every file it depended on) and warm
without validation.  Prints a table; not a timed test.

    PYTHONPATH=. python bench/alloc_resolve.py [REPEAT]

The programs: /usr/bin/ls, python3, and tests/fixtures/alloc's leak6 linked
with -ljemalloc (built here; skipped when libjemalloc-dev is missing)."""

import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures", "alloc"))
import builds as B  # noqa: E402

from pytest_memleak_ebpf import allocators as A  # noqa: E402


def cold(exe, env):
    A.clear_caches()
    t = time.perf_counter()
    a = A.AllocatorCache().resolve(exe, env)
    return time.perf_counter() - t, a


def main():
    repeat = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LD_LIBRARY_PATH")}
    progs = [("/usr/bin/ls", "ls"), (os.path.realpath("/usr/bin/python3"), "python3")]
    tmp = tempfile.mkdtemp(prefix="alloc-bench-")
    jem = next(c for c in B.C_CONFIGS if c.name == "link-jemalloc")
    if not B.missing(jem.packages):
        progs.append((B.build(jem, tmp), "leak6 -ljemalloc"))
    print(f"{'program':18} {'allocator':10} {'first ms':>8} {'cold ms':>8} {'warm us':>8} {'warm, no check us':>18}"
          "  module")
    for exe, label in progs:
        first = cold(exe, env)[0]               # files possibly not in the page cache yet
        c = min(cold(exe, env)[0] for _ in range(5))
        cache = A.AllocatorCache()
        a = cache.resolve(exe, env)
        t = time.perf_counter()
        for _ in range(repeat):
            cache.resolve(exe, env)
        warm = (time.perf_counter() - t) / repeat
        t = time.perf_counter()
        for _ in range(repeat):
            cache.resolve(exe, env, validate=False)
        nocheck = (time.perf_counter() - t) / repeat
        print(f"{label:18} {a.kind:10} {first * 1e3:8.2f} {c * 1e3:8.2f} {warm * 1e6:8.1f} {nocheck * 1e6:18.1f}  {a.module}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
