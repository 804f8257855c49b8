"""Offsets of the kernel struct members the exec pause reads (bpf/memleak.bpf.c
exec_key: the task's mm, the mm's executable file and environment, the file's
inode, its number, device, size and modification time), from this kernel's BTF (/sys/kernel/btf/vmlinux,
through libbpf).

The kernel headers BCC compiles with may be another version's (a distribution's
generic headers linked for a custom kernel): their struct layouts cannot be
trusted, BTF's can. Without BTF, or a member, cflags() is empty and the BPF
program is built without the exec pause (processes then get no allocator
answer: as before this feature, only the libc is probed).
"""

from __future__ import annotations

import ctypes

from .loading import libbpf

_BTF_KIND_STRUCT, _BTF_KIND_UNION = 4, 5
_BTF_KIND_TYPEDEF, _BTF_KIND_VOLATILE, _BTF_KIND_CONST, _BTF_KIND_RESTRICT = 8, 9, 10, 11
_BTF_KIND_TYPE_TAG = 18

# -D name -> (struct, member), or a list of (struct, member, byte offset
# inside it) alternatives, the first this kernel has: the inode's times are
# `i_mtime_sec`/`i_mtime_nsec` from 6.11, a struct timespec64 (`__i_mtime` in
# 6.7-6.10, `i_mtime` before) whose tv_nsec's low 32 bits are at +8
MEMBERS = {
    "OFF_TASK_MM": ("task_struct", "mm"),
    "OFF_TASK_PTRACE": ("task_struct", "ptrace"),
    "OFF_MM_EXE_FILE": ("mm_struct", "exe_file"),
    "OFF_MM_ENV_START": ("mm_struct", "env_start"),
    "OFF_MM_ENV_END": ("mm_struct", "env_end"),
    "OFF_FILE_INODE": ("file", "f_inode"),
    "OFF_INODE_INO": ("inode", "i_ino"),
    "OFF_INODE_SB": ("inode", "i_sb"),
    "OFF_SB_DEV": ("super_block", "s_dev"),
    "OFF_INODE_SIZE": ("inode", "i_size"),
    "OFF_INODE_MTIME_SEC": [("inode", "i_mtime_sec", 0), ("inode", "__i_mtime", 0), ("inode", "i_mtime", 0)],
    "OFF_INODE_MTIME_NSEC": [("inode", "i_mtime_nsec", 0), ("inode", "__i_mtime", 8), ("inode", "i_mtime", 8)],
}


# -D name -> a path of (struct, member) whose offsets add up; optional: a
# kernel without one only leaves its define out (stop_registers in
# memleak.bpf.c: the registers at a stop at exit come through ptrace then)
OPTIONAL = {
    "OFF_TASK_FSBASE": [("task_struct", "thread"), ("thread_struct", "fsbase")],
}


class _Type(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size", ctypes.c_uint32)]


class _Member(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32), ("offset", ctypes.c_uint32)]


def _lib():
    lib = libbpf()
    lib.btf__type_by_id.restype = ctypes.POINTER(_Type)
    lib.btf__type_by_id.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.btf__name_by_offset.restype = ctypes.c_char_p
    lib.btf__name_by_offset.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    return lib


def _member_offset(lib, btf, type_id: int, name: str, depth: int = 0) -> int | None:
    """Byte offset of member `name` of the struct/union `type_id`, looking
    into anonymous struct/union members."""
    t = lib.btf__type_by_id(btf, type_id)
    if not t or depth > 8:
        return None
    info = t.contents.info
    kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
    if kind not in (_BTF_KIND_STRUCT, _BTF_KIND_UNION):
        return None
    members = ctypes.cast(ctypes.addressof(t.contents) + ctypes.sizeof(_Type), ctypes.POINTER(_Member))
    for i in range(vlen):
        m = members[i]
        bits = m.offset & 0xFFFFFF if kflag else m.offset
        mname = lib.btf__name_by_offset(btf, m.name_off) if m.name_off else b""
        if mname == name.encode():
            return bits // 8
        if not mname:
            inner = _member_offset(lib, btf, _strip(lib, btf, m.type), name, depth + 1)
            if inner is not None:
                return bits // 8 + inner
    return None


def _strip(lib, btf, type_id: int) -> int:
    for _ in range(16):
        t = lib.btf__type_by_id(btf, type_id)
        if not t:
            return type_id
        kind = (t.contents.info >> 24) & 0x1F
        if kind not in (_BTF_KIND_TYPEDEF, _BTF_KIND_VOLATILE, _BTF_KIND_CONST, _BTF_KIND_RESTRICT,
                        _BTF_KIND_TYPE_TAG):
            return type_id
        type_id = t.contents.size
    return type_id


_CACHED: list[str] | None = None


def offsets() -> dict[str, int] | None:
    """MEMBERS' byte offsets in this kernel, or None."""
    try:
        lib = _lib()
    except RuntimeError:
        return None
    btf = lib.btf__load_vmlinux_btf()
    if not btf:
        return None
    try:
        out = {}
        for define, spec in MEMBERS.items():
            off = None
            for struct, member, extra in (spec if isinstance(spec, list) else [(*spec, 0)]):
                sid = lib.btf__find_by_name_kind(btf, struct.encode(), _BTF_KIND_STRUCT)
                off = _member_offset(lib, btf, sid, member) if sid > 0 else None
                if off is not None:
                    off += extra
                    break
            if off is None:
                return None
            out[define] = off
        for define, path in OPTIONAL.items():
            total = 0
            for struct, member in path:
                sid = lib.btf__find_by_name_kind(btf, struct.encode(), _BTF_KIND_STRUCT)
                off = _member_offset(lib, btf, sid, member) if sid > 0 else None
                if off is None:
                    break
                total += off
            else:
                out[define] = total
        return out
    finally:
        lib.btf__free(btf)


def cflags() -> list[str]:
    """-D flags of the offsets ([] without BTF: no exec pause)."""
    global _CACHED
    if _CACHED is None:
        offs = offsets()
        _CACHED = [f"-D{k}={v}" for k, v in offs.items()] if offs else []
    return list(_CACHED)
