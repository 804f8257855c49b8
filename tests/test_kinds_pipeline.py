"""Leak kinds in the result pipeline, without root: the kinds list (option,
ini, marker), the collection of a scanned image's blocks per kind, the
classification stage, accounting per kind and what the budget counts, the
reports (terminal, JUnit, JSON), and the watchdog that resumes paused
processes when the session dies."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fakemaps import fake_maps
from pytest_memleak_ebpf import classify as cl
from pytest_memleak_ebpf.accounting import account
from pytest_memleak_ebpf.marks import Budget, MarkerError, budget_from_marker
from pytest_memleak_ebpf.report import failure_text, kind_properties, process_table, top_stacks
from pytest_memleak_ebpf.tracer import abi
from pytest_memleak_ebpf.tracer.collection import Collector, serial_at
from pytest_memleak_ebpf.tracer.exitpause import process_state
from pytest_memleak_ebpf.tracer.watchdog import Watchdog, pending_tgids
from pytest_memleak_ebpf.verdict import settle

DEFAULT = Budget(bytes=0, blocks=None)


def test_kinds_lists():
    assert cl.parse_kinds("definite,indirect") == {"definite", "indirect"}
    assert cl.parse_kinds(" possible , reachable ") == {"possible", "reachable"}
    assert cl.parse_kinds("all") == set(cl.KINDS)
    assert cl.parse_kinds(["definite"]) == {"definite"}
    assert DEFAULT.kinds == {"definite", "indirect", "unclassified"} and DEFAULT.classify
    assert not Budget(0, None, kinds=cl.parse_kinds("all")).classify
    assert not Budget(0, None, kinds=cl.parse_kinds("definite,indirect,possible,reachable,unclassified")).classify
    for bad, fragment in (("lost", "unknown leak kind 'lost'"), ("", "names no leak kind"),
                          ("definite,,x", "unknown leak kind 'x'"), (3, "is not a list of leak kinds")):
        with pytest.raises(ValueError, match=fragment):
            cl.parse_kinds(bad)


def test_marker_kinds():
    b = budget_from_marker((0,), {"kinds": "definite"}, DEFAULT)
    assert b.kinds == {"definite"}
    assert budget_from_marker((0,), {}, Budget(0, None, kinds=frozenset({"possible"}))).kinds == {"possible"}
    with pytest.raises(MarkerError, match=r"leak_budget\(kinds='lots'\): unknown leak kind 'lots'"):
        budget_from_marker((0,), {"kinds": "lots"}, DEFAULT)


def test_bad_kinds_option_and_ini_are_usage_errors(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("PYTEST_MEMLEAK_EBPF_BCC_PATH", str(tmp_path / "nowhere"))
    pytester.makepyfile(test_m="def test_x(): pass")
    r = pytester.runpytest_subprocess("--ebpf-leaks", "--ebpf-leaks-kinds=definite,lost")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "argument --ebpf-leaks-kinds: unknown leak kind 'lost' in 'definite,lost'" in r.stderr.str()
    assert "Traceback" not in r.stderr.str()
    pytester.makeini("[pytest]\nebpf_leaks_kinds = sometimes\n")
    r = pytester.runpytest_subprocess("--ebpf-leaks")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "ini option ebpf_leaks_kinds: unknown leak kind 'sometimes'" in r.stderr.str()


def test_collection_sums_a_scanned_image_per_kind_and_stack():
    maps, lib = fake_maps()
    sa, sb = serial_at(1000), serial_at(1001)
    maps["procs"][sa] = maps["procs"].Leaf(serial=sa, tgid=201, test_id=1, flags=abi.PF_EXITED, comm=b"p")
    maps["procs"][sb] = maps["procs"].Leaf(serial=sb, tgid=202, test_id=1, flags=abi.PF_EXITED, comm=b"q")
    for tgid, addr, size, serial, st in ((201, 0xA1, 10, sa, 11), (201, 0xA2, 20, sa, 11), (201, 0xA3, 5, sa, 11),
                                         (201, 0xA4, 7, sa, 12), (202, 0xB1, 9, sb, 11)):
        maps["blocks"][maps["blocks"].Key(tgid=tgid, addr=addr)] = maps["blocks"].Leaf(size=size, ts=1, serial=serial,
                                                                                      stack=st)
    c = Collector(maps, lib, stack_depth=4, max_stacks=8, thread_alive=lambda tid: False)
    assert sorted(c.image_blocks(201, sa)) == [(0xA1, 10), (0xA2, 20), (0xA3, 5), (0xA4, 7)]
    kinds = {sa: {0xA1: "definite", 0xA2: "reachable", 0xA3: "definite"}}   # 0xA4: not seen by the scan
    rec = c.collect_test(1, active=set(), window_serial=-1, window_allocs=False, windows=set(), single_client=True,
                         block_kinds=lambda serials: {s: kinds[s] for s in serials if s in kinds})
    assert {k: sorted(v) for k, v in rec.kinds[sa].items()} == {
        "definite": [(15, 11, 2)], "reachable": [(20, 11, 1)], "unclassified": [(7, 12, 1)]}
    assert sa not in rec.blocks and rec.blocks[sb] == [(9, 11, 1)]


def _proc(serial, pid, **kw):
    return {"serial": serial, "pid": pid, "ppid": 1, "uid": 0, "comm": f"p{pid}", "exited": True, "exit_code": 0,
            "signal": None, "alloc_bytes": 0, "alloc_blocks": 0, **kw}


def _result(budget=DEFAULT):
    procs = [_proc(1, 10), _proc(2, 20, signal=9, exit_code=None)]
    scanned = {1: {"definite": [(48, 5, 1)], "indirect": [(432, 5, 9)], "reachable": [(160, 6, 4)],
                   "possible": [(30, 7, 1)]}}
    c = cl.classify({2: [(64, 8, 2)]}, kinds=scanned, processes=procs, scanned={1}, wanted=True)
    assert c.reasons == {2: "it was killed by SIGKILL (a fatal signal: no pause at exit)"}
    assert cl.classify({2: [(64, 8, 2)]}, processes=procs[1:], wanted=False).reasons == {
        2: "leak kinds were not asked for (kinds=all)"}
    frames = {h: [{"function": f"f{h}", "offset": 0, "module": "/bin/p", "file": None, "line": None}]
              for h in (5, 6, 7, 8)}
    r = account("t::x", budget, procs, c.processes, frames, reasons=c.reasons)
    settle(r)
    return r


def test_only_the_budgets_kinds_count():
    r = _result()
    p10, p20 = r.processes
    assert p10.classified and p10.reason is None and not p20.classified
    assert (p10.leaked.bytes, p10.leaked.blocks) == (480, 10)              # definite + indirect
    assert (p20.leaked.bytes, p20.leaked.blocks) == (64, 2)                # unclassified counts by default
    assert (p10.outstanding.bytes, p10.outstanding.blocks) == (670, 15)    # raw, every kind
    assert r.over_budget
    r = _result(Budget(bytes=0, blocks=None, kinds=cl.parse_kinds("all")))
    assert (r.leaked.bytes, r.leaked.blocks) == (734, 17)
    r = _result(Budget(bytes=0, blocks=None, kinds=cl.parse_kinds("possible")))
    assert (r.leaked.bytes, r.leaked.blocks) == (30, 1)


def test_json_reachability_adds_up_to_outstanding():
    r = _result()
    doc = json.loads(json.dumps(r.to_json("passed")))
    p10, p20 = doc["processes"]
    assert p10["reachability"] == {"definite": {"bytes": 48, "blocks": 1}, "indirect": {"bytes": 432, "blocks": 9},
                                   "possible": {"bytes": 30, "blocks": 1}, "reachable": {"bytes": 160, "blocks": 4},
                                   "unclassified": {"bytes": 0, "blocks": 0}}
    for p in (p10, p20):
        assert sum(v["bytes"] for v in p["reachability"].values()) == p["outstanding"]["bytes"]
        assert sum(v["blocks"] for v in p["reachability"].values()) == p["outstanding"]["blocks"]
    assert p10["classified"] is True and "reason" not in p10
    assert p20["classified"] is False and p20["reason"].startswith("it was killed by SIGKILL")
    assert [s["kind"] for s in p10["stacks"]] == ["indirect", "definite", "possible", "reachable"]
    assert p10["leaked"] == {"bytes": 480, "blocks": 10}


def test_reports_name_the_kinds():
    r = _result()
    table = process_table(r)
    assert table[0].split() == ["pid", "ppid", "comm", "status", "leaked", "lost", "possible", "reachable",
                                "unclassified", "allocated", "(lifetime)", "exe"]
    assert "480 B in 10 blocks" in table[1] and "30 B in 1 block" in table[1] and "160 B in 4 blocks" in table[1]
    assert table[-1] == ("  pid 20 (p20): its blocks are unclassified: it was killed by SIGKILL "
                         "(a fatal signal: no pause at exit)")
    heads = [line for line in top_stacks(r) if line.startswith("  #")]
    assert heads == ["  #1 432 B in 9 blocks indirectly lost from pid 10 (p10):",
                     "  #2 48 B in 1 block definitely lost from pid 10 (p10):",
                     "  #3 64 B in 2 blocks unclassified from pid 20 (p20):",
                     "  #4 30 B in 1 block possibly lost from pid 10 (p10):",
                     "  #5 160 B in 4 blocks still reachable from pid 10 (p10):"]
    assert "definitely lost" in failure_text(r)
    assert kind_properties(r) == [("leak_definite_bytes", 48), ("leak_indirect_bytes", 432),
                                  ("leak_possible_bytes", 30), ("leak_reachable_bytes", 160)]


def test_the_in_process_window_has_the_kinds_its_scan_gave():
    """Classified at the window's close (kinds/inprocess.py): its records per
    kind; a window not scanned is unclassified, with the reason."""
    c = cl.classify({}, [], inproc_kinds={"definite": [(100, 3, 7)], "reachable": [(50, 4, 7)]}, wanted=True)
    assert c.in_process == {"definite": [(100, 3, 7)], "reachable": [(50, 4, 7)]} and not c.reasons
    assert c.in_process_classified and c.in_process_reason is None
    c = cl.classify({}, [(100, 3, 0), (50, 4, 7)])
    assert c.in_process == {"unclassified": [(100, 3, 0), (50, 4, 7)]} and not c.reasons
    assert not c.in_process_classified and c.in_process_reason == "leak kinds were not asked for (kinds=all)"
    c = cl.classify({}, [(100, 3, 0)], inproc_reason="the scan timed out (over 10 s)", wanted=True)
    assert c.in_process == {"unclassified": [(100, 3, 0)]} and c.in_process_reason == "the scan timed out (over 10 s)"


def _state_soon(pid, want, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process_state(pid) == want:
            return True
        time.sleep(0.01)
    return process_state(pid) == want


def _pending_map():
    """A BPF hash map like the program's `pending` (u32 tgid -> a value)."""
    from pytest_memleak_ebpf.tracer import loading

    return loading._create_map({"type": 1, "name": "test_pending", "key_size": 4, "leaf_size": 8,
                                "max_entries": 64, "flags": 0})


