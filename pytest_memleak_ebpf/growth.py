"""Growth mode (leak_budget(..., warmup=N, repeat=M) or --ebpf-leaks-warmup/
--ebpf-leaks-repeat): run the test body N times unmeasured, then M times inside
one in-process window with a snapshot of the counted figures after each, so
only what keeps growing per repetition counts.

What is repeated, per test style: a test function or method (plain or
parametrized) is called again with the same fixture values (its fixtures are
set up once); a unittest.TestCase test is run again whole, on a fresh
instance — setUp, the test method, tearDown and its cleanups — each time. A test growth mode cannot
repeat (a coroutine its async plugin runs once, a doctest, another plugin's
item) fails with a message naming it and why (unrepeatable), never a silent
pass."""

from __future__ import annotations

import gc
import inspect
import sys

import pytest

from .marks import Budget


def is_testcase(item) -> bool:
    """A unittest.TestCase test (pytest's unittest plugin runs it through
    TestCaseFunction.runtest, not pytest_pyfunc_call)."""
    unittest = sys.modules.get("unittest")
    if unittest is None or not isinstance(item, pytest.Function) or not getattr(item, "nofuncargs", False):
        return False
    return isinstance(getattr(item, "instance", None), unittest.TestCase)


def unrepeatable(item, budget: Budget, why: str) -> str:
    """The failure message of a test growth mode could not repeat."""
    return (f"{item.nodeid}: growth mode (warmup {budget.warmup or 0}, repeat {budget.repeat}) cannot repeat "
            f"this test: {why}; growth mode repeats test functions, methods (plain or parametrized) and "
            f"unittest.TestCase tests — run it without growth mode (leak_budget without warmup/repeat)")


def why_not_repeated(item) -> str:
    """Why a test growth mode did not repeat (it never reached the repetitions)."""
    if not isinstance(item, pytest.Function):
        return f"it is a {type(item).__module__}.{type(item).__qualname__} item, not a test function"
    if inspect.iscoroutinefunction(item.obj) or inspect.isasyncgenfunction(item.obj):
        return "it is a coroutine function, which its async plugin runs once"
    return "its function was called by another plugin's pytest_pyfunc_call, once"


def _measure(engine, warmup: int, repeat: int, once) -> None:
    """warmup unmeasured calls of once(), then `repeat` measured ones in one
    window with a snapshot after each; once() returning False (the test failed
    or was skipped) stops the repetitions."""
    for _ in range(warmup):
        if once() is False:
            return
    gc.collect()
    snapshots = []
    engine.open_window(freeze=False)     # its snapshots follow full collections
    try:
        for _ in range(repeat):
            ok = once()
            gc.collect()
            snapshots.append(engine.snapshot())
            if ok is False:
                break
    finally:
        gc.collect()
        engine.close_window()
        engine.set_growth(warmup, repeat, snapshots)


def run_repetitions(engine, item: pytest.Function, budget: Budget) -> bool | None:
    """Run `item`'s body warmup + repeat times (its pytest_pyfunc_call); the
    engine gets the per-repetition snapshots. None: not run here (a coroutine
    test, which its async plugin runs once)."""
    fn = item.obj
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return None
    args = {name: item.funcargs[name] for name in item._fixtureinfo.argnames}
    _measure(engine, budget.warmup or 0, budget.repeat, lambda: fn(**args))
    return True


def run_testcase_repetitions(engine, item, budget: Budget) -> bool:
    """Run a unittest.TestCase test whole warmup + repeat times, each time on
    a fresh instance of its class as unittest itself would (setUp, the
    method, tearDown, cleanups; what setUp keeps on the instance goes with
    it), its results handed to the item as pytest's runtest does. A
    failure, error or skip (which unittest hands to the item, not raised)
    ends the repetitions and is reported as usual."""
    case = type(item.instance)

    def once() -> bool:
        testcase = case(item.name)
        testcase(result=item)
        del testcase
        return not getattr(item, "_excinfo", None)

    _measure(engine, budget.warmup or 0, budget.repeat, once)
    return True
