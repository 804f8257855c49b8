"""bpf/memleak.h is the one home of the C/Python contract: its parser, the
layouts it gives Python (checked against the C compiler's), and no id, flag,
counter index or hash constant written a second time in the package."""

import ctypes
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_memleak_ebpf.tracer import abi, loading, probes

PKG = Path(abi.__file__).resolve().parent.parent
PARAMS = {"STACK_DEPTH": 32, "EXE_LEN": 256}


def test_parse_reads_defines_and_structs():
    h = abi.parse("""
        /* a comment with #define NOT_ME 3 and struct no { u8 x; }; */
        #define A 7        // trailing comment
        #define B 0x7ffff001
        #define C 0xcbf29ce484222325ULL
        #define D 02000000
        #define N 4
        struct inner { u32 a; u32 b; };
        struct outer {
            u64 x;          /* x */
            u32 lo, hi;
            char name[N];
            unsigned char raw[3];
            struct inner in[DEPTH];
            s32 last;
        };
    """)
    assert h.defines == {"A": 7, "B": 0x7FFFF001, "C": 0xCBF29CE484222325, "D": 0o2000000, "N": 4}
    assert [f.name for f in h.structs["outer"]] == ["x", "lo", "hi", "name", "raw", "in", "last"]
    cls = h.struct("outer", DEPTH=2)
    assert ctypes.sizeof(cls) == 8 + 4 + 4 + 4 + 3 + 1 + 2 * 8 + 4 + 4   # padding as C lays it out
    assert cls.name.offset == 16 and cls.raw.offset == 20 and getattr(cls, "in").offset == 24
    assert cls.last.offset == 40
    v = cls()
    v.name = b"ab"
    assert v.name == b"ab"
    with pytest.raises(KeyError, match="array size DEPTH"):
        h.struct("outer")
    with pytest.raises(KeyError, match="no struct missing"):
        h.struct("missing")
    with pytest.raises(KeyError, match="defines no Z"):
        h.define("Z")


@pytest.mark.parametrize("text, message", [
    ("#define X (1 << 3)\n", r"#define X \(1 << 3\): not an integer"),
    ("struct s { float f; };", "struct s: unknown type 'float'"),
    ("struct s { struct later l; };", "struct s: struct later is not defined before it"),
    ("struct s { u32 a[2][3]; };", "struct s: cannot read field"),
])
def test_parse_refuses_what_it_cannot_read(text, message):
    with pytest.raises(ValueError, match=message):
        abi.parse(text)


def test_python_layouts_are_the_c_compilers(tmp_path):
    """Every struct of the header as ctypes lays it out: the same size and
    field offsets as gcc gives them with the kernel's bpf_stack_build_id."""
    structs = abi.HEADER.structs
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/types.h>", "#include <linux/bpf.h>",
             "typedef __u8 u8; typedef __u16 u16; typedef __u32 u32; typedef __u64 u64;",
             "typedef __s8 s8; typedef __s16 s16; typedef __s32 s32; typedef __s64 s64;",
             *(f"#define {k} {v}" for k, v in PARAMS.items()),
             f'#include "{abi.header_path()}"', "int main(void) {"]
    for name, fields in structs.items():
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
        for f in fields:
            lines.append(f'printf("{name}.{f.name} %zu\\n", offsetof(struct {name}, {f.name}));')
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(tmp_path / "layout"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True).stdout
    c_layout = dict(line.rsplit(" ", 1) for line in out.splitlines())
    py_layout = {}
    for name, fields in structs.items():
        cls = abi.HEADER.struct(name, **PARAMS)
        py_layout[name] = str(ctypes.sizeof(cls))
        for f in fields:
            py_layout[f"{name}.{f.name}"] = str(getattr(cls, f.name).offset)
    assert py_layout == c_layout
    assert {"track_t", "proc_t", "block_key_t", "block_t", "stack_t", "event_t", "rawkey_t", "rawval_t",
            "ring_ent_t", "handoff_key_t", "handoff_t", "ext_t", "ext_page_t"} <= structs.keys()


def test_the_bpf_source_includes_the_header_and_defines_none_of_it():
    src = loading.bpf_source_path().read_text()
    assert '#include "memleak.h"' in src
    code = re.sub(r"/\*.*?\*/|//[^\n]*", "", src, flags=re.S)
    for name in abi.HEADER.defines:
        assert not re.search(rf"#\s*define\s+{name}\b", code), f"{name} is defined again in the BPF source"
    for name in abi.HEADER.structs:
        assert not re.search(rf"\bstruct\s+{name}\s*\{{", code), f"struct {name} is defined again in the BPF source"
    for literal in ("0xcbf29ce484222325", "0x100000001b3", "0x7ffff00"):
        assert literal not in code.lower()


