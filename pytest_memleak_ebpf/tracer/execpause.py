"""The allocator of every exec: the userspace side of the BPF exec pause.

A tracked process that execs an executable the session has not resolved for
its loader inputs (bpf/memleak.h resolved_key_t: the executable's device and
inode, its LD_PRELOAD and LD_LIBRARY_PATH) is stopped by the BPF program at
sched_process_exec, before its dynamic loader runs, and reported on the
`pauses` perf buffer. Here, on a thread of its own: allocators.resolve_process
finds the object that will provide its malloc; when that object is not probed
yet, probes.attach_allocators attaches its sites (the mode the session's
programs were built for); the answer gets an id, published in the `resolved`
map under the process's key (the next exec of that executable with the same
inputs is not paused: the kernel writes the id into its proc_t); then the
process is continued (SIGCONT). A process we stopped is never left stopped:
the watchdog (watchdog.py, a process of its own session holding the `pending`
map) continues every one still pending at its time limit or when pytest
dies; a process it continued before we answered is flagged (not covered).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import threading
import time

from .. import allocators as _allocators
from ..procmaps import process_state
from . import probes as _probes
from .abi import PAUSE_KEYED, PAUSE_STOPPED, SERIAL_CPU_BITS, TF_ALLOCS, Pause

# allocator kinds whose object is also the process's libc (its _exit, abort)
LIBC_KINDS = ("glibc", "static-glibc", "musl", "static-musl")


def _answer(kind: str, module: str | None, covered: bool, reason: str | None) -> dict:
    return {"kind": kind, "module": module, "covered": covered, "reason": reason}


def _host(path: str) -> str:
    """The file to probe: a path of another root (/proc/PID/root/...) as it
    is (realpath would leave that root), any other resolved."""
    return path if path.startswith("/proc/") else os.path.realpath(path)


def _absolute_list(raw: bytes) -> bool:
    """Every element of a preload / library path list is absolute (the answer
    does not depend on the cwd)."""
    text = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    return all(p.startswith("/") for p in re.split(r"[ :;\t\n]", text) if p)


class ExecPauses:
    """Owned by a Tracer (core.py): `lock` is the tracer's, `clients()` its
    clients (in-process recording is paused while we resolve and attach)."""

    def __init__(self, tracer, libc_probes: list, watchdog, *, poll_ms: int = 50):
        self._tracer = tracer
        self.bpf = tracer.bpf
        self.cache = _allocators.AllocatorCache()
        self.answers: list[dict] = []           # id - 1 -> answer
        self._ids: dict[tuple, int] = {}
        self.probed: dict[str, list] = {tracer.libc: list(libc_probes)}   # host path -> ProbeInfo
        # host path -> CLOCK_MONOTONIC ns when its probes were in (the BPF serials' clock)
        self.probed_since: dict[str, int] = {tracer.libc: 0}
        self.kinds: dict[str, str] = {tracer.libc: "glibc"}
        self.links: list[int] = []
        self.pauses = 0                         # processes stopped at exec and continued
        self.resolutions = 0
        self.handled = 0                        # pause records answered (memleak.h CTR_PAUSE_EVENTS)
        self.exit_probes = 0                    # _exit/abort probes on other libcs than the session's
        self.pause_seconds = 0.0                # time processes spent stopped, summed
        self._serial_alloc: dict[int, int] = {}
        self._pending = self.bpf[b"pending"]
        self._resolved = self.bpf[b"resolved"]
        self._closed = False
        self.root_answer = self._root_answer()
        self.watchdog = watchdog
        self.bpf[b"pauses"].open_perf_buffer(self._on_pause, page_cnt=16)
        self._poll_ms = poll_ms
        self._thread = threading.Thread(target=self._poll_loop, name="memleak-ebpf-exec-pauses", daemon=True)
        self._thread.start()

    # -- answers ------------------------------------------------------------

    def _id(self, ans: dict) -> int:
        key = (ans["kind"], ans["module"], ans["covered"], ans["reason"])
        aid = self._ids.get(key)
        if aid is None:
            self.answers.append(ans)
            aid = self._ids[key] = len(self.answers)
        return aid

    def answer_of(self, proc: dict) -> dict | None:
        """The allocator answer of a collected process record (collection.proc_dict)."""
        aid = proc.get("alloc_id") or self._serial_alloc.pop(proc["serial"], 0)
        if aid:
            return self.answers[aid - 1]
        if not proc.get("exe_raw") and not proc.get("execs"):
            return self.root_answer   # forked from pytest, never exec'd
        return None

    def alloc_id_of(self, serial: int) -> int:
        """The answer id of a live image paused at exec (0: none yet)."""
        return self._serial_alloc.get(serial, 0)

    def prune(self, keep) -> None:
        """Forget answers of images nothing will report (keep(serial) false)."""
        self._serial_alloc = {s: a for s, a in self._serial_alloc.items() if keep(s)}

    def _root_answer(self) -> dict | None:
        """The pytest process's own allocator (what its forked children run).
        Probed here when it is not the libc (pytest run with LD_PRELOAD)."""
        try:
            a = _allocators.resolve_process(os.getpid(), self.cache)
        except Exception:
            return None
        ans = _answer(a.kind, a.module, a.covered, a.reason)
        if a.covered and a.host_path and _host(a.host_path) not in self.probed:
            ans = self._attach(a, ans)
        return ans

    # -- probing ------------------------------------------------------------

    def _attach(self, a, ans: dict) -> dict:
        """Probe allocator `a` (its host_path not probed yet); the answer, made
        not covered when the kernel refuses."""
        host = _host(a.host_path)
        sites = _probes.allocator_sites(a)
        try:
            attached = _probes.attach_allocators(self.bpf, host, (self._tracer.attach_mode,), None, sites)
        except Exception as exc:
            return _answer(a.kind, a.module, False, f"its allocator {a.module} could not be probed: {exc}")
        self.links.extend(attached.links)
        if a.kind in LIBC_KINDS:
            # the object is a libc too (musl, a static program, another root's glibc):
            # its _exit and abort get the exit pause the session's libc has
            sites = _probes.MUSL_EXIT_SITES if "musl" in a.kind else _probes.EXIT_SITES
            self.exit_probes += _probes.attach_exit_probes(self.bpf, host, sites)
        self.probed_since[host] = time.monotonic_ns()
        self.probed[host] = attached.probes
        self.kinds[host] = a.kind
        return ans

    # -- the pause ------------------------------------------------------------

    def _poll_loop(self) -> None:
        while not self._closed:
            try:
                self.bpf.perf_buffer_poll(timeout=self._poll_ms)
            except Exception:
                time.sleep(self._poll_ms / 1000)

    def _on_pause(self, cpu, data, size) -> None:
        ev = ctypes.cast(data, ctypes.POINTER(Pause)).contents
        tgid, serial, flags = int(ev.tgid), int(ev.serial), int(ev.flags)
        path = ev.path.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        t0 = time.monotonic()
        try:
            with self._tracer._lock:
                paused = self._stop_recording()
                try:
                    aid = self._handle(tgid, path, flags, serial)
                finally:
                    self._resume_recording(paused)
            if aid and flags & PAUSE_STOPPED and not self._still_pending(tgid) \
                    and process_state(tgid) not in (None, "Z", "X"):
                # the watchdog's time limit passed (pytest stalled): it ran on before the answer
                a = self.answers[aid - 1]
                aid = self._id(_answer(a["kind"], a["module"], False, (
                    f"it stayed stopped at exec over {self.watchdog.limit:g} s (pytest did not answer in time) "
                    "and the watchdog continued it, maybe before its allocator was probed")))
            if aid:
                self._serial_alloc[serial] = aid
        finally:
            if flags & PAUSE_STOPPED:
                self.pauses += 1
                try:
                    os.kill(tgid, signal.SIGCONT)
                except OSError:
                    pass
                try:
                    del self._pending[self._pending.Key(tgid)]
                except KeyError:
                    pass
                self.pause_seconds += time.monotonic() - t0
            self.handled += 1

    def wait_answered(self, submitted: int, timeout: float = 2.0) -> bool:
        """Wait (without the tracer's lock: answering takes it) until every one
        of the `submitted` pause records is answered -- a ptraced process is
        not stopped, so it may end before its answer -- or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while self.handled < submitted:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def _still_pending(self, tgid: int) -> bool:
        try:
            self._pending[self._pending.Key(tgid)]
        except KeyError:
            return False
        return True

    def _stop_recording(self) -> list:
        """In-process windows open now: stop recording their roots while we
        resolve and attach (this allocates in the pytest process)."""
        paused = [c for c in self._tracer._clients if c.in_window]
        for c in paused:
            for r in c.roots:
                self._tracer._set_root_fields(r, flags=self._tracer._root_flags(c))
        return paused

    def _resume_recording(self, paused: list) -> None:
        for c in paused:
            if c.in_window:
                for r in c.roots:
                    self._tracer._set_root_fields(r, flags=self._tracer._root_flags(c) | TF_ALLOCS)

    def _handle(self, tgid: int, path: str, flags: int, serial: int) -> int:
        self.resolutions += 1
        try:
            a = _allocators.resolve_process(tgid, self.cache, exe=path if path.startswith("/") else None)
        except Exception as exc:
            return self._id(_answer("other", None, False, f"its allocator could not be resolved: {exc}"))
        ans = _answer(a.kind, a.module, a.covered, a.reason)
        if a.covered and a.host_path and _host(a.host_path) not in self.probed:
            ans = self._attach(a, ans)
        if not flags & PAUSE_STOPPED:
            since = self.probed_since.get(_host(a.host_path), 0) if ans["covered"] and a.host_path else 0
            if since > serial >> SERIAL_CPU_BITS:
                # not stopped (ptraced), and it exec'd before the probes were in (probed now,
                # or for another process a moment ago): what it allocated before is not seen
                return self._id(_answer(a.kind, a.module, False, "traced by another process (ptrace), so not "
                                        "stopped at exec: its allocator was probed after it had started"))
            return self._id(ans)
        aid = self._id(ans)
        if flags & PAUSE_KEYED:
            try:
                key = self._pending[self._pending.Key(tgid)]
            except KeyError:
                key = None
            if key is not None and _absolute_list(bytes(key.preload)) and _absolute_list(bytes(key.libpath)):
                self._resolved[key] = self._resolved.Leaf(aid)
        return aid

    def close(self) -> list[int]:
        """Stop serving pauses (the watchdog continues every process still
        pending when it is closed); the links to close."""
        self._closed = True
        self._thread.join(timeout=2)
        links, self.links = self.links, []
        return links
