"""Frames of the pytest process itself, without root: the resolver names its
own frames from the first test (its mapped files become symbolizer candidates
when a frame is unknown), and a word the BPF program found on the stack is a
frame only when a call instruction ends right before it (capstone), checked
on the leakext fixture's real bytes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pytest_memleak_ebpf import resolve
from pytest_memleak_ebpf.elf import load_segments, read_build_id
from pytest_memleak_ebpf.symbolize import Frame, Symbolizer



@pytest.fixture(scope="module")
def leakext_so(leakext_moddir) -> Path:
    (so,) = leakext_moddir.glob("leakext*.so")
    return so


def _symbols(path: Path) -> dict[str, int]:
    """name -> file offset of each symbol (nm's value through PT_LOAD)."""
    out = {}
    loads = load_segments(str(path))
    for line in subprocess.run(["nm", str(path)], check=True, capture_output=True, text=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            v = int(parts[0], 16)
            for off, size, vaddr, _ in loads:
                if vaddr <= v < vaddr + size:
                    out[parts[2]] = v - vaddr + off
    return out


# -- the call check ------------------------------------------------------------

@pytest.mark.parametrize("code, call", [
    (bytes.fromhex("e8 10 00 00 00"), "call 0x15"),                 # call rel32 (5 bytes), at address 0
    (bytes.fromhex("90 ff d0"), "call rax"),                         # call *%rax (2)
    (bytes.fromhex("41 ff d4"), "call r12"),                         # call *%r12 (3)
    (bytes.fromhex("ff 50 08"), "call qword ptr [rax + 8]"),         # (3)
    (bytes.fromhex("ff 15 00 10 00 00"), "call qword ptr [rip + 0x1000]"),   # (6)
    (bytes.fromhex("ff 14 c5 00 10 00 00"), "call qword ptr [rax*8 + 0x1000]"),  # SIB + disp32 (7)
    (bytes.fromhex("41 ff 94 24 00 10 00 00"), "call qword ptr [r12 + 0x1000]"),  # REX + SIB + disp32 (8)
])
def test_a_call_of_each_length_ending_there_is_found(code, call):
    end = 0x1000 + len(code)
    for before in (b"", b"\xcc" * 9, b"\x90" * 9):
        got = resolve.call_before(before + code, end)
        # the call found may be a shorter one inside this one (41 ff d4 ends in ff d4, call rsp):
        # either way a call ends right there
        assert got is not None and got.split()[0] == "call", (before, got)
    assert call.startswith("call")


@pytest.mark.parametrize("code", [
    bytes.fromhex("c3 cc cc cc cc cc cc cc cc"),     # a function start after ret + int3 padding
    bytes.fromhex("55 48 89 e5 48 89 f3"),           # push rbp; mov rbp,rsp; mov rbx,rsi
    bytes.fromhex("e8 00 00 00 00 90"),              # a call, then one more instruction
    bytes.fromhex("0f 1f 44 00 00"),                 # a 5-byte nop
    b"",
])
def test_no_call_ends_there(code):
    assert resolve.call_before(code, 0x2000) is None


def test_the_fixture_words_checked_on_its_bytes(leakext_so):
    sym = _symbols(leakext_so)
    helper, mid = sym["leakext_strdup_planted"], sym["leakext_planted_mid"]
    assert mid == helper + 4                                      # push rbx; mov rbx,rsi
    assert resolve.is_return_address(str(leakext_so), mid + 5)    # after `call strdup`: the real one
    assert not resolve.is_return_address(str(leakext_so), mid)    # inside code, after a mov
    assert not resolve.is_return_address(str(leakext_so), sym["leakext_leak"])      # a function pointer
    assert not resolve.is_return_address(str(leakext_so), sym["PyInit_leakext"])
    assert resolve.is_return_address(str(leakext_so) + ".gone", mid)   # unreadable: cannot tell, kept


class Sym:
    """A symbolizer that knows the files registered with it (by build id)."""

    def __init__(self):
        self.inner = Symbolizer(search_ld_cache=False, debug_dirs=())
        self.candidates = []
        self.calls = 0

    def add_candidate(self, path):
        self.candidates.append(path)
        self.inner.add_candidate(path)

    def resolve(self, bid, off):
        self.calls += 1
        return self.inner.resolve(bid, off)

    def resolve_raw_ip(self, ip):
        return Frame(None, None, None, address=ip)


def test_extension_words_through_maps_checked_once(leakext_so, tmp_path, monkeypatch):
    sym = _symbols(leakext_so)
    mid = sym["leakext_planted_mid"]
    maps = tmp_path / "maps"
    maps.write_text(f"7f0000000000-7f0000010000 r-xp 00000000 08:01 1 {leakext_so}\n")
    r = resolve.Resolver(Sym(), maps_path=str(maps))
    base = 0x7F0000000000
    real = r.extension_frame(base + mid + 5)
    assert real["function"] == "leakext_strdup_planted" and real["offset"] == 9 and real["address"] == mid + 5
    assert r.extension_frame(base + mid) is None
    assert r.extension_frame(base + sym["leakext_leak"]) is None
    checked = []
    monkeypatch.setattr(resolve, "is_return_address", lambda *a: checked.append(a) or True)
    assert r.extension_frame(base + mid) is None and checked == []     # cached per address
    assert r.extension_frames([base + mid + 5, base + mid]) == {base + mid + 5: real, base + mid: None}


def test_own_frames_named_from_the_first_stack(leakext_so, tmp_path):
    """The first in-process stack of a session: neither the extension nor
    libpython was registered by any traced process, yet they are named."""
    sym = _symbols(leakext_so)
    bid = read_build_id(str(leakext_so)).hex()
    maps = tmp_path / "maps"
    maps.write_text(f"7f0000000000-7f0000010000 r-xp 00000000 08:01 1 {leakext_so}\n"
                    f"7f0000100000-7f0000110000 r-xp 00000000 08:01 1 /nonexistent/libgone.so\n")
    s = Sym()
    r = resolve.Resolver(s, maps_path=str(maps))
    raw = [(1, bid, sym["leakext_planted_mid"] + 5), (1, "ee" * 20, 0x40)]
    frames = r.own_stack(raw)
    assert frames[0]["function"] == "leakext_strdup_planted" and frames[0]["module"] == str(leakext_so)
    assert frames[1]["module"] is None and frames[1]["address"] == 0x40      # truly unknown stays unknown
    assert s.candidates == [str(leakext_so), "/nonexistent/libgone.so"]
    assert s.calls == 4            # both frames, then both again after registering
    r.own_stack(raw)
    assert s.calls == 5            # maps registered once until they change: the unknown frame only
    assert len(s.candidates) == 2
    r.forget_maps()
    r.own_stack(raw)
    assert s.calls == 7 and len(s.candidates) == 4     # registered again after a change


def test_symbolizer_finds_a_build_id_drained_for_another(leakext_so, tmp_path):
    """Resolving one unknown build id drains every pending candidate: a second
    build id that was missing before must be found among them too."""
    other = tmp_path / "other.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-g", "-Wl,--build-id", "-o", str(other), "-x", "c", "-"],
                   input="int other_fn(int x) { return x + 1; }\n", text=True, check=True)
    s = Symbolizer(search_ld_cache=False, debug_dirs=())
    b1, b2 = read_build_id(str(leakext_so)), read_build_id(str(other))
    assert s.resolve(b1, 0x10).module is None and s.resolve(b2, 0x10).module is None
    s.add_candidate(str(leakext_so))
    s.add_candidate(str(other))
    assert s.resolve(b1, 0x10).module == str(leakext_so)     # drains both
    assert s.resolve(b2, 0x10).module == str(other)