# Names of the header's constants, and literals of theirs that were written in Python before
_CONSTANT = re.compile(r"^\s*((?:TF|PF|EV|CTR|FN|KFUNC|BUILD_ID)_\w+|RING|FNV_\w+|SERIAL_CPU_BITS)\b[^=\n]*=(?!=)(.*)$",
                       re.M)


def test_every_constant_python_uses_comes_from_the_header():
    defined = {}
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        for m in _CONSTANT.finditer(text):
            defined.setdefault(path.name, []).append((m.group(1), m.group(2).strip()))
        low = text.lower()
        for literal in ("0xcbf29ce484222325", "0x100000001b3", "0x7ffff001", "0x7ffff002"):
            assert literal not in low, f"{path}: {literal} is the header's"
        if path.name != "abi.py":
            assert not re.search(r"<<\s*8\b", text), f"{path}: a serial shift (SERIAL_CPU_BITS)"
    # only abi.py binds them, each from the parsed header
    assert set(defined) == {"abi.py"}, defined
    for name, value in defined["abi.py"]:
        assert "_d(" in value or name == "KFUNCS", (name, value)
    assert abi.KFUNCS == {abi.HEADER.defines["KFUNC_SESSION_COOKIE"]: "bpf_session_cookie",
                          abi.HEADER.defines["KFUNC_SESSION_IS_RETURN"]: "bpf_session_is_return"}
    assert abi.fnv_ips([]) == abi.FNV_OFFSET
    assert abi.fnv_ips([1]) == ((abi.FNV_OFFSET ^ 1) ^ 1) * abi.FNV_PRIME % (1 << 64)


def test_allocator_sites_use_the_headers_ids_and_the_sources_programs():
    fn_ids = {v for k, v in abi.HEADER.defines.items() if k.startswith("FN_")}
    sites = probes.ALLOCATOR_SITES
    assert {s.fn_id for s in sites} == fn_ids
    assert [s.function for s in sites if not s.has_return] == ["free"]
    assert next(s for s in sites if s.function == "free").fn_id == abi.FN_FREE
    src = loading.bpf_source_path().read_text()
    per_site = set(re.findall(r"^PER_SITE\((\w+), (FN_\w+)\)", src, re.M))
    for s in sites:
        fn_name = next(k for k, v in abi.HEADER.defines.items() if k.startswith("FN_") and v == s.fn_id)
        if s.has_return:
            assert (s.program, fn_name) in per_site
        assert re.search(rf"\bint {s.session_program}\(struct pt_regs \*ctx\)", src)
    for name in probes.MULTI_PROGRAMS:
        assert re.search(rf"\bint {name}\(struct pt_regs \*ctx\)", src)


def test_the_header_is_found_in_an_installed_layout(tmp_path):
    """The wheel ships bpf/ as pytest_memleak_ebpf/bpf (pyproject force-include):
    the source and the header are found there, not in a checkout."""
    import shutil

    dest = tmp_path / "site" / "pytest_memleak_ebpf"
    shutil.copytree(PKG, dest, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PKG.parent / "bpf", dest / "bpf")
    out = subprocess.run([sys.executable, "-c",
                          "from pytest_memleak_ebpf.tracer import abi, loading;"
                          "print(abi.header_path()); print(loading.bpf_source_path()); print(abi.FN_FREE)"],
                         capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out == [str(dest / "bpf" / "memleak.h"), str(dest / "bpf" / "memleak.bpf.c"), str(abi.FN_FREE)]


@pytest.mark.ebpf
def test_bccs_map_types_are_the_headers(ebpf):
    """BCC compiles the header into the program: the key and value types it
    describes for each map have the layouts abi gives Python."""
    from pytest_memleak_ebpf.tracer import Tracer

    t = Tracer()
    try:
        c = t.config
        params = {"STACK_DEPTH": c.stack_depth, "EXE_LEN": c.exe_len}
        maps = {b"tracked": (None, "track_t"), b"procs": (None, "proc_t"), b"blocks": ("block_key_t", "block_t"),
                b"handoffs": ("handoff_key_t", "handoff_t"), b"stacks": (None, "stack_t"),
                b"rawcache": ("rawkey_t", "rawval_t"), b"ext": (None, "ext_t"), b"ext_pages": ("ext_page_t", None)}

        def layout(cls):
            out, todo = [], [("", cls, 0)]
            while todo:
                prefix, k, base = todo.pop()
                out.append((prefix, ctypes.sizeof(k)))
                for name, *_ in getattr(k, "_fields_", ()):
                    f = getattr(k, name)
                    out.append((prefix + name, base + f.offset, f.size))
            return sorted(out)

        for name, (key, leaf) in maps.items():
            table = t.bpf[name]
            for ours, theirs in ((key, table.Key), (leaf, table.Leaf)):
                if ours is not None:
                    assert layout(abi.HEADER.struct(ours, **params)) == layout(theirs), (name, ours)
    finally:
        t.close()
