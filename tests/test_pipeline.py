"""Unit tests (no root, fakes only): each stage of the one-way result pipeline
(classify -> resolve -> accounting -> suppressions -> verdict -> report) and
the engine that runs them, with a fake tracer."""

from __future__ import annotations

import ast
import copy
import os
import sys

import pytest

from pytest_memleak_ebpf import accounting, classify, engine, resolve, verdict
from pytest_memleak_ebpf.accounting import Amount
from pytest_memleak_ebpf.marks import Budget, budget_from_marker
from pytest_memleak_ebpf.report import failure_text, format_frame, headline, render_problems
from pytest_memleak_ebpf.suppressions import DEFAULT_SUPPRESSIONS, Suppression, apply
from pytest_memleak_ebpf.symbolize import Frame
from pytest_memleak_ebpf.tracer import RawTest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pytest_memleak_ebpf")
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"


def proc(serial, pid, **kw):
    d = dict(serial=serial, pid=pid, ppid=1, uid=0, comm=f"p{pid}", exe_raw=f"/bin/p{pid}", exit_code=0,
             signal=None, running_at_test_end=False, alloc_bytes=0, alloc_blocks=0, lost_blocks=0,
             lost_handoffs=0, lost_stacks=0)
    d.update(kw)
    return d


class FakeSymbolizer:
    """Resolves build id "aa..." frames to fn_<offset> in /m.so, others to nothing."""

    def __init__(self):
        self.calls = []
        self.candidates = []

    def add_candidate(self, path):
        self.candidates.append(path)

    def resolve(self, bid, off):
        self.calls.append((bid.hex(), off))
        if bid.hex().startswith("aa"):
            return Frame(f"fn_{off:x}", 4, "/m.so")
        return Frame(None, None, None, build_id=bid.hex(), address=off)

    def resolve_raw_ip(self, ip):
        self.calls.append((None, ip))
        return Frame(None, None, None, address=ip)


# --------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------

def test_classify_tags_every_block_unclassified_and_keeps_records():
    blocks = {1: [(10, 5, 1), (20, 6, 2)], 2: []}
    inproc = [(8, 7, 0), (16, 7, 0x1000)]
    c = classify.classify(blocks, inproc)
    assert c.processes == {1: {"unclassified": blocks[1]}, 2: {}}
    assert c.in_process == {"unclassified": inproc}
    assert classify.LEAK_KINDS == ("unclassified",)


# --------------------------------------------------------------------------
# resolve: one cache
# --------------------------------------------------------------------------

def test_resolver_resolves_each_frame_once_and_retries_unknown_frames():
    sym = FakeSymbolizer()
    r = resolve.Resolver(sym)
    raw = {1: [(1, "aa" * 20, 0x10), (1, "bb" * 20, 0x20)], 2: [(1, "aa" * 20, 0x10)], 3: []}
    got = r.stacks(raw, {1, 2, 3, 0})
    assert set(got) == {1, 2}                                  # 3 and 0: not captured
    assert got[1][0] == {"function": "fn_10", "offset": 4, "module": "/m.so", "file": None, "line": None,
                         "build_id": "aa" * 20, "address": 0x10}
    assert got[1][1]["function"] is None and got[1][1]["address"] == 0x20
    r.stacks(raw, {1, 2})
    # the known frame went to the symbolizer once; the unknown one each time (a module may appear later)
    assert sym.calls.count(("aa" * 20, 0x10)) == 1
    assert sym.calls.count(("bb" * 20, 0x20)) == 2
    got[1][0]["function"] = "changed"                           # callers get copies
    assert r.frame(1, "aa" * 20, 0x10)["function"] == "fn_10"


def test_resolver_extension_frames_through_proc_maps(tmp_path):
    sym = FakeSymbolizer()
    notelf = tmp_path / "libnot.so"
    notelf.write_bytes(b"not an ELF file")
    # a return address in libc: the end of the first call of its first executable segment
    seg = ret = 0
    if os.path.exists(LIBC):
        from capstone import CS_ARCH_X86, CS_MODE_64, Cs

        from pytest_memleak_ebpf.elf import load_segments

        seg = next(off for off, size, vaddr, _ in load_segments(LIBC) if off == vaddr and off)
        with open(LIBC, "rb") as f:
            f.seek(seg)
            code = f.read(0x2000)
        ret = next(i.address + i.size for i in Cs(CS_ARCH_X86, CS_MODE_64).disasm(code, seg) if i.mnemonic == "call")
    maps = tmp_path / "maps"
    maps.write_text(f"7f0000000000-7f0000002000 r-xp 00001000 08:01 1 {notelf}\n"
                    f"7f0000010000-7f0000012000 r-xp {seg:08x} 08:01 2 {LIBC}\n")
    r = resolve.Resolver(sym, maps_path=str(maps))
    assert r.extension_frame(0x7F0000000010) == resolve.frame_dict(offset=0x1010, module=str(notelf),
                                                                   address=0x7F0000000010)
    assert r.extension_frame(0x1234) == resolve.frame_dict(address=0x1234)
    if os.path.exists(LIBC):
        f = r.extension_frame(0x7F0000010000 + ret - seg)
        assert sym.candidates == [LIBC] and f["address"] == ret and f["build_id"]
    maps.write_text("")
    assert r.extension_frame(0x7F0000000010)["module"] == str(notelf)   # maps read once per window
    r.forget_maps()
    assert r.extension_frame(0x7F0000000010) == resolve.frame_dict(address=0x7F0000000010)


