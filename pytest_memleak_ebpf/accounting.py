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
    suppressed: bool = False
    suppression: str | None = None     # the matching pattern


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
class InProcess:
    """The pytest process's own blocks from the test's window (C extensions)."""

    mode: str                      # "extensions" | "all"
    outstanding: Amount            # every block of the window still live at its end (raw)
    leaked: Amount                 # what the budget counts (mode filter; growth per repetition)
    allocated: Amount              # lifetime totals during the window
    stacks: list[StackLeak]
    growth: dict | None = None     # {"warmup", "repeat", "per_repetition": [...], "growing"}
    lost_blocks: int = 0
    lost_handoffs: int = 0
    lost_stacks: int = 0

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "outstanding": asdict(self.outstanding),
            "leaked": asdict(self.leaked),
            "allocated": asdict(self.allocated),
            "stacks": [asdict(s) for s in self.stacks],
            "growth": self.growth,
        }


@dataclass
class TestLeakResult:
    nodeid: str
    budget: Budget
    processes: list[ProcessLeak] = field(default_factory=list)
    leaked: Amount = field(default_factory=Amount)
    over_budget: bool = False
    incomplete: list[str] = field(default_factory=list)   # counts are not exact
    warnings: list[str] = field(default_factory=list)     # figures exact, detail missing
    in_process: InProcess | None = None
    suppressions_used: list[dict] = field(default_factory=list)

    @property
    def leaking_processes(self) -> list[ProcessLeak]:
        return [p for p in self.processes if p.leaked.blocks or p.leaked.bytes]

    def headline(self) -> str:
        """The failure's first line, self-contained."""
        n_leaking = len(self.leaking_processes)
        procs = f"{n_leaking} of {len(self.processes)} process{'es' if len(self.processes) != 1 else ''}"
        ip = self.in_process
        if ip is not None and (ip.leaked.bytes or ip.leaked.blocks):
            per = " per repetition" if ip.growth else ""
            where = f"in-process ({format_bytes(ip.leaked.bytes)}{per})"
            if n_leaking:
                where += f" and by {procs}"
            return (f"leak budget exceeded: {format_bytes(self.leaked.bytes)} in {format_blocks(self.leaked.blocks)} "
                    f"leaked {where} ({self.budget.describe()})")
        return (
            f"leak budget exceeded: {format_bytes(self.leaked.bytes)} in {format_blocks(self.leaked.blocks)} "
            f"leaked by {procs} ({self.budget.describe()})"
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
            "in_process": self.in_process.to_json() if self.in_process else None,
            "suppressions_used": list(self.suppressions_used),
        }


