"""Unit tests (no root): LSan-syntax suppressions, the default glibc/ld.so/libstdc++
suppressions, applying them to a test's result, and generating suppressions."""

import copy
import fnmatch
import json
import os
import shutil
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from pytest_memleak_ebpf import accounting
from pytest_memleak_ebpf.accounting import Amount, ProcessLeak, StackLeak
from pytest_memleak_ebpf.marks import Budget
from pytest_memleak_ebpf.report import gen_suppressions, suppressions_table
from pytest_memleak_ebpf.suppressions import (
    DEFAULT_SUPPRESSIONS,
    STATIC_INITIALIZER,
    Suppression,
    SuppressionError,
    apply,
    from_patterns,
    is_static_initializer,
    load_suppression_files,
    match,
    parse_suppressions,
    pattern_matches,
)
from pytest_memleak_ebpf.verdict import decide

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "suppressions")
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
LDSO = "/lib64/ld-linux-x86-64.so.2"
LIBSTDCXX = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"
APP = "/home/u/app"


def fr(function=None, module=None, file=None, line=None, address=0x1234, build_id=None):
    return {"function": function, "offset": 4 if function else None, "module": module, "file": file,
            "line": line, "build_id": build_id, "address": address}


def leak(nbytes, blocks, frames, captured=True):
    return StackLeak(nbytes, blocks, frames, captured)


def process(pid, stacks, comm=None, exe=None):
    out = Amount(sum(s.bytes for s in stacks), sum(s.blocks for s in stacks))
    return ProcessLeak(pid=pid, ppid=1, comm=comm or f"p{pid}", exe=exe, uid=0, user="root", exit_code=0,
                       signal=None, running_at_test_end=False, outstanding=out,
                       leaked=Amount(out.bytes, out.blocks), allocated=Amount(out.bytes * 2, out.blocks * 2),
                       stacks=stacks, counted=Amount(out.bytes, out.blocks))


def result(nodeid, *processes):
    r = accounting.TestLeakResult(nodeid=nodeid, budget=Budget(0, None), processes=list(processes))
    r.leaked = Amount(sum(p.leaked.bytes for p in processes), sum(p.leaked.blocks for p in processes))
    return r


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------

def test_parse_good_lines_with_sources():
    text = ("# comment\n\n   \nleak:foo\n  leak:^bar$  \r\nleak:ns::Cls::f(int) const\n\t# indented comment\n"
            "leak:*\nleak:/third_party/*\n")
    got = parse_suppressions(text, "my.supp")
    assert [(s.pattern, s.source) for s in got] == [
        ("foo", "my.supp:4"), ("^bar$", "my.supp:5"), ("ns::Cls::f(int) const", "my.supp:6"),
        ("*", "my.supp:8"), ("/third_party/*", "my.supp:9"),
    ]
    assert all(s.top_frames is None and s.modules == () for s in got)
    assert parse_suppressions("", "e.supp") == [] and parse_suppressions("# only\n", "e.supp") == []


@pytest.mark.parametrize("line, fragment", [
    ("race:foo", "unsupported suppression type 'race'"),
    ("interceptor_via_fun:foo", "unsupported suppression type 'interceptor_via_fun'"),
    ("lek:foo", "unknown suppression type 'lek'"),
    ("Leak:foo", "unknown suppression type 'Leak'"),
    ("leak :foo", "no space allowed between 'leak' and ':'"),
    ("foo", "expected 'leak:<pattern>'"),
    ("leak", "expected 'leak:<pattern>'"),
    ("leak:", "empty pattern"),
    ("leak:   ", "empty pattern"),
    ("leak:^", "nothing but anchors"),
    ("leak:^$", "nothing but anchors"),
    ("leak:$", "nothing but anchors"),
    ("leak:foo$bar", "'$' may only end a pattern"),
    ("leak:foo$$", "'$' may only end a pattern"),
    ("leak:foo  # why", "inline comments are not supported"),
    ("leak:a\x01b", "control character"),
    ("{", "valgrind suppression"),
    ("   Memcheck:Leak", "unknown suppression type 'Memcheck'"),
])
def test_parse_bad_line_names_file_line_and_text(line, fragment):
    text = "# header\nleak:ok\n" + line + "\nleak:never_reached\n"
    with pytest.raises(SuppressionError) as ei:
        parse_suppressions(text, "conf/leaks.supp")
    msg = str(ei.value)
    assert msg.startswith("conf/leaks.supp:3: "), msg
    assert fragment in msg
    assert repr(line.strip()) in msg


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("leak:^$*# \t\r\nabc_:{}/.\x00é")) | st.characters(), max_size=80))
def test_parser_raises_only_suppression_error(text):
    try:
        got = parse_suppressions(text, "h.supp")
    except SuppressionError as exc:
        assert str(exc).startswith("h.supp:")
        return
    for s in got:
        assert s.source.startswith("h.supp:")
        pattern_matches(s.pattern, "some_function")  # every accepted pattern compiles


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=5))
def test_from_patterns_raises_only_suppression_error(patterns):
    try:
        got = from_patterns(patterns)
    except SuppressionError as exc:
        assert str(exc).startswith("marker")
        return
    assert len(got) == len(patterns) and all(s.source == "marker" for s in got)