# --------------------------------------------------------------------------
# accounting: pure
# --------------------------------------------------------------------------

FRAMES = {5: [resolve.frame_dict("f5", 4, "/m.so")], 6: [resolve.frame_dict("f6", 4, "/m.so")]}


def test_accounting_groups_classified_blocks_and_leaves_the_verdict_alone():
    blocks = classify.classify({1: [(10, 5), (10, 5), (100, 6, 1), (1, 0)]}).processes
    before = copy.deepcopy((blocks, FRAMES))
    r = accounting.account("t", Budget(0, None), [proc(1, 10)], blocks, FRAMES)
    assert (blocks, FRAMES) == before
    p = r.processes[0]
    assert [(s.bytes, s.blocks, s.captured, s.kind) for s in p.stacks] == [
        (100, 1, True, "unclassified"), (20, 2, True, "unclassified"), (1, 1, False, "unclassified")]
    assert p.outstanding == p.counted == Amount(121, 4)
    assert p.leaked == Amount() and r.leaked == Amount() and not r.over_budget and not r.incomplete
    assert p.stacks[0].frames == FRAMES[6] and p.stacks[0].frames[0] is not FRAMES[6][0]


def test_in_process_counts_one_block_per_record_and_filters_extensions():
    blocks = classify.classify({}, [(100, 5, 0x7000), (50, 5, 0x7000), (8, 6, 0), (30, 0, 0x7100)]).in_process
    counted, growth, groups = accounting.in_process_groups("extensions", blocks, None)
    assert counted == Amount(180, 3) and growth is None
    assert groups == [(5, 0x7000, "unclassified", Amount(150, 2)), (0, 0x7100, "unclassified", Amount(30, 1))]
    assert accounting.in_process_amount("all", blocks) == Amount(188, 4)
    ext = resolve.frame_dict("ext_fn", 8, "/x/ext.so")
    resolved = [(a, kind, FRAMES.get(h, []), ext) for h, _e, kind, a in groups]
    ip = accounting.account_in_process("extensions", blocks, counted, growth, resolved, {"alloc_bytes": 999})
    assert ip.outstanding == Amount(188, 4) and ip.counted == Amount(180, 3) and ip.leaked == Amount()
    assert ip.allocated == Amount(999, 0)
    assert [f["function"] for f in ip.stacks[0].frames] == ["f5", "ext_fn"]
    assert ip.stacks[0].frames[-1]["scanned"] is True
    assert ip.stacks[1].captured and [f["function"] for f in ip.stacks[1].frames] == ["ext_fn"]


def test_in_process_growth_counts_per_repetition_only_when_growing():
    blocks = classify.classify({}, [(10, 5, 1)] * 6).in_process
    reps = [{"bytes": 20, "blocks": 2}, {"bytes": 40, "blocks": 4}, {"bytes": 60, "blocks": 6}]
    counted, growth, groups = accounting.in_process_groups("extensions", blocks, {"warmup": 1, "repeat": 3,
                                                                                  "per_repetition": reps})
    assert counted == Amount(20, 2) and growth["growing"] and len(groups) == 1
    flat = reps[:1] + [reps[0], reps[0]]
    counted, growth, groups = accounting.in_process_groups("extensions", blocks, {"warmup": 1, "repeat": 3,
                                                                                  "per_repetition": flat})
    assert counted == Amount() and not growth["growing"] and groups == []


# --------------------------------------------------------------------------
# verdict: computed once, idempotent, scope "test"
# --------------------------------------------------------------------------

def _result():
    blocks = classify.classify({1: [(4096, 5), (100, 6)], 2: [(7, 0)]}).processes
    frames = {5: [resolve.frame_dict("_IO_file_doallocate", 4, LIBC)], 6: [resolve.frame_dict("mine", 4, "/w/a")]}
    return accounting.account("t", Budget(50, None), [proc(1, 10, lost_stacks=2), proc(2, 11)], blocks, frames,
                              lost_events=1)


