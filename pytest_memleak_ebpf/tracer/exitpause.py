"""Leak kinds for the processes a test launches: the BPF program pauses a
tracked process at libc `_exit`/`abort` (bpf_send_signal(SIGSTOP), memleak.h
EV_EXIT_STOPPED); here it is scanned (kinds.roots.scan_process) while stopped
and resumed. Processes still running at their test's end are paused, scanned
and resumed the same way (Pauser.scan_running).

A process this session stopped must never stay stopped: every pause is told
to a watchdog process in its own session (setsid), which resumes it when its
scan's time limit passes, and resumes every process still listed when its
pipe closes (pytest ended, or died).

The per-block kinds are kept per process image (serial) until the test's
records are collected: Outcome.kinds maps a block's address to its kind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field


SCAN_SECONDS = 5.0          # time limit of one scan: then the process is resumed, its blocks unclassified
STOP_WAIT_SECONDS = 1.0     # how long a SIGSTOPped process may take to group-stop

# the watchdog: reads "+PID SECONDS" (paused: resume after SECONDS) and "-PID"
# (resumed) lines; resumes every listed pid at its deadline or at end of input.
# "?PID": it answers with a JSON line of the stopped process's thread
# registers ({tid: {reg: value}}, or {"error": text}): ptrace must come from a
# process that is not the tracee's parent (pytest's own waitpid of the child
# would take the ptrace-stop notifications of a tracer in its thread group).
WATCHDOG = r"""
import json, os, select, signal, sys, time
sys.path.insert(0, sys.argv[1])
paused = {}
buf = b""
fd = sys.stdin.fileno()
while True:
    now = time.monotonic()
    for pid, deadline in list(paused.items()):
        if deadline <= now:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
            del paused[pid]
    timeout = max(0.0, min(paused.values()) - now) if paused else None
    r, _, _ = select.select([fd], [], [], timeout)
    if not r:
        continue
    chunk = os.read(fd, 4096)
    if not chunk:
        break
    buf += chunk
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith(b"+"):
            paused[int(parts[0][1:])] = time.monotonic() + float(parts[1])
        elif len(parts) == 1 and parts[0].startswith(b"-"):
            paused.pop(int(parts[0][1:]), None)
        elif len(parts) == 1 and parts[0].startswith(b"?"):
            try:
                from pytest_memleak_ebpf.kinds.memory import thread_registers
                answer = {str(t): r for t, r in thread_registers(int(parts[0][1:])).items()}
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(1, json.dumps(answer).encode() + b"\n")
for pid in paused:
    try:
        os.kill(pid, signal.SIGCONT)
    except OSError:
        pass
"""


class Watchdog:
    """The process in its own session that resumes what this session paused."""

    def __init__(self):
        package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.proc = subprocess.Popen([sys.executable, "-c", WATCHDOG, package_parent], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     start_new_session=True, close_fds=True)
        self._out = b""

    def _say(self, line: str) -> None:
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def paused(self, pid: int, seconds: float) -> None:
        self._say(f"+{pid} {seconds:.3f}")

    def resumed(self, pid: int) -> None:
        self._say(f"-{pid}")

    def registers(self, pid: int, timeout: float) -> dict[int, dict[str, int]]:
        """The thread registers of the stopped process `pid` (read by the
        watchdog); OSError when it cannot."""
        import json
        import select

        self._say(f"?{pid}")
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._out:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise OSError(f"no registers of pid {pid} within {timeout:g} s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise OSError("the watchdog is gone")
            self._out += chunk
        line, self._out = self._out.split(b"\n", 1)
        answer = json.loads(line)
        if "error" in answer:
            raise OSError(answer["error"])
        return {int(t): r for t, r in answer.items()}

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class Outcome:
    """One image's scan: per-block kinds (address -> kind name), or why not."""

    kinds: dict[int, str] | None = None
    reason: str | None = None           # set when kinds is None
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)


def process_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    return s[s.rindex(")") + 2]


def wait_stopped(pid: int, seconds: float = STOP_WAIT_SECONDS) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        st = process_state(pid)
        if st in ("T", "t"):
            return True
        if st is None or st in ("Z", "X") or time.monotonic() >= deadline:
            return False
        time.sleep(0.0005)


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
    """Classify the stopped process's blocks [(address, size)]; registers()
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
    if not blocks:
        return Outcome(kinds={})
    starts = np.fromiter((a for a, _ in blocks), dtype=np.uint64, count=len(blocks))
    sizes = np.fromiter((s for _, s in blocks), dtype=np.uint64, count=len(blocks))
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


class Pauser:
    """Scans paused processes: `take_blocks(tgid, serial)` gives an image's
    live blocks [(address, size)] without removing them (the collection
    role); outcomes are kept per serial until taken (take)."""

    def __init__(self, take_blocks, limit: float = SCAN_SECONDS, allocator_kind=None):
        self.take_blocks = take_blocks
        # allocator_kind(serial) -> "glibc", "jemalloc", ... or None (not known)
        self.allocator_kind = allocator_kind or (lambda serial: None)
        self.limit = limit
        self.watchdog = Watchdog()
        self.outcomes: dict[int, Outcome] = {}

    def at_exit(self, tgid: int, serial: int, traced: bool) -> None:
        """EV_EXIT_STOPPED / EV_EXIT_TRACED of image `serial`."""
        if traced:
            self.outcomes[serial] = Outcome(reason="it is ptraced (a debugger or strace): not paused")
            return
        self.watchdog.paused(tgid, self.limit)
        try:
            self.outcomes[serial] = self._scan_stopped(tgid, serial)
        finally:
            _cont(tgid)
            self.watchdog.resumed(tgid)

    def _scan_stopped(self, tgid: int, serial: int) -> Outcome:
        if not wait_stopped(tgid):
            if tracer_pid(tgid):
                return Outcome(reason="it is ptraced (a debugger or strace): not paused")
            return Outcome(reason="it did not stop at exit")
        return scan(tgid, self.take_blocks(tgid, serial), self.limit,
                    registers=lambda: self.watchdog.registers(tgid, self.limit),
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
                self.watchdog.paused(tgid, self.limit)
                try:
                    os.kill(tgid, signal.SIGSTOP)
                except OSError:
                    self.watchdog.resumed(tgid)
                    continue
            try:
                self.outcomes[serial] = self._scan_stopped(tgid, serial)
            finally:
                if not was_stopped:
                    _cont(tgid)
                    self.watchdog.resumed(tgid)

    def take(self, serials) -> dict[int, Outcome]:
        return {s: self.outcomes.pop(s) for s in list(serials) if s in self.outcomes}

    def forget_older(self, serial: int) -> None:
        """Drop outcomes of images older than `serial` nobody collected."""
        self.outcomes = {s: o for s, o in self.outcomes.items() if s >= serial}

    def close(self) -> None:
        self.watchdog.close()


def _cont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except OSError:
        pass
