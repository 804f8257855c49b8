"""The verdict: what a test leaked after suppressions, whether that is over
its budget, and whether its figures are complete. The one place these are
computed, for the processes a test launched and for the pytest process's
own window (also when that window spans the whole test: in-process scope
"test" settles the same result again once the window has closed)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .accounting import Amount, TestLeakResult


@dataclass
class Figures:
    """One owner's figures: what counted, what suppressions hid, what is left."""
    counted: Amount
    suppressed: Amount
    leaked: Amount


@dataclass(frozen=True)
class Problem:
    """Why figures are incomplete (Verdict.incomplete: the test follows
    --ebpf-leaks-on-incomplete) or what was not captured while the counts stay
    exact (Verdict.warnings); report.problem_text says it."""
    code: str
    n: int = 0
    pid: int | None = None
    comm: str | None = None
    exe: str | None = None
    reason: str | None = None


@dataclass
class Verdict:
    processes: list[Figures]                   # aligned with result.processes
    in_process: Figures | None
    leaked: Amount                             # processes + in-process
    suppressed: Amount                         # processes only
    over_budget: bool
    incomplete: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


def _minus(a: Amount, b: Amount) -> Amount:
    return Amount(max(a.bytes - b.bytes, 0), max(a.blocks - b.blocks, 0))


def decide(result: TestLeakResult, summary=None) -> Verdict:
    """The verdict on `result` given which of its stacks `summary`
    (suppressions.apply) hides; pure. A process's leaked figure is what
    counted minus its suppressed stacks of the kinds the budget counts (stacks
    beyond a stack limit are never suppressed); the in-process figure likewise, except in growth mode, whose
    per-repetition figure suppressions do not change."""
    hidden = summary.matches if summary is not None else {}
    procs = []
    total = Amount()
    total_supp = Amount()
    counts = result.budget.kinds
    for p in result.processes:
        supp = Amount()
        for s in p.stacks:
            if id(s) in hidden and s.kind in counts:   # a suppressed stack of a kind that counts
                supp.bytes += s.bytes
                supp.blocks += s.blocks
        f = Figures(Amount(p.counted.bytes, p.counted.blocks), supp, _minus(p.counted, supp))
        procs.append(f)
        total.bytes += f.leaked.bytes
        total.blocks += f.leaked.blocks
        total_supp.bytes += supp.bytes
        total_supp.blocks += supp.blocks
    ipf = None
    ip = result.in_process
    if ip is not None:
        supp = Amount()
        for s in ip.stacks:
            if id(s) in hidden and s.kind in ip.kinds:   # a suppressed stack of a kind that counts
                supp.bytes += s.bytes
                supp.blocks += s.blocks
        leaked = Amount(ip.counted.bytes, ip.counted.blocks) if ip.growth else _minus(ip.counted, supp)
        ipf = Figures(Amount(ip.counted.bytes, ip.counted.blocks), supp, leaked)
        total.bytes += leaked.bytes
        total.blocks += leaked.blocks
    return Verdict(procs, ipf, total, total_supp, result.budget.exceeded_by(total.bytes, total.blocks),
                   _incomplete(result), _warnings(result))


def _incomplete(result: TestLeakResult) -> list[Problem]:
    out = []
    ip = result.in_process
    if ip is not None and (ip.lost_blocks or ip.lost_handoffs):
        out.append(Problem("in_process_lost", ip.lost_blocks + ip.lost_handoffs))
    for p in result.processes:
        if p.lost_blocks:
            out.append(Problem("lost_blocks", p.lost_blocks, p.pid, p.comm))
        if p.lost_handoffs:
            out.append(Problem("lost_handoffs", p.lost_handoffs, p.pid, p.comm))
    out += _not_covered(result)
    if result.lost_processes:
        out.append(Problem("lost_processes", result.lost_processes))
    return out


def _not_covered(result: TestLeakResult) -> list[Problem]:
    """Processes whose allocator is not probed: their figures are not seen
    (a test with budget None only reports them)."""
    if not result.budget.checked:
        return []
    return [Problem("not_covered", 0, p.pid, p.comm, p.exe, p.allocator_reason)
            for p in result.processes if p.allocator is not None and not p.allocator["covered"]]


def _warnings(result: TestLeakResult) -> list[Problem]:
    out = [Problem("lost_stacks", p.lost_stacks, p.pid, p.comm) for p in result.processes if p.lost_stacks]
    if result.lost_events:
        out.append(Problem("lost_events", result.lost_events))
    return out


def settle(result: TestLeakResult, summary=None) -> Verdict:
    """Decide and write the verdict's figures into `result`: stacks'
    suppressed flags, each owner's leaked figure, the total, over_budget and
    the suppressions used; returns the verdict, whose problems
    report.render_problems writes into `result` as text."""
    v = decide(result, summary)
    hidden = summary.matches if summary is not None else {}
    for s in result.stacks():
        hit = hidden.get(id(s))
        s.suppressed = hit is not None
        s.suppression = hit.pattern if hit is not None else None
    for p, f in zip(result.processes, v.processes):
        p.leaked = f.leaked
    if result.in_process is not None:
        result.in_process.leaked = v.in_process.leaked
    result.leaked = v.leaked
    result.over_budget = v.over_budget
    result.suppressions_used = [
        {"pattern": u.pattern, "source": u.source, "stacks": u.stacks, "bytes": u.bytes, "blocks": u.blocks}
        for u in (summary.used if summary is not None else ())
    ]
    return v
