"""Accounting: a test's classified blocks and resolved frames in, per-process
and per-stack figures out. Pure: no callbacks, no I/O (apart from the user
name of a uid), builtin types and the dataclasses below.

Where it sits in the result pipeline (engine.LeakEngine.finish):

  tracer.RawTest -> classify.classify (a kind per block) -> resolve.Resolver
  (frames, once) -> accounting (figures and stacks) -> suppressions.apply
  (which stacks are hidden) -> verdict.settle (leaked, totals, over_budget,
  what is incomplete) -> report (every text: render_problems, ...) / flamegraph / JSON

What accounting does not do: suppressions, totals, budgets and messages
are the verdict's (`leaked` stays zero here until verdict.settle)."""

from __future__ import annotations

import pwd
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from .classify import KINDS, LEAK_KINDS, LOST_KINDS, UNCLASSIFIED

if TYPE_CHECKING:
    from .marks import Budget

# frames of a stack the tracer could not capture
NO_STACK_FRAME = {"function": None, "offset": None, "module": None, "file": None, "line": None}

Frames = Mapping[int, Sequence[dict]]     # stack hash -> resolved frames (innermost first)


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
    kind: str = UNCLASSIFIED           # classify's kind of these blocks

    def to_json(self) -> dict:
        return {"bytes": self.bytes, "blocks": self.blocks, "frames": self.frames, "captured": self.captured,
                "suppressed": self.suppressed, "suppression": self.suppression, "kind": self.kind}


def _kinds_sum(reachability: dict, kinds) -> Amount:
    """The outstanding amount of these kinds (reachability: kind -> Amount)."""
    out = Amount()
    for k in kinds:
        a = reachability.get(k)
        if a is not None:
            out.bytes += a.bytes
            out.blocks += a.blocks
    return out


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
    leaked: Amount                    # set by verdict.settle: outstanding minus suppressed stacks
    allocated: Amount
    stacks: list[StackLeak]
    lost_blocks: int = 0
    lost_handoffs: int = 0
    lost_stacks: int = 0
    counted: Amount = field(default_factory=Amount)  # blocks of leak kinds, before suppressions
    allocator: dict | None = None     # {"kind", "module", "covered"}; None: not known
    allocator_reason: str | None = None   # why not covered
    reachability: dict[str, Amount] = field(default_factory=dict)  # kind -> outstanding of that kind
    classified: bool = False          # its blocks were scanned (else all "unclassified")
    reason: str | None = None         # why not classified

    def kind_amount(self, *kinds: str) -> Amount:
        return _kinds_sum(self.reachability, kinds)

    def to_json(self) -> dict:
        return {
            "pid": self.pid, "ppid": self.ppid, "comm": self.comm, "exe": self.exe, "uid": self.uid,
            "user": self.user, "exit_code": self.exit_code, "signal": self.signal,
            "running_at_test_end": self.running_at_test_end, "outstanding": asdict(self.outstanding),
            "leaked": asdict(self.leaked), "allocated": asdict(self.allocated),
            "reachability": {k: asdict(self.reachability.get(k, Amount())) for k in KINDS},
            "classified": self.classified, **({} if self.classified else {"reason": self.reason}),
            "stacks": [s.to_json() for s in self.stacks],
            "tracking": {"lost_blocks": self.lost_blocks, "lost_handoffs": self.lost_handoffs,
                         "lost_stacks": self.lost_stacks},
            "allocator": self.allocator,
        }


@dataclass
class InProcess:
    """The pytest process's own blocks from the test's window (C extensions)."""

    mode: str                      # "extensions" | "all"
    outstanding: Amount            # every block of the window still live at its end (raw)
    leaked: Amount                 # what the budget counts (set by verdict.settle)
    allocated: Amount              # lifetime totals during the window
    stacks: list[StackLeak]
    growth: dict | None = None     # {"warmup", "repeat", "per_repetition": [...], "growing"}
    lost_blocks: int = 0
    lost_handoffs: int = 0
    lost_stacks: int = 0
    counted: Amount = field(default_factory=Amount)  # mode filter (growth: per repetition), before suppressions
    reachability: dict[str, Amount] = field(default_factory=dict)  # kind -> outstanding of that kind
    classified: bool = False       # its blocks were classified at the window's close
    reason: str | None = None      # why not
    kinds: frozenset = frozenset((UNCLASSIFIED,))   # the kinds that count

    def kind_amount(self, *kinds: str) -> Amount:
        return _kinds_sum(self.reachability, kinds)

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "outstanding": asdict(self.outstanding),
            "leaked": asdict(self.leaked),
            "allocated": asdict(self.allocated),
            "reachability": {k: asdict(self.reachability.get(k, Amount())) for k in KINDS},
            "classified": self.classified, **({} if self.classified else {"reason": self.reason}),
            "stacks": [s.to_json() for s in self.stacks],
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
    lost_processes: int = 0        # processes the process map had no room for
    lost_events: int = 0           # exec/open events lost (ring buffer full)
    verdict_warnings: int = 0      # how many of `warnings` (the first ones) report.render_problems wrote

    @property
    def leaking_processes(self) -> list[ProcessLeak]:
        return [p for p in self.processes if p.leaked.blocks or p.leaked.bytes]

    def stacks(self) -> list[StackLeak]:
        """Every stack: the processes' in order, then the in-process ones."""
        out = [s for p in self.processes for s in p.stacks]
        if self.in_process is not None:
            out += self.in_process.stacks
        return out

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