def _hold(fd, tgid):
    import ctypes

    from pytest_memleak_ebpf.tracer import loading

    key, value = ctypes.c_uint32(tgid), ctypes.c_uint64(0)

    class Attr(ctypes.Structure):
        _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                    ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]

    attr = Attr(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(value))
    assert loading._bpf_syscall(2, attr) == 0     # BPF_MAP_UPDATE_ELEM


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="BPF maps and ptrace of a child need root here")


@needs_root
def test_the_watchdog_continues_a_pending_process_at_the_time_limit():
    """A process listed in `pending` (by the BPF program, before its stop) is
    continued once stopped longer than the limit, whatever pytest does, and
    its key is deleted; an unlisted stopped process is not the watchdog's."""
    fd = _pending_map()
    child, other = _sleeper(), _sleeper()
    try:
        for c in (child, other):
            os.kill(c.pid, signal.SIGSTOP)
            assert _state_soon(c.pid, "T")
        _hold(fd, child.pid)
        w = Watchdog(fd, 0.3)
        t0 = time.monotonic()
        assert _state_soon(child.pid, "S")
        assert 0.3 <= time.monotonic() - t0 < 3
        assert pending_tgids(fd) == []
        assert process_state(other.pid) == "T"
        w.close()
        assert w.proc.returncode == 0
        assert process_state(other.pid) == "T"
    finally:
        for c in (child, other):
            c.kill()
            c.wait()
        os.close(fd)


