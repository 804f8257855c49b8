"""The window's gc.freeze() (engine._GcFreeze): undone at the window's
close, and as soon as the test itself uses the collector, so a test sees the
interpreter as it would without the plugin. No eBPF."""

import gc
import weakref
from types import SimpleNamespace

from pytest_memleak_ebpf.engine import _GcFreeze


class Node:
    pass


def _frozen():
    engine = SimpleNamespace(_froze=True)
    _GcFreeze.freeze(engine)
    return engine


def test_a_collection_the_test_asks_for_frees_garbage_older_than_the_window():
    a, b = Node(), Node()
    a.other, b.other = b, a          # a cycle made before the window ...
    gone = weakref.ref(a)
    del a, b                         # ... that became garbage before it opened
    engine = _frozen()
    try:
        assert _GcFreeze._real["get_freeze_count"]() > 0
        gc.collect()                 # the test's own call: thaws first
        assert gone() is None
        assert engine._froze is False and gc.collect is _GcFreeze.collect
        assert gc.get_freeze_count() == 0
    finally:
        _GcFreeze.thaw(engine)


def test_every_wrapped_function_thaws_and_the_close_restores_them():
    for name in _GcFreeze.WRAPPED:
        engine = _frozen()
        try:
            assert getattr(gc, name) is not _GcFreeze._real[name]
            args = (object(),) if name == "get_referrers" else ()
            getattr(gc, name)(*args)
            assert engine._froze is False, name
            assert getattr(gc, name) is _GcFreeze._real[name], name
            if name == "freeze":      # the test's own freeze stands (it is the test's to undo)
                assert _GcFreeze._real["get_freeze_count"]() > 0
                _GcFreeze._real["unfreeze"]()
            assert _GcFreeze._real["get_freeze_count"]() == 0, name
        finally:
            _GcFreeze.thaw(engine)
    engine = _frozen()
    _GcFreeze.thaw(engine)           # the window's close, the test used nothing
    assert engine._froze is False and gc.get_freeze_count() == 0
    assert all(getattr(gc, n) is _GcFreeze._real[n] for n in _GcFreeze.WRAPPED)
