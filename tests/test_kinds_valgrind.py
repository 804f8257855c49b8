"""The leak kinds of real processes against valgrind memcheck's LEAK SUMMARY.

Each fixture case (tests/fixtures/kinds/cases.c, cases_cxx.cpp) runs twice:
natively with the LD_PRELOAD recorder, stopped in its last atexit handler and
scanned by pytest_memleak_ebpf.kinds; and under ``valgrind --leak-check=full
--show-leak-kinds=all --run-libc-freeres=no --run-cxx-freeres=no``.  All four
kinds must agree in bytes and blocks, and so must the "reachable via
heuristic" figures.  The C cases also have their expected figures written out.

Runs valgrind: run under the machine-wide lock (flock /tmp/ebpf.lock ...).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import kinds_harness as harness  # noqa: E402
from pytest_memleak_ebpf.kinds import roots as kroots  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")

Z = (0, 0)
#: (definite, indirect, possible, reachable) as (bytes, blocks)
EXPECTED = {
    "list": ((48, 1), (432, 9), Z, (160, 4)),
    "tree": ((56, 1), (784, 14), Z, Z),
    "cycle": ((64, 1), (128, 2), Z, (144, 2)),
    "interior": (Z, Z, (272, 3), (96, 1)),
    "mmap_tls": (Z, Z, Z, (232, 2)),
    # glibc's DTV of the second thread: calloc'd, kept as dtv + 1 (interior)
    "thread": (Z, Z, (288, 1), (280, 2)),
    "freed": ((328, 2), Z, Z, (8, 1)),
    "big": ((1 << 20, 1), (176, 1), Z, ((3 << 19) + 184, 2)),
    "family": ((210, 1), Z, (472, 2), (424, 2)),
    "hazard": ((120, 5), Z, Z, (6200, 7)),
}
CXX_HEURISTICS = {
    "string": {"stdstring": (125, 1)},
    "newarray": {"newarray": (128, 1)},
    "length64": {"length64": (48, 1)},
    "mi": {"multipleinheritance": (40, 1)},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return harness.build(tmp_path_factory.mktemp("kinds"))


def _both(built, prog, args):
    argv = [str(built[prog]), *args]
    ours = harness.run_scanned(argv, built["recorder.so"], env=harness.native_env(built["recorder.so"]))
    assert ours.returncode == 0
    theirs = harness.run_valgrind(argv)
    return ours, theirs


def _kinds(summary):
    return tuple(summary.kinds[k] for k in harness.KINDS)


@pytest.mark.parametrize("case", list(EXPECTED))
def test_c_case_matches_valgrind(built, case):
    ours, theirs = _both(built, "cases", [case])
    assert _kinds(theirs) == EXPECTED[case], f"valgrind: {theirs}"
    assert _kinds(ours.summary) == EXPECTED[case], f"ours: {ours.summary}"
    assert ours.summary.heuristics == theirs.heuristics == {}


def test_all_c_cases_in_one_process_match_valgrind(built):
    ours, theirs = _both(built, "cases", list(EXPECTED))
    want = tuple(tuple(sum(EXPECTED[c][k][j] for c in EXPECTED) for j in (0, 1)) for k in range(4))
    assert _kinds(theirs) == want, f"valgrind: {theirs}"
    assert _kinds(ours.summary) == want, f"ours: {ours.summary}"


@pytest.mark.parametrize("case", list(CXX_HEURISTICS))
def test_cxx_heuristic_case_matches_valgrind(built, case):
    ours, theirs = _both(built, "cases_cxx", [case])
    assert theirs.heuristics == CXX_HEURISTICS[case]
    assert ours.summary.heuristics == CXX_HEURISTICS[case]
    assert _kinds(ours.summary) == _kinds(theirs), f"ours: {ours.summary}; valgrind: {theirs}"


def test_all_cxx_cases_in_one_process_match_valgrind(built):
    ours, theirs = _both(built, "cases_cxx", list(CXX_HEURISTICS))
    assert _kinds(ours.summary) == _kinds(theirs)
    assert ours.summary.heuristics == theirs.heuristics == {
        k: v for d in CXX_HEURISTICS.values() for k, v in d.items()}


def test_without_the_chunk_header_rule_the_hazard_case_disagrees(built, monkeypatch):
    """The glibc hazard is real: a recycled block's stale bk points 16 bytes
    into a lost 24-byte block; counted as an interior pointer, that block would
    be possibly lost, while memcheck (and we) say definitely lost."""
    real = kroots.scan_process
    monkeypatch.setattr(kroots, "scan_process", lambda *a, **k: real(*a, hazard=False, **k))
    ours = harness.run_scanned([str(built["cases"]), "hazard"], built["recorder.so"])
    assert _kinds(ours.summary) == ((96, 4), Z, (24, 1), (6200, 7))


def test_forked_child_matches_valgrind(built):
    """fork without exec: the child's summary holds the blocks it inherited
    (valgrind's view, and ours when the child is scanned with the inherited
    recorder table) plus its own."""
    argv = [str(built["cases"]), "fork"]
    root, children = harness.run_scanned_tree(argv, built["recorder.so"],
                                              env=harness.native_env(built["recorder.so"]))
    assert root.returncode == 0
    vg = harness.run_valgrind_tree(argv)
    assert len(vg) == 2 and len(children) == 1
    vg_root, vg_child = list(vg.values())
    assert _kinds(vg_root) == ((200, 1), Z, Z, (192, 1))
    assert _kinds(vg_child) == ((408, 2), Z, Z, (192, 1))
    assert _kinds(root.summary) == _kinds(vg_root)
    assert _kinds(next(iter(children.values())).summary) == _kinds(vg_child)


def test_a_pointer_in_a_slot_the_exit_path_never_wrote_is_no_root(built):
    """The lost block's pointer is left in a dead slot at each of 12 depths;
    some of those slots are inside exit's frames, unwritten (memcheck skips
    them as undefined): without leaving the exit path's frames out of the
    roots, the block reads as reachable at some depths (it did at two)."""
    want = ((77, 1), Z, Z, Z)
    for depth in range(12):
        ours, theirs = _both(built, "stale", [str(depth)])
        assert tuple(theirs.kinds[k] for k in harness.KINDS) == want, (depth, str(theirs))
        assert tuple(ours.summary.kinds[k] for k in harness.KINDS) == want, (depth, str(ours.summary))


def test_the_exit_path_hole_ends_at_the_return_of_call_exit(built, monkeypatch):
    """Without the exit path hole the same depths read as reachable at least
    once: the test above can fail."""
    from pytest_memleak_ebpf.kinds import exitframe

    monkeypatch.setattr(exitframe, "exit_path_hole", lambda *a: None)
    seen = []
    for depth in range(12):
        argv = [str(built["stale"]), str(depth)]
        ours = harness.run_scanned(argv, built["recorder.so"], env=harness.native_env(built["recorder.so"]))
        seen.append(ours.summary.kinds["reachable"])
    assert (77, 1) in seen, seen