def _stack(amount: Amount, raw_frames: Sequence[dict] | None, kind: str) -> StackLeak:
    if raw_frames:
        return StackLeak(amount.bytes, amount.blocks, [dict(f) for f in raw_frames], True, kind=kind)
    return StackLeak(amount.bytes, amount.blocks, [dict(NO_STACK_FRAME)], False, kind=kind)


def aggregate_stacks(
    blocks: Mapping[str, Iterable[tuple]],
    frames: Frames,
    *,
    limit: int | None = None,
) -> list[StackLeak]:
    """Group a process's classified blocks ({kind: records}) per (kind,
    stack), largest first. Records are (size, stack-hash) for one block or
    (bytes, stack-hash, blocks) already summed per stack; `frames` holds the
    resolved frames of each stack hash (a hash it lacks, or 0: not captured)."""
    per: dict[tuple[int, str], Amount] = {}
    for kind, records in blocks.items():
        for item in records:
            a = per.get((item[1], kind))
            if a is None:
                a = per[(item[1], kind)] = Amount()
            a.bytes += item[0]
            a.blocks += item[2] if len(item) > 2 else 1
    order = sorted(per.items(), key=lambda kv: (_KIND_RANK.get(kv[0][1], 1), -kv[1].bytes, -kv[1].blocks, kv[0]))
    if limit is not None:
        order = order[:limit]
    return [_stack(amount, frames.get(h) if h else None, kind) for (h, kind), amount in order]


# stacks are listed lost first, then unclassified, possible, reachable
_KIND_RANK = {**{k: 0 for k in LOST_KINDS}, UNCLASSIFIED: 1, "possible": 2, "reachable": 3}


def _reachability(blocks: Mapping[str, Iterable[tuple]]) -> dict[str, Amount]:
    return {k: _amount({k: blocks[k]}) for k in KINDS if k in blocks}


def stack_hashes(blocks: Mapping[str, Iterable[tuple]]) -> set[int]:
    """The stack hashes of classified blocks (what the resolver must resolve)."""
    return {item[1] for records in blocks.values() for item in records if item[1]}


def _amount(blocks: Mapping[str, Iterable[tuple]], kinds=None) -> Amount:
    """Total of a process's classified records: (size, stack) per block or
    (bytes, stack, blocks) summed per stack."""
    out = Amount()
    for kind, records in blocks.items():
        if kinds is not None and kind not in kinds:
            continue
        for b in records:
            out.bytes += b[0]
            out.blocks += b[2] if len(b) > 2 else 1
    return out


def _window_amount(blocks: Mapping[str, Iterable[tuple[int, int, int]]]) -> Amount:
    """Total of a window's classified (size, stack, ext_ip) records: one block each."""
    out = Amount()
    for records in blocks.values():
        for b in records:
            out.bytes += b[0]
            out.blocks += 1
    return out


def in_process_counted(mode: str, blocks: Mapping[str, Sequence[tuple[int, int, int]]],
                       kinds=LEAK_KINDS) -> dict[str, list]:
    """The window's blocks that count ({kind: records}): those of `kinds`
    (the budget's; growth mode's window: LEAK_KINDS) and, in mode
    "extensions", only blocks with an extension return address on their
    stack (ext_ip); mode "all" counts every block."""
    return {k: [b for b in recs if mode == "all" or b[2]] for k, recs in blocks.items() if k in kinds}


def in_process_amount(mode: str, blocks: Mapping[str, Sequence[tuple[int, int, int]]]) -> Amount:
    """What counts in a window now (growth mode's per-repetition snapshots)."""
    return _window_amount(in_process_counted(mode, blocks))


