"""Growth mode for unittest.TestCase, the failure of a test it cannot
repeat, the TestCase method window, and growth mode's texts — without root
(fakes for the engine; pytester for the hooks, in-process checking on a fake
engine)."""

from __future__ import annotations

import unittest
from types import SimpleNamespace

import pytest

from pytest_memleak_ebpf import growth, report
from pytest_memleak_ebpf.accounting import Amount, InProcess, ProcessLeak, StackLeak
from pytest_memleak_ebpf.accounting import TestLeakResult as LeakResult
from pytest_memleak_ebpf.marks import Budget

from fake_engine import FakeEngine


def _case(log, fail_on=None):
    class Case(unittest.TestCase):
        def setUp(self):
            log.append(("setUp", id(self)))
            self.kept = object()

        def tearDown(self):
            log.append(("tearDown", id(self)))

        def test_x(self):
            log.append(("test", id(self)))
            if fail_on is not None and sum(1 for e in log if e[0] == "test") == fail_on:
                self.fail("fails here")
    return Case


class FakeItem:
    """The parts of pytest's TestCaseFunction that growth uses: it is the
    unittest result object (addFailure & co. record into _excinfo)."""

    _excinfo = None

    def __init__(self, case):
        self.name = "test_x"
        self.instance = case("test_x")
        self.nodeid = "t.py::Case::test_x"

    def startTest(self, t): pass
    def stopTest(self, t): pass
    def addSuccess(self, t): pass
    def addDuration(self, t, e): pass
    def addFailure(self, t, exc): self.__dict__.setdefault("_excinfo", []).append(exc)
    addError = addFailure

    def addSkip(self, t, reason):
        self.__dict__.setdefault("_excinfo", []).append(reason)


def test_a_testcase_is_repeated_whole_on_fresh_instances():
    log, engine = [], FakeEngine()
    item = FakeItem(_case(log))
    assert growth.run_testcase_repetitions(engine, item, Budget(0, None, warmup=1, repeat=3)) is True
    assert [e[0] for e in log] == ["setUp", "test", "tearDown"] * 4
    instances = [e[1] for e in log if e[0] == "test"]
    assert id(item.instance) not in instances      # never the item's own instance (nor one kept alive)
    assert engine.calls == ["open", "snapshot", "snapshot", "snapshot", "close", ("growth", 1, 3, [{"bytes": 0, "blocks": 0}] * 3)]


def test_a_failing_repetition_ends_the_repetitions():
    log, engine = [], FakeEngine()
    item = FakeItem(_case(log, fail_on=3))           # warmup, then the second measured one fails
    growth.run_testcase_repetitions(engine, item, Budget(0, None, warmup=1, repeat=4))
    assert [e[0] for e in log].count("test") == 3 and len(item._excinfo) == 1
    assert engine.calls == ["open", "snapshot", "snapshot", "close", ("growth", 1, 4, [{"bytes": 0, "blocks": 0}] * 2)]
    log2, engine2 = [], FakeEngine()
    item2 = FakeItem(_case(log2, fail_on=1))         # the warmup fails: nothing measured
    growth.run_testcase_repetitions(engine2, item2, Budget(0, None, warmup=1, repeat=4))
    assert engine2.calls == [] and len(item2._excinfo) == 1


def test_why_a_test_was_not_repeated():
    async def coro():
        pass

    fn = pytest.Function.__new__(pytest.Function)
    fn.__dict__["_obj"] = coro
    assert growth.why_not_repeated(fn) == "it is a coroutine function, which its async plugin runs once"
    assert growth.why_not_repeated(SimpleNamespace()) == "it is a types.SimpleNamespace item, not a test function"
    msg = growth.unrepeatable(SimpleNamespace(nodeid="a.py::t"), Budget(0, None, warmup=None, repeat=3), "why")
    assert msg.startswith("a.py::t: growth mode (warmup 0, repeat 3) cannot repeat this test: why; ")


HOOKS = """
    import pytest
    from pytest_memleak_ebpf import roles
    from pytest_memleak_ebpf.marks import Budget

    class Engine:
        def __init__(self):
            self.settings = type("S", (), {"in_process": "extensions", "in_process_scope": "call",
                                           "default_budget": Budget(0, None)})()
            self.log = []
            self._active = False
        def begin(self, budget=None): self._active = True
        def active(self): return self._active
        def open_window(self, *, freeze=True): self.log.append("open")
        def close_window(self, *, collect=False): self.log.append("close")
        def snapshot(self): return {"bytes": 0, "blocks": 0}
        def set_growth(self, *a): self.log.append("growth")

    ENGINE = Engine()

    class Checker(roles.Checker):
        def pytest_runtest_makereport(self, item, call):   # no verdicts here: only the windows
            yield
        pytest_runtest_makereport = pytest.hookimpl(hookwrapper=True)(pytest_runtest_makereport)
        def pytest_runtest_protocol(self, item, nextitem):
            item.stash[roles.reports_key] = []
            ENGINE._active = False
            ENGINE.log.append(item.name)
            yield
        pytest_runtest_protocol = pytest.hookimpl(hookwrapper=True)(pytest_runtest_protocol)
        def pytest_unconfigure(self, config):
            print("LOG", ENGINE.log)

    def pytest_configure(config):
        config.pluginmanager.register(Checker(config, ENGINE), "fake-checker")
"""


