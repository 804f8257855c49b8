"""Unit tests (no root): folded stacks and the SVG flame graph of leaked memory."""

import os
import re
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings, strategies as st

from pytest_memleak_ebpf import accounting
from pytest_memleak_ebpf.accounting import Amount, ProcessLeak, StackLeak
from pytest_memleak_ebpf.flamegraph import (
    folded,
    frame_label,
    parse_folded,
    safe_file_stem,
    svg,
    write_flamegraphs,
)
from pytest_memleak_ebpf.marks import Budget

SVG_NS = "{http://www.w3.org/2000/svg}"
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
KV = "/w/build/libkvconf.so"


def fr(function=None, module=None):
    return {"function": function, "offset": 4 if function else None, "module": module, "file": None,
            "line": None, "build_id": None, "address": 0x10}


def proc(pid, comm, stacks):
    out = Amount(sum(s.bytes for s in stacks), sum(s.blocks for s in stacks))
    return ProcessLeak(pid=pid, ppid=1, comm=comm, exe=None, uid=0, user=None, exit_code=0, signal=None,
                       running_at_test_end=False, outstanding=out, leaked=Amount(out.bytes, out.blocks),
                       allocated=out, stacks=stacks)


def sample():
    main = [fr("main", "/w/build/kvtool"), fr("__libc_start_call_main", LIBC)]
    p1 = proc(4242, "kvtool", [
        StackLeak(840, 21, [fr("kv_index_entry_new", KV), fr("kv_index_build", KV)] + main),
        StackLeak(312, 19, [fr("kv_index_entry_new", KV), fr("kv_index_build", KV)] + main),  # same labels: merged
        StackLeak(168, 1, [fr("kv_index_build", KV)] + main),
        StackLeak(64, 1, [fr("operator new(unsigned long)", "/usr/lib/libstdc++.so.6"),
                          fr("std::vector<int, std::allocator<int> >::push_back(int const&)", "/w/build/kvtool"),
                          fr("weird;name\twith\nbreaks", "/w/build/kvtool")] + main),
        StackLeak(0, 2, [fr("zero_sized", KV)] + main),
        StackLeak(16, 1, [fr(None, "/opt/lib/libblob.so"), fr(None, None)] + main),
    ])
    p2 = proc(4243, "sh -c;x", [
        StackLeak(4096, 1, [fr("_IO_file_doallocate", LIBC)]),
        StackLeak(7, 1, [dict(accounting.NO_STACK_FRAME)], captured=False),
    ])
    r = accounting.TestLeakResult(nodeid="tests/test_kv.py::test_dump[flat/a b]", budget=Budget(0, None),
                                  processes=[p1, p2])
    return r


EXPECTED_BYTES = (
    "kvtool (4242);__libc_start_call_main;main;[unknown];[unknown] (/opt/lib/libblob.so) 16\n"
    "kvtool (4242);__libc_start_call_main;main;kv_index_build 168\n"
    "kvtool (4242);__libc_start_call_main;main;kv_index_build;kv_index_entry_new 1152\n"
    "kvtool (4242);__libc_start_call_main;main;weird:name with breaks;"
    "std::vector<int, std::allocator<int> >::push_back(int const&);operator new(unsigned long) 64\n"
    "sh -c:x (4243);[stack not captured] 7\n"
    "sh -c:x (4243);_IO_file_doallocate 4096\n"
)


def test_frame_labels():
    assert frame_label(fr("f", "/m.so")) == "f"
    assert frame_label(fr(None, "/m.so")) == "[unknown] (/m.so)"
    assert frame_label(fr(None, None)) == "[unknown]"
    assert frame_label(fr("a;b", None)) == "a:b"
    assert frame_label(fr("x\r\ny", None)) == "x  y"


def test_folded_exact():
    r = sample()
    assert folded(r) == EXPECTED_BYTES
    assert folded(r, weight="blocks") == (
        "kvtool (4242);__libc_start_call_main;main;[unknown];[unknown] (/opt/lib/libblob.so) 1\n"
        "kvtool (4242);__libc_start_call_main;main;kv_index_build 1\n"
        "kvtool (4242);__libc_start_call_main;main;kv_index_build;kv_index_entry_new 40\n"
        "kvtool (4242);__libc_start_call_main;main;weird:name with breaks;"
        "std::vector<int, std::allocator<int> >::push_back(int const&);operator new(unsigned long) 1\n"
        "kvtool (4242);__libc_start_call_main;main;zero_sized 2\n"
        "sh -c:x (4243);[stack not captured] 1\n"
        "sh -c:x (4243);_IO_file_doallocate 1\n"
    )
    with pytest.raises(ValueError, match="weight"):
        folded(r, weight="calls")


