"""A struct member's byte offset from the kernel's BTF (/sys/kernel/btf/vmlinux):
the BPF program reads task_struct.ptrace at that offset without compiling the
kernel's headers."""

from __future__ import annotations

import struct

VMLINUX = "/sys/kernel/btf/vmlinux"
_STRUCT, _UNION = 4, 5
# bytes of kind-specific data after each btf_type: fixed, or per vlen entry
_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}
_PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}


def member_offset(struct_name: str, member: str, path: str = VMLINUX) -> int | None:
    """Byte offset of `member` in `struct struct_name` (a direct member), or
    None when the BTF is missing, unreadable or lacks it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if len(data) < 24:
        return None
    magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != 0xEB9F:
        return None
    type_off, type_len, str_off, _str_len = struct.unpack_from("<4I", data, 8)
    types = hdr_len + type_off
    strings = hdr_len + str_off

    def name(off: int) -> bytes:
        start = strings + off
        return data[start:data.index(b"\0", start)]

    want_struct, want_member = struct_name.encode(), member.encode()
    pos, end = types, types + type_len
    while pos < end:
        name_off, info, _size = struct.unpack_from("<3I", data, pos)
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        pos += 12
        if kind == _STRUCT and name(name_off) == want_struct and vlen:
            for i in range(vlen):
                m_name, _m_type, m_off = struct.unpack_from("<3I", data, pos + 12 * i)
                if name(m_name) == want_member:
                    bits = m_off & 0xFFFFFF if kflag else m_off
                    return bits // 8 if bits % 8 == 0 else None
        pos += _FIXED.get(kind, 0) + _PER_VLEN.get(kind, 0) * vlen
    return None