def _user(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def aggregate_stacks(
    blocks: Iterable[tuple],
    stacks: Mapping[int, Sequence[tuple[int, str | None, int]]],
    resolve: FrameResolver,
    *,
    limit: int | None = None,
) -> list[StackLeak]:
    """Group blocks per stack, largest first. Items are (size, stack-hash)
    for one block or (bytes, stack-hash, blocks) already summed per stack."""
    per: dict[int, Amount] = {}
    for item in blocks:
        a = per.setdefault(item[1], Amount())
        a.bytes += item[0]
        a.blocks += item[2] if len(item) > 2 else 1
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


def account_in_process(
    mode: str,
    blocks: Sequence[tuple[int, int, int]],
    stacks: Mapping[int, Sequence[tuple[int, str | None, int]]],
    resolve: FrameResolver,
    resolve_ext: Callable[[int], dict],
    counters: Mapping[str, int] | None,
    *,
    growth: dict | None = None,
) -> InProcess:
    """In-process figures from the window's live (size, stack, ext_ip) blocks.

    mode "extensions": only blocks with a return address into an extension
    module on their stack count; "all": every block counts. In growth mode
    `growth["per_repetition"]` holds the counted figures after each measured
    repetition; only memory that grew in every repetition is leaked, reported
    per repetition."""
    counters = counters or {}
    counted = [b for b in blocks if mode == "all" or b[2]]
    outstanding = Amount(sum(b[0] for b in blocks), len(blocks))
    leaked = Amount(sum(b[0] for b in counted), len(counted))
    if growth is not None:
        reps = growth["per_repetition"]
        prev = {"bytes": 0, "blocks": 0}
        deltas = []
        for r in reps:
            deltas.append({"bytes": r["bytes"] - prev["bytes"], "blocks": r["blocks"] - prev["blocks"]})
            prev = r
        growing = bool(deltas) and all(d["blocks"] > 0 or d["bytes"] > 0 for d in deltas)
        growth = dict(growth, deltas=deltas, growing=growing)
        m = max(len(reps), 1)
        leaked = Amount(leaked.bytes // m, leaked.blocks // m) if growing else Amount()
    # stacks: per (stack, extension return address)
    per: dict[tuple[int, int], Amount] = {}
    for size, h, ext in (counted if (leaked.blocks or leaked.bytes) else ()):
        a = per.setdefault((h, ext), Amount())
        a.bytes += size
        a.blocks += 1
    out = []
    for (h, ext), amount in sorted(per.items(), key=lambda kv: (-kv[1].bytes, -kv[1].blocks, kv[0])):
        raw = stacks.get(h) if h else None
        frames = [resolve(st, bid, off) for st, bid, off in raw] if raw else []
        if ext:
            f = dict(resolve_ext(ext), scanned=True)
            if not any(fr.get("function") and fr.get("function") == f.get("function")
                       and fr.get("module") == f.get("module") for fr in frames):
                frames.append(f)
        out.append(StackLeak(amount.bytes, amount.blocks, frames or [dict(NO_STACK_FRAME)], bool(frames)))
    return InProcess(
        mode=mode, outstanding=outstanding, leaked=leaked,
        allocated=Amount(counters.get("alloc_bytes", 0), counters.get("alloc_blocks", 0)),
        stacks=out, growth=growth,
        lost_blocks=counters.get("lost_blocks", 0), lost_handoffs=counters.get("lost_handoffs", 0),
        lost_stacks=counters.get("lost_stacks", 0),
    )


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
    in_process: InProcess | None = None,
) -> TestLeakResult:
    """The test's verdict from the tracer's records (see tracer.RawTest)."""
    result = TestLeakResult(nodeid=nodeid, budget=budget, in_process=in_process)
    if in_process is not None:
        result.leaked.bytes += in_process.leaked.bytes
        result.leaked.blocks += in_process.leaked.blocks
        if in_process.lost_blocks or in_process.lost_handoffs:
            result.incomplete.append(
                f"{in_process.lost_blocks + in_process.lost_handoffs:,} allocations of the pytest process "
                "were not recorded (a map was full: raise --ebpf-leaks-max-blocks)")
    exe_paths = exe_paths or {}
    for p in processes:
        bl = blocks.get(p["serial"], ())
        out = Amount(sum(b[0] for b in bl), sum(b[2] if len(b) > 2 else 1 for b in bl))
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


def apply_suppressions(result: TestLeakResult, suppressions: Sequence) -> TestLeakResult:
    """Mark suppressed stacks; `leaked` (process, in-process, total) then
    excludes them while `outstanding` stays raw. Re-evaluates the budget."""
    from .suppressions import apply

    summary = apply(result, suppressions or ())
    stacks = [s for p in result.processes for s in p.stacks]
    if result.in_process is not None:
        stacks += result.in_process.stacks
    for s in stacks:
        hit = summary.suppression_for(s)
        if hit is not None:
            s.suppressed = True
            s.suppression = hit.pattern
    total = Amount()
    for p, ps in zip(result.processes, summary.processes):
        p.leaked = Amount(ps.leaked.bytes, ps.leaked.blocks)
        total.bytes += p.leaked.bytes
        total.blocks += p.leaked.blocks
    ip = result.in_process
    if ip is not None:
        if summary.in_process_suppressed is not None and not ip.growth:
            ip.leaked = Amount(max(ip.leaked.bytes - summary.in_process_suppressed.bytes, 0),
                               max(ip.leaked.blocks - summary.in_process_suppressed.blocks, 0))
        total.bytes += ip.leaked.bytes
        total.blocks += ip.leaked.blocks
    result.leaked = total
    result.suppressions_used = [
        {"pattern": u.pattern, "source": u.source, "stacks": u.stacks, "bytes": u.bytes, "blocks": u.blocks}
        for u in summary.used
    ]
    result.over_budget = result.budget.exceeded_by(total.bytes, total.blocks)
    return result
