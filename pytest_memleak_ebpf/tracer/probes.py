"""Probes: which functions of which binary the tracer probes, where in them
(placement.py decodes their first instructions), and how the probes are
attached (preflight.ATTACH_MODES: uprobe session links, 6.13+; an entry and a
return uprobe_multi link, 6.6+; a perf-event uprobe per site through BCC).

The allocator sites are data (ALLOCATOR_SITES): probing one more allocator
is one more entry, probing another binary is another `binary` argument to
attach_allocators().
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .. import placement as _placement
from ..preflight import ATTACH_MODES
from ..procmaps import read_maps
from . import abi
from .loading import BPF_TRACE_UPROBE_MULTI, BPF_TRACE_UPROBE_SESSION, link_uprobe_multi


@dataclass(frozen=True)
class AllocatorSite:
    function: str                 # the symbol probed
    fn_id: int                    # its FN_* id (memleak.h): the attach cookie of its uprobe_multi site
    registers: tuple[str, ...]    # argument registers the entry reads (placement keeps them intact)
    has_return: bool              # a return probe records the block
    program: str                  # perf mode: its programs <program>_entry / <program>_return
    session_program: str          # session mode: the program of its link


ALLOCATOR_SITES: tuple[AllocatorSite, ...] = (
    AllocatorSite("malloc", abi.FN_MALLOC, ("rdi",), True, "malloc", "malloc_session"),
    AllocatorSite("calloc", abi.FN_CALLOC, ("rdi", "rsi"), True, "calloc", "alloc_session"),
    AllocatorSite("realloc", abi.FN_REALLOC, ("rdi", "rsi"), True, "realloc", "alloc_session"),
    AllocatorSite("reallocarray", abi.FN_REALLOCARRAY, ("rdi", "rsi", "rdx"), True, "reallocarray", "alloc_session"),
    AllocatorSite("posix_memalign", abi.FN_POSIX_MEMALIGN, ("rdi", "rsi", "rdx"), True, "posix_memalign",
                  "alloc_session"),
    # aligned_alloc has memalign's signature: memalign's id and programs
    AllocatorSite("aligned_alloc", abi.FN_MEMALIGN, ("rdi", "rsi"), True, "memalign", "alloc_session"),
    AllocatorSite("memalign", abi.FN_MEMALIGN, ("rdi", "rsi"), True, "memalign", "alloc_session"),
    AllocatorSite("valloc", abi.FN_VALLOC, ("rdi",), True, "valloc", "alloc_session"),
    AllocatorSite("pvalloc", abi.FN_PVALLOC, ("rdi",), True, "pvalloc", "alloc_session"),
    # entry only: an entry-only uprobe_multi link in session mode
    AllocatorSite("free", abi.FN_FREE, ("rdi",), False, "free", "free_entry"),
)

# CPython's pymalloc: the allocator of Python objects (PyObject_*) and of
# PyMem_* unless PYTHONMALLOC says otherwise. Its functions are the targets of
# the allocator table the public entry points call through, so no caller can
# inline past them; their arguments follow the table's context pointer
# (CTX_ARG_FN_BIT). A request over 512 B goes on to malloc, which libc's probes
# record: the pymalloc return finds that block recorded by the nested call
# (NEST_FN_BIT). Probed in a pytest process only, while a window is open
# (attach_pymalloc).
_PYMALLOC_BITS = abi.NEST_FN_BIT | abi.CTX_ARG_FN_BIT
PYMALLOC_SITES: tuple[AllocatorSite, ...] = (
    AllocatorSite("_PyObject_Malloc", abi.FN_MALLOC | _PYMALLOC_BITS, ("rsi",), True, "", "alloc_session"),
    AllocatorSite("_PyObject_Calloc", abi.FN_CALLOC | _PYMALLOC_BITS, ("rsi", "rdx"), True, "", "alloc_session"),
    AllocatorSite("_PyObject_Realloc", abi.FN_REALLOC | _PYMALLOC_BITS, ("rsi", "rdx"), True, "", "alloc_session"),
    AllocatorSite("_PyObject_Free", abi.FN_FREE | abi.CTX_ARG_FN_BIT, ("rsi",), False, "", "alloc_session"),
)


def interpreter_objects(tgid: int) -> list[str]:
    """The files process `tgid` maps that may hold CPython's pymalloc: its
    libpython, then its executable."""
    maps = [m.path for m in read_maps(f"/proc/{tgid}/maps")]
    out = [p for p in dict.fromkeys(maps) if os.path.basename(p).startswith("libpython")]
    try:
        out.append(os.path.realpath(f"/proc/{tgid}/exe"))
    except OSError:
        pass
    return out


def place_pymalloc(tgid: int) -> tuple[str, list[PlacedSite]]:
    """(binary, its placed PYMALLOC_SITES) of process `tgid`'s interpreter;
    LookupError saying why when no object it maps has all four functions."""
    tried = []
    for binary in interpreter_objects(tgid):
        try:
            placed, _ = place_sites(binary, PYMALLOC_SITES)
        except Exception as exc:   # noqa: BLE001 - unreadable or not ELF: the next candidate
            tried.append(f"{binary}: {exc}")
            continue
        if len(placed) == len(PYMALLOC_SITES):
            return binary, placed
        tried.append(f"{binary} lacks " + ", ".join(sorted({s.function for s in PYMALLOC_SITES}
                                                           - {p.site.function for p in placed})))
    raise LookupError("CPython's pymalloc functions (_PyObject_Malloc, ...) were not found in its symbol "
                      "tables (" + ("; ".join(tried) or "no interpreter mapped") + ")")


def attach_pymalloc(bpf, mode: str, binary: str, placed: list[PlacedSite], pid: int) -> list[int]:
    """Links of the placed pymalloc sites in process `pid` only, made as the
    allocator sites' are in `mode` (session or multi). The perf mode cannot
    filter by process: ValueError."""
    if mode not in ("session", "multi"):
        raise ValueError(f"the {mode} attach mode cannot probe one process only")
    links: list[int] = []
    try:
        _ATTACH[mode](bpf, binary, placed, links, pid=pid)
    except OSError:
        for fd in links:
            os.close(fd)
        raise
    return links


@dataclass(frozen=True)
class ExitSite:
    """A libc function where a process ends on purpose: its uprobe program
    pauses a tracked process whose test wants leak kinds (exitpause.py)."""
    function: str
    program: str


# every normal exit (exit() after the atexit handlers, the last thread's
# pthread_exit) goes through _exit; abort() raises SIGABRT
EXIT_SITES: tuple[ExitSite, ...] = (ExitSite("_exit", "exit_pause"), ExitSite("abort", "exit_pause"))
# musl's exit() ends in _Exit, not _exit (which calls _Exit too); glibc's
# _Exit is an alias of _exit (one site there: EXIT_SITES)
MUSL_EXIT_SITES: tuple[ExitSite, ...] = (ExitSite("_Exit", "exit_pause"), ExitSite("abort", "exit_pause"))

# The uprobe_multi pair (mode multi): every site's entry, and the returns
MULTI_PROGRAMS = ("alloc_entry", "alloc_return")


@dataclass
class ProbeInfo:
    function: str
    library: str
    offset: int
    instruction: str
    emulated: bool
    return_probe: bool
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlacedSite:
    site: AllocatorSite
    address: int        # probe virtual address
    file_offset: int    # probe file offset (uprobe_multi links)


@dataclass
class Attached:
    """What attach_allocators() attached: the BPF object the programs are
    in, the mode, the sites, the link fds (closed first at exit) and the
    modes that failed (mode -> reason)."""

    bpf: object
    mode: str
    probes: list[ProbeInfo]
    links: list[int] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def find_libc() -> str:
    """The libc this process maps (the one dynamically linked programs load)."""
    for m in read_maps(executable=False):
        if os.path.basename(m.path).startswith("libc.so"):
            return os.path.realpath(m.path)
    for cand in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6", "/usr/lib64/libc.so.6"):
        if os.path.exists(cand):
            return os.path.realpath(cand)
    raise FileNotFoundError("libc.so.6 not found")


def place_sites(binary: str, sites=ALLOCATOR_SITES) -> tuple[list[PlacedSite], list[ProbeInfo]]:
    """Where each site's probe goes in `binary` (aliases of a function
    already placed, and functions the binary lacks, are left out)."""
    placed = _placement.place_probes(binary, {s.function: s.registers for s in sites})
    seen_addresses: set[int] = set()
    out, probes = [], []
    for site in sites:
        sp = placed.get(site.function)
        if sp is None or sp.address in seen_addresses:
            continue  # not in this binary, or an alias already probed
        seen_addresses.add(sp.address)
        pl = sp.placement
        # A return probe hijacks the return address at [rsp] where it sits:
        # it may move past the prologue only if nothing skipped touched rsp
        # or memory (placement.return_probe_ok); otherwise both stay at +0.
        if site.has_return and not getattr(pl, "return_probe_ok", False):
            off, insn, emulated = 0, "entry", pl.emulated and pl.offset == 0
        else:
            off, insn, emulated = pl.offset, pl.insn, pl.emulated
        out.append(PlacedSite(site, sp.address + off, sp.file_offset + off))
        probes.append(ProbeInfo(site.function, binary, off, insn, emulated, site.has_return, tuple(sp.aliases)))
    return out, probes


def attach_allocators(bpf, binary: str, modes=ATTACH_MODES, programs=None, sites=ALLOCATOR_SITES) -> Attached:
    """Place the allocator probes in `binary` and attach them the first way
    of `modes` the kernel accepts. `bpf` holds the programs of modes[0];
    programs(mode) returns the BPF object of a later mode (the BPF source
    compiles one mode's programs; the caller drops the previous object),
    None: `bpf` has every mode's programs. The last mode's failure raises."""
    placed, probes = place_sites(binary, sites)
    result = Attached(bpf, modes[0], probes)
    for i, mode in enumerate(modes):
        if i and programs is not None:
            result.bpf = programs(mode)
        try:
            _ATTACH[mode](result.bpf, binary, placed, result.links)
            result.mode = mode
            return result
        except Exception as e:
            if mode == modes[-1]:
                raise
            result.errors[mode] = str(e)
            for fd in result.links:
                os.close(fd)
            result.links.clear()
    raise ValueError("no attach mode given")


def _attach_session(bpf, binary: str, placed: list[PlacedSite], links: list[int], pid: int = 0) -> None:
    """A link per session program: malloc's session (a program of its own),
    the other allocators' session (one program, the attach cookie says
    which), and free's entry-only uprobe_multi link. pid: in that process only."""
    groups: dict[str, list[PlacedSite]] = {}
    for p in placed:
        groups.setdefault(p.site.session_program, []).append(p)
    for name, group in groups.items():
        attach_type = BPF_TRACE_UPROBE_SESSION if group[0].site.has_return else BPF_TRACE_UPROBE_MULTI
        prog = bpf.load_func(name.encode(), bpf.KPROBE, attach_type=attach_type)
        links.append(link_uprobe_multi(prog.fd, binary, [(p.file_offset, p.site.fn_id) for p in group],
                                       False, attach_type=attach_type, pid=pid))


