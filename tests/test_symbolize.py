"""Tests for pytest_memleak_ebpf.symbolize.

Everything is checked against independent oracles from binutils: build ids
from ``readelf -n``, function addresses/sizes from ``nm -S``, program headers
from ``readelf -l`` (to turn addresses into the file offsets the kernel
reports), source lines from ``addr2line``, call sites from disassembly.  The
test programs are compiled into temporary directories and never run: the
symbolizer works from files on disk only, as after the traced process exited.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_memleak_ebpf import symbolize
from pytest_memleak_ebpf.report import format_frame
from pytest_memleak_ebpf.symbolize import Frame, Symbolizer, ld_cache_paths, read_build_id

DATA = Path(__file__).parent / "data" / "symbolize"
TOOLS = ("gcc", "readelf", "nm", "addr2line", "objcopy", "strip")
needs_tools = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS),
    reason="needs gcc and binutils (" + ", ".join(TOOLS) + ")",
)


# --------------------------------------------------------------------------
# binutils oracles
# --------------------------------------------------------------------------


def run(*cmd: str, cwd: Path | None = None) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _cached(fn):
    """Memoize a per-file oracle on (path, mtime, size): frame_for() asks for
    the same file's build id and program headers for every address."""
    cache: dict = {}

    def wrapper(path, *args):
        st = os.stat(path)
        key = (str(path), st.st_mtime_ns, st.st_size, args)
        if key not in cache:
            cache[key] = fn(path, *args)
        return cache[key]

    return wrapper


@_cached
def readelf_build_id(path: Path | str) -> bytes:
    m = re.search(r"Build ID:\s*([0-9a-fA-F]+)", run("readelf", "-n", str(path)))
    assert m, f"no build id in {path}"
    return bytes.fromhex(m.group(1))


@_cached
def readelf_loads(path: Path | str) -> list[tuple[int, int, int]]:
    """(p_offset, p_vaddr, p_filesz) of the PT_LOAD segments."""
    out = []
    for line in run("readelf", "-lW", str(path)).splitlines():
        parts = line.split()
        if parts and parts[0] == "LOAD":
            out.append((int(parts[1], 16), int(parts[2], 16), int(parts[4], 16)))
    assert out, f"no PT_LOAD in {path}"
    return out


def vaddr_to_offset(path: Path | str, vaddr: int) -> int:
    for off, va, fsz in readelf_loads(path):
        if va <= vaddr < va + fsz:
            return vaddr - va + off
    raise AssertionError(f"0x{vaddr:x} not in a PT_LOAD of {path}")


def nm_functions(path: Path | str, dynamic: bool = False) -> dict[str, tuple[int, int]]:
    """name -> (vaddr, size) of the text symbols ``nm`` reports."""
    args = ["nm", "-S", "--defined-only"] + (["-D"] if dynamic else []) + [str(path)]
    out = {}
    for line in run(*args).splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "TtWwi":
            out[parts[3].split("@")[0]] = (int(parts[0], 16), int(parts[1], 16))
    return out


def addr2line(path: Path | str, vaddrs: list[int]) -> list[tuple[str, int] | None]:
    """file:line of each address per ``addr2line``.  binutils 2.40 cannot read
    64-bit DWARF 5 ("DWARF error: offset ... greater than .debug_line_str
    size"); then ``llvm-symbolizer`` is the oracle, or the test is skipped."""
    res_ = subprocess.run(["addr2line", "-e", str(path), *[hex(a) for a in vaddrs]],
                          capture_output=True, text=True)
    assert res_.returncode == 0, res_.stderr
    out = res_.stdout.splitlines()
    if "DWARF error" in res_.stderr:
        if shutil.which("llvm-symbolizer") is None:
            pytest.skip(f"addr2line cannot read the DWARF of {path}: {res_.stderr[:200]}")
        out = run("llvm-symbolizer", "--functions=none", "--no-inlines", "--output-style=GNU",
                  f"--obj={path}", *[hex(a) for a in vaddrs]).splitlines()
    assert len(out) == len(vaddrs)
    res: list[tuple[str, int] | None] = []
    for line in out:
        line = line.split(" (discriminator")[0]
        file, _, num = line.rpartition(":")
        if file == "??" or not num.isdigit() or num == "0":
            res.append(None)
        else:
            res.append((os.path.normpath(file), int(num)))
    return res