def test_from_patterns_accepts_bare_and_prefixed():
    got = from_patterns(["leak:foo", "bar", "std::vector<int>::push_back", " ^baz$ "], source="marker")
    assert [s.pattern for s in got] == ["foo", "bar", "std::vector<int>::push_back", "^baz$"]
    assert {s.source for s in got} == {"marker"}
    with pytest.raises(SuppressionError, match=r"marker #2: .*unsupported suppression type 'race'"):
        from_patterns(["ok", "race:x"])
    with pytest.raises(SuppressionError, match=r"marker #1: not a string"):
        from_patterns([3])


def test_load_files_in_order(tmp_path):
    extra = tmp_path / "more.supp"
    extra.write_text("leak:zzz\n")
    got = load_suppression_files([os.path.join(DATA, "example.supp"), extra])
    assert [s.pattern for s in got] == [
        "kv_index_entry_new", "^kv_index_build$", "third_party/zlib/*",
        "(anonymous namespace)::Cache::insert(std::string const&)", "libcrypto.so", "zzz",
    ]
    assert got[0].source == os.path.join(DATA, "example.supp") + ":3"
    assert got[-1].source == f"{extra}:1"


def test_load_missing_or_unreadable_file_names_path_and_os_error(tmp_path):
    missing = tmp_path / "nope.supp"
    with pytest.raises(SuppressionError) as ei:
        load_suppression_files([missing])
    assert str(missing) in str(ei.value) and "No such file or directory" in str(ei.value)
    with pytest.raises(SuppressionError) as ei:
        load_suppression_files([tmp_path])
    assert str(tmp_path) in str(ei.value) and "Is a directory" in str(ei.value)
    with pytest.raises(SuppressionError, match="not UTF-8"):
        load_suppression_files([os.path.join(DATA, "not_utf8.supp")])
    bad = tmp_path / "bad.supp"
    bad.write_text("leak:a\nleak:b\nrace:c\n")
    with pytest.raises(SuppressionError, match=rf"^{bad}:3: "):
        load_suppression_files([bad])


# --------------------------------------------------------------------------
# Pattern semantics
# --------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, text, expected", [
    ("foo", "foo", True), ("foo", "xfooy", True), ("foo", "fo", False),
    ("^foo", "foobar", True), ("^foo", "xfoo", False),
    ("foo$", "barfoo", True), ("foo$", "foox", False),
    ("^foo$", "foo", True), ("^foo$", "foo.part.0", False),
    ("f*o", "fxyzo", True), ("f*o", "fo", True), ("^a*b*c$", "a-b-c", True), ("^a*b*c$", "a-c", False),
    ("*", "anything", True), ("^*$", "x", True),
    ("a.b", "axb", False), ("a.b", "a.b", True),           # regex characters are literal
    ("f(int)", "f(int) const", True), ("a+b", "aab", False), ("[x]", "[x]", True),
    ("a^b", "a^b", True),                                    # '^' is only an anchor at the start
    ("a$", "aba", True),                                     # backtracks (LSan's matcher would say no)
    ("/usr/lib/*libc.so", "/usr/lib/x86_64-linux-gnu/libc.so.6", True),
    ("foo", "", False), ("foo", None, False), ("*", "", False),
])
def test_pattern_semantics(pattern, text, expected):
    assert pattern_matches(pattern, text) is expected


