"""End-to-end: leak kinds of the pytest process's own window (C extensions),
with real eBPF; opt-in (--ebpf-leaks-in-process-kinds), with pymalloc probed or PYTHONMALLOC=malloc. At the default kinds a cache an extension keeps (a static
list, a module-level dict, a first-call static) is still reachable and does
not fail its test; what nobody references (raw blocks, objects missing a
Py_DECREF) is classified block by block, its lost part counted — a leaked
block whose address a recently freed object had can read as reachable or
possibly lost through a stale word (README, "Leak kinds in-process": the
known gap), so the split between kinds is not asserted, their sum is;
kinds=all keeps every figure of before."""

import pytest

pytestmark = pytest.mark.ebpf

TESTS = """
    import leakext
    def test_keep():
        leakext.keep(100)
    def test_keep_object():
        leakext.keep_object("k")
    def test_cache_once():
        leakext.cache_once()
    def test_raw_leak():
        leakext.leak(3, 1000)
    def test_objects():
        leakext.leak_objects(7)
    def test_clean():
        leakext.clean(50)
"""


@pytest.fixture
def project(pytester, leakext_moddir):
    pytester.makeconftest(f"import sys; sys.path.insert(0, {str(leakext_moddir)!r})")
    pytester.makepyfile(test_ext=TESTS)
    return pytester


def _by_name(doc):
    return {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}


@pytest.mark.parametrize("allocator", ["pymalloc", "malloc"])
@pytest.mark.parametrize("dist", [[], ["-n", "2"]], ids=["single", "xdist"])
def test_caches_are_reachable_and_leaks_are_lost(project, run_plugin, leakext_expected, dist, allocator,
                                                 monkeypatch):
    obj = leakext_expected.BYTES_OBJECT_SIZE
    if allocator == "malloc":
        monkeypatch.setenv("PYTHONMALLOC", "malloc")
    else:
        monkeypatch.delenv("PYTHONMALLOC", raising=False)
    result, doc = run_plugin("--ebpf-leaks-in-process-kinds", *dist)
    out = result.stdout.str()
    if allocator == "pymalloc":   # its free blocks told from its live ones: no restart
        assert "pymalloc kept: Python objects are seen through CPython's pymalloc functions" in out
        assert "restarting pytest" not in out
    t = _by_name(doc)
    outcomes = {n: x["outcome"] for n, x in t.items()}
    assert {n: o for n, o in outcomes.items() if n not in ("test_raw_leak", "test_objects")} == {
        "test_keep": "passed", "test_keep_object": "passed", "test_cache_once": "passed", "test_clean": "passed"}
    ip = {n: x["in_process"] for n, x in t.items()}
    for name in ("test_keep", "test_keep_object", "test_cache_once", "test_raw_leak", "test_objects"):
        assert ip[name]["classified"] is True, (name, ip[name].get("reason"))
        assert sum(v["bytes"] for v in ip[name]["reachability"].values()) == ip[name]["outstanding"]["bytes"]
    # what an extension keeps reachable: shown, not counted
    assert ip["test_keep"]["leaked"] == {"bytes": 0, "blocks": 0}
    keep = [s for s in ip["test_keep"]["stacks"] if any(f["function"] == "leakext_keep" for f in s["frames"])]
    assert [(s["kind"], s["bytes"], s["blocks"]) for s in keep] == [("reachable", 108, 1)]
    assert ip["test_cache_once"]["leaked"] == {"bytes": 0, "blocks": 0}
    assert ip["test_cache_once"]["reachability"]["reachable"]["bytes"] >= leakext_expected.CACHE_ONCE_BYTES
    assert ip["test_keep_object"]["leaked"] == {"bytes": 0, "blocks": 0}
    assert ip["test_keep_object"]["reachability"]["reachable"]["bytes"] >= obj
    # what nobody references: every block classified, what counts is its lost part
    for name, fn, total in (("test_raw_leak", "leakext_leak", (3000, 3)),
                            ("test_objects", "leakext_leak_objects", (7 * obj, 7))):   # objects missing a Py_DECREF
        mine = [s for s in ip[name]["stacks"] if any(f["function"] == fn for f in s["frames"])]
        assert (sum(s["bytes"] for s in mine), sum(s["blocks"] for s in mine)) == total, name
        lost = [s for s in mine if s["kind"] in ("definite", "indirect")]
        assert ip[name]["leaked"] == {"bytes": sum(s["bytes"] for s in lost), "blocks": sum(s["blocks"] for s in lost)}
        assert t[name]["outcome"] == ("failed" if lost else "passed"), name
        if lost:
            assert "lost from the pytest process (in-process):" in out
    if not dist:
        assert "(lost " in out and ", possible " in out


def test_kinds_all_keeps_the_figures_of_before(project, run_plugin, leakext_expected):
    obj = leakext_expected.BYTES_OBJECT_SIZE
    result, doc = run_plugin("--ebpf-leaks-kinds=all")
    t = _by_name(doc)
    ip = {n: x["in_process"] for n, x in t.items()}
    assert ip["test_keep"]["leaked"] == {"bytes": 108, "blocks": 1} and t["test_keep"]["outcome"] == "failed"
    assert ip["test_keep_object"]["leaked"]["blocks"] >= 1 and t["test_keep_object"]["outcome"] == "failed"
    assert ip["test_cache_once"]["leaked"] == {"bytes": leakext_expected.CACHE_ONCE_BYTES, "blocks": 1}
    assert ip["test_raw_leak"]["leaked"] == {"bytes": 3000, "blocks": 3}
    assert ip["test_objects"]["leaked"] == {"bytes": 7 * obj, "blocks": 7}
    assert ip["test_clean"]["leaked"] == {"bytes": 0, "blocks": 0}
    for x in ip.values():
        assert x["classified"] is False and x["reason"] == "leak kinds were not asked for (kinds=all)"
        assert x["reachability"]["unclassified"] == x["outstanding"]
        assert all(s["kind"] == "unclassified" for s in x["stacks"])
    out = result.stdout.str()
    assert "3,000 B in 3 blocks from the pytest process (in-process):" in out


def test_in_process_kinds_are_opt_in(project, run_plugin, leakext_expected):
    """Without --ebpf-leaks-in-process-kinds (and with
    --ebpf-leaks-no-in-process-kinds over an ini that turns them on) the
    window is not scanned: its blocks are unclassified (they count at the
    default kinds), with the reason, and the figures are exactly those of before."""
    obj = leakext_expected.BYTES_OBJECT_SIZE
    project.makeini("[pytest]\nebpf_leaks_in_process_kinds = true\n")
    result, doc = run_plugin("--ebpf-leaks-no-in-process-kinds")
    t = _by_name(doc)
    ip = {n: x["in_process"] for n, x in t.items()}
    assert ip["test_keep"]["leaked"] == {"bytes": 108, "blocks": 1} and t["test_keep"]["outcome"] == "failed"
    assert ip["test_raw_leak"]["leaked"] == {"bytes": 3000, "blocks": 3}
    assert ip["test_objects"]["leaked"] == {"bytes": 7 * obj, "blocks": 7}
    assert ip["test_clean"]["leaked"] == {"bytes": 0, "blocks": 0}
    for x in ip.values():
        assert x["classified"] is False
        assert x["reason"] == "in-process leak kinds are off (--ebpf-leaks-in-process-kinds turns them on)"
        assert x["reachability"]["unclassified"] == x["outstanding"]
    assert "in_process_scans" not in doc.get("session", {})


