"""Unit tests (no root, no BPF) of the allocator-per-exec pieces: the probe
sites of an allocator answer, the allocator defaults, the verdict's flag of
a process whose allocator is not probed, the key's path check, the
watchdog's map walk."""

import os
import subprocess
import sys

import pytest

from pytest_memleak_ebpf import verdict
from pytest_memleak_ebpf.accounting import Amount, ProcessLeak, account
from pytest_memleak_ebpf.accounting import TestLeakResult as LeakResult
from pytest_memleak_ebpf.allocators import Allocator, Site
from pytest_memleak_ebpf.marks import Budget
from pytest_memleak_ebpf.suppressions import DEFAULT_SUPPRESSIONS, Suppression, allocator_defaults, apply, match
from pytest_memleak_ebpf.report import problem_text
from pytest_memleak_ebpf.tracer import abi, probes
from pytest_memleak_ebpf.tracer.execpause import _absolute_list


def _site(name, family):
    return Site(name, "alloc", (("size", 0),), family, 0x1000, 0x1000)


def test_sites_of_an_allocator_take_their_familys_programs_and_ids():
    a = Allocator("jemalloc", "/x/libjemalloc.so.2", True,
                  sites=(_site("malloc", "malloc"), _site("_Znam", "malloc"), _site("_ZdlPvm", "free"),
                         _site("calloc", "calloc"), _site("odd", None)))
    sites = {s.function: s for s in probes.allocator_sites(a)}
    assert set(sites) == {"malloc", "_Znam", "_ZdlPvm", "calloc"}
    for name in ("malloc", "_Znam"):
        s = sites[name]
        assert (s.fn_id, s.registers, s.has_return, s.program, s.session_program) == \
            (abi.FN_MALLOC | abi.NEST_FN_BIT, ("rdi",), True, "malloc_nest", "alloc_session")
    assert sites["calloc"].fn_id == abi.FN_CALLOC | abi.NEST_FN_BIT
    # free-type sites are entry only: a nested free finds the block gone (counted once)
    free = sites["_ZdlPvm"]
    assert (free.fn_id, free.has_return, free.program, free.session_program) == (abi.FN_FREE, False, "free",
                                                                               "free_entry")


@pytest.mark.parametrize("kind", ["glibc", "static-glibc"])
def test_glibcs_sites_keep_todays_ids(kind):
    a = Allocator(kind, "/x", True, sites=(_site("malloc", "malloc"), _site("realloc", "realloc")))
    assert [(s.fn_id, s.program, s.session_program) for s in probes.allocator_sites(a)] == [
        (abi.FN_MALLOC, "malloc", "malloc_session"), (abi.FN_REALLOC, "realloc", "alloc_session")]


def test_every_nested_program_is_in_the_bpf_source():
    import re

    from pytest_memleak_ebpf.tracer import loading

    src = loading.bpf_source_path().read_text()
    per_site = set(re.findall(r"^PER_SITE\((\w+), (FN_\w+) \| NEST_FN_BIT\)", src, re.M))
    for s in probes.ALLOCATOR_SITES:
        if s.has_return:
            fn = next(k for k, v in abi.HEADER.defines.items() if k.startswith("FN_") and v == s.fn_id)
            assert (s.program + "_nest", fn) in per_site


def fr(function, module):
    return {"function": function, "module": module, "file": None}


TC = "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4.5.10"
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
APP = "/home/u/build/app"


