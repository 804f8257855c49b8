"""End-to-end: in-process leak checking of C extension modules (the pytest
process itself), with real eBPF. Exact figures from a fixture extension that
leaks a known number of blocks of a known size per call."""

import json

import pytest

pytestmark = pytest.mark.ebpf



@pytest.fixture(scope="module")
def leakext(leakext_moddir, leakext_expected):
    return str(leakext_moddir), leakext_expected


@pytest.mark.parametrize("dist,allocator", [([], "pymalloc"), ([], "malloc"), (["-n", "2"], "pymalloc")],
                         ids=["single-pymalloc", "single-malloc", "xdist-pymalloc"])
def test_extension_leaks_are_exact(pytester, run_plugin, leakext, dist, allocator, monkeypatch):
    """With the interpreter's own allocator (pymalloc: its functions are
    probed in the window, no restart) and with PYTHONMALLOC=malloc (every
    Python object from malloc); also under xdist, where each worker's windows
    go through the controller's tracer, which probes the worker's pymalloc."""
    moddir, expected = leakext
    if allocator == "malloc":
        monkeypatch.setenv("PYTHONMALLOC", "malloc")
    else:
        monkeypatch.delenv("PYTHONMALLOC", raising=False)
    obj = expected.BYTES_OBJECT_SIZE
    pytester.makeconftest(f"import sys; sys.path.insert(0, {moddir!r})")
    pytester.makepyfile(test_ext="""
        import pytest, leakext
        def test_clean():
            leakext.clean(100)
        def test_raw_malloc():
            leakext.leak(3, 1000)
        def test_objects():
            leakext.leak_objects(7)
        @pytest.mark.leak_budget("1 MiB")
        def test_within_budget():
            leakext.leak(2, 64)
        def test_python_objects_are_not_extension_leaks():
            test_python_objects_are_not_extension_leaks.keep = [bytes(100) for _ in range(50)]
        @pytest.mark.leak_budget(0, warmup=1, repeat=3)
        def test_first_call_cache_passes_in_growth_mode():
            leakext.cache_once()
        @pytest.mark.leak_budget(0, warmup=1, repeat=4)
        def test_growth_mode_per_repetition():
            leakext.leak(2, 48)
    """)
    junit = pytester.path / "junit.xml"
    result, doc = run_plugin(f"--junitxml={junit}", "--ebpf-leaks-kinds=all", *dist)
    out = result.stdout.str()
    assert "ebpf-leaks: in-process checking: extensions" in out or "in-process checking: extensions" in out
    if allocator == "malloc":
        assert "PYTHONMALLOC=malloc: Python objects are visible to the tracer" in out
    else:   # with xdist too: the controller's header says what its workers do
        assert "pymalloc kept: Python objects are seen through CPython's pymalloc functions" in out
        assert "restarting pytest" not in out and "run pytest with PYTHONMALLOC=malloc" not in out
    tests = {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}
    ip = {name: t["in_process"] for name, t in tests.items()}
    assert ip["test_clean"]["leaked"] == {"bytes": 0, "blocks": 0}
    assert ip["test_raw_malloc"]["leaked"] == {"bytes": 3000, "blocks": 3}
    assert ip["test_objects"]["leaked"] == {"bytes": 7 * obj, "blocks": 7}
    assert ip["test_within_budget"]["leaked"] == {"bytes": 128, "blocks": 2}
    assert ip["test_python_objects_are_not_extension_leaks"]["leaked"] == {"bytes": 0, "blocks": 0}
    assert ip["test_python_objects_are_not_extension_leaks"]["outstanding"]["blocks"] >= 50
    assert ip["test_first_call_cache_passes_in_growth_mode"]["leaked"] == {"bytes": 0, "blocks": 0}
    g = ip["test_growth_mode_per_repetition"]
    assert g["growth"]["deltas"] == [{"bytes": 96, "blocks": 2}] * 4 and g["growth"]["growing"] is True
    assert g["leaked"] == {"bytes": 96, "blocks": 2}
    outcomes = {n: t["outcome"] for n, t in tests.items()}
    assert outcomes == {
        "test_clean": "passed", "test_raw_malloc": "failed", "test_objects": "failed",
        "test_within_budget": "passed", "test_python_objects_are_not_extension_leaks": "passed",
        "test_first_call_cache_passes_in_growth_mode": "passed",
        "test_growth_mode_per_repetition": "failed",
    }
    # each figure once: the in-process part is not repeated when it is the whole leak
    assert "leak budget exceeded: 3,000 B in 3 blocks leaked in-process (budget 0 B)" in out
    # the leaking function is named, found on the stack above the interpreter
    raw = ip["test_raw_malloc"]["stacks"][0]
    assert raw["bytes"] == 3000 and any(f["function"] == "leakext_leak" and f["module"].endswith(".so") for f in raw["frames"])
    objs = ip["test_objects"]["stacks"][0]
    assert any(f["function"] == "leakext_leak_objects" for f in objs["frames"])
    assert "growth per repetition: +96 B/2, +96 B/2, +96 B/2, +96 B/2 -> keeps growing" in out
    # the version-1 fields are unchanged and leaked totals include in-process
    assert tests["test_objects"]["leaked"] == {"bytes": 7 * obj, "blocks": 7}
    assert tests["test_objects"]["processes"] == []