def test_hooks_testcase_window_and_unrepeatable_failure(pytester):
    pytester.makeconftest(HOOKS)
    pytester.makepyfile(test_x='''
        import unittest, pytest
        EVENTS = []

        class Case(unittest.TestCase):
            def setUp(self):
                EVENTS.append("setUp")
            def tearDown(self):
                EVENTS.append("tearDown")
            def test_method(self):
                EVENTS.append("test")
            @unittest.skip("no")
            def test_skipped(self):
                pass

        @pytest.mark.leak_budget(0, warmup=1, repeat=2)
        class GrowthCase(unittest.TestCase):
            def test_g(self):
                EVENTS.append("g")

        @pytest.mark.leak_budget(0, warmup=1, repeat=2)
        async def test_coroutine():
            pass

        def test_function():
            pass

        def test_events():
            assert EVENTS == ["setUp", "test", "tearDown", "g", "g", "g"]
    ''')
    result = pytester.runpytest("-p", "no:cacheprovider", "-s", "-W", "ignore")
    out = result.stdout.str()
    result.assert_outcomes(passed=4, skipped=1, failed=1)
    assert ("test_x.py::test_coroutine: growth mode (warmup 1, repeat 2) cannot repeat this test: it is a "
            "coroutine function, which its async plugin runs once") in out
    log = out.split("LOG ", 1)[1].splitlines()[0]
    # the method window opens after setUp and closes before tearDown: the only window of test_method;
    # a skipped method gets an empty window; growth repeats the TestCase in one window
    assert log == str(["test_method", "open", "close", "test_skipped", "open", "close",
                       "test_g", "open", "close", "growth", "test_coroutine",
                       "test_function", "open", "close", "test_events", "open", "close"])


# -- texts -------------------------------------------------------------------------

def _result(ip_leaked, *, growth=None, procs=()):
    ip = InProcess("extensions", outstanding=Amount(400, 8), leaked=ip_leaked, allocated=Amount(1200, 30),
                   stacks=[StackLeak(96, 2, [{"function": "leakext_leak", "offset": 0x9b, "module": "/x.so",
                                              "file": None, "line": None}])], growth=growth)
    r = LeakResult("t.py::t", Budget(0, None), processes=list(procs), in_process=ip)
    r.leaked = Amount(ip_leaked.bytes + sum(p.leaked.bytes for p in procs),
                      ip_leaked.blocks + sum(p.leaked.blocks for p in procs))
    r.over_budget = True
    return r


GROWTH = {"warmup": 1, "repeat": 4, "per_repetition": [{"bytes": 96 * i, "blocks": 2 * i} for i in range(1, 5)],
          "deltas": [{"bytes": 96, "blocks": 2}] * 4, "growing": True}


def test_each_headline_figure_once():
    assert report.headline(_result(Amount(3000, 3))) == \
        "leak budget exceeded: 3,000 B in 3 blocks leaked in-process (budget 0 B)"
    assert report.headline(_result(Amount(96, 2), growth=GROWTH)) == \
        "leak budget exceeded: 96 B in 2 blocks leaked in-process per repetition (budget 0 B)"
    p = ProcessLeak(7, 1, "c", "/c", 0, None, 0, None, False, Amount(42, 1), Amount(42, 1), Amount(42, 1), [])
    assert report.headline(_result(Amount(96, 2), growth=GROWTH, procs=[p])) == \
        "leak budget exceeded: 138 B in 3 blocks leaked in-process (96 B per repetition) and by 1 of 1 process (budget 0 B)"
    r = _result(Amount(96, 2), growth=GROWTH)
    r.over_budget = False
    assert report.within_budget_headline(r).startswith("leaked 96 B in 2 blocks per repetition (within ")
    assert report.summary_lines([r])[0][1].startswith("t.py::t: leaked 96 B in 2 blocks per repetition (within ")


def test_growth_text_on_one_scale():
    text = report.failure_text(_result(Amount(96, 2), growth=GROWTH))
    assert ("  in-process (extensions), per repetition (mean of 4): leaked 96 B in 2 blocks; outstanding 100 B "
            "in 2 blocks; allocated 300 B in 7 blocks") in text
    assert "growth per repetition: +96 B/2, +96 B/2, +96 B/2, +96 B/2 -> keeps growing" in text
    assert "  #1 96 B in 2 blocks per repetition from the pytest process (in-process):" in text
    plain = report.failure_text(_result(Amount(96, 2)))
    assert "  in-process (extensions): leaked 96 B in 2 blocks; outstanding 400 B in 8 blocks" in plain
    assert "per repetition" not in plain


def test_the_loader_only_default_is_not_shown_as_match_all():
    r = _result(Amount(0, 0))
    r.suppressions_used = [{"pattern": "*", "source": "default", "stacks": 1, "bytes": 40, "blocks": 1},
                           {"pattern": "^_dl_", "source": "default", "stacks": 1, "bytes": 8, "blocks": 1},
                           {"pattern": "*", "source": "supp.txt:3", "stacks": 1, "bytes": 8, "blocks": 1}]
    lines = report.suppressions_used_lines(r)
    assert lines[1].endswith("leak:* (default: only when the innermost frame is in ld-linux*.so*, ld-2.*.so or "
                             "ld64.so*)")
    assert lines[2].endswith("leak:^_dl_ (default)")
    assert lines[3].endswith("leak:* (supp.txt:3)")
    from pytest_memleak_ebpf.suppressions import SuppressionUse

    table = report.suppressions_table([SuppressionUse(1, 40, 1, "*", "default")])
    assert table[2].endswith("*        default: only when the innermost frame is in ld-linux*.so*, ld-2.*.so or "
                             "ld64.so*")
