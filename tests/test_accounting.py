"""Unit tests (no root): accounting and report formatting on synthetic records."""

import json

from pytest_memleak_ebpf import accounting
from pytest_memleak_ebpf.atomic import write_json_atomic
from pytest_memleak_ebpf.classify import classify
from pytest_memleak_ebpf.marks import Budget
from pytest_memleak_ebpf.report import failure_text, format_frame, headline, incomplete_headline, json_report, render_problems
from pytest_memleak_ebpf.verdict import settle


def proc(serial, pid, **kw):
    d = dict(serial=serial, pid=pid, ppid=1, uid=0, comm=f"p{pid}", exe_raw=f"/bin/p{pid}", exited=True,
             exit_code=0, signal=None, running_at_test_end=False, alloc_bytes=0, alloc_blocks=0,
             lost_blocks=0, lost_handoffs=0, lost_stacks=0)
    d.update(kw)
    return d


def resolve(status, bid, off):
    return {"function": f"fn_{off:x}", "offset": 4, "module": "/m.so", "file": None, "line": None}


def account(nodeid, budget, processes, blocks, stacks, resolve, **kw):
    """The pipeline without the tracer: classify, resolve (a fake), account, verdict."""
    frames = {h: [resolve(*f) for f in raw] for h, raw in stacks.items() if raw}
    r = accounting.account(nodeid, budget, processes, classify(blocks).processes, frames, **kw)
    return render_problems(r, settle(r))


def test_headline_and_totals_are_exact():
    procs = [proc(1, 10), proc(2, 11), proc(3, 12)]
    blocks = {2: [(4321, 77)]}
    stacks = {77: [(1, "ab" * 20, 0x1234), (1, "ab" * 20, 0x99)]}
    r = account("t.py::test", Budget(0, None), procs, blocks, stacks, resolve)
    assert r.over_budget
    assert headline(r) == "leak budget exceeded: 4,321 B in 1 block leaked by 1 of 3 processes (budget 0 B)"
    assert [p.leaked.bytes for p in r.processes] == [0, 4321, 0]
    text = failure_text(r)
    assert text.splitlines()[0] == headline(r)
    assert "fn_1234+0x4 (/m.so)" in text


def test_stacks_aggregate_per_stack_largest_first():
    blocks = {1: [(10, 5), (10, 5), (100, 6), (1, 0)]}
    stacks = {5: [(1, "aa" * 20, 1)], 6: [(1, "aa" * 20, 2)]}
    r = account("t", Budget(1000, None), [proc(1, 10)], blocks, stacks, resolve)
    s = r.processes[0].stacks
    assert [(x.bytes, x.blocks) for x in s] == [(100, 1), (20, 2), (1, 1)]
    assert not s[-1].captured
    assert r.leaked.bytes == 121 and r.leaked.blocks == 4 and not r.over_budget


def test_blocks_budget_and_off():
    blocks = {1: [(1, 0)] * 3}
    assert account("t", Budget(None, 2), [proc(1, 1)], blocks, {}, resolve).over_budget
    assert not account("t", Budget(None, 3), [proc(1, 1)], blocks, {}, resolve).over_budget
    assert not account("t", Budget(None, None, checked=False), [proc(1, 1)], blocks, {}, resolve).over_budget


def test_incomplete_tracking_is_reported():
    r = account("t", Budget(0, None), [proc(1, 5, lost_blocks=3)], {}, {}, resolve, lost_procs=2)
    assert len(r.incomplete) == 2 and "max-blocks" in r.incomplete[0]
    assert incomplete_headline(r).startswith("leak tracking incomplete:")


def test_json_schema_v1(tmp_path):
    r = account("t.py::x", Budget(0, None), [proc(1, 10, signal=11, exit_code=None)], {1: [(8, 9)]},
                {9: [(1, "cd" * 20, 16)]}, resolve)
    doc = json_report([r.to_json("failed")])
    path = tmp_path / "r.json"
    write_json_atomic(str(path), doc)
    back = json.loads(path.read_text())
    t = back["tests"][0]
    assert back["version"] == 1
    assert t["outcome"] == "failed" and t["over_budget"] is True
    assert t["budget"] == {"bytes": 0, "blocks": None} and t["leaked"] == {"bytes": 8, "blocks": 1}
    p = t["processes"][0]
    for key in ("pid", "ppid", "comm", "exe", "uid", "user", "exit_code", "signal", "running_at_test_end",
                "outstanding", "leaked", "allocated", "stacks"):
        assert key in p
    assert p["signal"] == 11 and p["user"] == "root"
    assert set(p["stacks"][0]["frames"][0]) >= {"function", "offset", "module", "file", "line"}
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_frame_formats():
    assert format_frame({"function": "f", "offset": 16, "module": "/x.so"}) == "f+0x10 (/x.so)"
    assert format_frame({"function": "f", "offset": 1, "module": "/x", "file": "a.c", "line": 3}) == "f+0x1 (/x) at a.c:3"
    assert format_frame({"function": None, "module": None, "address": 255}) == "0xff [unknown]"
    assert format_frame({"function": None, "offset": None, "module": None}) == "[stack not captured]"


def test_lost_events_warn_but_counts_stay_exact():
    r = account("t", Budget(0, None), [proc(1, 5)], {1: [(16, 0)]}, {}, resolve, lost_events=7)
    assert r.leaked.bytes == 16 and r.leaked.blocks == 1
    assert not r.incomplete
    assert r.warnings == ["7 exec/open events were lost (ring buffer full): some frames may not be symbolized"]


def test_lost_handoffs_and_stacks_name_the_process_and_the_fix():
    r = account("t", Budget(0, None), [proc(1, 5, lost_handoffs=2, lost_stacks=4)], {}, {}, resolve)
    assert any("pid 5" in m for m in r.incomplete + r.warnings)
    assert any("--ebpf-leaks-max-stacks" in w and "4" in w for w in r.warnings)
    assert r.incomplete, "a lost hand-off means an allocation was not recorded: never a silent pass"
