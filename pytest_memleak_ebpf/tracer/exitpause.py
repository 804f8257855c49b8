"""Leak kinds for the processes a test launches: the BPF program pauses a
tracked process at libc `_exit`/`abort` (bpf_send_signal(SIGSTOP), memleak.h
EV_EXIT_STOPPED); here it is scanned (kinds.roots.scan_process) while stopped
and resumed. Processes still running at their test's end are paused, scanned
and resumed the same way (Pauser.scan_running).

A process this session stopped must never stay stopped: every one is a key
of the BPF `pending` map while it is stopped (written by the BPF program
before its stop at exit, by `hold` here before a stop at its test's end), and
the watchdog (watchdog.py, a process of its own session) continues it at the
time limit, or when pytest dies.

The per-block kinds are kept per process image (serial) until the test's
records are collected: Outcome.kinds maps a block's address to its kind."""

from __future__ import annotations

import itertools
import os
import signal
import time
from dataclasses import dataclass, field

from ..procmaps import process_state


SCAN_SECONDS = 5.0          # time limit of one scan: then the process is resumed, its blocks unclassified
STOP_WAIT_SECONDS = 1.0     # how long a SIGSTOPped process may take to group-stop
# the watchdog's limit: a process stopped this long is continued, whatever pytest does
WATCHDOG_SECONDS = SCAN_SECONDS + STOP_WAIT_SECONDS + 1.0

@dataclass
class Outcome:
    """One image's scan: per-block kinds (address -> kind name), or why not."""

    kinds: dict[int, str] | None = None
    reason: str | None = None           # set when kinds is None
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)


def wait_stopped(pid: int, seconds: float = STOP_WAIT_SECONDS) -> bool:
    """Whether `pid` is (or gets) stopped within `seconds`. A process sent
    SIGSTOP at its exit stops within microseconds: the checks start 20 us
    apart and back off to 0.5 ms."""
    deadline = time.monotonic() + seconds
    step = 0.00002
    while True:
        st = process_state(pid)
        if st in ("T", "t"):
            return True
        if st is None or st in ("Z", "X") or time.monotonic() >= deadline:
            return False
        time.sleep(step)
        step = min(step * 2, 0.0005)


def tracer_pid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def scan(pid: int, blocks: list[tuple[int, int]], limit: float = SCAN_SECONDS, registers=None,
         allocator: str = "glibc") -> Outcome:
    """Classify the stopped process's blocks [(address, size)] (or an
    (n, 2) array of them); registers()
    gives its threads' registers; allocator: its allocator's kind."""
    import numpy as np

    from ..kinds import KIND_NAMES
    from ..kinds.allocmem import UnsupportedAllocator, check_supported
    from ..kinds.roots import scan_process

    try:
        check_supported(allocator)
    except UnsupportedAllocator as exc:
        return Outcome(reason=str(exc))
    t0 = time.monotonic()
    if len(blocks) == 0:
        return Outcome(kinds={})
    if isinstance(blocks, np.ndarray):
        pairs = blocks.astype(np.uint64, copy=False).reshape(-1, 2)
    else:   # [(address, size)]: fromiter is several times faster than np.array on a list of tuples
        pairs = np.fromiter(itertools.chain.from_iterable(blocks), dtype=np.uint64,
                            count=2 * len(blocks)).reshape(-1, 2)
    starts, sizes = pairs[:, 0], pairs[:, 1]
    try:
        regs = registers() if registers is not None else None
        result = scan_process(pid, starts, sizes, registers=regs, allocator=allocator).classification
    except UnsupportedAllocator as exc:     # its allocator's memory was not found in this process
        return Outcome(reason=str(exc), seconds=time.monotonic() - t0)
    except Exception as exc:   # noqa: BLE001 - the process went away, or its memory could not be read
        return Outcome(reason=f"its memory could not be scanned ({type(exc).__name__}: {exc})",
                       seconds=time.monotonic() - t0)
    elapsed = time.monotonic() - t0
    if elapsed > limit:
        return Outcome(reason=f"the scan timed out (over {limit:g} s): the process was resumed", seconds=elapsed)
    names = [KIND_NAMES[k] for k in result.kinds.tolist()]
    return Outcome(kinds=dict(zip(result.starts.tolist(), names)), seconds=elapsed,
                   summary={k: v for k, v in result.summary().items()})


@dataclass
class StopRegisters:
    """memleak.h stop_regs_t: the registers of the thread `tid` of image
    `serial` at its stop, as the BPF program copied them (ptrace's names)."""

    serial: int
    tid: int
    registers: dict[str, int]


def thread_ids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (OSError, ValueError):
        return []