@needs_root
@pytest.mark.parametrize("owner_stopped", [False, True], ids=["killed", "stopped-then-killed"])
def test_the_watchdog_continues_everything_when_its_owner_is_killed(owner_stopped):
    """SIGKILL of the process that owns the watchdog (pytest), running or
    itself stopped (it never read the stop's event): the watchdog, in a
    session of its own, sees its pipe close and continues every process
    listed in the map at once, long before the limit."""
    child = _sleeper()
    fd = _pending_map()
    owner_code = f"""
import os, sys, time
sys.path.insert(0, {os.getcwd()!r})
from pytest_memleak_ebpf.tracer.watchdog import Watchdog
w = Watchdog({fd}, 3600)
print(w.proc.pid, flush=True)
time.sleep(60)
"""
    owner = subprocess.Popen([sys.executable, "-c", owner_code], stdout=subprocess.PIPE, text=True, pass_fds=(fd,))
    try:
        dog = int(owner.stdout.readline())
        assert os.getsid(dog) == dog != os.getsid(0)
        if owner_stopped:
            owner.send_signal(signal.SIGSTOP)
        os.kill(child.pid, signal.SIGSTOP)
        _hold(fd, child.pid)
        assert _state_soon(child.pid, "T")
        time.sleep(0.2)
        assert process_state(child.pid) == "T"
        owner.kill()
        owner.wait()
        assert _state_soon(child.pid, "S", seconds=2)
        deadline = time.monotonic() + 5
        while process_state(dog) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process_state(dog) in (None, "Z")
        assert pending_tgids(fd) == []
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()
        child.kill()
        child.wait()
        os.close(fd)


