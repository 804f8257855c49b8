"""The compiled-program cache: map fds patched in the instructions, entries
used only when safe, and a tracer loaded from the cache counts exactly what a
compiled one counts."""

import os
import struct
import subprocess

import pytest

from pytest_memleak_ebpf.tracer import loading

INSN = struct.Struct("<BBhi")


def insn(code, dst=0, src=0, off=0, imm=0):
    return INSN.pack(code, src << 4 | dst, off, imm)


def test_patch_replaces_map_fds_and_nothing_else():
    prog = (insn(0xb7, dst=0, imm=7)                          # mov r0, 7 (imm 7 is not a map)
            + insn(0x18, dst=1, src=1, imm=7) + insn(0)       # ld_imm64 r1, map fd 7
            + insn(0x18, dst=2, src=0, imm=7) + insn(0, imm=3)  # ld_imm64 r2, constant 7 | 3 << 32
            + insn(0x18, dst=3, src=1, imm=9) + insn(0)       # ld_imm64 r3, map fd 9
            + insn(0x95))                                     # exit
    out = loading._patch(prog, {7: 40, 9: 41})
    words = [INSN.unpack_from(out, i) for i in range(0, len(out), 8)]
    assert [w[3] for w in words] == [7, 40, 0, 7, 3, 41, 0, 0]
    assert [w[0] for w in words] == [INSN.unpack_from(prog, i)[0] for i in range(0, len(prog), 8)]


def test_patch_refuses_an_unknown_map_fd_or_reference():
    with pytest.raises(ValueError, match="unknown map fd 5"):
        loading._patch(insn(0x18, dst=1, src=1, imm=5) + insn(0), {7: 40})
    assert loading._patch(insn(0x18, dst=1, src=2, imm=7) + insn(0, imm=8), {7: 40})[4:8] == (40).to_bytes(4, "little")
    with pytest.raises(ValueError, match="kind 3"):   # a BTF id: not ours to patch
        loading._patch(insn(0x18, dst=1, src=3, imm=7) + insn(0), {7: 40})


def test_kfunc_placeholders_become_kernel_function_calls():
    ids = {"bpf_session_cookie": 65573, "bpf_session_is_return": 65575}
    by_name = {v: k for k, v in loading.KFUNCS.items()}
    prog = (insn(0x85, imm=by_name["bpf_session_cookie"])          # call placeholder
            + insn(0x85, imm=1)                                     # call bpf_map_lookup_elem: a helper
            + insn(0x18, dst=1, src=0, imm=by_name["bpf_session_is_return"]) + insn(0x85)  # a constant
            + insn(0x85, imm=by_name["bpf_session_is_return"])
            + insn(0x95))
    out = loading.link_kfuncs(prog, ids.__getitem__)
    words = [INSN.unpack_from(out, i) for i in range(0, len(out), 8)]
    # (code, regs, off, imm): src_reg 2 = BPF_PSEUDO_KFUNC_CALL, imm = BTF id
    assert words[0] == (0x85, 2 << 4, 0, 65573)
    assert words[1] == (0x85, 0, 0, 1)
    assert words[2:4] == [INSN.unpack_from(prog, 16), INSN.unpack_from(prog, 24)]   # ld_imm64 halves untouched
    assert words[4] == (0x85, 2 << 4, 0, 65575)
    assert words[5] == (0x95, 0, 0, 0)


@pytest.mark.ebpf
def test_kfunc_ids_come_from_this_kernels_btf(ebpf):
    out = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                         capture_output=True, text=True, check=True).stdout
    for name in loading.KFUNCS.values():
        line = next(l for l in out.splitlines() if f"FUNC '{name}'" in l)
        assert loading.kfunc_btf_id(name) == int(line.split("]")[0].lstrip("["))
    with pytest.raises(RuntimeError, match="no kernel function bpf_no_such_thing"):
        loading.kfunc_btf_id("bpf_no_such_thing")