def marker_lines(src: Path) -> dict[str, int]:
    out = {}
    for no, text in enumerate(src.read_text().splitlines(), 1):
        m = re.search(r"LINE:(\w+)", text)
        if m:
            out[m.group(1)] = no
    return out


def call_return_addresses(path: Path | str, func: str) -> list[int]:
    """Return addresses of the call instructions inside ``func`` (capstone)."""
    import capstone

    start, size = nm_functions(path)[func]
    off = vaddr_to_offset(path, start)
    code = Path(path).read_bytes()[off:off + size]
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return [i.address + i.size for i in md.disasm(code, start) if i.mnemonic == "call"]


def same_file(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and os.path.normpath(a) == os.path.normpath(b)


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

CFLAGS = ["-g", "-O0", "-fno-omit-frame-pointer", "-Wl,--build-id"]


@dataclass
class Built:
    dir: Path
    prog: Path
    lib: Path
    prog_src: Path
    lib_src: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    if any(shutil.which(t) is None for t in TOOLS):
        pytest.skip("needs gcc and binutils")
    d = tmp_path_factory.mktemp("symbolize")
    lib_src, prog_src = DATA / "libkv.c", DATA / "prog.c"
    run("gcc", *CFLAGS, "-shared", "-fPIC", "-o", str(d / "libkvconf.so"), str(lib_src), cwd=d)
    run("gcc", *CFLAGS, "-o", str(d / "prog"), str(prog_src), "-L", str(d), "-lkvconf",
        f"-Wl,-rpath,{d}", cwd=d)
    return Built(d, d / "prog", d / "libkvconf.so", prog_src, lib_src)


def frame_for(sym: Symbolizer, path: Path, vaddr: int, *, ret: bool) -> Frame:
    return sym.resolve(readelf_build_id(path), vaddr_to_offset(path, vaddr),
                       is_return_address=ret)


def fresh(*candidates: Path, **kw) -> Symbolizer:
    kw.setdefault("debug_dirs", ())
    kw.setdefault("search_ld_cache", False)
    sym = Symbolizer(**kw)
    for c in candidates:
        sym.add_candidate(str(c))
    return sym


# --------------------------------------------------------------------------
# build ids
# --------------------------------------------------------------------------


@needs_tools
def test_read_build_id_matches_readelf(built):
    for p in (built.prog, built.lib):
        assert read_build_id(str(p)) == readelf_build_id(p)


def test_read_build_id_of_non_elf_and_missing(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x7fELF" + b"\xff" * 60)
    text = tmp_path / "text"
    text.write_text("hello\n")
    assert read_build_id(str(junk)) is None
    assert read_build_id(str(text)) is None
    assert read_build_id(str(tmp_path / "missing")) is None


@needs_tools
def test_build_id_cache_notices_a_rebuilt_file(built, tmp_path):
    p = tmp_path / "lib.so"
    shutil.copy(built.lib, p)
    assert read_build_id(str(p)) == readelf_build_id(built.lib)
    run("gcc", *CFLAGS[:-1], "-Wl,--build-id=0x0123456789abcdef", "-shared", "-fPIC",
        "-o", str(p), str(built.lib_src))
    assert read_build_id(str(p)) == bytes.fromhex("0123456789abcdef")


# --------------------------------------------------------------------------
# functions, offsets, modules, lines
# --------------------------------------------------------------------------


@needs_tools
def test_executable_function_offset_module_and_line(built):
    sym = fresh(built.prog)
    start, size = nm_functions(built.prog)["make_entry"]
    for delta in (0, 4, size // 2, size - 1):
        vaddr = start + delta
        fr = frame_for(sym, built.prog, vaddr, ret=False)
        assert fr.function == "make_entry"
        assert fr.offset == delta
        assert fr.module == str(built.prog)
        assert fr.build_id == readelf_build_id(built.prog).hex()
        assert fr.address == vaddr_to_offset(built.prog, vaddr)
        expected = addr2line(built.prog, [vaddr])[0]
        assert expected is not None
        assert same_file(fr.file, expected[0]) and fr.line == expected[1]
    text = format_frame(frame_for(sym, built.prog, start + 4, ret=False), "symbol")
    assert text.startswith(f"make_entry+0x4 ({built.prog}) at ")
    assert text.endswith(f"prog.c:{addr2line(built.prog, [start + 4])[0][1]}")


@needs_tools
def test_return_addresses_resolve_to_call_sites(built):
    sym = fresh(built.prog)
    marks = marker_lines(built.prog_src)
    main_start, _ = nm_functions(built.prog)["main"]
    rets = call_return_addresses(built.prog, "main")
    assert len(rets) >= 3
    oracle = addr2line(built.prog, [r - 1 for r in rets])
    seen = set()
    for ret, exp in zip(rets, oracle):
        fr = frame_for(sym, built.prog, ret, ret=True)
        assert fr.function == "main"
        assert fr.offset == ret - main_start  # the address itself, not address-1
        assert exp is not None and same_file(fr.file, exp[0]) and fr.line == exp[1]
        seen.add(fr.line)
    # the oracle agrees with the source: the tagged call lines are call sites
    assert {marks["main_call"], marks["main_fatal"]} <= seen


@needs_tools
def test_return_address_after_noreturn_call_at_end_of_function(built):
    funcs = nm_functions(built.prog)
    f_start, f_size = funcs["fatal_error"]
    nxt, _ = funcs["after_fatal"]
    rets = call_return_addresses(built.prog, "fatal_error")
    if f_start + f_size != nxt or rets[-1] != nxt:
        pytest.skip("compiler did not place the noreturn call at the very end")
    sym = fresh(built.prog)
    as_ret = frame_for(sym, built.prog, nxt, ret=True)
    assert as_ret.function == "fatal_error"
    assert as_ret.offset == f_size
    assert as_ret.line == marker_lines(built.prog_src)["fatal_abort"]
    assert as_ret.line == addr2line(built.prog, [nxt - 1])[0][1]
    as_ip = frame_for(sym, built.prog, nxt, ret=False)
    assert (as_ip.function, as_ip.offset) == ("after_fatal", 0)
    assert as_ip.line == addr2line(built.prog, [nxt])[0][1]


@needs_tools
def test_shared_library_functions_static_and_exported(built):
    sym = fresh(built.prog, built.lib)
    marks = marker_lines(built.lib_src)
    funcs = nm_functions(built.lib)
    for name in ("kv_dup", "kv_index_build", "kv_exported_helper"):
        start, size = funcs[name]
        for ret in call_return_addresses(built.lib, name) or [start + size // 2]:
            fr = frame_for(sym, built.lib, ret, ret=True)
            assert fr.function == name
            assert fr.offset == ret - start
            assert fr.module == str(built.lib)
            exp = addr2line(built.lib, [ret - 1])[0]
            assert same_file(fr.file, exp[0]) and fr.line == exp[1]
    # the call of malloc in kv_dup is on its tagged line
    rets = call_return_addresses(built.lib, "kv_dup")
    lines = {frame_for(sym, built.lib, r, ret=True).line for r in rets}
    assert marks["kv_dup_malloc"] in lines


@needs_tools
def test_global_alias_preferred_over_local(built):
    out = run("nm", "--defined-only", str(built.lib)).split("\n")
    by_name = {ln.split()[2]: (ln.split()[0], ln.split()[1]) for ln in out if len(ln.split()) == 3}
    assert by_name["kv_impl"][0] == by_name["__kv_alias_public"][0]
    assert by_name["kv_impl"][1] == "t" and by_name["__kv_alias_public"][1] == "T"
    fr = frame_for(fresh(built.lib), built.lib, int(by_name["kv_impl"][0], 16) + 1, ret=False)
    assert (fr.function, fr.offset) == ("__kv_alias_public", 1)


@needs_tools
def test_every_instruction_byte_matches_addr2line(built):
    """Line table decoding against addr2line for every byte of every function
    of both test binaries (not only statement starts)."""
    sym = fresh(built.prog, built.lib)
    for path in (built.prog, built.lib):
        funcs = {n: v for n, v in nm_functions(path).items()
                 if n in ("fatal_error", "after_fatal", "make_entry", "main",
                          "kv_dup", "kv_index_build", "kv_exported_helper")}
        assert len(funcs) >= 3
        vaddrs = [s + k for s, size in funcs.values() for k in range(size)]
        bad = addr2line_mismatches(sym, path, vaddrs)
        assert not bad, bad[:10]


def addr2line_mismatches(sym, path, vaddrs):
    """(address, ours, addr2line's) for every address where our file:line
    differs from addr2line's."""
    bad = []
    for vaddr, exp in zip(vaddrs, addr2line(path, vaddrs)):
        fr = frame_for(sym, path, vaddr, ret=False)
        got = (os.path.normpath(fr.file), fr.line) if fr.line else None
        if got != exp:
            bad.append((hex(vaddr), got, exp))
    return bad


DWARF_VARIANTS = {
    "dwarf4": ["-gdwarf-4"],
    "dwarf5": ["-gdwarf-5"],
    "dwarf4-64bit": ["-gdwarf-4", "-gdwarf64"],
    "dwarf5-64bit": ["-gdwarf-5", "-gdwarf64"],
}


@needs_tools
@pytest.mark.parametrize("aranges", [True, False], ids=["aranges", "no-aranges"])
@pytest.mark.parametrize("variant", sorted(DWARF_VARIANTS))
def test_dwarf_variants_match_addr2line(variant, aranges, tmp_path):
    """DWARF 4 and 5, 32- and 64-bit DWARF, with and without .debug_aranges
    (without it, CUs are found through their top DIE's DW_AT_ranges, which
    the section-placed kv_cold_path forces)."""
    lib = tmp_path / "libkv.so"
    flags = ["-g", *DWARF_VARIANTS[variant], "-O0", "-fno-omit-frame-pointer"]
    res = subprocess.run(["gcc", *flags, "-shared", "-fPIC", "-o", str(lib),
                          str(DATA / "libkv.c")], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"gcc does not support {flags}: {res.stderr.strip()[:200]}")
    if not aranges:
        run("objcopy", "--remove-section=.debug_aranges", str(lib))
    sections = run("readelf", "-SW", str(lib))
    assert (".debug_aranges" in sections) == aranges
    assert "DW_AT_ranges" in run("readelf", "--debug-dump=info", str(lib))

    sym = fresh(lib)
    funcs = nm_functions(lib)
    vaddrs = [s + k for n, (s, size) in funcs.items() if n.startswith(("kv_", "__kv"))
              for k in range(size)]
    assert len(vaddrs) > 50
    bad = addr2line_mismatches(sym, lib, vaddrs)
    assert not bad, bad[:10]
    cold = marker_lines(DATA / "libkv.c")["kv_cold_body"]
    start, size = funcs["kv_cold_path"]
    assert cold in {frame_for(sym, lib, start + k, ret=False).line for k in range(size)}
    # all of it was done by the fast reader, not the pyelftools fallback
    dl = symbolize._DwarfLines(str(lib))
    assert all(dl.lookup(v) is not None for v in vaddrs[::7] if v)
    assert dl.fallbacks == 0
    # with .debug_aranges, no CU top DIE had to be read to find the CUs
    assert (dl._cu_index is None) == aranges


@needs_tools
def test_candidates_are_read_lazily(built, monkeypatch):
    calls = []
    real = symbolize.read_build_id

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(symbolize, "read_build_id", counting)
    sym = fresh()
    sym.add_candidate(str(built.prog))
    sym.add_candidate(str(built.lib))
    sym.add_candidate(str(built.dir / "does-not-exist.so"))
    assert calls == []
    start, _ = nm_functions(built.lib)["kv_index_build"]
    fr = frame_for(sym, built.lib, start, ret=False)
    assert fr.function == "kv_index_build"
    n = len(calls)
    assert n >= 2
    # a second frame of a known build id reads nothing more
    fr = frame_for(sym, built.lib, start + 1, ret=False)
    assert fr.function == "kv_index_build" and len(calls) == n


@needs_tools
def test_candidate_registered_after_a_miss(built):
    sym = fresh()
    bid = readelf_build_id(built.lib)
    start, _ = nm_functions(built.lib)["kv_index_build"]
    off = vaddr_to_offset(built.lib, start + 1)
    assert sym.resolve(bid, off).module is None
    sym.add_candidate(str(built.lib))
    fr = sym.resolve(bid, off)
    assert (fr.function, fr.module) == ("kv_index_build", str(built.lib))


@needs_tools
def test_short_build_id_padded_by_the_kernel(built, tmp_path):
    lib = tmp_path / "libshort.so"
    run("gcc", *CFLAGS[:-1], "-Wl,--build-id=0xdeadbeefcafe0001", "-shared", "-fPIC",
        "-o", str(lib), str(built.lib_src))
    bid = readelf_build_id(lib)
    assert len(bid) == 8
    start, _ = nm_functions(lib)["kv_exported_helper"]
    off = vaddr_to_offset(lib, start + 3)
    sym = fresh(lib)
    # BPF_F_USER_BUILD_ID always reports 20 bytes, zero padded
    fr = sym.resolve(bid + b"\0" * 12, off, is_return_address=False)
    assert (fr.function, fr.offset, fr.module) == ("kv_exported_helper", 3, str(lib))
    assert sym.resolve(bid.hex(), off, is_return_address=False).function == "kv_exported_helper"


# --------------------------------------------------------------------------
# stripped modules and separate debug files
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split(built, tmp_path_factory):
    """libkvconf.so stripped to .dynsym, its DWARF+symtab in a separate file."""
    d = tmp_path_factory.mktemp("split")
    lib = d / "libkvconf.so"
    shutil.copy(built.lib, lib)
    dbg = d / "libkvconf.so.debug"
    run("objcopy", "--only-keep-debug", str(lib), str(dbg))
    run("strip", "--strip-all", str(lib))
    return lib, dbg


@needs_tools
def test_stripped_module_uses_dynsym(split, built):
    lib, _dbg = split
    sym = fresh(lib)
    funcs = nm_functions(built.lib)
    start, size = funcs["kv_exported_helper"]
    fr = frame_for(sym, lib, start + 2, ret=False)
    assert (fr.function, fr.offset, fr.module) == ("kv_exported_helper", 2, str(lib))
    assert fr.file is None and fr.line is None
    # a static function is not in .dynsym: no name, but never a wrong one
    s_start, _ = funcs["kv_dup"]
    fr = frame_for(sym, lib, s_start + 2, ret=False)
    assert fr.function is None and fr.module == str(lib)
    assert format_frame(fr, "symbol") == f"[unknown] ({lib}+0x{vaddr_to_offset(lib, s_start + 2):x})"


@needs_tools
def test_build_id_debug_dir(split, built, tmp_path):
    lib, dbg = split
    bid = readelf_build_id(lib).hex()
    ddir = tmp_path / "debug"
    (ddir / ".build-id" / bid[:2]).mkdir(parents=True)
    shutil.copy(dbg, ddir / ".build-id" / bid[:2] / (bid[2:] + ".debug"))
    sym = fresh(lib, debug_dirs=(str(ddir),))
    start, _ = nm_functions(built.lib)["kv_dup"]
    for ret in call_return_addresses(built.lib, "kv_dup"):
        fr = frame_for(sym, lib, ret, ret=True)
        assert fr.function == "kv_dup"  # static: from the debug file's .symtab
        assert fr.offset == ret - start
        assert fr.module == str(lib)  # the real module, not the .debug file
        exp = addr2line(built.lib, [ret - 1])[0]
        assert same_file(fr.file, exp[0]) and fr.line == exp[1]


@needs_tools
def test_gnu_debuglink(split, built, tmp_path):
    _, dbg = split
    lib = tmp_path / "libkvconf.so"
    shutil.copy(built.lib, lib)
    run("strip", "--strip-all", str(lib))
    shutil.copy(dbg, tmp_path / "libkvconf.so.debug")
    run("objcopy", f"--add-gnu-debuglink={tmp_path / 'libkvconf.so.debug'}", str(lib))
    # the debuglink changes no loaded bytes: the build id and offsets are kept
    assert readelf_build_id(lib) == readelf_build_id(built.lib)
    sym = fresh(lib)
    start, _ = nm_functions(built.lib)["kv_index_build"]
    fr = frame_for(sym, lib, start + 8, ret=False)
    assert (fr.function, fr.offset, fr.module) == ("kv_index_build", 8, str(lib))
    exp = addr2line(built.lib, [start + 8])[0]
    assert same_file(fr.file, exp[0]) and fr.line == exp[1]


@needs_tools
def test_only_the_debug_file_is_known(split, built, tmp_path):
    """The module itself is not found (no candidate, not in the loader cache)
    but its build-id debug file exists: symbols and lines still resolve."""
    lib, dbg = split
    bid = readelf_build_id(lib).hex()
    ddir = tmp_path / "debug"
    (ddir / ".build-id" / bid[:2]).mkdir(parents=True)
    shutil.copy(dbg, ddir / ".build-id" / bid[:2] / (bid[2:] + ".debug"))
    sym = fresh(debug_dirs=(str(ddir),))
    start, _ = nm_functions(built.lib)["kv_index_build"]
    fr = frame_for(sym, built.lib, start + 5, ret=False)
    assert (fr.function, fr.offset, fr.module) == ("kv_index_build", 5, None)
    assert fr.line == addr2line(built.lib, [start + 5])[0][1]
    assert format_frame(fr, "symbol").startswith(f"kv_index_build+0x5 (build-id {bid})")


# --------------------------------------------------------------------------
# C++
# --------------------------------------------------------------------------


@needs_tools
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cxx_names_are_demangled(tmp_path):
    lib = tmp_path / "libcxx.so"
    run("g++", *CFLAGS, "-shared", "-fPIC", "-o", str(lib), str(DATA / "cxxlib.cpp"))
    funcs = nm_functions(lib)
    mangled = next(n for n in funcs if n.startswith("_Z") and "insert" in n)
    start, size = funcs[mangled]
    bid, off = readelf_build_id(lib), vaddr_to_offset(lib, start + 4)
    line = addr2line(lib, [start + 4])[0][1]
    if shutil.which("c++filt"):
        sym = fresh(lib)
        fr = sym.resolve(bid, off, is_return_address=False)
        assert fr.function == "kv::Table::insert(int)"
        assert fr.offset == 4
        assert fr.line == line
        body = marker_lines(DATA / "cxxlib.cpp")["cxx_insert_body"]
        assert body in {sym.resolve(bid, off - 4 + k, is_return_address=False).line
                        for k in range(size)}
        many = fresh(lib).resolve_many([(bid, off, False), (bid, off, True)])
        assert [f.function for f in many] == ["kv::Table::insert(int)"] * 2
    raw = fresh(lib, demangle=False).resolve(bid, off, is_return_address=False)
    assert raw.function == mangled and raw.line == line


# --------------------------------------------------------------------------
# libc through the loader cache (+ libc6-dbg when installed)
# --------------------------------------------------------------------------


def _libc_path() -> str:
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if re.search(r"/libc(\.so\.6|-[\d.]+\.so)$", path):
                return path
    pytest.skip("libc not found in /proc/self/maps")


def _dynsym(path: str, name: str) -> tuple[int, int]:
    for line in run("readelf", "-W", "--dyn-syms", path).splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[3] in ("FUNC", "IFUNC") and parts[7].split("@")[0] == name \
                and parts[6] != "UND":
            return int(parts[1], 16), int(parts[2], 0)
    raise AssertionError(f"{name} not in .dynsym of {path}")


@needs_tools
def test_libc_malloc_via_loader_cache():
    libc = _libc_path()
    bid = readelf_build_id(libc)
    start, size = _dynsym(libc, "malloc")
    sym = Symbolizer()  # no candidates at all: the loader cache must find libc
    entry = sym.resolve(bid, vaddr_to_offset(libc, start), is_return_address=False)
    assert entry.function == "malloc" and entry.offset == 0
    assert entry.module is not None
    assert os.path.realpath(entry.module) == os.path.realpath(libc)
    inside = sym.resolve(bid, vaddr_to_offset(libc, start + 0x10))
    assert (inside.function, inside.offset) == ("malloc", 0x10)
    # the return-address rule must not spill into the previous function:
    # ip == malloc+0 as a *return* address belongs to whatever precedes it
    before = sym.resolve(bid, vaddr_to_offset(libc, start), is_return_address=True)
    assert before.function != "malloc" or before.offset != 0

    h = bid.hex()
    debug = Path("/usr/lib/debug/.build-id") / h[:2] / (h[2:] + ".debug")
    if debug.exists():
        exp = addr2line(debug, [start + 0x10])[0]
        assert exp is not None
        assert same_file(inside.file, exp[0]) and inside.line == exp[1]
        assert inside.file.endswith("malloc.c")
        # a static libc function exists only in the debug file's .symtab
        s_start, _ = nm_functions(debug)["_int_malloc"]
        assert "_int_malloc" not in nm_functions(libc, dynamic=True)
        fr = sym.resolve(bid, vaddr_to_offset(libc, s_start + 7))
        assert (fr.function, fr.offset) == ("_int_malloc", 7)
        assert os.path.realpath(fr.module) == os.path.realpath(libc)
        exp = addr2line(debug, [s_start + 6])[0]
        assert fr.line == exp[1]


@needs_tools
def test_libc_debug_file_without_the_module():
    libc = _libc_path()
    bid = readelf_build_id(libc)
    h = bid.hex()
    if not (Path("/usr/lib/debug/.build-id") / h[:2] / (h[2:] + ".debug")).exists():
        pytest.skip("libc6-dbg not installed")
    start, _ = _dynsym(libc, "malloc")
    sym = Symbolizer(search_ld_cache=False)
    fr = sym.resolve(bid, vaddr_to_offset(libc, start + 0x10))
    assert (fr.function, fr.offset, fr.module) == ("malloc", 0x10, None)
    assert fr.file and fr.file.endswith("malloc.c")


def test_ld_cache_paths_match_ldconfig():
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    if not os.path.exists(ldconfig):
        pytest.skip("no ldconfig")
    ours = {os.path.realpath(p) for p in ld_cache_paths()}
    theirs = set()
    for line in run(ldconfig, "-p").splitlines():
        if " => " in line:
            p = line.rsplit(" => ", 1)[1].strip()
            if os.path.exists(p):
                theirs.add(os.path.realpath(p))
    assert ours == theirs


# --------------------------------------------------------------------------
# DWARF decoding: fast reader vs pyelftools
# --------------------------------------------------------------------------


@needs_tools
def test_raw_line_reader_agrees_with_pyelftools(built):
    paths = [built.prog, built.lib]
    libc = _libc_path()
    h = readelf_build_id(libc).hex()
    debug = Path("/usr/lib/debug/.build-id") / h[:2] / (h[2:] + ".debug")
    if debug.exists():
        paths.append(debug)
    for path in paths:
        dl = symbolize._DwarfLines(str(path))
        cus = list(dl._raw.iter_cus())[:25]
        assert cus
        compared = 0
        for cu in cus:
            ours = dl._raw.line_table(cu)
            ref = dl._pyelftools_table(cu.offset)
            if ours is None or ref is None:
                assert ours is None and ref is None
                continue
            compared += 1
            assert ours.seqs.starts == ref.seqs.starts
            assert ours.seqs.ends == ref.seqs.ends
            assert [s[:2] for s in ours.seqs.seqs] == [s[:2] for s in ref.seqs.seqs]
            used = {i >> 32 for s in ours.seqs.seqs for i in s[1]}
            assert [ours.file_name(i) for i in sorted(used)] == \
                [ref.file_name(i) for i in sorted(used)]
        assert compared


# --------------------------------------------------------------------------
# unknowns and damaged files
# --------------------------------------------------------------------------


def test_unknown_build_id():
    sym = Symbolizer(debug_dirs=())
    fr = sym.resolve(b"\x42" * 20, 0x1234)
    assert fr == Frame(function=None, offset=None, module=None, build_id="42" * 20,
                       address=0x1234)
    assert "[unknown]" in format_frame(fr, "symbol") and "0x1234" in format_frame(fr, "symbol")


def test_raw_ip():
    fr = Symbolizer().resolve_raw_ip(0x7F1234567890)
    assert (fr.function, fr.module, fr.build_id, fr.address) == (None, None, None, 0x7F1234567890)
    assert format_frame(fr, "symbol") == "0x7f1234567890 [unknown]"


def test_garbage_inputs_never_raise(tmp_path):
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"\x7fELF\x02\x01\x01" + os.urandom(4000))
    sym = Symbolizer(debug_dirs=(str(tmp_path),))
    sym.add_candidate(str(bad))
    sym.add_candidate(str(tmp_path / "missing"))
    sym.add_candidate(str(tmp_path))  # a directory
    for bid in (b"", b"\x00" * 20, b"\x01" * 3, "zz", "ab" * 20):
        for off in (0, 1, -5, 1 << 70):
            fr = sym.resolve(bid, off)
            assert fr.function is None
    assert format_frame(sym.resolve(b"\x01" * 20, 10), "symbol")


@needs_tools
def test_truncated_module_degrades(built, tmp_path):
    """The build id note and program headers survive but the section headers
    and symbol tables are cut off: module known, function unknown."""
    full = built.lib.read_bytes()
    lib = tmp_path / "libkvconf.so"
    lib.write_bytes(full[:8192])
    bid = readelf_build_id(built.lib)
    assert read_build_id(str(lib)) == bid
    sym = fresh(lib)
    start, _ = nm_functions(built.lib)["kv_index_build"]
    fr = sym.resolve(bid, vaddr_to_offset(built.lib, start))
    assert fr.module == str(lib) and fr.function is None and fr.line is None


@needs_tools
def test_corrupt_dwarf_keeps_function_names(built, tmp_path):
    lib = tmp_path / "libkvconf.so"
    shutil.copy(built.lib, lib)
    # overwrite .debug_line with garbage of the same size
    out = run("readelf", "-SW", str(lib))
    m = re.search(r"\.debug_line\s+\S+\s+[0-9a-f]+\s+([0-9a-f]+)\s+([0-9a-f]+)", out)
    assert m
    off, size = int(m.group(1), 16), int(m.group(2), 16)
    data = bytearray(lib.read_bytes())
    data[off:off + size] = b"\xff" * size
    lib.write_bytes(bytes(data))
    sym = fresh(lib)
    start, _ = nm_functions(built.lib)["kv_index_build"]
    fr = frame_for(sym, lib, start + 4, ret=False)
    assert (fr.function, fr.offset, fr.module) == ("kv_index_build", 4, str(lib))
    assert fr.line is None


@needs_tools
def test_offset_outside_any_segment(built):
    sym = fresh(built.prog)
    bid = readelf_build_id(built.prog)
    fr = sym.resolve(bid, 1 << 40)
    assert fr.module == str(built.prog) and fr.function is None


# --------------------------------------------------------------------------
# property: any offset inside a function of the test binaries resolves to it
# --------------------------------------------------------------------------


@needs_tools
def test_random_offsets_property(built):
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    sym = fresh(built.prog, built.lib)
    table = []
    for path in (built.prog, built.lib):
        bid = readelf_build_id(path)
        aliases: dict[int, set[str]] = {}
        funcs = nm_functions(path)
        for name, (start, size) in funcs.items():
            aliases.setdefault(start, set()).add(name)
        for name, (start, size) in funcs.items():
            if size:
                table.append((bid, aliases[start], vaddr_to_offset(path, start), size))

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.integers(0, len(table) - 1), st.integers(0, 10_000), st.booleans())
    def check(i, k, ret):
        bid, names, start_off, size = table[i]
        delta = k % size + (1 if ret else 0)  # return addresses may equal the end
        fr = sym.resolve(bid, start_off + delta, is_return_address=ret)
        assert fr.function in names
        assert fr.offset == delta

    check()
