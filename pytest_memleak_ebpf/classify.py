"""Per-block classification: the stage between the tracer's raw records and
accounting where each live block gets a kind, as valgrind memcheck gives it.

A process the tracer paused at exit (or at its test's end) and scanned
(tracer/exitpause.py, kinds/) has its blocks summed per kind: "definite"
(no pointer reaches it), "indirect" (reached only from lost blocks),
"possible" (reached only through interior pointers), "reachable" (reached
from the roots); a block the scan did not see, and every block of a process
that was not scanned, is "unclassified", with the reason (`Classified.reasons`).
Which kinds count against the budget is the budget's (marks.Budget.kinds).

The pytest process's own window (in-process) is classified at its close,
when the test's kinds are not `all` (tracer close_window,
kinds/inprocess.py): its blocks then come per kind the same way; a window
that was not (kinds=all, growth mode, nothing that could count, a scan that
failed) has its blocks "unclassified", with the reason
(`Classified.in_process_reason`).

Records keep the tracer's shapes: a process's (bytes, stack, blocks) summed
per stack, an in-process window's (size, stack, ext_ip) per block."""

from __future__ import annotations

import signal as _signal
from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["UNCLASSIFIED", "KINDS", "LOST_KINDS", "DEFAULT_KINDS", "LEAK_KINDS", "Classified", "classify",
           "classify_blocks", "classify_window", "unclassified_reason", "parse_kinds", "wants_kinds"]

DEFINITE, INDIRECT, POSSIBLE, REACHABLE = "definite", "indirect", "possible", "reachable"
UNCLASSIFIED = "unclassified"
KINDS: tuple[str, ...] = (DEFINITE, INDIRECT, POSSIBLE, REACHABLE, UNCLASSIFIED)   # report order
LOST_KINDS = (DEFINITE, INDIRECT)
DEFAULT_KINDS: frozenset = frozenset((DEFINITE, INDIRECT, UNCLASSIFIED))  # what counts by default
LEAK_KINDS: tuple[str, ...] = (UNCLASSIFIED,)   # kinds that count in growth mode's window (never classified)

Kinds = Mapping[str, Sequence[tuple]]          # kind -> records


@dataclass
class Classified:
    processes: dict[int, Kinds] = field(default_factory=dict)   # serial -> kind -> records
    in_process: Kinds = field(default_factory=dict)             # the window's blocks, kind -> records
    reasons: dict[int, str] = field(default_factory=dict)       # unscanned serials: why
    in_process_classified: bool = False                         # the window's blocks have kinds
    in_process_reason: str | None = None                        # why not


def classify_blocks(records: Sequence[tuple]) -> Kinds:
    """Blocks of an owner nobody scanned: all "unclassified"."""
    return {UNCLASSIFIED: records} if records else {}


def classify_window(records: Sequence[tuple], kinds: Kinds | None, reason: str | None,
                    wanted: bool) -> tuple[Kinds, bool, str | None]:
    """An in-process window's blocks by kind, whether they were classified,
    and why not: `kinds` the scan's records per kind (None: not scanned)."""
    if kinds is not None:
        merged = {k: list(v) for k, v in kinds.items() if v}
        if records:
            merged[UNCLASSIFIED] = merged.get(UNCLASSIFIED, []) + list(records)
        return merged, True, None
    if not wanted:
        reason = "leak kinds were not asked for (kinds=all)"
    return classify_blocks(records), False, reason or "it was not scanned"


def unclassified_reason(process: Mapping, scan_reason: str | None, wanted: bool) -> str:
    """Why a process's blocks have no kind."""
    if not wanted:
        return "leak kinds were not asked for (kinds=all)"
    if scan_reason:
        return scan_reason
    sig = process.get("signal")
    if sig:
        try:
            name = _signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"it was killed by {name} (a fatal signal: no pause at exit)"
    if process.get("running_at_test_end"):
        return "it was still running at the test's end and could not be scanned"
    if process.get("exited"):
        return "it exited without libc _exit or abort (exit_group called directly, or no libc)"
    return "it was not scanned"


def classify(blocks: Mapping[int, Sequence[tuple]], inproc_blocks: Sequence[tuple] = (), *,
             kinds: Mapping[int, Kinds] | None = None, processes: Sequence[Mapping] = (),
             scan_reasons: Mapping[int, str] | None = None, scanned=(), wanted: bool = False,
             inproc_kinds: Kinds | None = None, inproc_reason: str | None = None) -> Classified:
    """A test's blocks (tracer.RawTest .blocks: unscanned images; .kinds:
    scanned images' records per kind; .inproc_blocks, or .inproc_kinds when
    the window was classified, else .inproc_reason) by kind. `wanted`: the
    test asked for leak kinds (its processes were paused)."""
    out = Classified({serial: classify_blocks(recs) for serial, recs in blocks.items()})
    out.in_process, out.in_process_classified, out.in_process_reason = classify_window(
        inproc_blocks, inproc_kinds, inproc_reason, wanted)
    for serial, per in (kinds or {}).items():
        merged = dict(out.processes.get(serial, {}))
        for kind, recs in per.items():
            merged[kind] = list(merged.get(kind, ())) + list(recs)
        out.processes[serial] = merged
    scanned = set(kinds or {}) | set(scanned)
    for p in processes:
        if p["serial"] not in scanned:
            out.reasons[p["serial"]] = unclassified_reason(p, (scan_reasons or {}).get(p["serial"]), wanted)
    return out


def parse_kinds(value) -> frozenset:
    """A kinds list ("definite,indirect", ["definite", "indirect"], "all")
    as a set of kinds; ValueError names a bad value."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple, set, frozenset)) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"{value!r} is not a list of leak kinds")
    names = [i.strip() for i in items if i.strip()]
    if not names:
        raise ValueError(f"{value!r} names no leak kind (known: {', '.join(KINDS)}, all)")
    out = set()
    for n in names:
        if n == "all":
            out.update(KINDS)
        elif n in KINDS:
            out.add(n)
        else:
            raise ValueError(f"unknown leak kind {n!r} in {value!r} (known: {', '.join(KINDS)}, all)")
    return frozenset(out)


def wants_kinds(kinds: frozenset) -> bool:
    """Whether counting `kinds` needs the blocks classified (not every kind counts)."""
    return not set(KINDS) <= set(kinds)
