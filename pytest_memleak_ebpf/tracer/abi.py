"""The C/Python contract, read from its one home: bpf/memleak.h.

The BPF program #includes the header; this module parses the same file, so
every id, flag, counter index and map value layout is written once. A define
or struct the header lacks fails at import, naming it.

parse() reads `#define NAME <integer>` lines and `struct NAME { ... };`
definitions (fields of u8..u64/s8..s64/char/unsigned char, arrays of them,
structs defined before; array sizes are integers, defines, or parameters
the loader substitutes, such as STACK_DEPTH). Header.struct() turns one
into a ctypes Structure.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

HEADER_NAME = "memleak.h"
SOURCE_NAME = "memleak.bpf.c"

_SCALARS = {
    "u8": ctypes.c_uint8, "u16": ctypes.c_uint16, "u32": ctypes.c_uint32, "u64": ctypes.c_uint64,
    "s8": ctypes.c_int8, "s16": ctypes.c_int16, "s32": ctypes.c_int32, "s64": ctypes.c_int64,
    "char": ctypes.c_char, "unsigned char": ctypes.c_ubyte,
}


class _BuildIdOffset(ctypes.Union):
    _fields_ = [("offset", ctypes.c_uint64), ("ip", ctypes.c_uint64)]


class BpfStackBuildId(ctypes.Structure):
    """The kernel's struct bpf_stack_build_id (uapi/linux/bpf.h): the one
    type the header uses that it does not define."""

    _anonymous_ = ("_u",)
    _fields_ = [("status", ctypes.c_int32), ("build_id", ctypes.c_ubyte * 20), ("_u", _BuildIdOffset)]


_KERNEL_STRUCTS = {"bpf_stack_build_id": BpfStackBuildId}


def bpf_dir() -> Path:
    """The directory of the BPF C source and its header: inside the installed
    package (the wheel ships bpf/ as pytest_memleak_ebpf/bpf), else the
    checkout's bpf/."""
    try:
        p = resources.files("pytest_memleak_ebpf").joinpath("bpf")
        if p.joinpath(SOURCE_NAME).is_file() and p.joinpath(HEADER_NAME).is_file():
            return Path(str(p))
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    p = Path(__file__).resolve().parent.parent.parent / "bpf"
    if (p / SOURCE_NAME).is_file() and (p / HEADER_NAME).is_file():
        return p
    raise FileNotFoundError(f"{SOURCE_NAME} and {HEADER_NAME} are missing from the installation "
                            f"(expected in pytest_memleak_ebpf/bpf/)")


def header_path() -> Path:
    return bpf_dir() / HEADER_NAME


@dataclass(frozen=True)
class Field:
    name: str
    type: str                 # a scalar name, or "struct NAME"
    dim: int | str | None     # array length (a number or a define/parameter name), None: not an array


@dataclass
class Header:
    defines: dict[str, int]
    structs: dict[str, list[Field]]
    text: str = ""

    def __post_init__(self):
        self._built: dict = {}

    def define(self, name: str) -> int:
        try:
            return self.defines[name]
        except KeyError:
            raise KeyError(f"{HEADER_NAME} defines no {name}") from None

    def struct(self, name: str, **params: int) -> type[ctypes.Structure]:
        """struct `name` as a ctypes Structure; params give the loader's
        parameters its array sizes use (STACK_DEPTH=32, ...)."""
        key = (name, tuple(sorted(params.items())))
        if key in self._built:
            return self._built[key]
        if name not in self.structs:
            raise KeyError(f"{HEADER_NAME} defines no struct {name}")
        fields = []
        for f in self.structs[name]:
            if f.type.startswith("struct "):
                sub = f.type[len("struct "):]
                ctype = _KERNEL_STRUCTS.get(sub) or self.struct(sub, **params)
            else:
                ctype = _SCALARS[f.type]
            if f.dim is not None:
                ctype = ctype * self._dim(f.dim, params, name)
            fields.append((f.name, ctype))
        cls = type(name, (ctypes.Structure,), {"_fields_": fields})
        self._built[key] = cls
        return cls

    def _dim(self, dim, params: dict, struct: str) -> int:
        if isinstance(dim, int):
            return dim
        if dim in params:
            return int(params[dim])
        if dim in self.defines:
            return self.defines[dim]
        raise KeyError(f"struct {struct}: array size {dim} is neither defined in {HEADER_NAME} nor given")


_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+([^\n]*?)[ \t]*$", re.M)
_STRUCT = re.compile(r"\bstruct\s+(\w+)\s*\{(.*?)\}\s*;", re.S)
_DECL = re.compile(r"^(struct\s+\w+|unsigned\s+char|\w+)\s+(.+)$", re.S)
_DECLARATOR = re.compile(r"^(\w+)\s*(?:\[\s*(\w+)\s*\])?$")


def _int(text: str) -> int:
    t = re.sub(r"(?i)(?<=[0-9a-f])[ul]+$", "", text.strip())
    if re.fullmatch(r"0[0-7]+", t):
        return int(t, 8)
    return int(t, 0)


