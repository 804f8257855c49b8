"""The leak-checking engine of one pytest session: owns the tracer and the
symbolizer, turns each test's records into a TestLeakResult and keeps the
JSON entries. plugin.py only wires it to pytest's hooks."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from .accounting import TestLeakResult, account
from .marks import Budget
from .report import json_report, write_json_atomic


@dataclass
class Settings:
    default_budget: Budget
    json_path: str | None = None
    max_blocks: int = 1 << 20
    max_stacks: int = 1 << 15
    max_processes: int = 1 << 15
    on_incomplete: str = "error"          # "error" | "warn"


@dataclass
class SessionInfo:
    probes: int = 0
    uprobes: int = 0
    load_seconds: float = 0.0
    libc: str = ""
    placements: list[str] = field(default_factory=list)


class LeakEngine:
    def __init__(self, settings: Settings):
        from .symbolize import Symbolizer
        from .tracer import Tracer, TracerConfig

        self.settings = settings
        cfg = TracerConfig(
            max_blocks=settings.max_blocks,
            max_stacks=settings.max_stacks,
            max_procs=settings.max_processes,
        )
        self.tracer = Tracer(cfg)
        self.symbolizer = Symbolizer()
        self._frame_cache: dict[tuple, dict] = {}
        self.tracer.add_root(os.getpid())
        self.info = SessionInfo(
            probes=self.tracer.probe_count,
            uprobes=len(self.tracer.probes),
            load_seconds=self.tracer.load_seconds,
            libc=self.tracer.libc,
            placements=[
                f"{p.function}@+{p.offset}" + (" (return)" if p.return_probe else f" '{p.instruction}'")
                for p in self.tracer.probes
            ],
        )
        self.json_entries: list[dict] = []
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
        result = account(
            nodeid, budget, raw.processes, raw.blocks, raw.stacks, self._resolve,
            exe_paths=exe_paths, lost_procs=raw.lost_procs, lost_events=raw.lost_events,
        )
        self.report_seconds += time.monotonic() - t0
        self.results.append(result)
        return result

    def abandon(self) -> None:
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
            self._frame_cache[key] = f
        return dict(f)

    # -- session ------------------------------------------------------------

    def record_json(self, result: TestLeakResult, outcome: str) -> None:
        self.json_entries.append(result.to_json(outcome))

    def write_json(self) -> str | None:
        path = self.settings.json_path
        if not path:
            return None
        write_json_atomic(path, json_report(self.json_entries, session={
            "probes": self.info.probes,
            "libc": self.info.libc,
            "load_seconds": round(self.info.load_seconds, 3),
        }))
        return path

    def close(self) -> None:
        self.tracer.close()