_plain = st.text(alphabet=st.characters(blacklist_characters="*^$\n", blacklist_categories=("Cs",)), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(_plain, st.text(max_size=20))
def test_unanchored_literal_is_substring(p, t):
    assert pattern_matches(p, t) == (bool(t) and p in t)
    assert pattern_matches("^" + p, t) == (bool(t) and t.startswith(p))
    assert pattern_matches(p + "$", t) == (bool(t) and t.endswith(p))
    assert pattern_matches("^" + p + "$", t) == (t == p)


@settings(max_examples=300, deadline=None)
@given(st.lists(_plain, min_size=1, max_size=3), st.booleans(), st.booleans(),
       st.text(alphabet="abc*?[]x", max_size=12))
def test_wildcards_agree_with_fnmatch(pieces, start, end, text):
    pattern = ("^" if start else "") + "*".join(pieces) + ("$" if end else "")
    glob = "".join("[" + c + "]" if c in "*?[]" else c for c in pieces[0])
    for piece in pieces[1:]:
        glob += "*" + "".join("[" + c + "]" if c in "?[]" else c for c in piece)
    glob = ("" if start else "*") + glob + ("" if end else "*")
    assert pattern_matches(pattern, text) == (bool(text) and fnmatch.fnmatchcase(text, glob))


# --------------------------------------------------------------------------
# Matching stacks
# --------------------------------------------------------------------------

def test_match_any_frame_by_function_module_or_file():
    frames = [fr("helper", "/opt/lib/libthird.so.1", "src/helper.c"), fr("caller", APP, "app/main.c")]
    s = lambda p: Suppression(p, "t")
    assert match(frames, [s("caller")]).pattern == "caller"                  # function, outer frame
    assert match(frames, [s("libthird.so")]).pattern == "libthird.so"        # module (full path, substring)
    assert match(frames, [s("^/opt/lib/")]).pattern == "^/opt/lib/"
    assert match(frames, [s("^libthird")]) is None                           # module is a full path, as in LSan
    assert match(frames, [s("app/main.c")]).pattern == "app/main.c"          # source file
    assert match(frames, [s("nothing")]) is None
    assert match(frames, []) is None
    assert match([], [s("*")]) is None


def test_match_innermost_frame_first_then_list_order():
    frames = [fr("inner", APP), fr("outer", APP)]
    a, b, c = Suppression("outer", "a"), Suppression("inner", "b"), Suppression("inn", "c")
    assert match(frames, [a, b, c]) is b   # frame 0 is tried against every suppression first
    assert match(frames, [c, b, a]) is c


def test_top_frames_and_modules():
    frames = [fr("strdup", LIBC), fr("setlocale", LIBC), fr("main", APP)]
    assert match(frames, [Suppression("setlocale", "t", top_frames=1, modules=("libc.so*",))]) is None
    assert match(frames, [Suppression("setlocale", "t", top_frames=2, modules=("libc.so*",))]) is not None
    assert match(frames, [Suppression("main", "t", top_frames=3, modules=("libc.so*",))]) is None
    assert match(frames, [Suppression("main", "t", top_frames=3, modules=("app",))]) is None  # frames 0-1 not in app
    assert match(frames, [Suppression("main", "t", top_frames=3)]) is not None
    # the module glob is matched against the basename
    assert match(frames, [Suppression("strdup", "t", modules=("libc.so.*",))]) is not None
    assert match(frames, [Suppression("strdup", "t", modules=("*/libc.so.6",))]) is None
    # a frame without a module is in no module
    assert match([fr("strdup")], [Suppression("strdup", "t", modules=("*",))]) is None
    assert match([fr("strdup")], [Suppression("strdup", "t")]) is not None


def test_uncaptured_and_unknown_frames_never_match_a_pattern():
    nothing = {"function": None, "offset": None, "module": None, "file": None, "line": None}
    assert match([nothing], [Suppression("*", "t")]) is None
    assert match([fr(None, APP)], [Suppression("*", "t")]) is not None  # module still matches


# --------------------------------------------------------------------------
# Default suppressions
# --------------------------------------------------------------------------

def _example_name(pattern):
    """A concrete function name the default's pattern matches."""
    if pattern == "*":
        return "dl_open_worker_begin"
    name = pattern.lstrip("^").rstrip("$").replace("*", "x")
    return name + ("" if pattern.endswith("$") else "")


def _module_for(s):
    for glob, path in (("libc.so*", LIBC), ("ld-linux*.so*", LDSO), ("libstdc++.so*", LIBSTDCXX)):
        if glob in s.modules:
            return path
    raise AssertionError(f"no known module for {s}")


def _named_defaults():
    return [s for s in DEFAULT_SUPPRESSIONS if s.pattern != STATIC_INITIALIZER]


def test_every_default_is_anchored_and_documented():
    assert len(DEFAULT_SUPPRESSIONS) > 40
    for s in DEFAULT_SUPPRESSIONS:
        assert s.source == "default"
        assert s.modules and all(m.startswith(("libc", "ld-", "ld64", "libstdc++")) for m in s.modules), s
        assert s.top_frames is not None and 1 <= s.top_frames <= 2, s
        assert s.reason and "\n" not in s.reason, s
        parse_suppressions("leak:" + s.pattern, "defaults")  # valid file syntax too
    assert len({s.pattern for s in DEFAULT_SUPPRESSIONS}) == len(DEFAULT_SUPPRESSIONS)


@pytest.mark.parametrize("s", _named_defaults(), ids=lambda s: s.pattern)
def test_default_matches_inside_its_module_at_frame_0(s):
    name = _example_name(s.pattern)
    for path in (_module_for(s), "/lib/x86_64-linux-gnu/" + os.path.basename(_module_for(s))):
        frames = [fr(name, path), fr("main", APP), fr("__libc_start_call_main", LIBC)]
        assert match(frames, DEFAULT_SUPPRESSIONS) is not None, (s, path)
    assert match([fr(name, _module_for(s))], [s]) is s


@pytest.mark.parametrize("s", DEFAULT_SUPPRESSIONS, ids=lambda s: s.pattern)
def test_default_never_matches_a_user_function_of_the_same_name(s):
    name = _example_name(s.pattern)
    for frames in (
        [fr(name, APP), fr("main", APP)],                                   # user's own function, frame 0
        [fr(name, "/home/u/build/libmine.so"), fr("main", APP)],             # in a user library
        [fr("make_thing", APP), fr(name, _module_for(s)), fr("main", APP)],  # user frame below the libc one
        [fr("cmp_cb", APP), fr("msort_with_tmp", LIBC), fr(name, _module_for(s))],  # user callback from libc
        [fr(name, None)],                                                    # no module: not anchored
    ):
        assert match(frames, DEFAULT_SUPPRESSIONS) is None, (s, frames)


@pytest.mark.parametrize("s", _named_defaults(), ids=lambda s: s.pattern)
def test_default_never_matches_deeper_than_top_frames(s):
    if s.pattern == "*":
        pytest.skip("matches any frame of ld.so, so the frames below it match too")
    name = _example_name(s.pattern)
    module = _module_for(s)
    filler = "neutral_helper_fn"   # in the same module but matched by no default
    assert match([fr(filler, module)], DEFAULT_SUPPRESSIONS) is None or module == LDSO
    frames = [fr(filler, module)] * s.top_frames + [fr(name, module), fr("main", APP)]
    assert match(frames, [s]) is None
    if s.top_frames > 1:
        frames = [fr(filler, module)] * (s.top_frames - 1) + [fr(name, module), fr("main", APP)]
        assert match(frames, [s]) is s


def test_printf_stdout_buffer_is_suppressed():
    # What the tracer + symbolizer record for `printf("hello\n"); return 0;` on Debian 12: libc has no frame
    # pointers, so the stack is the one frame that called malloc (gdb shows the full chain
    # malloc <- _IO_file_doallocate <- _IO_doallocbuf <- _IO_new_file_overflow <- _IO_new_file_xsputn <- puts <- main).
    stdout_buf = [fr("_IO_file_doallocate", LIBC, address=0x75840 + 0x8C)]
    assert match(stdout_buf, DEFAULT_SUPPRESSIONS).pattern == "^_IO_file_doallocate"
    with_fp = [fr("_IO_file_doallocate", "/lib/x86_64-linux-gnu/libc.so.6", "./libio/filedoalloc.c", 101),
               fr("_IO_doallocbuf", LIBC), fr("_IO_file_overflow", LIBC), fr("_IO_file_xsputn", LIBC),
               fr("puts", LIBC), fr("main", APP, "prog.c", 2), fr("__libc_start_call_main", LIBC)]
    assert match(with_fp, DEFAULT_SUPPRESSIONS).pattern == "^_IO_file_doallocate"
    mine = [fr("_IO_file_doallocate", APP, "mystdio.c", 10), fr("main", APP)]
    assert match(mine, DEFAULT_SUPPRESSIONS) is None


def test_leaked_iconv_and_fopen_stay_reported_while_libc_caches_are_suppressed():
    assert match([fr("__gconv_open", LIBC), fr("iconv_open", LIBC), fr("main", APP)], DEFAULT_SUPPRESSIONS) is None
    assert match([fr("__gconv_find_shlib", LIBC)], DEFAULT_SUPPRESSIONS) is not None
    assert match([fr("__fopen_internal", LIBC), fr("main", APP)], DEFAULT_SUPPRESSIONS) is None
    assert match([fr("newlocale", LIBC), fr("main", APP)], DEFAULT_SUPPRESSIONS) is None
    assert match([fr("_nl_intern_locale_data", LIBC)], DEFAULT_SUPPRESSIONS) is not None
    assert match([fr("strdup", LIBC), fr("main", APP)], DEFAULT_SUPPRESSIONS) is None
    assert match([fr("strdup", LIBC), fr("setlocale", LIBC)], DEFAULT_SUPPRESSIONS) is not None  # libc with FP
    assert match([fr("operator new(unsigned long)", LIBSTDCXX), fr("main", APP)], DEFAULT_SUPPRESSIONS) is None


def _malloc_callers():
    with open(os.path.join(DATA, "glibc236_malloc_callers.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


# libc functions whose blocks belong to the program (it must free them): never suppressed by default
PROGRAM_OWNED = [
    "__alloc_dir", "__fopen_internal", "fdopen", "popen", "fopencookie", "fmemopen", "open_memstream",
    "open_wmemstream", "getdelim", "strdup", "strndup", "wcsdup", "__vasprintf_internal", "__gconv_open",
    "__gconv_lookup_cache", "__gconv_create_spec", "newlocale", "duplocale", "getaddrinfo",
    "convert_hostent_to_gaih_addrtuple", "getifaddrs_internal", "if_nameindex", "glob", "glob_in_dir",
    "wordexp", "regcomp", "re_compile_internal", "backtrace_symbols", "tsearch", "hcreate_r", "argz_add",
    "argz_create", "envz_add", "__libc_dynarray_finalize", "__sched_cpualloc", "__posix_spawn_file_actions_realloc",
    "timer_create", "catopen", "__open_catalog", "fts_open", "fts_alloc.isra.0", "getcwd", "__scandir64_tail",
    "__pthread_attr_extension", "pthread_getattr_np", "realloc", "reallocarray", "malloc", "calloc",
    "posix_memalign", "memalign", "valloc", "pvalloc", "clnttcp_create", "authunix_create", "xdr_bytes",
    "_IO_str_overflow", "_IO_default_doallocate", "__libc_scratch_buffer_grow", "qsort_r", "__printf_fp_l",
]


def test_every_libc_default_names_a_libc_malloc_caller():
    callers = _malloc_callers()
    assert len(callers) > 300 and "_IO_file_doallocate" in callers
    for s in DEFAULT_SUPPRESSIONS:
        if "libc.so*" in s.modules and s.top_frames == 1:
            assert [c for c in callers if pattern_matches(s.pattern, c)], s.pattern


def test_program_owned_libc_allocations_are_never_suppressed():
    callers = set(_malloc_callers())
    assert set(PROGRAM_OWNED) <= callers
    for name in PROGRAM_OWNED:
        assert match([fr(name, LIBC), fr("main", APP)], DEFAULT_SUPPRESSIONS) is None, name
        assert match([fr(name, LIBC)], DEFAULT_SUPPRESSIONS) is None, name


def test_which_libc_malloc_callers_the_defaults_cover():
    callers = _malloc_callers()
    covered = [c for c in callers if match([fr(c, LIBC)], DEFAULT_SUPPRESSIONS)]
    # a snapshot: a change here is a change of the default list, to be reviewed
    assert len(covered) == 110, covered
    assert not set(covered) & set(PROGRAM_OWNED)


def _real_stacks():
    with open(os.path.join(DATA, "debian12_real_stacks.json")) as f:
        return json.load(f)["stacks"]


def _local_build_id(path):
    from pytest_memleak_ebpf.elf import init_functions
    info = init_functions(path)
    return info.build_id if info else None


def test_real_debian12_stacks():
    stacks = _real_stacks()
    assert len(stacks) > 150 and {"suppressed", "reported"} == {s["expect"] for s in stacks}
    wrong = []
    for s in stacks:
        if "needs_build_id" in s and _local_build_id(s["frames"][0]["module"]) != s["needs_build_id"]:
            continue  # unnamed libstdc++ frames are recognised from the very libstdc++ file
        got = match(s["frames"], DEFAULT_SUPPRESSIONS)
        if (got is not None) != (s["expect"] == "suppressed"):
            wrong.append((s["program"], s["frames"][0]["function"], s.get("note"), got))
    assert not wrong


def test_real_stacks_printf_program_fully_suppressed_and_user_leaks_fully_reported():
    stacks = _real_stacks()
    for prog in ("printf_only", "puts_only", "nss", "threads", "tlsdl"):
        mine = [s for s in stacks if s["program"] == prog]
        assert mine and all(match(s["frames"], DEFAULT_SUPPRESSIONS) for s in mine), prog
    user = [s for s in stacks if s["program"] == "userleaks" and s.get("note", "").endswith(("d", "leak", "freed"))
            and "helper" not in s.get("note", "")]
    assert len(user) >= 7
    assert not [s for s in user if match(s["frames"], DEFAULT_SUPPRESSIONS)]


# --------------------------------------------------------------------------
# Unnamed frames in static constructors
# --------------------------------------------------------------------------

FX_SO = r"""
#include <stdlib.h>
void *kept_by_ctor;
__attribute__((constructor)) static void fx_static_init(void) { kept_by_ctor = malloc(100); }
__attribute__((noinline)) void *fx_make(void) { return malloc(10); }
"""


@pytest.fixture(scope="module")
def stripped_lib(tmp_path_factory):
    """(stripped .so path, {function: file offset inside it}, build id)."""
    if not shutil.which("gcc") or not shutil.which("strip"):
        pytest.skip("needs gcc and strip")
    from elftools.elf.elffile import ELFFile
    d = tmp_path_factory.mktemp("fx")
    (d / "fx.c").write_text(FX_SO)
    full, stripped = d / "libfx-full.so", d / "libfx.so"
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-Wl,--build-id", "-o", str(full), str(d / "fx.c")], check=True)
    subprocess.run(["strip", "--strip-all", "-o", str(stripped), str(full)], check=True)
    offsets = {}
    with open(full, "rb") as f:
        elf = ELFFile(f)
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        for sym in elf.get_section_by_name(".symtab").iter_symbols():
            if sym.name in ("fx_static_init", "fx_make"):
                vaddr = sym["st_value"] + max(sym["st_size"] // 2, 1)
                seg = next(s for s in loads if s["p_vaddr"] <= vaddr < s["p_vaddr"] + s["p_filesz"])
                offsets[sym.name] = vaddr - seg["p_vaddr"] + seg["p_offset"]
    assert set(offsets) == {"fx_static_init", "fx_make"}
    return str(stripped), offsets, _local_build_id(str(stripped))


def test_unnamed_frame_in_static_constructor_is_recognised(stripped_lib):
    path, offsets, bid = stripped_lib
    assert bid and len(bid) == 40
    ctor = fr(None, path, address=offsets["fx_static_init"], build_id=bid)
    other = fr(None, path, address=offsets["fx_make"], build_id=bid)
    assert is_static_initializer(ctor) and not is_static_initializer(other)
    assert not is_static_initializer(dict(ctor, build_id="00" * 20))       # another build of the file
    assert not is_static_initializer(dict(ctor, module=path + ".gone"))
    assert not is_static_initializer(dict(ctor, address=None))
    user_rule = parse_suppressions("leak:" + STATIC_INITIALIZER, "u.supp")
    assert match([ctor], user_rule) is not None and match([other], user_rule) is None
    assert match([dict(ctor, function="fx_static_init")], user_rule) is None  # only unnamed frames
    # the default only covers libstdc++'s constructors, never a user library's
    assert match([ctor], DEFAULT_SUPPRESSIONS) is None


def test_libstdcxx_emergency_pool_on_this_machine():
    pool = next(s for s in _real_stacks() if "needs_build_id" in s and s["expect"] == "suppressed")
    demangle = next(s for s in _real_stacks() if "needs_build_id" in s and s["expect"] == "reported")
    if _local_build_id(pool["frames"][0]["module"]) != pool["needs_build_id"]:
        pytest.skip("not the libstdc++ build the stacks were recorded with")
    assert pool["bytes"] == 72704
    assert match(pool["frames"], DEFAULT_SUPPRESSIONS).pattern == STATIC_INITIALIZER
    assert match(demangle["frames"], DEFAULT_SUPPRESSIONS) is None


def test_libstdcxx_pool_when_symbolized():
    for name in ("(anonymous namespace)::pool::pool()", "_GLOBAL__sub_I_eh_alloc.cc"):
        assert match([fr(name, LIBSTDCXX), fr("call_init", LDSO)], DEFAULT_SUPPRESSIONS) is not None
        assert match([fr(name, APP)], DEFAULT_SUPPRESSIONS) is None


# --------------------------------------------------------------------------
# apply()
# --------------------------------------------------------------------------

def _sample_result():
    p1 = process(100, [
        leak(4096, 1, [fr("_IO_file_doallocate", LIBC)]),
        leak(840, 21, [fr("kv_index_entry_new", "/w/libkv.so"), fr("main", APP)]),
        leak(100, 2, [fr("_nl_make_l10nflist", LIBC)]),
        leak(60, 1, [fr("_nl_intern_locale_data", LIBC)]),
        leak(7, 1, [dict(function=None, offset=None, module=None, file=None, line=None)], captured=False),
    ], comm="kvtool", exe=APP)
    p2 = process(101, [leak(4096, 1, [fr("_IO_file_doallocate", LIBC)])], comm="sh")
    p3 = process(102, [], comm="true")
    return result("tests/test_kv.py::test_dump[a/b]", p1, p2, p3)


def test_apply_marks_stacks_and_computes_leaked():
    r = _sample_result()
    before = copy.deepcopy(r)
    supp = [Suppression("kv_index_entry_new", "my.supp:1")]
    summary = apply(r, list(DEFAULT_SUPPRESSIONS) + supp)
    v = decide(r, summary)
    assert r == before                                    # pure: nothing modified, outstanding untouched
    s = r.processes[0].stacks
    assert summary.suppression_for(s[0]).pattern == "^_IO_file_doallocate"
    assert summary.suppression_for(s[1]) == supp[0]
    assert summary.is_suppressed(s[2]) and summary.is_suppressed(s[3])
    assert not summary.is_suppressed(s[4])                # an uncaptured stack never matches
    assert len(summary.matches) == 5
    p1, p2, p3 = v.processes
    assert (r.processes[0].pid, p1.counted, p1.suppressed, p1.leaked) == (
        100, Amount(5103, 26), Amount(5096, 25), Amount(7, 1))
    assert (p2.counted, p2.suppressed, p2.leaked) == (Amount(4096, 1), Amount(4096, 1), Amount(0, 0))
    assert (p3.counted, p3.suppressed, p3.leaked) == (Amount(0, 0), Amount(0, 0), Amount(0, 0))
    assert v.leaked == Amount(7, 1) and v.suppressed == Amount(9192, 26)
    assert [(u.stacks, u.bytes, u.blocks, u.pattern, u.source) for u in summary.used] == [
        (2, 8192, 2, "^_IO_file_doallocate", "default"),
        (1, 840, 21, "kv_index_entry_new", "my.supp:1"),
        (2, 160, 3, "^_nl_", "default"),
    ]
    assert suppressions_table(summary.used) == [
        "Suppressions used:",
        "  stacks  bytes  blocks  pattern               source",
        "       2  8,192       2  ^_IO_file_doallocate  default",
        "       1    840      21  kv_index_entry_new    my.supp:1",
        "       2    160       3  ^_nl_                 default",
    ]


def test_apply_without_suppressions():
    r = _sample_result()
    summary = apply(r, [])
    v = decide(r, summary)
    assert summary.matches == {} and summary.used == [] and suppressions_table(summary.used) == []
    assert v.leaked == r.leaked and v.suppressed == Amount(0, 0)
    assert [p.leaked for p in v.processes] == [p.outstanding for p in r.processes]


# --------------------------------------------------------------------------
# gen_suppressions()
# --------------------------------------------------------------------------

def test_gen_suppressions_output_and_roundtrip():
    r = _sample_result()
    r.processes[0].stacks += [
        leak(64, 1, [fr("operator new(unsigned long)", LIBSTDCXX), fr("Cache::put(std::string const&)", APP)]),
        leak(32, 2, [fr("strdup", LIBC), fr("main", APP), fr("__libc_start_call_main", LIBC)]),
        leak(16, 1, [fr(None, "/opt/vendor/libblob.so.3"), fr("main", APP)]),
        leak(8, 1, [fr(None, APP), fr("main", APP)]),
        leak(5, 1, [fr("odd$name", APP)]),
        leak(0, 0, [fr("nothing_leaked", APP)]),
    ]
    summary = apply(r, DEFAULT_SUPPRESSIONS)
    text = gen_suppressions(r, summary)
    n = "tests/test_kv.py::test_dump[a/b]"
    assert text == (
        f"# 840 B in 21 block(s) leaked in {n}; function kv_index_entry_new\n"
        "leak:^kv_index_entry_new$\n"
        f"# 64 B in 1 block(s) leaked in {n}; function Cache::put(std::string const&)\n"
        "leak:^Cache::put(std::string const&)$\n"
        f"# 16 B in 1 block(s) leaked in {n}; any stack through module /opt/vendor/libblob.so.3 (it has no function names)\n"
        "leak:/libblob.so.3$\n"
        f"# 5 B in 1 block(s) leaked in {n}; function odd$name\n"
        "leak:^odd*name$\n"
        f"# 7 B in 1 block(s) by pid 100 (kvtool) in {n}: stack not captured\n"
        f"# 32 B in 2 block(s) by pid 100 (kvtool) in {n}: no function outside the C/C++ runtime and the "
        "program's entry points to suppress by (innermost: strdup)\n"
        f"# 8 B in 1 block(s) by pid 100 (kvtool) in {n}: no function outside the C/C++ runtime and the "
        "program's entry points to suppress by (innermost: [unknown] (/home/u/app))\n"
    )
    generated = parse_suppressions(text, "generated.supp")
    assert len(generated) == 4
    again = apply(r, list(DEFAULT_SUPPRESSIONS) + generated)
    still = [s for s in r.processes[0].stacks if not again.is_suppressed(s)]
    assert [s.bytes for s in still] == [7, 32, 8, 0]      # exactly the ones without an entry remain


def test_gen_suppressions_merges_across_stacks_and_tests():
    a = result("t.py::a", process(1, [leak(10, 1, [fr("leaky", APP)]), leak(5, 1, [fr("leaky", APP)])]))
    b = result("t.py::b", process(2, [leak(20, 2, [fr("leaky", APP), fr("main", APP)])]))
    assert gen_suppressions([a, b]) == (
        "# 35 B in 4 block(s) from 3 stacks leaked in t.py::a and 1 more test(s); function leaky\n"
        "leak:^leaky$\n"
    )
    assert gen_suppressions(result("t.py::c", process(3, []))) == ""


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=12), st.sampled_from([APP, "/opt/x/lib$odd.so", LIBC, None]),
                          st.integers(0, 100)), max_size=6),
       st.text(max_size=20))
