"""Reading a stopped process (memory, maps, every thread's registers) and
walking its glibc heap, on real processes (no valgrind, no eBPF)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import kinds_harness as harness  # noqa: E402
from pytest_memleak_ebpf import procmaps  # noqa: E402
from pytest_memleak_ebpf.kinds import heap, memory, ptrace  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("kinds")
    b = harness.build(out)
    exe = out / "stopper"
    subprocess.run(["gcc", "-O0", "-pthread", "-o", str(exe), str(harness.FIXTURES / "stopper.c")], check=True)
    b["stopper"] = exe
    return b


def _stopped(exe):
    proc = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True)
    marker = int(proc.stdout.readline(), 16)
    pid, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
    return proc, marker


def _all_stopped(pid):
    return all(memory.process_state(pid) == "T" and
               open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[0] == "T"
               for t in ptrace.thread_ids(pid))


def test_registers_of_every_thread_and_the_process_stays_stopped_then_continues(built):
    proc, marker = _stopped(built["stopper"])
    try:
        regs = ptrace.thread_registers(proc.pid)
        assert sorted(regs) == ptrace.thread_ids(proc.pid) and len(regs) == 2
        parked = [r for tid, r in regs.items() if tid != proc.pid]
        assert parked[0]["r12"] == 0x5EED5EED5EED
        maps = procmaps.read_regions(proc.pid)
        for tid, r in regs.items():
            assert any(m.start <= r["rsp"] < m.end and m.writable for m in maps), tid
        assert _all_stopped(proc.pid)
        # a second attach works the same (the first detach left no tracer)
        assert ptrace.thread_registers(proc.pid)[proc.pid]["rip"] == regs[proc.pid]["rip"]
        assert _all_stopped(proc.pid)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=10) == 7


def test_memory_reads_with_process_vm_readv_and_proc_mem(built, monkeypatch):
    proc, marker = _stopped(built["stopper"])
    want = [0x1122334455667788, 0x99AABBCCDDEEFF00, 0, 0x0123456789ABCDEF]
    try:
        with memory.ProcessMemory(proc.pid) as mem:
            assert mem.read_words(marker, 32).tolist() == want
            assert not mem.used_proc_mem
            # unreadable memory comes back short, not as an error
            assert mem.read(8, 64) == b""
            parts = mem.read_many([(marker, 16), (8, 8), (marker + 24, 8)])
            assert [len(p) for p in parts] == [16, 0, 8]
        with memory.ProcessMemory(proc.pid) as mem:
            monkeypatch.setattr(memory, "_process_vm_readv", lambda *a: -1)
            assert mem.read_words(marker, 32).tolist() == want
            assert mem.used_proc_mem
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=10) == 7


def test_prefetched_mappings_serve_the_reads_inside_them(built, monkeypatch):
    """ProcessMemory.prefetch reads the writable mappings in one go, leaving
    out a range that cannot be read (page 0) and going on after it; reads
    inside what it kept (read, read_many, words_many) give the same bytes as
    reading the process, without a further process_vm_readv; a range it does
    not hold wholly is read from the process."""
    proc, marker = _stopped(built["stopper"])
    try:
        maps = procmaps.read_regions(proc.pid)
        rw = [(m.start, m.end - m.start) for m in maps if m.readable and m.writable and m.path != "[vvar]"]
        holder = next((a, n) for a, n in rw if a <= marker < a + n)
        with memory.ProcessMemory(proc.pid) as plain:
            want = {r: plain.read(*r) for r in rw}
        with memory.ProcessMemory(proc.pid) as mem:
            kept = mem.prefetch([(0, 4096)] + rw)       # page 0 first: the first call stops there
            assert kept == sum(n for _, n in rw)
            calls = []
            real = memory._process_vm_readv
            monkeypatch.setattr(memory, "_process_vm_readv", lambda *a: calls.append(a[2]) or real(*a))
            for r in rw:
                assert mem.read(*r) == want[r]
            assert mem.read_many([(marker, 16), (marker + 24, 8)]) == [want[holder][marker - holder[0]:][:16],
                                                                        want[holder][marker - holder[0] + 24:][:8]]
            words = mem.words_many([(marker, 32), (holder[0], holder[1])])
            assert words[0].tolist() == [0x1122334455667788, 0x99AABBCCDDEEFF00, 0, 0x0123456789ABCDEF]
            assert words[1].tobytes() == want[holder]
            assert calls == []
            # not held wholly: read from the process
            assert mem.read(8, 64) == b"" and calls == [1]
            assert mem.words_many([(marker, 32)])[0].size == 4 and len(calls) == 1
        with memory.ProcessMemory(proc.pid) as mem:     # nothing prefetched: straight into numpy
            got = mem.words_many([(marker, 32), (8, 64), (holder[0], holder[1])])
            assert got[0].tolist()[:2] == [0x1122334455667788, 0x99AABBCCDDEEFF00]
            assert got[1].size == 0 and got[2].tobytes() == want[holder]
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=10) == 7


CASES = ["list", "tree", "cycle", "interior", "mmap_tls", "thread", "freed", "big", "family", "hazard"]


def test_heap_walk_tells_live_chunks_from_free_ones(built):
    """The walk's live chunks are exactly the recorder's live blocks (plus
    glibc's tcache structs, which malloc allocates for itself), with the usable
    size of each; mmapped blocks are found by their header, and also without
    the block list by looking for mmapped chunks in anonymous mappings."""
    seen = {}

    def inspect(pid, scan):
        maps = procmaps.read_regions(pid)
        with memory.ProcessMemory(pid) as mem:
            w = heap.walk(maps, mem.read)
            seen["arenas"] = w.arenas
            seen["main_arena"] = heap.find_main_arena(maps, mem.read)
            seen["live"] = dict(zip(w.live_starts.tolist(), w.live_sizes.tolist()))
            seen["tcaches"] = list(w.tcaches)
            seen["free"] = w.free_chunks
            c = scan.classification
            seen["rec"] = dict(zip(c.starts.tolist(), c.sizes.tolist()))
            seen["mmapped"] = {s: heap.mmapped_extent(mem.read, s) for s in seen["rec"]}
            seen["found"] = heap.mmapped_chunks(maps, mem.read)

    r = harness.run_scanned([str(built["cases"]), *CASES], built["recorder.so"], inspect=inspect)
    assert r.returncode == 0
    live, rec = seen["live"], seen["rec"]
    mmapped = {s for s, e in seen["mmapped"].items() if e}
    assert sorted(rec[s] for s in mmapped) == [1 << 20, 3 << 19]
    for s in mmapped:
        lo, hi = seen["mmapped"][s]
        assert lo % 4096 == 0 and hi % 4096 == 0 and lo < s and s + rec[s] <= hi
    assert len(seen["tcaches"]) == 2  # main thread's and the parked thread's
    assert set(live) == (set(rec) - mmapped) | set(seen["tcaches"])
    for s in set(rec) - mmapped:
        assert heap.request2chunk(rec[s]) - 8 == live[s] or \
            (live[s] >= rec[s] and rec[s] in (216, 224, 256))  # memalign'd: split chunks
    found = {u: (n, lo, hi) for u, n, lo, hi in seen["found"]}
    assert set(found) == mmapped
    for u in mmapped:
        assert found[u][1:] == seen["mmapped"][u] and found[u][0] >= rec[u]
    assert [a.is_main for a in seen["arenas"]] == [True, False]
    assert seen["arenas"][0].address == seen["main_arena"]
    assert seen["free"], "the fixture frees blocks: some chunks are free"
    free_users = {c + 16 for c, _ in seen["free"]}
    assert not free_users & set(live)


def test_registers_of_a_running_process_and_it_keeps_running():
    """PTRACE_INTERRUPT stops a running (sleeping) thread for the read; the
    detach lets it run on (it is not left stopped)."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while memory.process_state(proc.pid) != "S" and time.monotonic() < deadline:
            time.sleep(0.01)
        regs = ptrace.thread_registers(proc.pid)
        assert list(regs) == [proc.pid]
        stack = next(m for m in procmaps.read_regions(proc.pid) if m.path == "[stack]")
        assert stack.start <= regs[proc.pid]["rsp"] < stack.end
        time.sleep(0.05)
        assert memory.process_state(proc.pid) == "S"
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