@needs_root
def test_the_watchdog_reads_the_registers_of_a_stopped_process():
    """Registers are read by the watchdog, not by the process that waits for
    the child (its waitpid would take the ptrace stops); the child stays stopped."""
    child = _sleeper()
    fd = _pending_map()
    w = Watchdog(fd, 3600)
    try:
        os.kill(child.pid, signal.SIGSTOP)
        assert _state_soon(child.pid, "T")
        regs = w.registers(child.pid, 5.0)
        assert child.pid in regs and regs[child.pid]["rsp"] > 0
        assert process_state(child.pid) == "T"
        with pytest.raises(OSError):
            w.registers(2 ** 22 + 7, 5.0)
    finally:
        w.close()
        child.kill()
        child.wait()
        os.close(fd)


def test_a_suppressed_stack_of_a_kind_that_does_not_count_changes_nothing():
    from pytest_memleak_ebpf.suppressions import apply, from_patterns

    r = _result()
    reachable = next(s for s in r.processes[0].stacks if s.kind == "reachable")
    lost = next(s for s in r.processes[0].stacks if s.kind == "definite")
    settle(r, apply(r, from_patterns([reachable.frames[0]["function"]])))
    assert reachable.suppressed and (r.processes[0].leaked.bytes, r.processes[0].leaked.blocks) == (480, 10)
    settle(r, apply(r, from_patterns([lost.frames[0]["function"]])))
    # the lost list's head and its rest were allocated from the same stack (f5)
    assert lost.suppressed and (r.processes[0].leaked.bytes, r.processes[0].leaked.blocks) == (0, 0)


def test_generated_suppressions_cover_only_the_kinds_that_count():
    from pytest_memleak_ebpf.report import gen_suppressions

    text = gen_suppressions(_result())
    assert "leak:^f5$" in text and "leak:^f8$" in text          # lost, unclassified
    assert "f6" not in text and "f7" not in text                # reachable, possible


def test_a_default_suppression_never_hides_a_lost_stack():
    """The defaults describe memory a library keeps: a stack the scan found
    lost (definite, indirect) is not hidden by one, though a user's own
    suppression hides it; a default still hides a reachable or an
    unclassified stack."""
    from pytest_memleak_ebpf.suppressions import Suppression, apply

    r = _result()
    p10, p20 = r.processes
    every = [s for p in r.processes for s in p.stacks]
    defaults = [Suppression(pattern=f"^f{h}$", source="default") for h in (5, 6, 7, 8)]
    hidden = apply(r, defaults).matches
    assert {s.kind for s in every if id(s) in hidden} == {"reachable", "possible", "unclassified"}
    assert not any(id(s) in hidden for s in every if s.kind in ("definite", "indirect"))
    settle(r, apply(r, defaults))
    assert (p10.leaked.bytes, p10.leaked.blocks) == (480, 10) and (p20.leaked.bytes, p20.leaked.blocks) == (0, 0)
    mine = [Suppression(pattern="^f5$", source="leaks.supp:1")]
    settle(r, apply(r, defaults + mine))
    assert (p10.leaked.bytes, p10.leaked.blocks) == (0, 0)