def test_allocator_defaults_are_anchored_to_the_allocators_frames():
    tc = allocator_defaults("tcmalloc", APP)
    assert tc and all(s.source == "default" and s.reason for s in tc)
    assert match([fr("TCMallocGuard::TCMallocGuard()", TC)], tc) is not None
    assert match([fr("tsearch", LIBC), fr("MallocExtension::Initialize()", TC)], tc) is not None
    # a user's function of the same name, or a user frame below, is never hidden
    assert match([fr("TCMallocGuard::TCMallocGuard()", APP)], tc) is None
    assert match([fr("make", APP), fr("MallocExtension::Initialize()", TC)], tc) is None
    assert match([fr("tsearch", LIBC), fr("main", APP)], tc) is not None   # the stated tcmalloc-only one
    assert match([fr("tsearch", LIBC), fr("main", APP)], allocator_defaults("glibc", APP)) is None
    st = allocator_defaults("static-glibc", APP)
    assert match([fr("_dl_new_object", APP)], st) is not None
    assert match([fr("_dl_new_object", "/other/prog")], st) is None
    assert match([fr("main", APP), fr("_dl_new_object", APP)], st) is None
    assert allocator_defaults("static-glibc", None) == ()
    assert allocator_defaults("mimalloc", APP) == () and allocator_defaults(None, APP) == ()


def _proc(pid, kind, covered, reason=None, stacks=()):
    p = ProcessLeak(pid=pid, ppid=1, comm="prog", exe=APP, uid=0, user="root", exit_code=0, signal=None,
                    running_at_test_end=False, outstanding=Amount(), leaked=Amount(), allocated=Amount(),
                    stacks=list(stacks))
    p.allocator = {"kind": kind, "module": None, "covered": covered}
    p.allocator_reason = reason
    return p


def test_a_process_not_covered_makes_the_test_incomplete_unless_budget_is_none():
    r = LeakResult("t::x", Budget(0, None), processes=[_proc(7, "other", False, "stripped"),
                                                           _proc(8, "glibc", True)])
    assert [problem_text(p) for p in verdict.decide(r).incomplete] == [
        f"pid 7 (prog, {APP}): allocations not visible, stripped"]
    r.budget = Budget(None, None, checked=False)
    assert verdict.decide(r).incomplete == []


def test_account_carries_the_allocator_into_the_json():
    procs = [{"serial": 1, "pid": 5, "ppid": 1, "comm": "c", "uid": 0,
              "allocator": {"kind": "musl", "module": "/lib/ld-musl-x86_64.so.1", "covered": True, "reason": None}},
             {"serial": 2, "pid": 6, "ppid": 1, "comm": "d", "uid": 0}]
    r = account("t::x", Budget(0, None), procs, {}, {})
    assert r.processes[0].to_json()["allocator"] == {"kind": "musl", "module": "/lib/ld-musl-x86_64.so.1",
                                                     "covered": True}
    assert r.processes[1].to_json()["allocator"] is None


def test_allocator_defaults_apply_only_with_the_defaults_on():
    class S:
        def __init__(self, frames):
            self.frames, self.bytes, self.blocks, self.captured = frames, 16, 1, True

    p = _proc(9, "tcmalloc", True, stacks=[S([fr("TCMallocGuard::TCMallocGuard()", TC)])])
    r = LeakResult("t::x", Budget(0, None), processes=[p])
    assert len(apply(r, list(DEFAULT_SUPPRESSIONS)).matches) == 1
    assert apply(r, [Suppression("nothing_here", "marker")]).matches == {}


def test_key_paths_must_be_absolute_to_be_published():
    assert _absolute_list(b"/usr/lib/libjemalloc.so.2\0junk")
    assert _absolute_list(b"/a:/b /c\0")
    assert _absolute_list(b"\0")
    assert not _absolute_list(b"libjemalloc.so.2\0")
    assert not _absolute_list(b"/a::lib\0")


def test_the_watchdog_continues_nothing_when_its_map_fd_is_not_a_map(tmp_path):
    """The watchdog reads EOF, walks the map (here an fd that is not one: the
    walk ends at once) and exits 0."""
    fd = os.open(str(tmp_path), os.O_RDONLY)
    from pytest_memleak_ebpf.tracer import watchdog

    p = subprocess.Popen([sys.executable, "-I", "-S", watchdog.__file__, str(fd), "5"], pass_fds=(fd,),
                         stdin=subprocess.PIPE)
    p.stdin.close()
    assert p.wait(timeout=10) == 0
    assert watchdog.pending_tgids(fd) == []
    os.close(fd)
