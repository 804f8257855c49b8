"""Leak kinds under jemalloc, tcmalloc, mimalloc and musl, on real processes
without eBPF: tests/fixtures/alloc/kinds.c (known lost and reachable blocks,
small and large) built each way of issue 14 that a preloaded recorder can
see (tests/fixtures/kinds/recorder.c: the live blocks), stopped at exit and
scanned with kinds/allocmem.py's allocator memory kept out of the roots.

Oracle: the fixture's known figures (definite 1,048,932 B in 5 blocks,
indirect 200 B in 5, possible 0, reachable 301,676 B in 7), plus whatever the
runtime holds for itself, which the same program run with "none" (it
allocates nothing; its second thread runs all the same) shows: reachable,
and, under glibc, the second thread's DTV, possibly lost (glibc keeps a
pointer 16 bytes into it, as memcheck says too).  valgrind's
LEAK SUMMARY of the same program (tests marked ebpf, under the lock) agrees
exactly where valgrind replaces that allocator (test_matches_valgrind)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "fixtures" / "alloc"))
import builds  # noqa: E402
import kinds_harness as harness  # noqa: E402
from pytest_memleak_ebpf.kinds import roots as kroots  # noqa: E402

SOURCE = HERE / "fixtures" / "alloc" / "kinds.c"
KINDS = harness.KINDS
#: kinds.c's own blocks
EXPECTED = {"definite": (1048932, 5), "indirect": (200, 5), "possible": (0, 0), "reachable": (301676, 7)}
NAMES = ["link-jemalloc", "link-tcmalloc", "link-mimalloc", "preload-jemalloc", "preload-tcmalloc",
         "preload-mimalloc", "musl"]
CONFIGS = {c.name: c for c in builds.C_CONFIGS}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("allockinds")
    rec = harness.FIXTURES / "recorder.c"
    made = {"recorder": out / "recorder.so"}
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(made["recorder"]), str(rec), "-ldl"], check=True)
    if shutil.which("musl-gcc"):
        made["recorder-musl"] = out / "recorder-musl.so"
        subprocess.run(["musl-gcc", "-O2", "-shared", "-fPIC", "-o", str(made["recorder-musl"]), str(rec)],
                       check=True)
    for name in NAMES:
        if not builds.missing(CONFIGS[name].packages):
            made[name] = Path(builds.build(CONFIGS[name], str(out), source=str(SOURCE)))
    return made


def _need(built, name):
    if name not in built:
        miss = builds.missing(CONFIGS[name].packages)
        if os.environ.get("CI"):
            pytest.fail(f"{name}: packages missing: {miss}")
        pytest.skip(f"{name}: packages missing: {miss}")
    return built[name]


def _scan(built, name, *args):
    """{kind: (bytes, blocks)} of kinds.c built as `name`, scanned at its exit
    (the harness's run, with the allocator's kind given to the scan)."""
    cfg = CONFIGS[name]
    exe = _need(built, name)
    recorder = built["recorder-musl" if cfg.kind == "musl" else "recorder"]
    env = builds.env_for(cfg)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(recorder), cfg.preload]))

    def scan_one(pid, info, rc):
        addr, length = (int(x, 16) for x in info.read_text().split())
        starts, sizes = harness.read_recorder_table(pid, addr, length)
        scan = kroots.scan_process(pid, starts, sizes, exclude=[(addr, addr + length)], allocator=cfg.kind)
        c = scan.classification
        return harness.Scanned(harness.Summary(c.summary(), c.heuristic_summary()), scan, starts, sizes,
                               (addr, addr + length), rc)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "_scan_one", scan_one)
        r = harness.run_scanned([str(exe), *args], recorder, env=env)
    assert r.returncode == 0
    return r.summary.kinds


def _plus(a, b):
    return (a[0] + b[0], a[1] + b[1])


@pytest.mark.parametrize("name", NAMES)
def test_known_lost_and_reachable_blocks(built, name):
    base = _scan(built, name, "none")
    # the runtime's own blocks: reachable, but glibc's DTV of the second thread
    assert base["definite"] == base["indirect"] == (0, 0), base
    assert base["possible"][1] == (0 if CONFIGS[name].kind == "musl" else 1), base
    got = _scan(built, name)
    assert got == {k: _plus(EXPECTED[k], base[k]) for k in KINDS}, (name, got, base)


@pytest.mark.ebpf
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")
@pytest.mark.parametrize("name, soname", [("link-jemalloc", "*jemalloc*"), ("link-mimalloc", "*mimalloc*")])
def test_matches_valgrind(built, name, soname):
    """valgrind replaces the allocator named by --soname-synonyms: its LEAK
    SUMMARY is the program's logical truth.  (Not tcmalloc: under valgrind
    its start-up differs -- one more 8-byte block it loses --, nor musl,
    which valgrind's preload objects do not support.)"""
    exe = _need(built, name)
    saved = list(harness.VALGRIND_OPTS)
    harness.VALGRIND_OPTS.append(f"--soname-synonyms=somalloc={soname}")
    try:
        theirs = harness.run_valgrind([str(exe)])
    finally:
        harness.VALGRIND_OPTS[:] = saved
    ours = _scan(built, name)
    assert ours == theirs.kinds, (ours, str(theirs))
