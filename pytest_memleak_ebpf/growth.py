"""Growth mode (leak_budget(..., warmup=N, repeat=M) or --ebpf-leaks-warmup/
--ebpf-leaks-repeat): run the test body N times unmeasured, then M times inside
one in-process window with a snapshot of the counted figures after each, so
only what keeps growing per repetition counts."""

from __future__ import annotations

import gc
import inspect

import pytest

from .marks import Budget


def run_repetitions(engine, item: pytest.Function, budget: Budget) -> bool | None:
    """Run `item`'s body warmup + repeat times (its pytest_pyfunc_call); the
    engine gets the per-repetition snapshots. None: not run here (a coroutine
    test, which its async plugin runs once)."""
    fn = item.obj
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return None
    args = {name: item.funcargs[name] for name in item._fixtureinfo.argnames}
    warmup = budget.warmup or 0
    for _ in range(warmup):
        fn(**args)
    gc.collect()
    snapshots = []
    engine.open_window()
    try:
        for _ in range(budget.repeat):
            fn(**args)
            gc.collect()
            snapshots.append(engine.snapshot())
    finally:
        gc.collect()
        engine.close_window()
        engine.set_growth(warmup, budget.repeat, snapshots)
    return True
