"""Leak kinds under jemalloc, tcmalloc, mimalloc and musl, on real processes
without eBPF: tests/fixtures/alloc/kinds.c (known lost and reachable blocks,
small and large) built each way of issue 14 that a preloaded recorder can
see (tests/fixtures/kinds/recorder.c: the live blocks), stopped at exit and
scanned with kinds/allocmem.py's allocator memory kept out of the roots.

Oracle: the fixture's known figures (definite 1,048,884 B in 4 blocks,
indirect 200 B in 5, possible 0, reachable 301,620 B in 6), plus whatever the
allocator and its libraries hold for themselves, which the same program run
with "none" (it allocates nothing) shows, all of it reachable.  valgrind's
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
EXPECTED = {"definite": (1048884, 4), "indirect": (200, 5), "possible": (0, 0), "reachable": (301620, 6)}
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
    # the allocator's (and its libraries') own blocks: all reachable
    assert all(base[k] == (0, 0) for k in ("definite", "indirect", "possible")), base
    got = _scan(built, name)
    want = dict(EXPECTED, reachable=_plus(EXPECTED["reachable"], base["reachable"]))
    assert got == want, (name, got, base)


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