def _attach_multi(bpf, binary: str, placed: list[PlacedSite], links: list[int], pid: int = 0) -> None:
    entry_name, return_name = MULTI_PROGRAMS
    entry = bpf.load_func(entry_name.encode(), bpf.KPROBE, attach_type=BPF_TRACE_UPROBE_MULTI)
    ret = bpf.load_func(return_name.encode(), bpf.KPROBE, attach_type=BPF_TRACE_UPROBE_MULTI)
    links.append(link_uprobe_multi(entry.fd, binary, [(p.file_offset, p.site.fn_id) for p in placed], False,
                                   pid=pid))
    links.append(link_uprobe_multi(ret.fd, binary, [(p.file_offset, p.site.fn_id) for p in placed
                                                    if p.site.has_return], True, pid=pid))


def _attach_perf(bpf, binary: str, placed: list[PlacedSite], links: list[int]) -> None:
    lib = binary.encode()
    for p in placed:
        bpf.attach_uprobe(name=lib, addr=p.address, fn_name=f"{p.site.program}_entry".encode())
        if p.site.has_return:
            bpf.attach_uretprobe(name=lib, addr=p.address, fn_name=f"{p.site.program}_return".encode())


_ATTACH = {"session": _attach_session, "multi": _attach_multi, "perf": _attach_perf}


