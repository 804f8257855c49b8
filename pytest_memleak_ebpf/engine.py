"""The leak-checking engine of one pytest session: owns the tracer and the
symbolizer, turns each test's records into a TestLeakResult and keeps the
JSON entries. plugin.py only wires it to pytest's hooks."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .accounting import TestLeakResult, account, account_in_process, apply_suppressions
from .marks import Budget


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
    own_modules: frozenset = frozenset()  # modules the plugin itself loaded (never extensions)
    suppressions: tuple = ()              # default + files (Suppression objects)
    flamegraph_dir: str | None = None
    wait: float = 0.0


def session_info(tracer) -> dict:
    """The JSON report's session entry."""
    return {"probes": tracer.probe_count, "libc": tracer.libc, "load_seconds": round(tracer.load_seconds, 3)}


def tracer_config(settings: Settings):
    from .tracer import TracerConfig

    return TracerConfig(max_blocks=settings.max_blocks, max_stacks=settings.max_stacks,
                        max_procs=settings.max_processes)


class LeakEngine:
    def __init__(self, settings: Settings, tracer=None):
        """tracer: the xdist controller's (shared.RemoteTracer); by default
        this process loads its own."""
        from .symbolize import Symbolizer

        self.settings = settings
        if tracer is None:
            from .tracer import Tracer

            tracer = Tracer(tracer_config(settings))
        self.tracer = tracer
        self.symbolizer = Symbolizer()
        self._frame_cache: dict[tuple, dict] = {}
        self._maps: list[tuple[int, int, int, str]] | None = None
        self._growth: dict | None = None
        self._empty_window = False
        self.tracer.add_root(os.getpid())
        self.json_entries: list[dict] = []
        self.flamegraphs: list[tuple[str, str]] = []
        self.results: list[TestLeakResult] = []
        self._current: int | None = None
        self.report_seconds = 0.0

    # -- per test ---------------------------------------------------------

    def begin(self) -> None:
        self._current = self.tracer.begin_test()

    def active(self) -> bool:
        return self._current is not None

    def finish(self, nodeid: str, budget: Budget) -> TestLeakResult:
        test_id, self._current = self._current, None
        raw = self.tracer.end_test(test_id)
        t0 = time.monotonic()
        exe_paths = {}
        for serial, paths in raw.paths.items():
            for p in paths:
                self.symbolizer.add_candidate(p)
            if paths:
                exe_paths[serial] = paths[0]
        in_process = None
        if self._empty_window:
            self._empty_window = False
            in_process = account_in_process(self.settings.in_process, [], {}, self._resolve, self._resolve_ext, {},
                                            growth=self._growth)
        elif raw.inproc_counters is not None:
            in_process = account_in_process(
                self.settings.in_process, raw.inproc_blocks, raw.stacks, self._resolve,
                self._resolve_ext, raw.inproc_counters, growth=self._growth,
            )
        self._growth = None
        result = account(
            nodeid, budget, raw.processes, raw.blocks, raw.stacks, self._resolve,
            exe_paths=exe_paths, lost_procs=raw.lost_procs, lost_events=raw.lost_events,
            in_process=in_process,
        )
        apply_suppressions(result, self._suppressions(budget))
        if self.settings.flamegraph_dir and (result.over_budget or result.incomplete):
            from .flamegraph import write_flamegraphs

            skip = {id(st) for p in result.processes for st in p.stacks if st.suppressed}
            if result.in_process is not None:
                skip |= {id(st) for st in result.in_process.stacks if st.suppressed}
            try:
                self.flamegraphs.append(write_flamegraphs(result, self.settings.flamegraph_dir, skip=skip))
            except OSError as exc:
                result.warnings.append(f"could not write the flame graph: {exc}")
        self.report_seconds += time.monotonic() - t0
        self.results.append(result)
        return result

    # -- in-process windows -------------------------------------------------

    @property
    def window_empty(self) -> bool:
        return self._empty_window

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

    def open_window(self) -> None:
        ranges = self._extension_ranges()
        if self.settings.in_process == "extensions" and not ranges:
            # nothing could count: attribution needs extension pages set before the
            # allocations happen. Record an empty window instead of tracing one.
            self._empty_window = True
            return
        self.tracer.set_extension_pages(ranges)
        self.tracer.open_window()

    def close_window(self, *, collect: bool = False) -> None:
        """collect: run gc.collect() first (inside the window, so the frees
        it makes are recorded) — skipped in extensions mode when no extension
        module is loaded, as nothing could count then."""
        if self._empty_window:
            return
        if collect and (self.settings.in_process == "all" or self._extension_ranges()):
            import gc

            gc.collect()
        self.tracer.close_window()
        self._maps = None  # read lazily: only leaking stacks need it

    def snapshot(self) -> dict:
        """Counted in-process figures now (growth mode, inside a window)."""
        if self._empty_window:
            return {"bytes": 0, "blocks": 0}
        blocks = self.tracer.window_snapshot()
        mode = self.settings.in_process
        counted = [b for b in blocks if mode == "all" or b[2]]
        return {"bytes": sum(b[0] for b in counted), "blocks": len(counted)}

    def set_growth(self, warmup: int, repeat: int, per_repetition: list[dict]) -> None:
        self._growth = {"warmup": warmup, "repeat": repeat, "per_repetition": per_repetition}

    def _resolve_ext(self, ip: int) -> dict:
        from .inprocess import locate
        from .symbolize import read_build_id

        if self._maps is None:
            from .inprocess import read_maps

            self._maps = read_maps()
        hit = locate(self._maps, ip)
        if hit is None:
            return {"function": None, "offset": None, "module": None, "file": None, "line": None,
                    "build_id": None, "address": ip}
        path, file_offset = hit
        bid = read_build_id(path)
        if bid is None:
            return {"function": None, "offset": file_offset, "module": path, "file": None, "line": None,
                    "build_id": None, "address": ip}
        self.symbolizer.add_candidate(path)
        return self._resolve(1, bid.hex(), file_offset)

    def finish_in_process(self, result: TestLeakResult, budget) -> TestLeakResult:
        """Scope "test": the window that spanned setup, call and teardown ends
        now; add its figures to the test's result and re-evaluate the budget."""
        self.close_window(collect=True)
        blocks, counters, stacks = self.tracer.collect_window()
        if counters is None:   # the window was empty (no extension module)
            blocks, stacks = [], {}
        t0 = time.monotonic()
        result.in_process = account_in_process(self.settings.in_process, blocks, stacks, self._resolve,
                                               self._resolve_ext, counters)
        apply_suppressions(result, self._suppressions(budget))
        self.report_seconds += time.monotonic() - t0
        return result

    def _suppressions(self, budget) -> list:
        """The session's suppressions plus the test's marker's own."""
        sups = list(self.settings.suppressions)
        if budget.suppress:
            from .suppressions import from_patterns

            sups += from_patterns(budget.suppress, source="marker")
        return sups

    def abandon(self) -> None:
        self._empty_window = False
        if self.tracer.in_window():
            self.tracer.close_window()
        """Stop tracking the current test without reporting (interrupted)."""
        if self._current is not None:
            test_id, self._current = self._current, None
            try:
                self.tracer.end_test(test_id)
            except Exception:
                pass

    def _resolve(self, status: int, build_id: str | None, off: int) -> dict:
        key = (status, build_id, off)
        f = self._frame_cache.get(key)
        if f is None:
            if build_id is not None:
                fr = self.symbolizer.resolve(bytes.fromhex(build_id), off)
            else:
                fr = self.symbolizer.resolve_raw_ip(off)
            f = {
                "function": fr.function,
                "offset": fr.offset,
                "module": fr.module,
                "file": fr.file,
                "line": fr.line,
                "build_id": build_id,
                "address": off,
            }
            if f["function"] is not None or f["module"] is not None:
                self._frame_cache[key] = f  # unknown frames may resolve once more modules are seen
        return dict(f)

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