def test_folded_skips_given_stacks():
    r = sample()
    skip = {id(r.processes[1].stacks[0]): "suppressed"}
    assert "_IO_file_doallocate" not in folded(r, skip=skip)
    assert folded(r, skip=skip).count("\n") == EXPECTED_BYTES.count("\n") - 1


def test_folded_lines_split_like_flamegraph_pl():
    # flamegraph.pl: my ($stack, $samples) = (/^(.*)\s+?(\d+(?:\.\d*)?)$/);  then split /;/, $stack
    for line in EXPECTED_BYTES.splitlines():
        m = re.match(r"^(.*)\s+?(\d+(?:\.\d*)?)$", line)
        stack, samples = m.group(1), int(m.group(2))
        frames = stack.split(";")
        assert samples > 0 and all(frames) and frames[0].endswith(")")
    assert parse_folded(EXPECTED_BYTES)[3][0][-1] == "operator new(unsigned long)"
    assert sum(w for _, w in parse_folded(EXPECTED_BYTES)) == 840 + 312 + 168 + 64 + 16 + 4096 + 7


@pytest.mark.parametrize("bad", ["no_weight", "a;b x", "a;b -3", " 5", "a nan"])
def test_parse_folded_rejects_malformed(bad):
    with pytest.raises(ValueError, match="folded line 2"):
        parse_folded("ok 1\n" + bad + "\n")


def _frames(doc):
    """(title text, x, width, y) of every frame rectangle."""
    out = []
    for g in doc.iter(SVG_NS + "g"):
        if g.get("class") != "f":
            continue
        rect = g.find(SVG_NS + "rect")
        out.append((g.find(SVG_NS + "title").text, float(rect.get("x")), float(rect.get("width")),
                    float(rect.get("y"))))
    return out


def test_svg_is_well_formed_one_rect_per_node_and_widths_add_up():
    text = folded(sample())
    doc = ET.fromstring(svg(text, title="Leaked bytes: <test> & co"))
    assert doc.tag == SVG_NS + "svg"
    frames = _frames(doc)
    # nodes of the merged tree: all; 2 processes; kvtool: libc_start->main->{[unknown]->[unknown](blob),
    # kv_index_build->kv_index_entry_new, weird->vector->new}; sh: [not captured], _IO_file_doallocate
    assert len(frames) == 1 + 2 + 2 + 2 + 2 + 3 + 2
    by_label = {t.split(" (")[0] if not t.startswith(("[unknown] (", "kvtool (", "sh -c:x (")) else
                t.rsplit(" (", 1)[0]: (x, w, y) for t, x, w, y in frames}
    total = 840 + 312 + 168 + 64 + 16 + 4096 + 7
    all_x, all_w, all_y = by_label["all"]
    assert all_w == pytest.approx(1180, abs=0.01)
    for label, share in [("kvtool (4242)", 840 + 312 + 168 + 64 + 16), ("sh -c:x (4243)", 4103),
                         ("kv_index_entry_new", 1152), ("main", 1400), ("operator new(unsigned long)", 64)]:
        assert by_label[label][1] == pytest.approx(all_w * share / total, abs=0.002)
    # children sit side by side inside their parent, one level up
    kv_x, kv_w, kv_y = by_label["kvtool (4242)"]
    sh_x, sh_w, sh_y = by_label["sh -c:x (4243)"]
    assert kv_y == sh_y == all_y - 16
    assert kv_x == pytest.approx(all_x) and sh_x == pytest.approx(kv_x + kv_w, abs=0.002)
    assert kv_w + sh_w == pytest.approx(all_w, abs=0.002)
    titles = [t for t, *_ in frames]
    assert "all (5,503 B, 100.00%)" in titles
    assert "_IO_file_doallocate (4,096 B, 74.43%)" in titles
    assert any(t.startswith("std::vector<int, std::allocator<int> >::push_back(int const&) (64 B, 1.16%)")
               for t in titles)
    assert "Leaked bytes: <test> & co" in "".join(doc.itertext())


def test_svg_text_truncated_to_fit_and_deterministic_colors():
    text = "p (1);" + "a_very_long_function_name_that_cannot_fit_in_a_narrow_box" + " 1\np (1);wide 999\n"
    out = svg(text, title="t")
    doc = ET.fromstring(out)
    texts = [t.text for t in doc.iter(SVG_NS + "text")]
    assert "wide" in texts
    assert not any(t and t.startswith("a_very_long") and not t.endswith("..") for t in texts)
    assert out == svg(text, title="t")
    fills = {}
    for g in doc.iter(SVG_NS + "g"):
        if g.get("class") == "f":
            fills[g.find(SVG_NS + "title").text.split(" (")[0]] = g.find(SVG_NS + "rect").get("fill")
    other = ET.fromstring(svg("q (2);wide 5\n", title="u"))
    other_fill = [g.find(SVG_NS + "rect").get("fill") for g in other.iter(SVG_NS + "g")
                  if g.get("class") == "f" and g.find(SVG_NS + "title").text.startswith("wide")]
    assert other_fill == [fills["wide"]]