def parse(text: str) -> Header:
    """The defines and structs of a header in the form described above;
    ValueError naming the line for anything else."""
    code = _COMMENT.sub(" ", text)
    defines: dict[str, int] = {}
    for name, value in _DEFINE.findall(code):
        try:
            defines[name] = _int(value)
        except ValueError:
            raise ValueError(f"{HEADER_NAME}: #define {name} {value}: not an integer") from None
    structs: dict[str, list[Field]] = {}
    for sname, body in _STRUCT.findall(code):
        fields = []
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            m = _DECL.match(" ".join(decl.split()))
            if m is None:
                raise ValueError(f"{HEADER_NAME}: struct {sname}: cannot read field {decl!r}")
            ftype = m.group(1)
            if not ftype.startswith("struct ") and ftype not in _SCALARS:
                raise ValueError(f"{HEADER_NAME}: struct {sname}: unknown type {ftype!r}")
            if ftype.startswith("struct ") and ftype[7:] not in structs and ftype[7:] not in _KERNEL_STRUCTS:
                raise ValueError(f"{HEADER_NAME}: struct {sname}: {ftype} is not defined before it")
            for d in m.group(2).split(","):
                dm = _DECLARATOR.match(d.strip())
                if dm is None:
                    raise ValueError(f"{HEADER_NAME}: struct {sname}: cannot read field {d.strip()!r}")
                dim = dm.group(2)
                if dim is not None and dim[0].isdigit():
                    dim = _int(dim)
                fields.append(Field(dm.group(1), ftype, dim))
        structs[sname] = fields
    return Header(defines, structs, text)


HEADER = parse(header_path().read_text())
_d = HEADER.define

# allocator function ids (the attach cookie of a uprobe_multi site)
FN_MALLOC, FN_CALLOC, FN_REALLOC, FN_REALLOCARRAY = _d("FN_MALLOC"), _d("FN_CALLOC"), _d("FN_REALLOC"), _d("FN_REALLOCARRAY")
FN_POSIX_MEMALIGN, FN_MEMALIGN, FN_VALLOC, FN_PVALLOC = (_d("FN_POSIX_MEMALIGN"), _d("FN_MEMALIGN"),
                                                         _d("FN_VALLOC"), _d("FN_PVALLOC"))
FN_FREE = _d("FN_FREE")
NEST_FN_BIT = _d("NEST_FN_BIT")
CTX_ARG_FN_BIT = _d("CTX_ARG_FN_BIT")
PAUSE_STOPPED, PAUSE_KEYED = _d("PAUSE_STOPPED"), _d("PAUSE_KEYED")
# track_t.flags, proc_t.flags, event_t.type
TF_ROOT, TF_ALLOCS, TF_SPAWNER, TF_SPAWNED, TF_RING = (_d("TF_ROOT"), _d("TF_ALLOCS"), _d("TF_SPAWNER"),
                                                       _d("TF_SPAWNED"), _d("TF_RING"))
PF_EXITED, PF_TERMINATED = _d("PF_EXITED"), _d("PF_TERMINATED")
EV_EXEC, EV_OPEN = _d("EV_EXEC"), _d("EV_OPEN")
TF_KINDS, TF_VFORK = _d("TF_KINDS"), _d("TF_VFORK")
EV_EXIT_STOPPED, EV_EXIT_TRACED, EV_EXIT_UNPAUSED = _d("EV_EXIT_STOPPED"), _d("EV_EXIT_TRACED"), _d("EV_EXIT_UNPAUSED")
PENDING_AT_EXIT = _d("PENDING_AT_EXIT")
STOP_REGS = _d("STOP_REGS")
# the counters array
CTR_LOST_PROCS, CTR_LOST_EVENTS, CTR_LOST_STACKS, CTR_NEW_STACKS = (_d("CTR_LOST_PROCS"), _d("CTR_LOST_EVENTS"),
                                                                     _d("CTR_LOST_STACKS"), _d("CTR_NEW_STACKS"))
CTR_PAUSE_EVENTS = _d("CTR_PAUSE_EVENTS")
CTR_NCOUNTERS = _d("CTR_NCOUNTERS")
SERIAL_CPU_BITS = _d("SERIAL_CPU_BITS")
FNV_OFFSET, FNV_PRIME = _d("FNV_OFFSET"), _d("FNV_PRIME")
BUILD_ID_VALID, BUILD_ID_IP = _d("BUILD_ID_VALID"), _d("BUILD_ID_IP")
RING = _d("RING")
CTR_LOST_DEAD = _d("CTR_LOST_DEAD")
TABLE_WAYS, TABLE_MIX, TABLE_MIX2, TABLE_REGION_SLOTS = (_d("TABLE_WAYS"), _d("TABLE_MIX"), _d("TABLE_MIX2"),
                                                         _d("TABLE_REGION_SLOTS"))
STACK_STAMP_NS = _d("STACK_STAMP_NS")
# placeholder helper id -> kernel function (KFUNC_<NAME> stands for bpf_<name>)
KFUNCS = {v: "bpf_" + k[len("KFUNC_"):].lower() for k, v in HEADER.defines.items() if k.startswith("KFUNC_")}

Event = HEADER.struct("event_t")   # a ring-buffer record
Pause = HEADER.struct("pause_t")   # a perf-buffer record: an image stopped at exec


def fnv_ips(ips: list[int]) -> int:
    """The BPF program's hash of a plain-ip stack (capture_stack)."""
    mask = (1 << 64) - 1
    h = FNV_OFFSET ^ len(ips)
    for ip in ips:
        h = ((h ^ ip) * FNV_PRIME) & mask
    return h