def test_decide_is_pure_and_settle_writes_it_once():
    r = _result()
    summary = apply(r, DEFAULT_SUPPRESSIONS)
    before = copy.deepcopy(r)
    v = verdict.decide(r, summary)
    assert r == before
    assert [f.leaked for f in v.processes] == [Amount(100, 1), Amount(7, 1)]
    assert v.leaked == Amount(107, 2) and v.suppressed == Amount(4096, 1) and v.over_budget
    render_problems(r, verdict.settle(r, summary))
    assert r.leaked == Amount(107, 2) and r.over_budget and r.processes[0].leaked == Amount(100, 1)
    assert r.processes[0].stacks[0].suppressed and r.processes[0].stacks[0].suppression == "^_IO_file_doallocate"
    assert r.suppressions_used == [{"pattern": "^_IO_file_doallocate", "source": "default", "stacks": 1,
                                    "bytes": 4096, "blocks": 1}]
    assert len(r.warnings) == 2 and "pid 10" in r.warnings[0] and "exec/open" in r.warnings[1]
    r.warnings.append("the test was interrupted: these are the figures so far")
    once = copy.deepcopy(r)
    render_problems(r, verdict.settle(r, apply(r, DEFAULT_SUPPRESSIONS)))
    assert r == once                                            # settling again changes nothing
    assert headline(r) == "leak budget exceeded: 107 B in 2 blocks leaked by 2 of 2 processes (budget 50 B)"


def test_settle_again_with_a_whole_test_window_adds_it_to_the_verdict():
    r = _result()
    verdict.settle(r, apply(r, ()))
    assert r.leaked == Amount(4203, 3)
    r.in_process = accounting.InProcess("extensions", Amount(64, 2), Amount(), Amount(), [], counted=Amount(64, 2),
                                        lost_blocks=3)
    render_problems(r, verdict.settle(r, apply(r, ())))
    assert r.leaked == Amount(4267, 5) and r.in_process.leaked == Amount(64, 2)
    assert r.incomplete == ["3 allocations of the pytest process were not recorded "
                            "(a map was full: raise --ebpf-leaks-max-blocks)"]


def test_marker_suppressions_are_parsed_once_into_the_budget():
    b = budget_from_marker((0,), {"suppress": ["mine", "leak:^other$"]}, Budget(0, None))
    assert b.suppress == ("mine", "leak:^other$")
    assert b.suppressions == (Suppression("mine", "marker"), Suppression("^other$", "marker"))


# --------------------------------------------------------------------------
# report: the one frame formatter
# --------------------------------------------------------------------------

@pytest.mark.parametrize("frame, stack, label, symbol", [
    (resolve.frame_dict("f", 16, "/x.so", "a.c", 3), "f+0x10 (/x.so) at a.c:3", "f", "f+0x10 (/x.so) at a.c:3"),
    (resolve.frame_dict(None, None, "/x.so", address=0x40), "[unknown] (/x.so)", "[unknown] (/x.so)",
     "[unknown] (/x.so+0x40)"),
    (resolve.frame_dict("g", 1, None, build_id="ab"), "g+0x1", "g", "g+0x1 (build-id ab)"),
    (resolve.frame_dict(address=0xFF), "0xff [unknown]", "[unknown]", "0xff [unknown]"),
    (resolve.frame_dict(), "[stack not captured]", "[unknown]", "[unknown]"),
])
def test_one_formatter_three_styles(frame, stack, label, symbol):
    assert format_frame(frame) == format_frame(frame, "stack") == stack
    assert format_frame(frame, "label") == label
    assert format_frame(frame, "symbol") == symbol
    assert format_frame(Frame(**frame), "symbol") == symbol     # a symbolize.Frame formats the same
    with pytest.raises(ValueError, match="frame style"):
        format_frame(frame, "fancy")


# --------------------------------------------------------------------------
# the engine with a fake tracer
# --------------------------------------------------------------------------

class FakeTracer:
    def __init__(self, raw, window=None):
        self.raw = raw
        self.window = window        # (blocks, counters, stacks) of a whole-test window
        self.roots = []
        self.windows = []

    def add_root(self, pid):
        self.roots.append(pid)

    def begin_test(self, kinds=False):
        return 7

    def end_test(self, test_id):
        assert test_id == 7
        return self.raw

    def in_window(self):
        return False

    def set_extension_pages(self, ranges):
        pass

    def open_window(self):
        self.windows.append("open")

    def close_window(self, scan=None):
        self.windows.append("close")

    def collect_window(self):
        return self.window

    def window_snapshot(self):
        return list(self.window[0]) if self.window else []

    def close(self):
        pass