def in_process_groups(mode: str, blocks: Mapping[str, Sequence[tuple[int, int, int]]],
                      growth: dict | None, kinds=LEAK_KINDS,
                      ) -> tuple[Amount, dict | None, list[tuple[int, int, str, Amount]]]:
    """The counted figure of an in-process window, the growth verdict, and
    the groups of blocks the report shows: (stack hash, extension return
    address or 0, kind, amount), the kinds that count first, then largest.

    mode "extensions": only blocks with a return address into an extension
    module on their stack (ext_ip) count; "all": every block counts. Only
    `kinds` count (a classified window's other kinds are shown too). In
    growth mode `growth["per_repetition"]` holds the counted figures after
    each measured repetition; only memory that grew in every repetition
    counts, per repetition."""
    counted = in_process_counted(mode, blocks, kinds)
    amount = _window_amount(counted)
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
        amount = Amount(amount.bytes // m, amount.blocks // m) if growing else Amount()
    per: dict[tuple[int, int, str], Amount] = {}
    shown = counted
    if growth is None and set(blocks) - set(counted):   # a classified window: its other kinds too
        shown = in_process_counted(mode, blocks, tuple(blocks))
    if amount.blocks or amount.bytes or shown is not counted:
        for kind, records in shown.items():
            for size, h, ext in records:
                a = per.get((h, ext, kind))
                if a is None:
                    a = per[(h, ext, kind)] = Amount()
                a.bytes += size
                a.blocks += 1
    groups = [(h, ext, kind, a) for (h, ext, kind), a in
              sorted(per.items(), key=lambda kv: (kv[0][2] not in kinds, _KIND_RANK.get(kv[0][2], 1),
                                                  -kv[1].bytes, -kv[1].blocks, kv[0]))]
    return amount, growth, groups


def account_in_process(
    mode: str,
    blocks: Mapping[str, Sequence[tuple[int, int, int]]],
    counted: Amount,
    growth: dict | None,
    groups: Sequence[tuple[Amount, str, Sequence[dict], dict | None]],
    counters: Mapping[str, int] | None,
    *,
    classified: bool = False,
    reason: str | None = None,
    kinds=LEAK_KINDS,
) -> InProcess:
    """In-process figures of a window: its classified live (size, stack,
    ext_ip) blocks, what counted and the growth verdict (in_process_groups),
    and each shown group as (amount, kind, resolved stack frames, resolved
    frame of the extension return address found on the stack or None).
    classified/reason: whether the window's blocks were classified (why
    not); kinds: the kinds that count."""
    counters = counters or {}
    out = []
    for amount, kind, frames, ext_frame in groups:
        fl = [dict(f) for f in frames]
        if ext_frame is not None:
            f = dict(ext_frame, scanned=True)
            if not any(fr.get("function") and fr.get("function") == f.get("function")
                       and fr.get("module") == f.get("module") for fr in fl):
                fl.append(f)
        out.append(StackLeak(amount.bytes, amount.blocks, fl or [dict(NO_STACK_FRAME)], bool(fl), kind=kind))
    return InProcess(
        mode=mode, outstanding=_window_amount(blocks), leaked=Amount(), counted=counted,
        allocated=Amount(counters.get("alloc_bytes", 0), counters.get("alloc_blocks", 0)),
        stacks=out, growth=growth,
        lost_blocks=counters.get("lost_blocks", 0), lost_handoffs=counters.get("lost_handoffs", 0),
        lost_stacks=counters.get("lost_stacks", 0),
        reachability=_window_reachability(blocks), classified=classified, reason=None if classified else reason,
        kinds=frozenset(kinds),
    )


def _window_reachability(blocks: Mapping[str, Sequence[tuple]]) -> dict[str, Amount]:
    return {k: _window_amount({k: blocks[k]}) for k in KINDS if blocks.get(k)}


def account(
    nodeid: str,
    budget: Budget,
    processes: Sequence[dict],
    blocks: Mapping[int, Mapping[str, Sequence[tuple]]],
    frames: Frames,
    *,
    exe_paths: Mapping[int, str] | None = None,
    lost_procs: int = 0,
    lost_events: int = 0,
    max_stacks_per_process: int | None = None,
    in_process: InProcess | None = None,
    reasons: Mapping[int, str] | None = None,
) -> TestLeakResult:
    """The test's figures from the tracer's process records (tracer.RawTest
    .processes), their classified blocks (serial -> {kind: records}) and
    the resolved frames of their stacks. `reasons`: serial -> why a process
    was not classified (a serial missing: classified). What counts is the
    budget's kinds."""
    result = TestLeakResult(nodeid=nodeid, budget=budget, in_process=in_process,
                            lost_processes=lost_procs, lost_events=lost_events)
    exe_paths = exe_paths or {}
    reasons = reasons if reasons is not None else {p["serial"]: "leak kinds were not asked for" for p in processes}
    for p in processes:
        bl = blocks.get(p["serial"], {})
        result.processes.append(ProcessLeak(
            pid=p["pid"],
            ppid=p["ppid"],
            comm=p["comm"],
            exe=exe_paths.get(p["serial"]) or p.get("exe_raw"),
            uid=p["uid"],
            user=_user(p["uid"]),
            exit_code=p.get("exit_code"),
            signal=p.get("signal"),
            running_at_test_end=bool(p.get("running_at_test_end")),
            outstanding=_amount(bl),
            counted=_amount(bl, budget.kinds),
            reachability=_reachability(bl),
            classified=p["serial"] not in reasons,
            reason=reasons.get(p["serial"]),
            leaked=Amount(),
            allocated=Amount(p.get("alloc_bytes", 0), p.get("alloc_blocks", 0)),
            stacks=aggregate_stacks(bl, frames, limit=max_stacks_per_process),
            lost_blocks=p.get("lost_blocks", 0),
            lost_handoffs=p.get("lost_handoffs", 0),
            lost_stacks=p.get("lost_stacks", 0),
            **_allocator(p.get("allocator")),
        ))
    return result


def _allocator(a: Mapping | None) -> dict:
    """ProcessLeak's allocator fields from the tracer's answer."""
    if not a:
        return {}
    return {"allocator": {"kind": a["kind"], "module": a["module"], "covered": bool(a["covered"])},
            "allocator_reason": a.get("reason")}