def test_the_registers_of_a_stop_come_from_its_bpf_record_when_the_process_has_that_one_thread():
    """Pauser.registers: the BPF program's record of the stop (memleak.h
    stop_regs_t) is the answer for a process whose one thread took the stop;
    a record of another image (serial), of another thread, or a process with
    more threads goes to ptrace (the watchdog)."""
    from pytest_memleak_ebpf.tracer.exitpause import Pauser, StopRegisters

    class Watchdog:
        asked = []

        def registers(self, pid, timeout):
            self.asked.append(pid)
            return {pid: {"rsp": 1}, pid + 1: {"rsp": 2}}

    one = subprocess.Popen(["sleep", "30"])
    two = subprocess.Popen([sys.executable, "-c", "import threading, time\n"
                            "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
                            "print(flush=True)\ntime.sleep(30)"], stdout=subprocess.PIPE)
    try:
        two.stdout.readline()       # its second thread runs
        wd = Watchdog()
        p = Pauser(None, wd, None, None)
        regs = {"rsp": 0x7FFF0000, "rbx": 0x1234, "fs_base": 0x7F000000}
        assert p.registers(one.pid, 7, StopRegisters(7, one.pid, regs)) == {one.pid: regs}
        assert wd.asked == [] and p.register_sources == {"bpf": 1, "ptrace": 0}
        for pid, rec in ((one.pid, StopRegisters(8, one.pid, regs)),          # another image's
                         (one.pid, StopRegisters(7, one.pid + 1, regs)),      # another thread's
                         (one.pid, None),                                     # none
                         (two.pid, StopRegisters(7, two.pid, regs))):         # two threads
            assert p.registers(pid, 7, rec) == {pid: {"rsp": 1}, pid + 1: {"rsp": 2}}
        assert wd.asked == [one.pid, one.pid, one.pid, two.pid]
        assert p.register_sources == {"bpf": 1, "ptrace": 4}
    finally:
        for proc in (one, two):
            proc.kill()
            proc.wait()


def test_a_stop_with_its_bpf_record_and_one_thread_is_scanned_without_waiting_for_proc(monkeypatch):
    """Pauser._scan_stopped: the record of our SIGSTOP (written with the
    siglock held up to the group stop) and one thread: no wait for /proc
    to show the stop. No record yet, or more threads: wait, and the record
    is taken after the wait (no record outlives its stop)."""
    from pytest_memleak_ebpf.tracer import exitpause
    from pytest_memleak_ebpf.tracer.exitpause import Pauser, StopRegisters

    regs = {"rsp": 0x7FFF0000, "fs_base": 0}
    waits, scans = [], []
    monkeypatch.setattr(exitpause, "wait_stopped", lambda pid: waits.append(pid) or True)
    monkeypatch.setattr(exitpause, "scan", lambda pid, blocks, limit, registers, allocator:
                        scans.append(registers()) or exitpause.Outcome(kinds={}))
    records = []
    p = Pauser(lambda tgid, serial: [], None, None, None, stop_registers=lambda tgid: records.pop(0) if records
               else None)
    monkeypatch.setattr(exitpause, "thread_ids", lambda pid: [pid])
    records[:] = [StopRegisters(7, 100, regs)]
    p._scan_stopped(100, 7)
    assert waits == [] and scans == [{100: regs}]
    # the record comes only after the stop shows: waited, then taken
    records[:] = []
    p.stop_registers = lambda tgid, seq=[None, StopRegisters(7, 100, regs)]: seq.pop(0)
    p._scan_stopped(100, 7)
    assert waits == [100] and scans[-1] == {100: regs}
    # two threads: waited (and the registers through ptrace)
    monkeypatch.setattr(exitpause, "thread_ids", lambda pid: [pid, pid + 1])
    p.watchdog = type("W", (), {"registers": lambda self, pid, t: {pid: {"rsp": 1}, pid + 1: {"rsp": 2}}})()
    p.stop_registers = lambda tgid: StopRegisters(7, 100, regs)
    p._scan_stopped(100, 7)
    assert waits == [100, 100] and scans[-1] == {100: {"rsp": 1}, 101: {"rsp": 2}}
    # a record of another image: waited
    monkeypatch.setattr(exitpause, "thread_ids", lambda pid: [pid])
    p.stop_registers = lambda tgid: StopRegisters(6, 100, regs)
    p._scan_stopped(100, 7)
    assert waits == [100, 100, 100]