def test_svg_blocks_unit_and_empty():
    doc = ET.fromstring(svg("p (1);f 3\n", title="b", unit="blocks"))
    assert "f (3 blocks, 100.00%)" in [t for t, *_ in _frames(doc)]
    empty = ET.fromstring(svg("", title="nothing"))
    assert not _frames(empty) and "no leaked memory" in "".join(empty.itertext())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(["a", "b", "c d", "<e&>", "f;g"]), min_size=1, max_size=4),
                          st.integers(1, 10_000)), max_size=8))
def test_svg_always_parses_and_conserves_weight(stacks):
    r = accounting.TestLeakResult(nodeid="t", budget=Budget(0, None), processes=[
        proc(1, "p", [StackLeak(w, 1, [fr(n, "/m") for n in reversed(names)]) for names, w in stacks])])
    text = folded(r)
    total = sum(w for _, w in stacks)
    assert sum(w for _, w in parse_folded(text)) == total
    doc = ET.fromstring(svg(text, title="t"))
    frames = _frames(doc)
    if not total:
        assert not frames
        return
    root_w = [w for t, x, w, y in frames if t.startswith("all (")][0]
    assert root_w == pytest.approx(1180, abs=0.01)
    for t, x, w, y in frames:
        assert x >= 10 - 1e-6 and x + w <= 10 + root_w + 1e-3
        # the children (one row up, inside this box) fit side by side within it
        kids = sorted((cx, cw) for _, cx, cw, cy in frames if cy == y - 16 and x - 1e-2 <= cx < x + w - 1e-2)
        assert sum(cw for _, cw in kids) <= w + 1e-3 * (len(kids) + 1)  # 3-decimal rounding
        for (ax, aw), (bx, _) in zip(kids, kids[1:]):
            assert ax + aw <= bx + 2e-3


@pytest.mark.parametrize("nodeid", [
    "tests/test_kv.py::test_dump[flat/a b]", "../../etc/passwd", ".hidden::x", "t.py::test[é€ 🙂]",
    "t.py::" + "x" * 500, "", "::", "a\0b", "t.py::test[..]",
])
def test_safe_file_stem(nodeid):
    stem = safe_file_stem(nodeid)
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*-[0-9a-f]{10}", stem), stem
    assert len(stem) <= 131 and ".." not in stem and "/" not in stem


def test_safe_file_stems_do_not_collide():
    ids = ["t.py::test[a/b]", "t.py::test[a_b]", "t.py::test[a b]", "t.py::test[a:b]"]
    assert len({safe_file_stem(i) for i in ids}) == len(ids)
    assert safe_file_stem(ids[0]) == safe_file_stem(ids[0])


def test_write_flamegraphs(tmp_path):
    r = sample()
    out = tmp_path / "flame" / "graphs"
    folded_path, svg_path = write_flamegraphs(r, out)
    assert os.path.dirname(folded_path) == os.path.dirname(svg_path) == str(out)
    assert os.path.basename(folded_path).startswith("tests_test_kv.py_test_dump_flat_a_b-")
    assert folded_path.endswith(".folded") and svg_path.endswith(".svg")
    assert folded_path[:-len(".folded")] == svg_path[:-len(".svg")]
    with open(folded_path, encoding="utf-8") as f:
        assert f.read() == EXPECTED_BYTES
    with open(svg_path, encoding="utf-8") as f:
        doc = ET.fromstring(f.read())
    assert "tests/test_kv.py::test_dump[flat/a b]" in "".join(doc.itertext())
    assert sorted(os.listdir(out)) == sorted([os.path.basename(folded_path), os.path.basename(svg_path)])
    # blocks and again: same names, overwritten in place
    assert write_flamegraphs(r, out, weight="blocks") == (folded_path, svg_path)
    with open(folded_path, encoding="utf-8") as f:
        assert f.read() == folded(r, weight="blocks")


def test_folded_includes_in_process_stacks():
    InProcess = getattr(accounting, "InProcess", None)
    if InProcess is None:
        pytest.skip("no in-process results in this version")
    r = sample()
    r.in_process = InProcess(mode="extensions", outstanding=Amount(48, 3), leaked=Amount(48, 3),
                             allocated=Amount(48, 3),
                             stacks=[StackLeak(48, 3, [fr("kvext_parse", "/w/kvext.so"), fr("PyObject_Call", None)])])
    assert folded(r).splitlines() == sorted(EXPECTED_BYTES.splitlines() + ["pytest (in-process);PyObject_Call;kvext_parse 48"])