def test_cache_dir_and_key(monkeypatch, tmp_path):
    monkeypatch.setenv(loading.CACHE_ENV, "off")
    assert loading.cache_dir() is None
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path))
    assert loading.cache_dir() == tmp_path
    k = loading.cache_key(b"src", ["-DA=1"], "0.26.0")
    assert k != loading.cache_key(b"src", ["-DA=2"], "0.26.0")
    assert k != loading.cache_key(b"src2", ["-DA=1"], "0.26.0")
    assert k != loading.cache_key(b"src", ["-DA=1"], "0.27.0")
    assert k == loading.cache_key(b"src", ["-DA=1"], "0.26.0")
    with_header = loading.cache_key(b"src", ["-DA=1"], "0.26.0", b"#define X 1\n")
    assert with_header != k   # the header the source includes is part of the key
    assert with_header != loading.cache_key(b"src", ["-DA=1"], "0.26.0", b"#define X 2\n")


def test_only_our_own_unshared_files_are_trusted(tmp_path):
    d = tmp_path / "c"
    d.mkdir(mode=0o700)
    assert loading._safe(d)
    os.chmod(d, 0o777)
    assert not loading._safe(d)
    os.chmod(d, 0o720)
    assert not loading._safe(d)
    assert not loading._safe(tmp_path / "missing")


LEAK7 = r"""
#include <stdlib.h>
int main(void) { for (int i = 0; i < 7; i++) { void *p = malloc(10); __asm__ volatile("" :: "r"(p)); } return 0; }
"""


def _figures(tracer, prog):
    tracer.add_root(os.getpid())
    tid = tracer.begin_test()
    subprocess.run([prog], check=True)
    raw = tracer.end_test(tid)
    (p,) = [p for p in raw.processes if p["comm"] == "leak7"]
    nbytes = sum(b for b, _h, _n in raw.blocks[p["serial"]])
    nblocks = sum(n for _b, _h, n in raw.blocks[p["serial"]])
    return nbytes, nblocks, p["alloc_blocks"] >= nblocks


@pytest.mark.ebpf
def test_cached_programs_count_exactly_like_compiled_ones(ebpf, cbuild, tmp_path, monkeypatch):
    from pytest_memleak_ebpf.tracer import Tracer

    prog = cbuild("leak7", LEAK7)
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    runs = []
    for _ in range(2):
        t = Tracer()
        try:
            runs.append((t.cached, _figures(t, prog)))
        finally:
            t.close()
    assert [c for c, _ in runs] == [False, True]
    assert runs[0][1] == runs[1][1] == (70, 7, True)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1


@pytest.mark.ebpf
def test_a_damaged_or_unsafe_cache_is_not_used(ebpf, cbuild, tmp_path, monkeypatch):
    from pytest_memleak_ebpf.tracer import Tracer

    prog = cbuild("leak7", LEAK7)
    cache = tmp_path / "cache"
    monkeypatch.setenv(loading.CACHE_ENV, str(cache))
    Tracer().close()                                   # compiles, saves
    (entry,) = cache.glob("*.json")
    entry.write_text(entry.read_text().replace('"functions": {', '"functions": {"x": "!!", ', 1)[:-50])
    t = Tracer()                                       # damaged: compiled again, and saved again
    try:
        assert not t.cached and _figures(t, prog) == (70, 7, True)
    finally:
        t.close()
    t = Tracer()
    t.close()
    assert t.cached
    os.chmod(cache, 0o777)                             # others may write it: never loaded
    t = Tracer()
    try:
        assert not t.cached and _figures(t, prog) == (70, 7, True)
    finally:
        t.close()


@pytest.mark.ebpf
def test_a_kernel_without_the_kfuncs_falls_back_to_uprobe_multi(ebpf, cbuild, monkeypatch):
    """The session program calls kernel functions; a kernel that lacks one
    refuses it, and the tracer attaches uprobe_multi links instead, exact."""
    from pytest_memleak_ebpf.tracer import Tracer

    prog = cbuild("leak7", LEAK7)
    cookie = next(k for k, v in loading.KFUNCS.items() if v == "bpf_session_cookie")
    monkeypatch.setitem(loading.KFUNCS, cookie, "bpf_no_such_kfunc")
    monkeypatch.delenv("PYTEST_MEMLEAK_EBPF_ATTACH", raising=False)
    t = Tracer()
    try:
        assert t.attach_mode == "multi"
        assert "no kernel function bpf_no_such_kfunc" in t.attach_errors["session"]
        assert _figures(t, prog) == (70, 7, True)
    finally:
        t.close()