def test_cache_fails_without_growth_mode(pytester, run_plugin, leakext):
    """With every outstanding block counting (kinds=all): at the default
    kinds the cache is still reachable and passes (test_inprocess_kinds_e2e.py)."""
    moddir, expected = leakext
    pytester.makeconftest(f"import sys; sys.path.insert(0, {moddir!r})")
    pytester.makepyfile(test_cache="""
        import leakext
        def test_cache():
            leakext.cache_once()
    """)
    result, doc = run_plugin("--ebpf-leaks-kinds=all")
    (t,) = doc["tests"]
    assert t["outcome"] == "failed" and t["in_process"]["leaked"]["blocks"] == 1
    assert t["in_process"]["leaked"]["bytes"] == expected.CACHE_ONCE_BYTES


def test_in_process_off_and_all(pytester, run_plugin, leakext):
    moddir, _ = leakext
    pytester.makeconftest(f"import sys; sys.path.insert(0, {moddir!r})")
    pytester.makepyfile(test_x="""
        import leakext
        def test_leak():
            leakext.leak(1, 10)
    """)
    result, doc = run_plugin("--ebpf-leaks-in-process=off")
    assert doc["tests"][0]["in_process"] is None and doc["tests"][0]["outcome"] == "passed"
    result, doc = run_plugin("--ebpf-leaks-in-process=all", "--ebpf-leaks-budget=1 MiB", "--ebpf-leaks-kinds=all")
    t = doc["tests"][0]
    assert t["in_process"]["mode"] == "all" and t["in_process"]["leaked"]["bytes"] >= 10
    result = pytester.runpytest_subprocess("--ebpf-leaks", "--ebpf-leaks-in-process=some")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--ebpf-leaks-in-process: 'some' is not one of extensions, all, off" in result.stderr.str()


def test_scope_test_widens_the_window_to_setup_and_teardown(pytester, run_plugin, leakext, cbuild):
    moddir, _ = leakext
    child = cbuild("child_leak", "#include <stdlib.h>\nint main(void) { malloc(42); return 0; }\n")
    pytester.makeconftest(f"import sys; sys.path.insert(0, {moddir!r})")
    pytester.makepyfile(test_scope=f"""
        import subprocess, pytest, leakext
        @pytest.fixture
        def leaky_fixture():
            leakext.leak(2, 500)      # setup
            yield
            leakext.leak(1, 30)       # teardown
        @pytest.fixture
        def balanced_fixture():
            leakext.clean(10)
            yield
        @pytest.mark.leak_budget("64 B")      # the child's 42 B pass at the call; the fixture's do not
        def test_fixture_leaks(leaky_fixture):
            subprocess.run([{child!r}], check=True)
        def test_balanced(balanced_fixture):
            pass
    """)
    result, doc = run_plugin("--ebpf-leaks-in-process-scope=test", "--ebpf-leaks-kinds=all")
    tests = {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}
    t = tests["test_fixture_leaks"]
    assert t["in_process"]["leaked"] == {"bytes": 1030, "blocks": 3}
    (p,) = t["processes"]
    assert p["outstanding"] == {"bytes": 42, "blocks": 1}
    assert t["leaked"] == {"bytes": 1072, "blocks": 4} and t["outcome"] == "error"
    assert tests["test_balanced"]["leaked"] == {"bytes": 0, "blocks": 0}
    out = result.stdout.str()
    assert "ERROR at teardown of test_fixture_leaks" in out
    # with the default scope (call) the fixture's blocks are not the test's
    result, doc = run_plugin()
    t = {x["nodeid"].split("::")[-1]: x for x in doc["tests"]}["test_fixture_leaks"]
    assert t["in_process"]["leaked"] == {"bytes": 0, "blocks": 0} and t["outcome"] == "passed"


