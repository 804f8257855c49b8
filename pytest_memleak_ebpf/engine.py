"""The leak-checking engine of one pytest session: owns the tracer and the
frame resolver, runs each test's records through the result pipeline and
keeps the results and JSON entries. plugin.py only wires it to pytest's hooks.

The pipeline, one way (each stage in its own module; the resolver is the
stage that reads files — /proc/self/maps, build ids, symbols, DWARF — and
the others do no I/O, except the suppressions' `<static initializer>`
pattern, which asks elf.py for a module's constructors when a frame has no
function name):

  tracer.RawTest
    -> classify.classify          a kind per live block (the scans' kinds, or "unclassified")
    -> resolve.Resolver           frames, once, through the session's one cache
    -> accounting                 per-process / in-process figures and stacks
    -> suppressions.apply         which stacks are hidden (defaults, files, marker)
    -> verdict.settle             leaked, totals, over_budget; what is incomplete
    -> report.render_problems     the incomplete / warning texts
    -> report / flamegraph / JSON rendering"""

from __future__ import annotations

import functools
import gc
import os
import sys
import time
from dataclasses import dataclass

from .accounting import (Amount, InProcess, TestLeakResult, account, account_in_process, in_process_amount,
                         in_process_groups, stack_hashes)
from .classify import LEAK_KINDS, classify, classify_blocks, classify_window
from .marks import Budget
from .suppressions import apply as match_suppressions
from .report import render_problems
from .verdict import settle


@dataclass
class Settings:
    default_budget: Budget
    json_path: str | None = None
    max_blocks: int = 1 << 20
    max_stacks: int = 1 << 15
    max_processes: int = 1 << 15
    on_incomplete: str = "error"          # "error" | "warn"
    in_process: str = "extensions"        # "extensions" | "all" | "off"
    in_process_scope: str = "call"        # "call" | "test" (setup + call + teardown)
    in_process_kinds: bool = False        # classify the window's blocks (kinds/inprocess.py): opt-in
    own_modules: frozenset = frozenset()  # modules the plugin itself loaded (never extensions)
    suppressions: tuple = ()              # default + files (Suppression objects)
    flamegraph_dir: str | None = None
    wait: float = 0.0


def session_info(tracer) -> dict:
    """The JSON report's session entry."""
    info = {"probes": tracer.probe_count, "libc": tracer.libc, "load_seconds": round(tracer.load_seconds, 3)}
    pauses = getattr(tracer, "exec_pauses", None)
    if pauses is not None:
        # the allocator of every exec (tracer/execpause.py)
        info["allocators"] = dict(pauses.kinds)
        info["exec_pauses"] = pauses.pauses
    scans = getattr(tracer, "window_scans", None)
    if scans:
        # in-process windows classified (kinds/inprocess.py): how many, and what they cost
        secs = [s[0] for s in scans]
        phases: dict = {}
        for s in scans:
            for k, v in s[3].items():
                phases[k] = round(phases.get(k, 0.0) + v, 3)
        info["in_process_scans"] = {"windows": len(scans), "seconds": round(sum(secs), 3),
                                    "max_seconds": round(max(secs), 3),
                                    "max_root_bytes": max(s[1] for s in scans), "phase_seconds": phases}
    return info


def tracer_config(settings: Settings):
    from .tracer import TracerConfig

    return TracerConfig(max_blocks=settings.max_blocks, max_stacks=settings.max_stacks,
                        max_procs=settings.max_processes)


def new_tracer(settings: Settings):
    """This process's own tracer for a session with `settings` (the window
    scanner only when in-process leak kinds are on)."""
    from .tracer import Tracer

    return Tracer(tracer_config(settings), window_scans=settings.in_process_kinds)


