"""Per-block classification: the stage between the tracer's raw records and
accounting where each live block gets a kind.

Today every block is "unclassified" and counts as leaked, exactly as before
this stage existed. The next step (valgrind-like leak kinds) replaces
`classify_blocks`: a block no pointer reaches is "definite", one reached only
from leaked blocks "indirect", one reached only through interior pointers
"possible", one reached from the roots "reachable"; LEAK_KINDS then says which
kinds count against the budget, and accounting, suppressions, the verdict and
the report already carry a kind per stack (StackLeak.kind).

Records keep the tracer's shapes: a process's (bytes, stack, blocks) summed
per stack, an in-process window's (size, stack, ext_ip) per block."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["UNCLASSIFIED", "LEAK_KINDS", "Classified", "classify", "classify_blocks"]

UNCLASSIFIED = "unclassified"
LEAK_KINDS: tuple[str, ...] = (UNCLASSIFIED,)   # kinds that count as leaked

Kinds = Mapping[str, Sequence[tuple]]          # kind -> records


@dataclass
class Classified:
    processes: dict[int, Kinds] = field(default_factory=dict)   # serial -> kind -> records
    in_process: Kinds = field(default_factory=dict)             # the window's blocks, kind -> records


def classify_blocks(records: Sequence[tuple]) -> Kinds:
    """One owner's live blocks by kind (today: all "unclassified")."""
    return {UNCLASSIFIED: records} if records else {}


def classify(blocks: Mapping[int, Sequence[tuple]], inproc_blocks: Sequence[tuple] = ()) -> Classified:
    """A test's blocks (tracer.RawTest.blocks, .inproc_blocks) by kind."""
    return Classified({serial: classify_blocks(recs) for serial, recs in blocks.items()},
                      classify_blocks(inproc_blocks))