def test_full_collection_only_when_a_block_that_could_count_is_live(pytester, run_plugin, leakext):
    """The window's gc.collect() (tens of ms in a process with many objects)
    runs only when a block that could count is live at the window's end: an
    extension's block held only by a reference cycle is freed by it (the test
    passes, exactly 0 B), while a test whose window holds nothing that could
    count pays no collection. Automatic collection is off in the inner
    session, so every full collection is an explicit one."""
    moddir, _ = leakext
    pytester.makeconftest(f"""
        import gc, json, sys
        import pytest
        sys.path.insert(0, {moddir!r})
        gc.disable()
        FULL = [0]
        gc.callbacks.append(lambda phase, info: FULL.__setitem__(0, FULL[0] + (phase == "start"
                                                                              and info["generation"] == 2)))
        COUNTS = {{}}

        @pytest.hookimpl(wrapper=True, tryfirst=True)
        def pytest_runtest_call(item):
            before = FULL[0]
            try:
                return (yield)
            finally:
                COUNTS[item.name] = FULL[0] - before

        def pytest_sessionfinish(session):
            with open("gc_counts.json", "w") as f:
                json.dump(COUNTS, f)
    """)
    pytester.makepyfile(test_gc="""
        import leakext
        def test_cycle_holds_an_extension_block():
            a = [leakext.hold(500)]
            a.append(a)
            del a
        def test_nothing_that_could_count():
            b = [bytes(100) for _ in range(10)]
            b.append(b)
            del b
        def test_extension_block_freed_by_the_test():
            c = leakext.hold(300)
            del c
    """)
    result, doc = run_plugin("--ebpf-leaks-kinds=all")
    tests = {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}
    assert {n: t["outcome"] for n, t in tests.items()} == dict.fromkeys(tests, "passed"), result.stdout.str()
    assert tests["test_cycle_holds_an_extension_block"]["in_process"]["leaked"] == {"bytes": 0, "blocks": 0}
    counts = json.loads((pytester.path / "gc_counts.json").read_text())
    assert counts == {"test_cycle_holds_an_extension_block": 1, "test_nothing_that_could_count": 0,
                      "test_extension_block_freed_by_the_test": 0}


@pytest.mark.parametrize("kinds", [[], ["--ebpf-leaks-in-process-kinds"]], ids=["default", "in-process-kinds"])
def test_a_session_with_warnings_as_errors_ends_cleanly(pytester, run_plugin, leakext, kinds):
    """A project whose ini turns every warning into an error (as many do):
    nothing the plugin opened is left for the garbage collector (an unclosed
    pipe of the window scanner made pytest end with a traceback)."""
    moddir, _ = leakext
    pytester.makeini("[pytest]\nfilterwarnings =\n    error\n")
    pytester.makeconftest(f"import sys; sys.path.insert(0, {moddir!r})")
    pytester.makepyfile(test_w="""
        import leakext
        def test_clean():
            leakext.clean(10)
    """)
    result, doc = run_plugin(*kinds)
    err = result.stderr.str() + result.stdout.str()
    assert result.ret == 0, err
    assert "ResourceWarning" not in err and "Traceback" not in err, err
    assert [t["outcome"] for t in doc["tests"]] == ["passed"]