class _GcFreeze:
    """gc.freeze() for a window (LeakEngine.open_window), undone at its close
    or as soon as the test itself uses the collector: while frozen, gc's
    functions are wrapped so that any call of them first thaws every object
    (a test that collects, counts objects or looks for referrers sees the
    interpreter as it would without the plugin)."""

    WRAPPED = ("collect", "get_objects", "get_referrers", "get_count", "get_stats", "freeze", "unfreeze",
               "get_freeze_count")
    collect = staticmethod(gc.collect)
    _real = {name: getattr(gc, name) for name in WRAPPED}
    _engine = None

    @classmethod
    def freeze(cls, engine) -> None:
        cls._real["freeze"]()
        cls._engine = engine
        for name, fn in cls._real.items():
            setattr(gc, name, cls._thawing(fn))

    @classmethod
    def _thawing(cls, fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if cls._engine is not None:
                cls.thaw(cls._engine)
            return fn(*args, **kwargs)
        return call

    @classmethod
    def thaw(cls, engine) -> None:
        """Give the window's frozen objects back (nothing when not frozen)."""
        if not engine._froze:
            return
        engine._froze = False
        cls._engine = None
        for name, fn in cls._real.items():
            setattr(gc, name, fn)
        cls._real["unfreeze"]()


class LeakEngine:
    def __init__(self, settings: Settings, tracer=None):
        """tracer: the xdist controller's (tracer.server.RemoteTracer); by default
        this process loads its own."""
        from .resolve import Resolver

        self.settings = settings
        if tracer is None:
            tracer = new_tracer(settings)
        self.tracer = tracer
        self.resolver = Resolver()
        self._growth: dict | None = None
        self._empty_window = False
        self._froze = False                 # gc.freeze() was called at the open window's start
        self._nothing_counted = False       # the closed window held no block that could count
        self.tracer.add_root(os.getpid())
        self.json_entries: list[dict] = []
        self.flamegraphs: list[tuple[str, str]] = []
        self.results: list[TestLeakResult] = []
        self._current: int | None = None
        self._kinds_wanted = False
        self.report_seconds = 0.0

    @property
    def window_empty(self) -> bool:
        """An in-process window is open (or awaits its result) with nothing
        traced: no extension module was loaded when it opened."""
        return self._empty_window

    # -- per test ---------------------------------------------------------

    def begin(self, budget: Budget | None = None) -> None:
        """budget: the test's (its kinds say whether its processes are classified)."""
        wanted = budget.classify if budget is not None else self.settings.default_budget.classify
        self._current = self.tracer.begin_test(wanted)
        self._kinds_wanted = wanted
        self._nothing_counted = False

    def active(self) -> bool:
        return self._current is not None

    def finish(self, nodeid: str, budget: Budget) -> TestLeakResult:
        test_id, self._current = self._current, None
        raw = self.tracer.end_test(test_id)
        t0 = time.monotonic()
        exe_paths = {}
        for serial, paths in raw.paths.items():
            self.resolver.add_paths(paths)
            if paths:
                exe_paths[serial] = paths[0]
        classified = classify(raw.blocks, raw.inproc_blocks, kinds=raw.kinds, processes=raw.processes,
                              scan_reasons=raw.unclassified, scanned=raw.scanned,
                              wanted=self._kinds_wanted, inproc_kinds=raw.inproc_kinds,
                              inproc_reason=raw.inproc_reason or self._inproc_off())
        in_process = None
        if self._empty_window:
            self._empty_window = False
            in_process = self._in_process({}, {}, {}, self._growth, budget,
                                          reason="no extension module was loaded: nothing was recorded")
        elif raw.inproc_counters is not None:
            in_process = self._in_process(classified.in_process, raw.stacks, raw.inproc_counters, self._growth, budget,
                                          classified.in_process_classified, classified.in_process_reason)
        self._growth = None
        hashes: set[int] = set()
        for blocks in classified.processes.values():
            hashes |= stack_hashes(blocks)
        frames = self.resolver.stacks(raw.stacks, hashes)
        result = account(
            nodeid, budget, raw.processes, classified.processes, frames,
            exe_paths=exe_paths, lost_procs=raw.lost_procs, lost_events=raw.lost_events,
            in_process=in_process, reasons=classified.reasons,
        )
        render_problems(result, settle(result, match_suppressions(result, self._suppressions(budget))))
        if self.settings.flamegraph_dir and (result.over_budget or result.incomplete):
            from .flamegraph import write_flamegraphs

            skip = {id(st) for st in result.stacks() if st.suppressed}
            try:
                self.flamegraphs.append(write_flamegraphs(result, self.settings.flamegraph_dir, skip=skip))
            except OSError as exc:
                result.warnings.append(f"could not write the flame graph: {exc}")
        self.report_seconds += time.monotonic() - t0
        self.results.append(result)
        return result

    def _in_process(self, blocks, stacks, counters, growth, budget, is_classified=False, reason=None) -> InProcess:
        """The window's figures: what counts and which groups of blocks are
        shown (accounting), their frames resolved in that order, then the
        InProcess (accounting). What counts is the budget's kinds; growth
        mode's window is never classified (it counts what grows)."""
        kinds = LEAK_KINDS if growth is not None else budget.kinds
        if growth is not None:
            reason = "growth mode counts what grows in every repetition (not classified)"
        counted, growth, groups = in_process_groups(self.settings.in_process, blocks, growth, kinds)
        if growth is not None:
            # growth mode: stacks on the headline's scale, per measured repetition
            m = max(len(growth["per_repetition"]), 1)
            groups = [(h, ext, kind, Amount(a.bytes // m, a.blocks // m)) for h, ext, kind, a in groups
                      if a.bytes // m or a.blocks // m]
        resolved = []
        for h, ext, kind, amount in groups:
            frames = self.resolver.own_stack(stacks.get(h) if h else None)
            resolved.append((amount, kind, frames, self.resolver.extension_frame(ext) if ext else None))
        return account_in_process(self.settings.in_process, blocks, counted, growth, resolved, counters,
                                  classified=is_classified, reason=reason, kinds=kinds)

    # -- in-process windows -------------------------------------------------

    def _extension_ranges(self) -> list:
        """Extension code ranges; /proc/self/maps is re-read only when the set
        of imported modules changed (or every 50 windows, for ctypes loads)."""
        import sys

        from .inprocess import extension_ranges

        key = len(sys.modules)
        self._ranges_age = getattr(self, "_ranges_age", 0) + 1
        if getattr(self, "_ranges_key", None) != key or self._ranges_age >= 50:
            self._ranges = extension_ranges(self.settings.own_modules)
            self._ranges_key = key
            self._ranges_age = 0
        return self._ranges

    def open_window(self, *, freeze: bool = True) -> None:
        """freeze: the window will end with a collection (close_window(collect=True)):
        the objects older than the window are moved to gc's permanent generation
        (gc.freeze(), a list splice) while it is open, so that collection walks
        only the objects the window made; close_window gives them back."""
        ranges = self._extension_ranges()
        if self.settings.in_process == "extensions" and not ranges:
            # nothing could count: attribution needs extension pages set before the
            # allocations happen. Record an empty window instead of tracing one.
            self._empty_window = True
            return
        self.tracer.set_extension_pages(ranges)
        # not when someone else froze objects (their freeze is theirs to undo)
        self._froze = freeze and gc.get_freeze_count() == 0
        if self._froze:
            _GcFreeze.freeze(self)
        self.tracer.open_window()

    def close_window(self, *, collect: bool = False) -> None:
        """collect: the window ends a test's call (or whole test): run
        gc.collect() first (inside the window, so the frees it makes are
        recorded) — skipped in extensions mode when no extension module is
        loaded, and whenever no block that could count is live in the window,
        as it could change no figure then — and, when the test's kinds are
        not `all`, have its blocks classified (growth mode closes its window
        without: it counts what grows)."""
        if self._empty_window:
            return
        counted = False      # a block that could count is live (then it may be worth a scan)
        try:
            if collect and (self.settings.in_process == "all" or self._extension_ranges()):
                counted = self._holds_counted()
                if counted:
                    _GcFreeze.collect()   # the window's own objects (older ones are frozen)
                    if self._froze and self._holds_counted():
                        # garbage that an older object is part of: only a full collection frees it
                        _GcFreeze.thaw(self)
                        _GcFreeze.collect()
        finally:
            _GcFreeze.thaw(self)
        self._nothing_counted = collect and not counted
        if collect and counted and self._kinds_wanted and self.settings.in_process_kinds:
            # CPython's type attribute cache holds borrowed pointers, stale once
            # a type changes or goes (a dangling pointer to a freed object's
            # address, which a leaked block may now have): empty it before the
            # scan (it refills on the next lookups). Known cost: every entry's
            # name becomes None, and None's reference count falls as they refill
            # (a later test comparing sys.getrefcount(None) around a call sees it).
            sys._clear_type_cache()
            self.tracer.close_window(self.settings.in_process)
        else:
            self.tracer.close_window()
        self.resolver.forget_maps()  # read lazily: only leaking stacks need it

    def _holds_counted(self) -> bool:
        """Whether a block that could count is live in the open window: only
        then is a full collection worth its cost (tens of ms in a process
        with many objects) — it can only free the window's blocks, and with
        none that could count it changes no figure. (What it skips: a
        finalizer of the test's cyclic garbage that would allocate.)"""
        return self.snapshot()["blocks"] > 0

    def snapshot(self) -> dict:
        """Counted in-process figures now (growth mode, inside a window)."""
        if self._empty_window:
            return {"bytes": 0, "blocks": 0}
        a = in_process_amount(self.settings.in_process, classify_blocks(self.tracer.window_snapshot()))
        return {"bytes": a.bytes, "blocks": a.blocks}

    def set_growth(self, warmup: int, repeat: int, per_repetition: list[dict]) -> None:
        self._growth = {"warmup": warmup, "repeat": repeat, "per_repetition": per_repetition}

    def finish_in_process(self, result: TestLeakResult, budget) -> TestLeakResult:
        """Scope "test": the window that spanned setup, call and teardown ends
        now; add its figures to the test's result and re-evaluate the budget."""
        self.close_window(collect=True)
        blocks, counters, stacks, (kinds, reason) = self.tracer.collect_window()
        if counters is None:   # the window was empty (no extension module)
            blocks, stacks, kinds = [], {}, None
        t0 = time.monotonic()
        per_kind, is_classified, reason = classify_window(blocks, kinds, reason or self._inproc_off(),
                                                          self._kinds_wanted)
        result.in_process = self._in_process(per_kind, stacks, counters, None, budget, is_classified, reason)
        render_problems(result, settle(result, match_suppressions(result, self._suppressions(budget))))
        self.report_seconds += time.monotonic() - t0
        return result

    def _inproc_off(self) -> str | None:
        """Why the window was not scanned when kinds are wanted: the scan is
        off, or nothing that could count was live at its close (then none was asked for)."""
        from .kinds.inprocess import KINDS_OFF, NOTHING_TO_CLASSIFY

        if not self.settings.in_process_kinds:
            return KINDS_OFF
        return NOTHING_TO_CLASSIFY if self._nothing_counted else None

    def _suppressions(self, budget: Budget) -> list:
        """The session's suppressions plus the test's marker's own."""
        return list(self.settings.suppressions) + list(budget.suppressions)

    def abandon(self) -> None:
        """Stop tracking the current test without reporting (interrupted)."""
        self._empty_window = False
        _GcFreeze.thaw(self)
        if self.tracer.in_window():
            self.tracer.close_window()
        if self._current is not None:
            test_id, self._current = self._current, None
            try:
                self.tracer.end_test(test_id)
            except Exception:
                pass

    # -- session ------------------------------------------------------------

    def wait_for_processes(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.tracer.running(self._current):
            time.sleep(0.01)

    def record_json(self, result: TestLeakResult, outcome: str, *, interrupted: bool = False) -> None:
        entry = result.to_json(outcome)
        if interrupted:
            entry["interrupted"] = True
        self.json_entries.append(entry)

    def session_info(self) -> dict:
        return session_info(self.tracer)

    def close(self) -> None:
        self.tracer.close()
