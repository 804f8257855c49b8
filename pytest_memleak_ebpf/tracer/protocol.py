"""The interface the engine drives: what Tracer (the program loaded in this
process) and server.RemoteTracer (the xdist controller's, over a socket)
both implement. A Tracer method may take one more argument, the client it
acts for (`c`, given by the server), with a default."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .collection import RawTest
from .probes import ProbeInfo


@runtime_checkable
class TracerAPI(Protocol):
    probes: list[ProbeInfo]
    libc: str
    attach_mode: str
    attach_errors: dict[str, str]
    load_seconds: float
    cached: bool

    @property
    def probe_count(self) -> int: ...

    def add_root(self, tgid: int) -> None:
        """Track the processes this pytest process creates during its tests."""

    def begin_test(self) -> int:
        """A new test of this client: its id."""

    def end_test(self, test_id: int) -> RawTest:
        """Stop the test and take out its records."""

    def running(self, test_id: int | None) -> int:
        """How many processes of the test are still alive."""

    def set_extension_pages(self, ranges) -> None:
        """Executable address ranges of extension modules in this process."""

    def enable_pymalloc_probes(self) -> str | None:
        """Probe this process's pymalloc in its windows (Python objects seen
        without PYTHONMALLOC=malloc): None, or why it cannot be done."""

    def open_window(self) -> int:
        """Start recording this process's own allocations: the window's serial."""

    def close_window(self, scan: str | None = None) -> dict:
        """Stop recording them: the window's counters. scan ("extensions" or
        "all"): classify the window's live blocks against this process's
        memory now (leak kinds)."""

    def in_window(self) -> bool:
        """Whether a window is open."""

    def window_snapshot(self) -> list[tuple[int, int, int]]:
        """The open window's live blocks, left in place."""

    def collect_window(self) -> tuple[list[tuple[int, int, int]], dict | None, dict,
                                      tuple[dict | None, str | None]]:
        """The closed window's blocks (taken out), counters, stacks, and
        (its blocks per kind when classified, else None; why not)."""

    def close(self) -> None:
        """Release the tracer (or the connection to it)."""