# -- the allocator of a process (allocators.Allocator) -------------------------

SITE_BY_FUNCTION = {s.function: s for s in ALLOCATOR_SITES}


def allocator_sites(allocator) -> tuple[AllocatorSite, ...]:
    """The probe sites of an allocators.Allocator answer: each of its sites
    (operator new/delete, je_/tc_/mi_ entry points included) with the
    programs and FN id of its `family`. Sites of any allocator but glibc's
    carry NEST_FN_BIT: their calls may nest in or tail-call one another
    (memleak.h), so each logical call is counted once."""
    nests = allocator.kind not in ("glibc", "static-glibc")
    out = []
    for s in allocator.sites:
        base = SITE_BY_FUNCTION.get(s.family or "")
        if base is None:
            continue
        if nests and base.has_return:
            out.append(AllocatorSite(s.name, base.fn_id | abi.NEST_FN_BIT, base.registers, True,
                                     base.program + "_nest", "alloc_session"))
        else:
            out.append(AllocatorSite(s.name, base.fn_id, base.registers, base.has_return, base.program,
                                     base.session_program))
    return tuple(out)


def attach_exit_probes(bpf, binary: str, sites=EXIT_SITES) -> int:
    """Attach the exit sites' programs (perf-event uprobes at the functions'
    entries); returns how many were attached (a site the binary lacks is
    left out)."""
    n = 0
    for site in sites:
        try:
            bpf.attach_uprobe(name=binary.encode(), sym=site.function.encode(), fn_name=site.program.encode())
        except Exception:
            continue
        n += 1
    return n
