"""pytest_memleak_ebpf.allocators: which allocator a program will use, and
where to probe it -- checked against the real loader (the programs run and
say which library they got), against nm (the sites) and ldconfig -p (the
cache parser).  No root needed, no eBPF."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from elftools.elf.elffile import ELFFile

from pytest_memleak_ebpf import allocators as A

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "fixtures", "alloc"))
import builds as B  # noqa: E402

ALL = B.C_CONFIGS + B.CXX_CONFIGS


def need(*packages):
    """Skip when a package is missing -- in CI (CI=true) fail instead."""
    miss = B.missing(packages)
    if miss:
        msg = f"packages missing: {' '.join(miss)} (scripts/setup-system.sh installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("alloc"))


def built(cfg, outdir):
    need(*cfg.packages)
    return B.build(cfg, outdir)


def nm_groups(path, dynamic):
    """{address: names} of the family members and operators ``path``
    defines, as nm lists them."""
    out = subprocess.run(["nm", "--defined-only"] + (["-D"] if dynamic else []) + [path],
                         check=True, capture_output=True, text=True).stdout
    wanted = set(A.FAMILY) | set(A.OPERATORS)
    groups = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[1] not in "TtWi":
            continue
        name = parts[2].split("@", 1)[0]
        if name in wanted and parts[1] in "TW":
            groups.setdefault(int(parts[0], 16), set()).add(name)
    return groups


def site_groups(alloc):
    wanted = set(A.FAMILY) | set(A.OPERATORS)
    return {s.address: {s.name, *s.aliases} & wanted for s in alloc.sites}


# ----------------------------------------------------------------------------
# every configuration of issue 14
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", ALL, ids=[c.name for c in ALL])
def test_configuration_resolves(cfg, outdir):
    exe = built(cfg, outdir)
    a = A.resolve_allocator(exe, B.env_for(cfg), cwd=outdir)
    assert a.kind == cfg.kind
    assert a.covered is cfg.covered
    if not cfg.covered:
        assert a.module is None and a.sites == () and "stripped" in a.reason
        return
    assert a.reason is None
    module = exe if cfg.static else cfg.module
    assert a.module == module and a.host_path == module
    assert a.json() == {"kind": cfg.kind, "module": module, "covered": True}
    # the sites: every family member and (for allocators replacing them) every
    # operator new/delete the object defines, one site per address
    expect = nm_groups(module, dynamic=not cfg.static)
    if cfg.kind in ("glibc", "musl", "static-glibc", "static-musl"):
        expect = {k: v - set(A.OPERATORS) for k, v in expect.items() if v - set(A.OPERATORS)}
    assert site_groups(a) == expect
    # each site's file offset is its address in the file (pyelftools' view)
    with open(module, "rb") as f:
        elf = ELFFile(f)
        for s in a.sites:
            assert list(elf.address_offsets(s.address)) == [s.file_offset], s.name
    if cfg.preload:
        assert a.scope[:2] == (exe, cfg.preload)
    # what the real loader says: this program's malloc is the one found
    if not cfg.static:
        got = loader_malloc(exe, B.env_for(cfg))
        assert got == module


def loader_malloc(exe, env):
    """Which object the real loader binds ``exe``'s malloc to (LD_DEBUG=bindings)."""
    interp = open_interp(exe)
    if interp and "ld-musl" in interp:
        return musl_loader_malloc(exe, env)
    r = subprocess.run([exe], env={**env, "LD_DEBUG": "bindings"}, capture_output=True, text=True)
    for line in r.stderr.splitlines():
        m = re.search(r"binding file (\S+) \[0\] to (\S+) \[0\]: normal symbol `malloc'", line)
        if m and m.group(1) == exe:
            return os.path.realpath(m.group(2))
    raise AssertionError(f"no binding of malloc for {exe}: {r.stderr[-2000:]}")