def _engine(raw, window=None, **kw):
    eng = engine.LeakEngine(engine.Settings(default_budget=Budget(0, None), **kw), tracer=FakeTracer(raw, window))
    eng.resolver = resolve.Resolver(FakeSymbolizer())
    return eng


def test_engine_runs_the_pipeline_once_per_test():
    raw = RawTest(processes=[proc(1, 10)], blocks={1: [(40, 5, 2), (8, 6, 1)]},
                  stacks={5: [(1, "aa" * 20, 0x10)], 6: [(1, "aa" * 20, 0x20)]}, paths={1: ["/bin/p10", "/m.so"]})
    eng = _engine(raw)
    eng.begin()
    budget = budget_from_marker((0,), {"suppress": ["fn_20"]}, Budget(0, None))
    r = eng.finish("t.py::x", budget)
    assert eng.resolver.symbolizer.candidates == ["/bin/p10", "/m.so"]
    assert r.leaked == Amount(40, 2) and r.over_budget and r.processes[0].exe == "/bin/p10"
    assert [s.suppressed for s in r.processes[0].stacks] == [False, True]
    assert r.suppressions_used[0]["source"] == "marker"
    assert eng.results == [r] and not eng.window_empty
    text = failure_text(r)
    assert text.splitlines()[0] == headline(r) and "fn_10+0x4 (/m.so)" in text


def test_engine_whole_test_window_and_empty_window():
    raw = RawTest(processes=[], blocks={}, stacks={})
    window = ([(64, 5, 0), (32, 0, 0)], {"alloc_bytes": 500, "alloc_blocks": 9}, {5: [(1, "aa" * 20, 0x30)]},
              (None, None))
    eng = _engine(raw, window, in_process="all", in_process_scope="test")
    eng.begin()
    r = eng.finish("t.py::y", Budget(0, None))
    assert r.in_process is None and not r.over_budget
    eng.finish_in_process(r, Budget(0, None))
    assert r.in_process.leaked == Amount(96, 2) and r.leaked == Amount(96, 2) and r.over_budget
    assert r.in_process.allocated == Amount(500, 9)
    assert [s.frames[0]["function"] for s in r.in_process.stacks] == ["fn_30", None]

    eng = _engine(raw)
    eng._extension_ranges = lambda: []            # no extension module loaded: nothing can count
    eng.open_window()
    assert eng.window_empty and eng.snapshot() == {"bytes": 0, "blocks": 0}
    eng.begin()
    r = eng.finish("t.py::z", Budget(0, None))
    assert not eng.window_empty and r.in_process.leaked == Amount() and r.in_process.outstanding == Amount()


# --------------------------------------------------------------------------
# the module graph runs one way
# --------------------------------------------------------------------------

def _imports() -> dict[str, set[str]]:
    """Every intra-package import of each module, function-level ones included."""
    mods = {f[:-3] for f in os.listdir(PKG) if f.endswith(".py")}
    graph = {}
    for m in mods:
        with open(os.path.join(PKG, m + ".py")) as f:
            tree = ast.parse(f.read())
        deps = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.level == 1:
                deps |= {n.module.split(".")[0]} if n.module else {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("pytest_memleak_ebpf."):
                deps.add(n.module.split(".")[1])
        graph[m] = deps & mods
    return graph


PIPELINE = {"accounting", "atomic", "classify", "elf", "engine", "flamegraph", "inprocess", "marks", "placement",
            "procmaps", "report", "resolve", "sizes", "suppressions", "symbolize", "verdict"}


def test_no_import_cycle_among_the_pipeline_modules():
    graph = _imports()
    cycles = []

    def visit(node, path):
        for d in sorted(graph[node] & PIPELINE):
            if d == path[0]:
                cycles.append(path + [d])
            elif d not in path:
                visit(d, path + [d])

    for m in sorted(PIPELINE):
        visit(m, [m])
    assert not cycles


def test_accounting_and_verdict_do_no_io_and_call_no_stage_back():
    graph = _imports()
    assert graph["accounting"] <= {"classify", "marks"}
    assert graph["verdict"] <= {"accounting"}
    assert graph["classify"] == set()
    for m in ("accounting", "verdict", "classify"):
        with open(os.path.join(PKG, m + ".py")) as f:
            src = f.read()
        assert "open(" not in src and "/proc" not in src.replace('"""', ""), m


def test_elf_is_the_only_elf_parser():
    for m in ("symbolize", "placement", "suppressions"):
        with open(os.path.join(PKG, m + ".py")) as f:
            src = f.read()
        assert "ELFFile" not in src and "\\x7fELF" not in src and "e_phoff" not in src, m
    assert "pytest_memleak_ebpf.elf" in sys.modules