def test_generated_suppressions_always_parse_and_hide_their_stacks(items, nodeid):
    stacks = [leak(n, 1, [fr(fn or None, mod), fr("main", APP)]) for fn, mod, n in items]
    r = result(nodeid, process(7, stacks, exe=APP))
    text = gen_suppressions(r)
    generated = parse_suppressions(text, "gen.supp")         # never a SuppressionError
    assert len(generated) == len({s.pattern for s in generated})
    summary = apply(r, generated)
    for s in stacks:
        entry_for_it = any(line.startswith("leak:") for line in gen_suppressions(
            result(nodeid, process(7, [s], exe=APP))).splitlines())
        if entry_for_it:
            assert summary.is_suppressed(s)


def test_in_process_stacks_are_matched_and_get_entries():
    InProcess = getattr(accounting, "InProcess", None)
    if InProcess is None:
        pytest.skip("no in-process results in this version")
    ext = "/w/build/kvext.cpython-311-x86_64-linux-gnu.so"
    ip_stacks = [leak(4096, 1, [fr("_IO_file_doallocate", LIBC)]),
                 leak(48, 3, [fr("kvext_parse", ext), fr("_PyEval_EvalFrameDefault", "/usr/bin/python3.11")]),
                 leak(8, 1, [fr(None, ext), fr("_PyEval_EvalFrameDefault", "/usr/bin/python3.11")]),
                 leak(5, 1, [fr("strdup", LIBC), fr("PyObject_Call", "/usr/lib/libpython3.11.so.1.0")])]
    r = _sample_result()
    r.in_process = InProcess(mode="extensions", outstanding=Amount(4157, 6), leaked=Amount(4157, 6),
                             allocated=Amount(9000, 9), stacks=ip_stacks, counted=Amount(4157, 6))
    summary = apply(r, DEFAULT_SUPPRESSIONS)
    v = decide(r, summary)
    assert summary.is_suppressed(ip_stacks[0]) and not summary.is_suppressed(ip_stacks[1])
    assert v.in_process.suppressed == Amount(4096, 1)
    assert v.suppressed == Amount(4096 + 160 + 4096, 5)        # processes only
    assert summary.used[0].stacks == 3 and summary.used[0].bytes == 3 * 4096
    text = gen_suppressions(r, summary)
    assert "leak:^kvext_parse$" in text and "leak:/kvext.cpython-311-x86_64-linux-gnu.so$" in text
    assert "_PyEval" not in text and "PyObject_Call" not in text        # the interpreter is never an entry
    assert "# 5 B in 1 block(s) by the pytest process (in-process) in tests/test_kv.py::test_dump[a/b]: " in text
    assert decide(_sample_result(), apply(_sample_result(), DEFAULT_SUPPRESSIONS)).in_process is None