def open_interp(exe):
    with open(exe, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_INTERP":
                return seg.get_interp_name()
    return None


def musl_loader_malloc(exe, env):
    # musl has no LD_DEBUG: ldd (the loader run as ldd) lists what it maps;
    # for musl programs malloc is the loader-and-libc itself
    out = subprocess.run([open_interp(exe), "--list", exe], env=env, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "ld-musl" in line or "libc.so" in line:
            return os.path.realpath(open_interp(exe))
    raise AssertionError(out)


def test_cxx_operators_only_from_the_allocator_that_replaces_them(outdir):
    """glibc: operator new is libstdc++'s (it calls malloc): no operator site.
    tcmalloc: its operators are the process's, and free shares its address
    with operator delete (one probe)."""
    cfgs = {c.name: c for c in B.CXX_CONFIGS}
    a = A.resolve_allocator(built(cfgs["cxx-glibc"], outdir), B.env_for(cfgs["cxx-glibc"]))
    assert not any(s.name.startswith("_Z") for s in a.sites)
    c = cfgs["cxx-link-tcmalloc"]
    a = A.resolve_allocator(built(c, outdir), B.env_for(c))
    by = {s.name: s for s in a.sites}
    assert {"_ZdlPv", "_ZdaPv"} <= set(by["free"].aliases)
    assert by["_Znwm"].role == "alloc" and by["_Znwm"].family == "malloc" and by["_Znwm"].args == (("size", 0),)
    assert by["_ZnwmSt11align_val_t"].role == "aligned_alloc"
    assert by["_ZnwmSt11align_val_t"].args == (("size", 0), ("align", 1))
    assert by["_ZdlPvm"].role == "sized_free" and by["_ZdlPvm"].family == "free"
    assert ("_ZdaPv", "free") in a.deduped


def test_operator_bound_elsewhere_is_not_probed_there(outdir, tmp_path):
    """An object earlier in the scope that defines operator new (here the
    program itself) gets the calls: the allocator's own _Znwm is no site."""
    need("g++", "libgoogle-perftools-dev")
    src = tmp_path / "ownnew.cpp"
    src.write_text("#include <cstdlib>\n#include <new>\n"
                   "void *operator new(std::size_t n) { return std::malloc(n); }\n"
                   "void *volatile s; int main() { s = new int; return 0; }\n")
    exe = str(tmp_path / "ownnew")
    subprocess.run(["g++", "-o", exe, str(src), "-rdynamic", "-Wl,--no-as-needed", "-ltcmalloc"], check=True)
    a = A.resolve_allocator(exe, {})
    assert a.kind == "tcmalloc"
    names = {n for s in a.sites for n in (s.name, *s.aliases)}
    assert "_Znwm" not in names and "_Znam" in names


# ----------------------------------------------------------------------------
# aliases
# ----------------------------------------------------------------------------

def test_aliases_deduped_by_address(outdir):
    c = {x.name: x for x in B.C_CONFIGS}
    a = A.resolve_allocator(built(c["link-tcmalloc"], outdir), {})
    assert ("tc_malloc", "malloc") in a.deduped and ("tc_free", "free") in a.deduped
    assert len({s.address for s in a.sites}) == len(a.sites)
    assert not any(s.name.startswith("tc_") for s in a.sites)
    a = A.resolve_allocator(built(c["link-mimalloc"], outdir), {})
    assert ("mi_malloc", "malloc") in a.deduped
    a = A.resolve_allocator(built(c["glibc"], outdir), {})
    assert a.deduped == (("memalign", "aligned_alloc"),)
    a = A.resolve_allocator(built(c["static-glibc"], outdir), {})
    assert ("__libc_malloc", "malloc") in a.deduped


def test_allocator_api_probed_only_when_imported(outdir, tmp_path):
    """jemalloc's mallocx/sdallocx are their own functions: a site only for a
    program that calls them."""
    need("libjemalloc-dev")
    src = tmp_path / "usex.c"
    src.write_text("#include <stddef.h>\nvoid *mallocx(size_t, int); void sdallocx(void *, size_t, int);\n"
                   "int main(void) { void *p = mallocx(10, 0); sdallocx(p, 10, 0); return 0; }\n")
    exe = str(tmp_path / "usex")
    subprocess.run(["gcc", "-o", exe, str(src), "-ljemalloc"], check=True)
    a = A.resolve_allocator(exe, {})
    by = {s.name: s for s in a.sites}
    assert by["mallocx"].family == "malloc" and by["sdallocx"].role == "sized_free"
    assert "rallocx" not in by
    plain = A.resolve_allocator(built({x.name: x for x in B.C_CONFIGS}["link-jemalloc"], outdir), {})
    assert not {"mallocx", "sdallocx"} & {s.name for s in plain.sites}


# ----------------------------------------------------------------------------
# LD_PRELOAD
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("sep", [":", " ", " : "])
def test_preload_order_first_definer_wins(outdir, sep):
    need("libjemalloc-dev", "libgoogle-perftools-dev")
    exe = built(B.C_CONFIGS[0], outdir)
    for first, second, kind in ((B.JEMALLOC, B.TCMALLOC, "jemalloc"), (B.TCMALLOC, B.JEMALLOC, "tcmalloc")):
        env = {"LD_PRELOAD": f"{first}{sep}{second}"}
        a = A.resolve_allocator(exe, env)
        assert (a.kind, a.module) == (kind, first)
        assert a.scope[1:3] == (first, second)
        assert loader_malloc(exe, env) == first


def test_preload_without_malloc_is_passed_over(outdir, tmp_path):
    need("libjemalloc-dev")
    lib = B.cc(str(tmp_path), "libnomalloc.so", "libfoo.c", "-shared", "-fPIC", "-DFOO_ID=7")
    exe = built(B.C_CONFIGS[0], outdir)
    env = {"LD_PRELOAD": f"{lib} {B.JEMALLOC}"}
    a = A.resolve_allocator(exe, env)
    assert (a.kind, a.module) == ("jemalloc", B.JEMALLOC)
    assert loader_malloc(exe, env) == B.JEMALLOC


def test_preload_by_name_searched_like_a_needed_library(outdir):
    need("libjemalloc-dev")
    exe = built(B.C_CONFIGS[0], outdir)
    a = A.resolve_allocator(exe, {"LD_PRELOAD": "libjemalloc.so.2"})
    assert (a.kind, a.module) == ("jemalloc", B.JEMALLOC)


def test_secure_process_ignores_preload_paths_and_library_path(outdir):
    need("libjemalloc-dev")
    exe = built(B.C_CONFIGS[0], outdir)
    a = A.resolve_allocator(exe, {"LD_PRELOAD": B.JEMALLOC}, secure=True)
    assert a.kind == "glibc"
    # a preload by name must be a set-user-ID file: libjemalloc is not
    a = A.resolve_allocator(exe, {"LD_PRELOAD": "libjemalloc.so.2"}, secure=True)
    assert a.kind == "glibc"


def test_setuid_file_is_secure(outdir, tmp_path):
    need("libjemalloc-dev")
    exe = str(tmp_path / "suid")
    shutil.copy(built(B.C_CONFIGS[0], outdir), exe)
    if os.geteuid() == 0:
        os.chown(exe, 0, 0)
    os.chmod(exe, 0o4755)                # after chown, which clears the bit
    st = os.stat(exe)
    other = st.st_uid + 1
    assert A.resolve_allocator(exe, {"LD_PRELOAD": B.JEMALLOC}, uid=other).kind == "glibc"
    assert A.resolve_allocator(exe, {"LD_PRELOAD": B.JEMALLOC}, uid=st.st_uid).kind == "jemalloc"


# ----------------------------------------------------------------------------
# search paths: RPATH / RUNPATH / LD_LIBRARY_PATH / $ORIGIN, against the loader
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def foo(tmp_path_factory):
    """libfoo.so (defining malloc) in dirs d1 d2 d3, each with its own id."""
    root = tmp_path_factory.mktemp("foo")
    dirs = {}
    for i in (1, 2, 3):
        d = root / f"d{i}"
        d.mkdir()
        B.cc(str(d), "libfoo.so", "libfoo.c", "-shared", "-fPIC", f"-DFOO_ID={i}", "-DFOO_MALLOC")
        dirs[i] = str(d)
    return str(root), dirs


def link(root, name, *flags, source="usefoo.c", compiler="gcc"):
    return B.cc(root, name, source, *flags, compiler=compiler)


def check(exe, env, want_id, dirs, allocator=True):
    """The resolver and the loader agree: libfoo of dir ``want_id`` (and it is
    the allocator, when it comes before libc in the scope)."""
    a = A.resolve_allocator(exe, env)
    lib = os.path.join(dirs[want_id], "libfoo.so")
    assert lib in a.scope and not any(p.endswith("/libfoo.so") for p in a.scope if p != lib), a.scope
    if allocator:
        assert a.module == lib
        assert a.kind == "other" and a.covered
    else:
        assert a.kind == "glibc"
    r = subprocess.run([exe], env=env)
    assert r.returncode == want_id


def test_rpath_before_library_path(foo):
    root, d = foo
    exe = link(root, "rp", f"-L{d[1]}", "-lfoo", f"-Wl,--disable-new-dtags,-rpath,{d[1]}")
    check(exe, {"LD_LIBRARY_PATH": d[2]}, 1, d)
    check(exe, {}, 1, d)


def test_library_path_before_runpath(foo):
    root, d = foo
    exe = link(root, "runp", f"-L{d[1]}", "-lfoo", f"-Wl,--enable-new-dtags,-rpath,{d[1]}")
    check(exe, {"LD_LIBRARY_PATH": d[2]}, 2, d)
    check(exe, {}, 1, d)
    check(exe, {"LD_LIBRARY_PATH": f"/nonexistent::{d[3]}"}, 3, d)


def test_library_path_empty_element_is_cwd(foo):
    root, d = foo
    exe = link(root, "runp2", f"-L{d[1]}", "-lfoo", f"-Wl,--enable-new-dtags,-rpath,{d[1]}")
    a = A.resolve_allocator(exe, {"LD_LIBRARY_PATH": ":/nonexistent"}, cwd=d[3])
    assert a.module == os.path.join(d[3], "libfoo.so")
    assert subprocess.run([exe], env={"LD_LIBRARY_PATH": ":/nonexistent"}, cwd=d[3]).returncode == 3


def test_rpath_inherited_unless_runpath(foo):
    """libbar (found in d3) needs libfoo: with no RUNPATH of its own libbar's
    deps are searched in the executable's RPATH (d1); a RUNPATH on libbar (d2)
    voids that."""
    root, d = foo
    bar = os.path.join(root, "bar")
    os.makedirs(os.path.join(bar, "plain"), exist_ok=True)
    os.makedirs(os.path.join(bar, "runp"), exist_ok=True)
    B.cc(os.path.join(bar, "plain"), "libbar.so", "libfoo.c", "-shared", "-fPIC", "-DFOO_NEEDS", "-DFOO_ID=0",
         f"-L{d[3]}", "-lfoo")
    B.cc(os.path.join(bar, "runp"), "libbar.so", "libfoo.c", "-shared", "-fPIC", "-DFOO_NEEDS", "-DFOO_ID=0",
         f"-L{d[3]}", "-lfoo", f"-Wl,--enable-new-dtags,-rpath,{d[2]}")
    for sub, want in (("plain", 1), ("runp", 2)):
        exe = link(root, f"ub-{sub}", "-L" + os.path.join(bar, sub), "-lbar",
                   f"-Wl,--disable-new-dtags,-rpath,{os.path.join(bar, sub)}:{d[1]}", source="usebar.c")
        check(exe, {}, want, d, allocator=False)     # breadth first: libc (needed by the program) comes first


def test_origin(foo):
    root, d = foo
    exe = link(root, "orig", f"-L{d[2]}", "-lfoo", "-Wl,--enable-new-dtags,-rpath,$ORIGIN/d2")
    check(exe, {}, 2, d)
    link_ = os.path.join(d[3], "orig-link")
    if not os.path.lexists(link_):
        os.symlink(exe, link_)
    check(link_, {}, 2, d)                 # $ORIGIN of the executable is its real directory


def test_musl_library_path_before_rpath(foo):
    need("musl-tools")
    root, d = foo
    mroot = os.path.join(root, "musl")
    for i in (1, 2):
        os.makedirs(os.path.join(mroot, f"d{i}"), exist_ok=True)
        B.cc(os.path.join(mroot, f"d{i}"), "libfoo.so", "libfoo.c", "-shared", "-fPIC", f"-DFOO_ID={i}",
             "-DFOO_MALLOC", compiler="musl-gcc")
    md = {i: os.path.join(mroot, f"d{i}") for i in (1, 2)}
    exe = link(mroot, "rp", f"-L{md[1]}", "-lfoo", f"-Wl,--disable-new-dtags,-rpath,{md[1]}", compiler="musl-gcc")
    check(exe, {"LD_LIBRARY_PATH": md[2]}, 2, md)      # glibc would take the RPATH first
    check(exe, {}, 1, md)


# ----------------------------------------------------------------------------
# static programs
# ----------------------------------------------------------------------------

def test_stripped_static_not_covered(outdir):
    c = {x.name: x for x in B.C_CONFIGS}
    a = A.resolve_allocator(built(c["static-glibc-stripped"], outdir), {})
    assert (a.kind, a.module, a.covered) == ("static-glibc", None, False)
    assert a.reason == "static executable without a symbol table (stripped): its malloc cannot be located"
    assert a.json() == {"kind": "static-glibc", "module": None, "covered": False}


def test_go_like_static_without_malloc(tmp_path):
    exe = B.cc(str(tmp_path), "nomalloc", "nomalloc.c", "-static", "-nostdlib")
    assert subprocess.run([exe]).returncode == 0
    a = A.resolve_allocator(exe, {})
    assert (a.kind, a.module, a.covered) == ("other", None, False)
    assert "without malloc" in a.reason


def test_not_an_elf_is_an_error(tmp_path):
    p = tmp_path / "script.sh"
    p.write_text("#!/bin/sh\n")
    with pytest.raises(A.ResolveError, match="script.sh"):
        A.resolve_allocator(str(p), {})


# ----------------------------------------------------------------------------
# /etc/ld.so.cache
# ----------------------------------------------------------------------------

def ldconfig_p(cache=None):
    args = ["ldconfig", "-p"] + (["-C", cache] if cache else [])
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines()[1:]:
        if line.startswith("Cache generated by"):
            continue
        m = re.match(r"\t(\S+) \((.*)\) => (.*)$", line)
        assert m, line
        rows.append((m.group(1), m.group(3), m.group(2)))
    return rows


def check_flags_and_hwcaps(entries, rows):
    for e, (_n, _p, desc) in zip(entries, rows):
        assert ("x86-64" in desc) == (e.flags == 0x0303), desc
        m = re.search(r'hwcap: "([^"]+)"', desc)
        assert e.hwcaps_subdir == (m.group(1) if m else None), desc


def test_ld_so_cache_equals_ldconfig_p():
    with open("/etc/ld.so.cache", "rb") as f:
        entries = A.parse_ld_so_cache(f.read())
    rows = ldconfig_p()
    assert [(e.name, e.path) for e in entries] == [(n, p) for n, p, _ in rows]
    assert len(entries) > 10
    check_flags_and_hwcaps(entries, rows)
    # the lookup the loader does gives what ldconfig lists first for a name
    firsts = {}
    for n, p, desc in rows:
        if "x86-64" in desc:
            firsts.setdefault(n, p)
    for n, p in firsts.items():
        assert A.cache_lookup(entries, n, A.glibc_hwcaps_subdirs()) == p


def test_ld_so_cache_hwcaps_entries(tmp_path):
    """A cache ldconfig builds with glibc-hwcaps subdirectories: the entry of
    the best subdirectory the CPU supports wins, as ld.so picks it."""
    lib = tmp_path / "lib"
    levels = ("x86-64-v2", "x86-64-v3", "x86-64-v4")
    for sub in ("",) + tuple(f"glibc-hwcaps/{v}" for v in levels):
        d = lib / sub
        d.mkdir(parents=True, exist_ok=True)
        B.cc(str(d), "libhw.so.1", "libfoo.c", "-shared", "-fPIC", "-DFOO_ID=1", "-Wl,-soname,libhw.so.1")
    conf = tmp_path / "ld.so.conf"
    conf.write_text(f"{lib}\n")
    cache = tmp_path / "ld.so.cache"
    subprocess.run(["ldconfig", "-X", "-f", str(conf), "-C", str(cache)], check=True)
    entries = A.parse_ld_so_cache(cache.read_bytes())
    rows = ldconfig_p(str(cache))
    assert [(e.name, e.path) for e in entries] == [(n, p) for n, p, _ in rows]
    check_flags_and_hwcaps(entries, rows)
    subs = {e.hwcaps_subdir for e in entries if e.name == "libhw.so.1"}
    assert subs == {None, *levels}
    supported = A.glibc_hwcaps_subdirs()
    want = str(lib / f"glibc-hwcaps/{supported[0]}/libhw.so.1") if supported else str(lib / "libhw.so.1")
    assert A.cache_lookup(entries, "libhw.so.1", supported) == want
    assert A.cache_lookup(entries, "libhw.so.1", ()) == str(lib / "libhw.so.1")
    assert A.cache_lookup(entries, "libhw.so.1", ("x86-64-v2",)) == str(lib / "glibc-hwcaps/x86-64-v2/libhw.so.1")


def test_bad_cache_is_refused():
    with pytest.raises(ValueError, match="unknown magic"):
        A.parse_ld_so_cache(b"not a cache at all, not at all")


# ----------------------------------------------------------------------------
# the resolution cache
# ----------------------------------------------------------------------------

def test_cache_hits_and_invalidates(foo, tmp_path):
    root, d = foo
    exe = link(root, "cached", f"-L{d[1]}", "-lfoo", f"-Wl,--enable-new-dtags,-rpath,{tmp_path}:{d[1]}")
    cache = A.AllocatorCache()
    a1 = cache.resolve(exe, {})
    a2 = cache.resolve(exe, {})
    assert a2 is a1 and (cache.hits, cache.misses) == (1, 1)
    assert a1.module == os.path.join(d[1], "libfoo.so")
    # other inputs, other answers
    assert cache.resolve(exe, {"LD_LIBRARY_PATH": d[2]}).module == os.path.join(d[2], "libfoo.so")
    assert cache.misses == 2
    # a library appearing earlier in the search path is seen
    shutil.copy(os.path.join(d[3], "libfoo.so"), tmp_path / "libfoo.so")
    a3 = cache.resolve(exe, {})
    assert a3.module == str(tmp_path / "libfoo.so") and cache.misses == 3
    assert subprocess.run([exe]).returncode == 3
    # validate=False answers from the entry alone
    os.unlink(tmp_path / "libfoo.so")
    assert cache.resolve(exe, {}, validate=False) is a3
    assert cache.resolve(exe, {}).module == os.path.join(d[1], "libfoo.so")


def test_cache_keyed_by_executable_identity(outdir, tmp_path):
    c = B.C_CONFIGS[0]
    exe = str(tmp_path / "prog")
    shutil.copy(built(c, outdir), exe)
    cache = A.AllocatorCache()
    a = cache.resolve(exe, {})
    assert a.kind == "glibc"
    shutil.copy(built({x.name: x for x in B.C_CONFIGS}["static-glibc"], outdir), exe + ".new")
    os.replace(exe + ".new", exe)                          # a new inode at the same path
    assert cache.resolve(exe, {}).kind == "static-glibc"


# ----------------------------------------------------------------------------
# another root filesystem
# ----------------------------------------------------------------------------

def test_other_root_follows_links_inside_it(outdir, tmp_path):
    """A root with its own /lib: absolute symlinks inside it resolve inside it."""
    rootfs = tmp_path / "rootfs"
    (rootfs / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (rootfs / "lib64").mkdir()
    (rootfs / "bin").mkdir()
    (rootfs / "etc").mkdir()
    os.symlink("usr/lib", rootfs / "lib")
    real = os.path.realpath("/lib64/ld-linux-x86-64.so.2")
    shutil.copy(real, rootfs / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    os.symlink("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", rootfs / "lib64/ld-linux-x86-64.so.2")
    shutil.copy(B.LIBC, rootfs / "usr/lib/x86_64-linux-gnu/libc.so.6")
    shutil.copy(built(B.C_CONFIGS[0], outdir), rootfs / "bin/prog")
    a = A.resolve_allocator("/bin/prog", {}, root=str(rootfs))
    assert (a.kind, a.module) == ("glibc", "/usr/lib/x86_64-linux-gnu/libc.so.6")
    assert a.host_path == str(rootfs / "usr/lib/x86_64-linux-gnu/libc.so.6")
    assert a.interpreter == "/lib64/ld-linux-x86-64.so.2"


def test_sysv_hash_only_objects(foo, tmp_path):
    """Objects with only a SysV .hash (which, unlike .gnu.hash, lists the
    undefined symbols too): the program's undefined malloc is no definition."""
    root, d = foo
    lib = tmp_path / "sysv"
    lib.mkdir()
    B.cc(str(lib), "libfoo.so", "libfoo.c", "-shared", "-fPIC", "-DFOO_ID=4", "-DFOO_MALLOC",
         "-Wl,--hash-style=sysv")
    exe = B.cc(str(tmp_path), "usefoo-sysv", "usefoo.c", f"-L{lib}", "-lfoo", f"-Wl,-rpath,{lib}",
               "-Wl,--hash-style=sysv")
    a = A.resolve_allocator(exe, {})
    assert a.module == str(lib / "libfoo.so") and a.kind == "other" and a.covered
    assert {s.name for s in a.sites} == {"malloc", "calloc", "realloc", "free"}
    assert subprocess.run([exe]).returncode == 4
    # a non-PIE program taking malloc's address: its undefined malloc has a
    # value (the canonical PLT entry) and is still no definition
    src = tmp_path / "addr.c"
    src.write_text("#include <stdlib.h>\nvoid *(*volatile f)(size_t);\n"
                   "int main(void) { f = malloc; free(f(1)); return 0; }\n")
    prog = str(tmp_path / "addr-sysv")
    subprocess.run(["gcc", "-fno-pic", "-no-pie", "-o", prog, str(src), "-Wl,--hash-style=sysv"], check=True)
    with open(prog, "rb") as f:
        m = ELFFile(f).get_section_by_name(".dynsym").get_symbol_by_name("malloc")[0]
        assert m["st_shndx"] == "SHN_UNDEF" and m["st_value"] != 0
    assert A.resolve_allocator(prog, {}).kind == "glibc"


# ----------------------------------------------------------------------------
# the sites, with real uprobes
# ----------------------------------------------------------------------------

@pytest.mark.ebpf
def test_sites_count_the_fixtures_calls(ebpf, outdir):
    """A counting uprobe at every resolved site, for every configuration:
    the hits from the fixture's main() are exactly its calls
    (tests/fixtures/alloc/verify_sites.py)."""
    for cfg in ALL:
        need(*cfg.packages)
    r = subprocess.run([sys.executable, os.path.join(HERE, "fixtures", "alloc", "verify_sites.py"), outdir],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)})
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert len(lines) == len(ALL)
    covered = [ln for ln in lines if " sites " in ln]
    assert len(covered) == sum(1 for c in ALL if c.covered and not (c.compiler == "g++" and c.kind in
                                                                    ("glibc", "static-glibc")))
    assert all(" OK " in ln for ln in covered), r.stdout


# ----------------------------------------------------------------------------
# a live process
# ----------------------------------------------------------------------------

def test_resolve_process_reads_its_environment(tmp_path):
    need("libjemalloc-dev")
    env = {"PATH": "/usr/bin:/bin", "LD_PRELOAD": B.JEMALLOC}
    p = subprocess.Popen(["/bin/sleep", "30"], env=env, cwd=str(tmp_path))
    try:
        for _ in range(500):                  # until the exec is complete
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                if os.readlink(f"/proc/{p.pid}/exe").endswith("sleep") and f.read():
                    break
            time.sleep(0.01)
        args = A.process_inputs(p.pid)
        assert args == {"executable": os.path.realpath("/bin/sleep"), "env": env, "cwd": str(tmp_path),
                        "root": "/", "secure": False}
        cache = A.AllocatorCache()
        a = A.resolve_process(p.pid, cache)
        assert (a.kind, a.module) == ("jemalloc", B.JEMALLOC)
        assert A.resolve_process(p.pid, cache) is a and cache.hits == 1
    finally:
        p.kill()
        p.wait()
    with pytest.raises(OSError):
        A.process_inputs(p.pid)


def test_ld_so_preload_file_after_ld_preload(outdir, tmp_path):
    """/etc/ld.so.preload (of the process's root) is loaded after LD_PRELOAD."""
    need("libjemalloc-dev", "libgoogle-perftools-dev")
    rootfs = tmp_path / "rootfs"
    lib = rootfs / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    (rootfs / "lib64").mkdir()
    (rootfs / "etc").mkdir()
    shutil.copy(os.path.realpath("/lib64/ld-linux-x86-64.so.2"), rootfs / "lib64/ld-linux-x86-64.so.2")
    for f in (B.LIBC, B.JEMALLOC, B.TCMALLOC):
        shutil.copy(f, lib / os.path.basename(f))
    shutil.copy(built(B.C_CONFIGS[0], outdir), rootfs / "prog")
    (rootfs / "etc/ld.so.preload").write_text("# emergencies only\n/usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    a = A.resolve_allocator("/prog", {}, root=str(rootfs))
    assert (a.kind, a.module) == ("jemalloc", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    tc = "/usr/lib/x86_64-linux-gnu/" + os.path.basename(B.TCMALLOC)
    a = A.resolve_allocator("/prog", {"LD_PRELOAD": tc}, root=str(rootfs))
    assert (a.kind, a.module) == ("tcmalloc", tc)
    assert a.scope[:3] == ("/prog", tc, "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")


@pytest.mark.parametrize("loader", ["/lib64/ld-linux-x86-64.so.2", "/lib/ld-musl-x86_64.so.1"])
def test_loader_run_as_a_command_is_named(loader):
    if loader.endswith("so.1"):
        need("musl-tools")
    a = A.resolve_allocator(loader, {})
    assert (a.kind, a.module, a.covered) == ("other", None, False)
    assert a.reason.startswith("the dynamic loader run as a command")


def test_other_machine_is_flagged(outdir, tmp_path):
    exe = tmp_path / "arm64"
    data = bytearray(open(built(B.C_CONFIGS[0], outdir), "rb").read())
    data[18:20] = (183).to_bytes(2, "little")            # e_machine = EM_AARCH64
    exe.write_bytes(bytes(data))
    a = A.resolve_allocator(str(exe), {})
    assert (a.kind, a.module, a.covered) == ("other", None, False)
    assert a.reason.startswith("not an x86-64 ELF64 program")
