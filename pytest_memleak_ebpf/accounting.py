"""Accounting: from a test's raw tracer records to per-process and per-stack
leak figures and a budget verdict. Pure Python, builtin types in and out."""

from __future__ import annotations

import pwd
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from .marks import Budget
from .sizes import format_blocks, format_bytes

# (status, build_id hex | None, offset or ip) -> frame dict
FrameResolver = Callable[[int, "str | None", int], dict]

NO_STACK_FRAME = {"function": None, "offset": None, "module": None, "file": None, "line": None}


@dataclass
class Amount:
    bytes: int = 0
    blocks: int = 0


@dataclass
class StackLeak:
    bytes: int
    blocks: int
    frames: list[dict]
    captured: bool = True


@dataclass
class ProcessLeak:
    pid: int
    ppid: int
    comm: str
    exe: str | None
    uid: int
    user: str | None
    exit_code: int | None
    signal: int | None
    running_at_test_end: bool
    outstanding: Amount
    leaked: Amount
    allocated: Amount
    stacks: list[StackLeak]
    lost_blocks: int = 0
    lost_handoffs: int = 0
    lost_stacks: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("lost_blocks", "lost_handoffs", "lost_stacks"):
            d.pop(k)
        d["tracking"] = {
            "lost_blocks": self.lost_blocks,
            "lost_handoffs": self.lost_handoffs,
            "lost_stacks": self.lost_stacks,
        }
        return d


@dataclass
class TestLeakResult:
    nodeid: str
    budget: Budget
    processes: list[ProcessLeak] = field(default_factory=list)
    leaked: Amount = field(default_factory=Amount)
    over_budget: bool = False
    incomplete: list[str] = field(default_factory=list)   # counts are not exact
    warnings: list[str] = field(default_factory=list)     # figures exact, detail missing

    @property
    def leaking_processes(self) -> list[ProcessLeak]:
        return [p for p in self.processes if p.leaked.blocks or p.leaked.bytes]

    def headline(self) -> str:
        """The failure's first line, self-contained."""
        n_leaking = len(self.leaking_processes)
        return (
            f"leak budget exceeded: {format_bytes(self.leaked.bytes)} in {format_blocks(self.leaked.blocks)} "
            f"leaked by {n_leaking} of {len(self.processes)} process{'es' if len(self.processes) != 1 else ''} "
            f"({self.budget.describe()})"
        )

    def incomplete_headline(self) -> str:
        return "leak tracking incomplete: " + "; ".join(self.incomplete)

    def to_json(self, outcome: str) -> dict:
        return {
            "nodeid": self.nodeid,
            "outcome": outcome,
            "budget": {"bytes": self.budget.bytes if self.budget.checked else None,
                       "blocks": self.budget.blocks if self.budget.checked else None},
            "leaked": asdict(self.leaked),
            "over_budget": self.over_budget,
            "tracking_complete": not self.incomplete,
            "incomplete": list(self.incomplete),
            "warnings": list(self.warnings),
            "processes": [p.to_json() for p in self.processes],
        }


def _user(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def aggregate_stacks(
    blocks: Iterable[tuple[int, int]],
    stacks: Mapping[int, Sequence[tuple[int, str | None, int]]],
    resolve: FrameResolver,
    *,
    limit: int | None = None,
) -> list[StackLeak]:
    """Group (size, stack-hash) blocks per stack, largest first."""
    per: dict[int, Amount] = {}
    for size, h in blocks:
        a = per.setdefault(h, Amount())
        a.bytes += size
        a.blocks += 1
    order = sorted(per.items(), key=lambda kv: (-kv[1].bytes, -kv[1].blocks, kv[0]))
    if limit is not None:
        order = order[:limit]
    out = []
    for h, amount in order:
        raw = stacks.get(h) if h else None
        if raw:
            frames = [resolve(status, bid, off) for status, bid, off in raw]
            out.append(StackLeak(amount.bytes, amount.blocks, frames, True))
        else:
            out.append(StackLeak(amount.bytes, amount.blocks, [dict(NO_STACK_FRAME)], False))
    return out


def account(
    nodeid: str,
    budget: Budget,
    processes: Sequence[dict],
    blocks: Mapping[int, Sequence[tuple[int, int]]],
    stacks: Mapping[int, Sequence[tuple[int, str | None, int]]],
    resolve: FrameResolver,
    *,
    exe_paths: Mapping[int, str] | None = None,
    lost_procs: int = 0,
    lost_events: int = 0,
    max_stacks_per_process: int | None = None,
) -> TestLeakResult:
    """The test's verdict from the tracer's records (see tracer.RawTest)."""
    result = TestLeakResult(nodeid=nodeid, budget=budget)
    exe_paths = exe_paths or {}
    for p in processes:
        bl = blocks.get(p["serial"], ())
        out = Amount(sum(s for s, _ in bl), len(bl))
        proc = ProcessLeak(
            pid=p["pid"],
            ppid=p["ppid"],
            comm=p["comm"],
            exe=exe_paths.get(p["serial"]) or p.get("exe_raw"),
            uid=p["uid"],
            user=_user(p["uid"]),
            exit_code=p.get("exit_code"),
            signal=p.get("signal"),
            running_at_test_end=bool(p.get("running_at_test_end")),
            outstanding=out,
            leaked=Amount(out.bytes, out.blocks),
            allocated=Amount(p.get("alloc_bytes", 0), p.get("alloc_blocks", 0)),
            stacks=aggregate_stacks(bl, stacks, resolve, limit=max_stacks_per_process),
            lost_blocks=p.get("lost_blocks", 0),
            lost_handoffs=p.get("lost_handoffs", 0),
            lost_stacks=p.get("lost_stacks", 0),
        )
        result.processes.append(proc)
        result.leaked.bytes += proc.leaked.bytes
        result.leaked.blocks += proc.leaked.blocks
        if proc.lost_blocks:
            result.incomplete.append(
                f"{proc.lost_blocks:,} allocations of pid {proc.pid} ({proc.comm}) were not recorded: "
                "the live-block map was full (raise --ebpf-leaks-max-blocks)"
            )
        if proc.lost_handoffs:
            result.incomplete.append(
                f"{proc.lost_handoffs:,} allocator calls of pid {proc.pid} ({proc.comm}) were not recorded: "
                "the hand-off map was full (too many threads inside the allocator at once)"
            )
        if proc.lost_stacks:
            result.warnings.append(
                f"{proc.lost_stacks:,} stacks of pid {proc.pid} ({proc.comm}) were not captured "
                "(stack map full: raise --ebpf-leaks-max-stacks); byte counts are still exact"
            )
    if lost_procs:
        result.incomplete.append(
            f"{lost_procs:,} processes could not be tracked: the process map was full "
            "(raise --ebpf-leaks-max-processes)"
        )
    if lost_events:
        result.warnings.append(
            f"{lost_events:,} exec/open events were lost (ring buffer full): some frames may not be symbolized"
        )
    result.over_budget = budget.exceeded_by(result.leaked.bytes, result.leaked.blocks)
    return result
