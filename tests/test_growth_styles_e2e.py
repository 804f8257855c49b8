"""End-to-end, real eBPF: growth mode for every test style pytest runs
(functions, methods, parametrized, unittest.TestCase), a clear failure for a
test it cannot repeat, unittest setUp/tearDown against the in-process scope,
and growth mode's output on one scale (per repetition)."""


import pytest

pytestmark = pytest.mark.ebpf



@pytest.fixture(scope="module")
def leakext(leakext_moddir):
    return str(leakext_moddir)


def _by_name(doc):
    return {t["nodeid"].split("::", 1)[1]: t for t in doc["tests"]}


GROWING = {"bytes": 96, "blocks": 2}


def test_growth_mode_repeats_every_test_style(pytester, run_plugin, leakext):
    pytester.makeconftest(f"import sys; sys.path.insert(0, {leakext!r})")
    pytester.makepyfile(test_styles="""
        import unittest, pytest, leakext
        GROWTH = pytest.mark.leak_budget(0, warmup=1, repeat=3)
        calls = []

        @GROWTH
        def test_function():
            leakext.leak(2, 48)

        class TestMethods:
            @GROWTH
            def test_method(self):
                leakext.leak(2, 48)

        @GROWTH
        @pytest.mark.parametrize("n", [1, 2])
        def test_parametrized(n):
            leakext.leak(2, 48)

        @GROWTH
        class GrowingCase(unittest.TestCase):
            def setUp(self):
                calls.append("setUp")
                self.held = leakext.hold(1000)      # replaced every repetition: not growth
            def tearDown(self):
                calls.append("tearDown")
            def test_leaks(self):
                calls.append("test")
                leakext.leak(2, 48)

        @GROWTH
        class CleanCase(unittest.TestCase):
            def test_first_call_cache(self):
                leakext.cache_once()                # once, in the warmup

        def test_setup_and_teardown_ran_each_repetition():
            assert calls == ["setUp", "test", "tearDown"] * 4
    """)
    result, doc = run_plugin()
    out = result.stdout.str()
    t = _by_name(doc)
    growing = ["test_function", "TestMethods::test_method", "test_parametrized[1]", "test_parametrized[2]",
               "GrowingCase::test_leaks"]
    for name in growing:
        ip = t[name]["in_process"]
        assert ip is not None, name
        assert ip["growth"]["deltas"] == [GROWING] * 3 and ip["growth"]["growing"] is True, name
        assert ip["leaked"] == GROWING and t[name]["outcome"] == "failed", name
        # the stacks on the headline's scale: per repetition
        assert sum(s["bytes"] for s in ip["stacks"]) == 96, name
    clean = t["CleanCase::test_first_call_cache"]
    assert clean["in_process"]["growth"]["growing"] is False and clean["in_process"]["leaked"] == {"bytes": 0, "blocks": 0}
    assert clean["outcome"] == "passed"
    assert t["test_setup_and_teardown_ran_each_repetition"]["outcome"] == "passed"
    # each figure once, labelled per repetition
    assert "test_styles.py::GrowingCase::test_leaks: leak budget exceeded: 96 B in 2 blocks leaked in-process " \
           "per repetition (budget 0 B)" in out
    assert "(96 B per repetition)" not in out
    assert "  #1 96 B in 2 blocks per repetition from the pytest process (in-process):" in out
    assert "in-process (extensions), per repetition (mean of 3): leaked 96 B in 2 blocks; outstanding " in out
    assert "growth per repetition: +96 B/2, +96 B/2, +96 B/2 -> keeps growing" in out


def test_a_test_growth_mode_cannot_repeat_fails_naming_it(pytester, run_plugin, leakext):
    pytester.makeconftest(f"import sys; sys.path.insert(0, {leakext!r})")
    pytester.makepyfile(mod_with_doctest='''
        def double(x):
            """
            >>> double(2)
            4
            """
            return 2 * x
    ''')
    result, doc = run_plugin("--doctest-modules", "--ebpf-leaks-repeat=2")
    (t,) = doc["tests"]
    assert t["outcome"] == "failed"
    out = result.stdout.str()
    assert ("mod_with_doctest.py::mod_with_doctest.double: growth mode (warmup 1, repeat 2) cannot repeat this "
            "test: it is a _pytest.doctest.DoctestItem item, not a test function") in out
    assert "Traceback" not in out


TESTCASE_SCOPE = """
    import unittest, leakext

    class Case(unittest.TestCase):
        def setUp(self):
            leakext.leak(2, 500)                  # like a fixture's setup
            self.kept = leakext.hold(2000)        # lives until pytest drops the TestCase
            self.held = leakext.hold(1000)
        def tearDown(self):
            del self.held                         # freed by tearDown
            leakext.leak(1, 30)                   # like a fixture's teardown
        def test_method(self):
            leakext.clean(10)
"""


def test_testcase_setup_and_teardown_follow_the_scope(pytester, run_plugin, leakext):
    """Scope "call": the window covers the test method only (setUp/tearDown
    are outside it, like a function's fixtures); scope "test": they count."""
    pytester.makeconftest(f"import sys; sys.path.insert(0, {leakext!r})")
    pytester.makepyfile(test_case=TESTCASE_SCOPE)
    result, doc = run_plugin()
    (t,) = doc["tests"]
    assert t["in_process"]["leaked"] == {"bytes": 0, "blocks": 0} and t["outcome"] == "passed"
    result, doc = run_plugin("--ebpf-leaks-in-process-scope=test", "--ebpf-leaks-kinds=all")
    (t,) = doc["tests"]
    assert t["in_process"]["leaked"] == {"bytes": 1030, "blocks": 3} and t["outcome"] == "error"
    assert "ERROR at teardown of Case.test_method" in result.stdout.str()