class Pauser:
    """Scans paused processes: `take_blocks(tgid, serial)` gives an image's
    live blocks [(address, size)] without removing them (the collection
    role); `watchdog` reads registers (watchdog.Watchdog); `hold(tgid)` lists
    a process in the `pending` map before we stop it, `release(tgid)`
    removes it once continued; `stop_registers(tgid)` takes the registers
    the BPF program copied at its stop (a StopRegisters, or None).
    Outcomes are kept per serial until taken (take)."""

    def __init__(self, take_blocks, watchdog, hold, release, limit: float = SCAN_SECONDS,
                 allocator_kind=None, stop_registers=None):
        self.take_blocks = take_blocks
        # allocator_kind(serial) -> "glibc", "jemalloc", ... or None (not known)
        self.allocator_kind = allocator_kind or (lambda serial: None)
        self.limit = limit
        self.watchdog = watchdog
        self.hold, self.release = hold, release
        self.stop_registers = stop_registers or (lambda tgid: None)
        self.outcomes: dict[int, Outcome] = {}
        # where each scan's registers came from: "bpf" (the stop's record) or "ptrace"
        self.register_sources = {"bpf": 0, "ptrace": 0}

    def registers(self, tgid: int, serial: int, record: StopRegisters | None,
                  threads: list[int] | None = None) -> dict[int, dict[str, int]]:
        """Every thread's registers of the stopped process: the BPF
        program's record of its stop when it has that one thread (its
        registers are the ones ptrace would read), else through the
        watchdog's ptrace. threads: its thread ids, when just listed."""
        if threads is None and record is not None:
            threads = thread_ids(tgid)
        if record is not None and record.serial == serial and threads == [record.tid]:
            self.register_sources["bpf"] += 1
            return {record.tid: record.registers}
        self.register_sources["ptrace"] += 1
        return self.watchdog.registers(tgid, self.limit)

    def at_exit(self, tgid: int, serial: int, traced: bool, unpaused: bool = False) -> None:
        """EV_EXIT_STOPPED / EV_EXIT_TRACED / EV_EXIT_UNPAUSED of image `serial`."""
        if traced:
            self.outcomes[serial] = Outcome(reason="it is ptraced (a debugger or strace): not paused")
            return
        if unpaused:
            self.outcomes[serial] = Outcome(reason="it could not be paused at exit: the table of stopped "
                                                   "processes (BPF map `pending`) was full")
            return
        try:
            self.outcomes[serial] = self._scan_stopped(tgid, serial)
        finally:
            _cont(tgid)
            self.release(tgid)

    def _scan_stopped(self, tgid: int, serial: int, own_stop: bool = True) -> Outcome:
        """own_stop: the process stopped on our SIGSTOP (a record of its
        registers is taken); else it was stopped before (none is)."""
        # The BPF record of the stop is written when its thread dequeues our
        # SIGSTOP, with the siglock held up to the group stop: a process of
        # that one thread cannot touch its memory again before our SIGCONT
        # (which cancels a stop not completed yet): no need to wait for the
        # stop to show in /proc. Else wait for it, and take the record then.
        record = self.stop_registers(tgid) if own_stop else None
        threads = thread_ids(tgid) if record is not None else None
        if record is not None and record.serial == serial and threads == [record.tid]:
            stopped = True
        else:
            stopped = wait_stopped(tgid)
            # taken whatever happens: no record outlives its stop
            if own_stop and record is None:
                record = self.stop_registers(tgid)
            threads = None
        if not stopped:
            if tracer_pid(tgid):
                return Outcome(reason="it is ptraced (a debugger or strace): not paused")
            return Outcome(reason="it did not stop at exit")
        return scan(tgid, self.take_blocks(tgid, serial), self.limit,
                    registers=lambda: self.registers(tgid, serial, record, threads),
                    allocator=self.allocator_kind(serial) or "glibc")

    def scan_running(self, procs: list[tuple[int, int]]) -> None:
        """Processes [(tgid, serial)] still running at their test's end:
        paused, scanned in place, resumed (one already stopped stays stopped)."""
        for tgid, serial in procs:
            if tracer_pid(tgid):
                self.outcomes[serial] = Outcome(reason="it is ptraced (a debugger or strace): not paused")
                continue
            was_stopped = process_state(tgid) in ("T", "t")
            if not was_stopped:
                if not self.hold(tgid):
                    self.outcomes[serial] = Outcome(reason="it could not be paused: the table of stopped "
                                                           "processes (BPF map `pending`) is full")
                    continue
                try:
                    os.kill(tgid, signal.SIGSTOP)
                except OSError:
                    self.release(tgid)
                    continue
            try:
                self.outcomes[serial] = self._scan_stopped(tgid, serial, own_stop=not was_stopped)
            finally:
                if not was_stopped:
                    _cont(tgid)
                    self.release(tgid)

    def take(self, serials) -> dict[int, Outcome]:
        return {s: self.outcomes.pop(s) for s in list(serials) if s in self.outcomes}

    def forget_older(self, serial: int) -> None:
        """Drop outcomes of images older than `serial` nobody collected."""
        self.outcomes = {s: o for s, o in self.outcomes.items() if s >= serial}

def _cont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except OSError:
        pass
