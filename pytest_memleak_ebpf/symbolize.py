"""Offline symbolization of BUILD-ID user stacks.

The BPF side records user stacks with ``BPF_F_USER_BUILD_ID``: each frame is
either ``(build_id[20], file_offset)`` -- ``file_offset`` being
``vma->vm_pgoff * PAGE_SIZE + ip - vma->vm_start``, i.e. the offset of the
instruction *in the ELF file* -- or, when the kernel could not read the build
id, the raw instruction pointer.  The traced processes are normally gone by the
time a report is rendered, so everything here works from files on disk:

* the ELF for a build id is found among the files registered with
  :meth:`Symbolizer.add_candidate` (executables and shared objects the traced
  processes used), then among the libraries of the dynamic loader cache
  (``/etc/ld.so.cache``), then as ``<debug_dir>/.build-id/xx/rest.debug``;
* the file offset is turned into a virtual address with the module's
  ``PT_LOAD`` program headers;
* the function comes from ``.symtab`` (of the separate debug file when there is
  one, else of the module) or ``.dynsym``;
* ``file:line`` comes from DWARF ``.debug_line``, the compile unit being
  located through ``.debug_aranges`` (or, for CUs it does not describe, a
  one-time index of the CUs' address ranges).  A small built-in DWARF reader
  does this (pyelftools, used as the fallback, is 10-100x slower on large
  libraries; see the notes above ``_uleb`` and bench/elf_lines.py, which
  measures both on libc's and libpython's line tables).

ELF itself (headers, build ids, symbol tables, sections) is read by elf.py;
resolved frames are cached once per session by resolve.Resolver.

Nothing in here raises on missing or corrupt files: frames degrade to
``function+offset`` without a line, or to ``[unknown]``.
"""

from __future__ import annotations

import bisect
import logging
import os
import shutil
import struct
import subprocess
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

from .elf import (SHT_DYNSYM, SHT_SYMTAB, Sections, SymbolTable, debug_load_segments, debuglink, dwarf_info,
                  load_segments, norm_build_id, read_build_id, stat_key)

__all__ = ["Frame", "Symbolizer", "read_build_id", "ld_cache_paths"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Public result type
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    function: str | None
    """Symbol name (C++ names demangled when ``c++filt`` is available)."""
    offset: int | None
    """Offset of the address (not address-1) from the start of ``function``."""
    module: str | None
    """Path of the ELF module (the real file, never the separate .debug file)."""
    file: str | None = None
    """Source file from DWARF line info, when available."""
    line: int | None = None
    build_id: str | None = None
    """Build id (hex) for build-id frames."""
    address: int | None = None
    """The file offset (build-id frames) or the raw ip (unresolved frames)."""


# --------------------------------------------------------------------------
# Dynamic loader cache
# --------------------------------------------------------------------------

_LD_CACHE_FILE = "/etc/ld.so.cache"
_NEW_CACHE_MAGIC = b"glibc-ld.so.cache1.1"


def _parse_ld_so_cache(data: bytes) -> list[str] | None:
    """Paths in a new-format (glibc >= 2.32 default) ld.so.cache, or None."""
    if not data.startswith(_NEW_CACHE_MAGIC) or len(data) < 48:
        return None
    end = "<" if struct.pack("=I", 1) == struct.pack("<I", 1) else ">"
    nlibs, _len_strings = struct.unpack_from(end + "II", data, 20)
    if 48 + nlibs * 24 > len(data):
        return None
    out = []
    for i in range(nlibs):
        _flags, key, value, _osv, _hwcap = struct.unpack_from(end + "iIIIQ", data, 48 + i * 24)
        if value >= len(data):
            continue
        stop = data.find(b"\0", value)
        if stop > value:
            out.append(os.fsdecode(data[value:stop]))
    return out


def _ldconfig_p() -> list[str]:
    exe = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None)
    if exe is None:
        return []
    try:
        res = subprocess.run([exe, "-p"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    out = []
    for line in res.stdout.decode("utf-8", "replace").splitlines():
        if " => " in line:
            out.append(line.rsplit(" => ", 1)[1].strip())
    return out


def ld_cache_paths(cache_file: str = _LD_CACHE_FILE) -> list[str]:
    """Library paths known to the dynamic loader (parsed from ld.so.cache,
    falling back to ``ldconfig -p``), one path per distinct file, preferring
    SONAME-style names (``libfoo.so.1``) over development symlinks."""
    paths: list[str] | None = None
    try:
        with open(cache_file, "rb") as f:
            paths = _parse_ld_so_cache(f.read())
    except OSError:
        paths = None
    if paths is None:
        paths = _ldconfig_p()
    seen: dict[tuple, int] = {}
    out: list[str] = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        k = (st.st_dev, st.st_ino)
        if k in seen:
            idx = seen[k]
            if out[idx].endswith(".so") and not p.endswith(".so"):
                out[idx] = p
            continue
        seen[k] = len(out)
        out.append(p)
    return out


_ld_scan_lock = threading.Lock()
_ld_scan: tuple[tuple | None, dict[bytes, str]] | None = None


def _ld_cache_build_ids(cache_file: str = _LD_CACHE_FILE) -> dict[bytes, str]:
    """normalised build id -> path for every library of the loader cache.
    Computed once per content of ld.so.cache (keyed by its stat)."""
    global _ld_scan
    try:
        key: tuple | None = stat_key(os.stat(cache_file))
    except OSError:
        key = None
    with _ld_scan_lock:
        if _ld_scan is not None and _ld_scan[0] == key and key is not None:
            return _ld_scan[1]
        mapping: dict[bytes, str] = {}
        for p in ld_cache_paths(cache_file):
            bid = read_build_id(p)
            if bid:
                mapping.setdefault(norm_build_id(bid), p)
        _ld_scan = (key, mapping)
        return mapping


# --------------------------------------------------------------------------
# DWARF line tables
#
# The hot path reads DWARF directly from the section bytes: .debug_aranges to
# find the compile unit, the CU's top DIE for DW_AT_stmt_list/DW_AT_comp_dir,
# then the CU's line program, decoded once into per-sequence sorted arrays.
# pyelftools is the fallback for anything this reader does not understand:
# measured on libc (with libc6-dbg) and libpython3.11, pyelftools spends
# ~4-13 ms parsing each CU's whole abbreviation table and ~15 us per line row
# (an object and a state copy per opcode), i.e. 0.1-0.7 s per compile unit,
# 4-8 s for 50 frames spread over 40 CUs, against ~10x less here.
# --------------------------------------------------------------------------


def _cstrings(data: bytes, pos: int, out: list) -> int:
    """Append NUL-terminated strings to `out` up to an empty one; return the
    position after it (DWARF 2-4 include_directories)."""
    while True:
        stop = data.index(b"\0", pos)
        if stop == pos:
            return pos + 1
        out.append(bytes(data[pos:stop]))
        pos = stop + 1


def _uleb(data, pos: int) -> tuple[int, int]:
    b = data[pos]
    if b < 0x80:
        return b, pos + 1
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _sleb(data, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            if b & 0x40:
                result -= 1 << shift
            return result, pos


_LINE_SHIFT = 32
_LINE_MASK = (1 << _LINE_SHIFT) - 1


class _Sequences:
    """Line rows of one CU: a list of sequences, each with sorted parallel
    arrays ``addrs`` and ``infos`` (``file << 32 | line``), compacted so that a
    row is kept only where the (file, line) changes; at one address the last
    row wins (as llvm-symbolizer and gdb do)."""

    __slots__ = ("starts", "ends", "seqs")

    def __init__(self, seqs: list[tuple[list[int], list[int], int]]):
        seqs = [s for s in seqs if s[0]]
        seqs.sort(key=lambda s: s[0][0])
        self.seqs = seqs
        self.starts = [s[0][0] for s in seqs]
        self.ends = [s[2] for s in seqs]

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[int, bool, int, int]]) -> _Sequences:
        """Build from ``(address, end_sequence, file, line)`` in program order."""
        seqs = []
        addrs: list[int] = []
        infos: list[int] = []
        last_addr = last_info = -1
        for address, end_seq, file, line in rows:
            if end_seq:
                if addrs:
                    seqs.append((addrs, infos, address))
                addrs, infos = [], []
                last_addr = last_info = -1
                continue
            info = (file << _LINE_SHIFT) | (line & _LINE_MASK)
            if address == last_addr:
                infos[-1] = info
                last_info = info
            elif info != last_info:
                addrs.append(address)
                infos.append(info)
                last_addr, last_info = address, info
        return cls(seqs)

    def lookup(self, vaddr: int) -> tuple[int, int] | None:
        j = bisect.bisect_right(self.starts, vaddr) - 1
        stop = max(j - 4, -1)
        while j > stop:
            if vaddr < self.ends[j]:
                addrs, infos, _end = self.seqs[j]
                i = bisect.bisect_right(addrs, vaddr) - 1
                if i >= 0:
                    info = infos[i]
                    return info >> _LINE_SHIFT, info & _LINE_MASK
                return None
            j -= 1
        return None


def _decode_line_program(data: bytes, pos: int, end: int, min_inst: int, line_base: int,
                         line_range: int, opcode_base: int, std_lens: Sequence[int],
                         default_file: int, little: bool) -> _Sequences:
    """Run a DWARF (v2-v5) line number program into :class:`_Sequences`."""
    if not line_range or opcode_base < 1:
        raise ValueError("bad line program header")
    aadv = [0] * 256
    ladv = [0] * 256
    for op in range(opcode_base, 256):
        adj = op - opcode_base
        aadv[op] = (adj // line_range) * min_inst
        ladv[op] = line_base + adj % line_range
    const_add_pc = ((255 - opcode_base) // line_range) * min_inst
    order = "little" if little else "big"
    end = min(end, len(data))
    seqs = []
    addrs: list[int] = []
    infos: list[int] = []
    last_addr = last_info = -1
    address, fshift, line = 0, default_file << _LINE_SHIFT, 1
    mask = _LINE_MASK
    while pos < end:
        op = data[pos]
        pos += 1
        if op >= opcode_base:
            address += aadv[op]
            line += ladv[op]
        elif op == 1:  # DW_LNS_copy
            pass
        elif op == 0:  # extended opcode
            n, pos = _uleb(data, pos)
            sub_end = pos + n
            ex = data[pos] if n else 0
            pos = sub_end
            if ex == 1:  # DW_LNE_end_sequence
                if addrs:
                    seqs.append((addrs, infos, address))
                addrs, infos = [], []
                last_addr = last_info = -1
                address, fshift, line = 0, default_file << _LINE_SHIFT, 1
            elif ex == 2:  # DW_LNE_set_address
                address = int.from_bytes(data[sub_end - n + 1:sub_end], order)
            # define_file, set_discriminator, vendor extensions: nothing to do
            continue
        else:
            if op == 2:  # DW_LNS_advance_pc
                v, pos = _uleb(data, pos)
                address += v * min_inst
            elif op == 3:  # DW_LNS_advance_line
                v, pos = _sleb(data, pos)
                line += v
            elif op == 4:  # DW_LNS_set_file
                v, pos = _uleb(data, pos)
                fshift = v << _LINE_SHIFT
            elif op == 8:  # DW_LNS_const_add_pc
                address += const_add_pc
            elif op == 9:  # DW_LNS_fixed_advance_pc
                address += int.from_bytes(data[pos:pos + 2], order)
                pos += 2
            elif op in (6, 7, 10, 11):  # negate_stmt, basic_block, prologue_end, epilogue_begin
                pass
            else:  # set_column (5), set_isa (12), unknown standard opcodes
                for _ in range(std_lens[op - 1] if op - 1 < len(std_lens) else 0):
                    _v, pos = _uleb(data, pos)
            continue
        # a row is appended (special opcode or DW_LNS_copy)
        info = fshift | (line & mask)
        if address == last_addr:
            infos[-1] = info
            last_info = info
        elif info != last_info:
            addrs.append(address)
            infos.append(info)
            last_addr = address
            last_info = info
    if addrs:  # unterminated sequence: keep what we have, bounded by its last row
        seqs.append((addrs, infos, addrs[-1] + 1))
    return _Sequences(seqs)


class _LineTable:
    """One CU's decoded line program plus its file name table."""

    __slots__ = ("seqs", "_names", "_dir_of", "_dirs", "_comp_dir", "_v5", "_cache")

    def __init__(self, seqs: _Sequences, names: list, dir_of: list[int], dirs: list,
                 comp_dir: str | None, v5: bool):
        self.seqs = seqs
        self._names, self._dir_of, self._dirs = names, dir_of, dirs
        self._comp_dir = comp_dir
        self._v5 = v5
        self._cache: dict[int, str | None] = {}

    def file_name(self, idx: int) -> str | None:
        if idx in self._cache:
            return self._cache[idx]
        name = None
        try:
            i = idx if self._v5 else idx - 1
            if 0 <= i < len(self._names):
                name = _dec(self._names[i])
                d = self._dir_of[i]
                if self._v5:
                    dname = _dec(self._dirs[d]) if 0 <= d < len(self._dirs) else None
                else:
                    dname = _dec(self._dirs[d - 1]) if 0 < d <= len(self._dirs) else None
                if not os.path.isabs(name):
                    if dname:
                        name = os.path.join(dname, name)
                    if not os.path.isabs(name) and self._comp_dir:
                        name = os.path.join(self._comp_dir, name)
                name = os.path.normpath(name)
        except Exception:  # malformed tables: no file name
            name = None
        self._cache[idx] = name
        return name

    def lookup(self, vaddr: int) -> tuple[str | None, int] | None:
        hit = self.seqs.lookup(vaddr)
        if hit is None or not hit[1]:
            return None  # no row, or line 0 ("no source line")
        return self.file_name(hit[0]), hit[1]


def _dec(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


_FORM_FIXED = {
    0x0B: 1, 0x05: 2, 0x06: 4, 0x07: 8, 0x1E: 16,  # data1/2/4/8/16
    0x0C: 1, 0x19: 0, 0x21: 0,                     # flag, flag_present, implicit_const
    0x11: 1, 0x12: 2, 0x13: 4, 0x14: 8, 0x20: 8,   # ref1/2/4/8, ref_sig8
    0x1C: 4, 0x24: 8,                              # ref_sup4/8
    0x25: 1, 0x26: 2, 0x27: 3, 0x28: 4,            # strx1..4
    0x29: 1, 0x2A: 2, 0x2B: 3, 0x2C: 4,            # addrx1..4
}
# strp, sec_offset, line_strp, strp_sup, GNU_ref_alt, GNU_strp_alt
_FORM_OFFSET = {0x0E, 0x17, 0x1F, 0x1D, 0x1F20, 0x1F21}
_FORM_ULEB = {0x0F, 0x15, 0x1A, 0x1B, 0x22, 0x23, 0x1F01, 0x1F02}
_ADDRX_FORMS = {0x1B, 0x29, 0x2A, 0x2B, 0x2C, 0x1F01}
_STRX_FORMS = {0x1A, 0x25, 0x26, 0x27, 0x28, 0x1F02}
DW_AT_stmt_list, DW_AT_low_pc, DW_AT_high_pc, DW_AT_comp_dir = 0x10, 0x11, 0x12, 0x1B
DW_AT_ranges = 0x55
DW_AT_str_offsets_base, DW_AT_addr_base, DW_AT_rnglists_base = 0x72, 0x73, 0x74
DW_AT_GNU_ranges_base, DW_AT_GNU_addr_base = 0x2132, 0x2133
DW_LNCT_path, DW_LNCT_directory_index = 1, 2


class _CU:
    __slots__ = ("offset", "version", "addr_size", "off_size", "abbrev_off", "die_pos",
                 "end", "_attrs")

    def __init__(self, offset, version, addr_size, off_size, abbrev_off, die_pos, end):
        self.offset, self.version, self.addr_size = offset, version, addr_size
        self.off_size, self.abbrev_off, self.die_pos, self.end = off_size, abbrev_off, die_pos, end
        self._attrs: dict[int, tuple[int, object]] | None = None


class _RawDwarf:
    """Just enough of a DWARF 2-5 reader for line lookups (see module notes)."""

    def __init__(self, sections: Sections):
        self._s = sections
        self.little = sections.little
        self.order = "little" if sections.little else "big"

    def sec(self, name: str) -> bytes | None:
        return self._s.get(name)

    def _initial_length(self, data: bytes, pos: int) -> tuple[int, int, int]:
        """A DWARF unit's initial length: (length, position after it, offset size)."""
        length = self._int(data, pos, 4)
        if length == 0xFFFFFFFF:
            return self._int(data, pos + 4, 8), pos + 12, 8
        return length, pos + 4, 4

    def _int(self, data, pos: int, size: int) -> int:
        if pos < 0 or pos + size > len(data):
            raise IndexError("read past end of section")
        return int.from_bytes(data[pos:pos + size], self.order)

    # forms ---------------------------------------------------------------------
    def read_form(self, data, pos: int, form: int, version: int, addr_size: int,
                  off_size: int, implicit=None) -> tuple[object, int]:
        """Value of an attribute: ints for numeric/offset/index forms, bytes for
        inline strings, None for blocks."""
        while form == 0x16:  # DW_FORM_indirect
            form, pos = _uleb(data, pos)
        if form == 0x01:
            return self._int(data, pos, addr_size), pos + addr_size
        size = _FORM_FIXED.get(form)
        if size is not None:
            if form == 0x21:
                return implicit, pos
            return (self._int(data, pos, size) if size else 1), pos + size
        if form in _FORM_OFFSET or (form == 0x10 and version >= 3):
            return self._int(data, pos, off_size), pos + off_size
        if form == 0x10:
            return self._int(data, pos, addr_size), pos + addr_size
        if form in _FORM_ULEB:
            return _uleb(data, pos)
        if form == 0x0D:
            return _sleb(data, pos)
        if form == 0x08:
            stop = data.index(b"\0", pos)
            return bytes(data[pos:stop]), stop + 1
        if form == 0x0A:
            return None, pos + 1 + data[pos]
        if form == 0x03:
            return None, pos + 2 + self._int(data, pos, 2)
        if form == 0x04:
            return None, pos + 4 + self._int(data, pos, 4)
        if form in (0x09, 0x18):
            ln, pos = _uleb(data, pos)
            return None, pos + ln
        raise ValueError(f"unknown DWARF form 0x{form:x}")

    def string(self, form: int, value, cu: _CU | None, off_size: int) -> bytes | None:
        if form == 0x08:
            return value
        if form == 0x0E:
            sec = self.sec(".debug_str")
        elif form == 0x1F:
            sec = self.sec(".debug_line_str")
        elif form in _STRX_FORMS and cu is not None:
            offs = self.sec(".debug_str_offsets")
            if offs is None:
                return None
            attrs = self.top_attrs(cu)
            base = attrs.get(DW_AT_str_offsets_base, (0, 8 if off_size == 4 else 16))[1]
            value = self._int(offs, base + value * off_size, off_size)
            sec = self.sec(".debug_str")
        else:  # supplementary-file strings (dwz) and the like
            return None
        if sec is None or not isinstance(value, int) or value >= len(sec):
            return None
        stop = sec.find(b"\0", value)
        return bytes(sec[value:stop if stop >= 0 else len(sec)])

    # units ---------------------------------------------------------------------
    def cu_at(self, offset: int) -> _CU:
        info = self.sec(".debug_info")
        if info is None:
            raise ValueError("no .debug_info")
        pos = offset
        length = self._int(info, pos, 4)
        pos += 4
        off_size = 4
        if length == 0xFFFFFFFF:
            length = self._int(info, pos, 8)
            pos += 8
            off_size = 8
        elif length >= 0xFFFFFFF0:
            raise ValueError("bad unit length")
        end = pos + length
        version = self._int(info, pos, 2)
        pos += 2
        if not 2 <= version <= 5:
            raise ValueError(f"unsupported DWARF version {version}")
        if version >= 5:
            unit_type = info[pos]
            addr_size = info[pos + 1]
            abbrev_off = self._int(info, pos + 2, off_size)
            pos += 2 + off_size
            if unit_type in (4, 5):  # skeleton, split_compile: dwo_id
                pos += 8
            elif unit_type in (2, 6):  # type units: signature + type offset
                pos += 8 + off_size
        else:
            abbrev_off = self._int(info, pos, off_size)
            addr_size = info[pos + off_size]
            pos += off_size + 1
        if end > len(info) or end <= offset:
            raise ValueError("unit past end of .debug_info")
        return _CU(offset, version, addr_size, off_size, abbrev_off, pos, end)

    def iter_cus(self):
        info = self.sec(".debug_info") or b""
        pos = 0
        while pos + 11 <= len(info):
            cu = self.cu_at(pos)
            yield cu
            pos = cu.end

    def _abbrev_specs(self, abbrev_off: int, code: int):
        ab = self.sec(".debug_abbrev")
        if ab is None:
            raise ValueError("no .debug_abbrev")
        pos = abbrev_off
        while True:
            c, pos = _uleb(ab, pos)
            if c == 0:
                raise ValueError(f"abbreviation {code} not found")
            _tag, pos = _uleb(ab, pos)
            pos += 1  # children flag
            specs = []
            while True:
                at, pos = _uleb(ab, pos)
                form, pos = _uleb(ab, pos)
                implicit = None
                if form == 0x21:
                    implicit, pos = _sleb(ab, pos)
                if at == 0 and form == 0:
                    break
                specs.append((at, form, implicit))
            if c == code:
                return specs

    def top_attrs(self, cu: _CU) -> dict[int, tuple[int, object]]:
        """Attributes of the CU's top DIE: {DW_AT: (form, value)}."""
        if cu._attrs is not None:
            return cu._attrs
        info = self.sec(".debug_info")
        code, pos = _uleb(info, cu.die_pos)
        attrs: dict[int, tuple[int, object]] = {}
        if code:
            for at, form, implicit in self._abbrev_specs(cu.abbrev_off, code):
                real_form = form
                while real_form == 0x16:
                    real_form, pos = _uleb(info, pos)
                value, pos = self.read_form(info, pos, real_form, cu.version, cu.addr_size,
                                            cu.off_size, implicit)
                attrs[at] = (real_form, value)
        cu._attrs = attrs
        return attrs

    # address ranges ------------------------------------------------------------
    def _addr_index(self, cu: _CU, idx: int) -> int:
        addr = self.sec(".debug_addr")
        if addr is None:
            raise ValueError("indexed address without .debug_addr")
        attrs = self.top_attrs(cu)
        base = attrs.get(DW_AT_addr_base, attrs.get(DW_AT_GNU_addr_base,
                         (0, 8 if cu.version >= 5 else 0)))[1]
        return self._int(addr, base + idx * cu.addr_size, cu.addr_size)

    def cu_ranges(self, cu: _CU) -> list[tuple[int, int]]:
        attrs = self.top_attrs(cu)

        def addr_value(fv):
            form, v = fv
            return self._addr_index(cu, v) if form in _ADDRX_FORMS else v

        low = addr_value(attrs[DW_AT_low_pc]) if DW_AT_low_pc in attrs else None
        if DW_AT_ranges in attrs:
            form, v = attrs[DW_AT_ranges]
            if cu.version >= 5:
                if form == 0x23:  # rnglistx
                    data = self.sec(".debug_rnglists") or b""
                    base = attrs.get(DW_AT_rnglists_base, (0, 12 if cu.off_size == 4 else 20))[1]
                    v = base + self._int(data, base + v * cu.off_size, cu.off_size)
                return self._rnglist(cu, v, low or 0)
            if DW_AT_GNU_ranges_base in attrs:
                v += attrs[DW_AT_GNU_ranges_base][1]
            return self._rangelist(cu, v, low or 0)
        if low is not None and DW_AT_high_pc in attrs:
            form, v = attrs[DW_AT_high_pc]
            high = addr_value((form, v)) if form == 0x01 or form in _ADDRX_FORMS else low + v
            return [(low, high)]
        return []

    def _rangelist(self, cu: _CU, pos: int, base: int) -> list[tuple[int, int]]:
        data = self.sec(".debug_ranges")
        if data is None:
            return []
        asz = cu.addr_size
        out, maxaddr = [], (1 << (8 * asz)) - 1
        while pos + 2 * asz <= len(data):
            b = self._int(data, pos, asz)
            e = self._int(data, pos + asz, asz)
            pos += 2 * asz
            if b == 0 and e == 0:
                break
            if b == maxaddr:
                base = e
            else:
                out.append((base + b, base + e))
        return out

    def _rnglist(self, cu: _CU, pos: int, base: int) -> list[tuple[int, int]]:
        data = self.sec(".debug_rnglists")
        if data is None:
            return []
        asz = cu.addr_size
        out = []
        while pos < len(data):
            kind = data[pos]
            pos += 1
            if kind == 0:  # end_of_list
                break
            if kind == 1:  # base_addressx
                i, pos = _uleb(data, pos)
                base = self._addr_index(cu, i)
            elif kind == 2:  # startx_endx
                i, pos = _uleb(data, pos)
                j, pos = _uleb(data, pos)
                out.append((self._addr_index(cu, i), self._addr_index(cu, j)))
            elif kind == 3:  # startx_length
                i, pos = _uleb(data, pos)
                ln, pos = _uleb(data, pos)
                b = self._addr_index(cu, i)
                out.append((b, b + ln))
            elif kind == 4:  # offset_pair
                b, pos = _uleb(data, pos)
                e, pos = _uleb(data, pos)
                out.append((base + b, base + e))
            elif kind == 5:  # base_address
                base = self._int(data, pos, asz)
                pos += asz
            elif kind == 6:  # start_end
                out.append((self._int(data, pos, asz), self._int(data, pos + asz, asz)))
                pos += 2 * asz
            elif kind == 7:  # start_length
                b = self._int(data, pos, asz)
                pos += asz
                ln, pos = _uleb(data, pos)
                out.append((b, b + ln))
            else:
                raise ValueError(f"unknown range list entry kind {kind}")
        return out

    def aranges(self) -> tuple[list[int], list[int], list[int]] | None:
        """.debug_aranges as sorted (starts, ends, cu_offsets), or None."""
        data = self.sec(".debug_aranges")
        if data is None:
            return None
        rows = []
        pos = 0
        while pos + 16 <= len(data):
            unit = pos
            length, pos, off_size = self._initial_length(data, pos)
            end = pos + length
            pos += 2  # version
            cu_off = self._int(data, pos, off_size)
            pos += off_size
            asz, seg = data[pos], data[pos + 1]
            pos += 2
            if asz not in (2, 4, 8) or end > len(data) or end <= unit:
                raise ValueError("bad .debug_aranges")
            tup = 2 * asz + seg
            pos = unit + ((pos - unit + 2 * asz - 1) // (2 * asz)) * (2 * asz)
            while pos + tup <= end:
                pos += seg
                a = self._int(data, pos, asz)
                n = self._int(data, pos + asz, asz)
                pos += 2 * asz
                if a == 0 and n == 0:
                    break
                if n:
                    rows.append((a, a + n, cu_off))
            pos = end
        rows.sort()
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    # line programs ---------------------------------------------------------------
    def line_table(self, cu: _CU) -> _LineTable | None:
        attrs = self.top_attrs(cu)
        if DW_AT_stmt_list not in attrs:
            return None
        offset = attrs[DW_AT_stmt_list][1]
        comp_dir = None
        if DW_AT_comp_dir in attrs:
            form, v = attrs[DW_AT_comp_dir]
            s = self.string(form, v, cu, cu.off_size)
            comp_dir = _dec(s) if s is not None else None
        data = self.sec(".debug_line")
        if data is None or not isinstance(offset, int):
            return None
        length, pos, off_size = self._initial_length(data, offset)
        unit_end = pos + length
        version = self._int(data, pos, 2)
        pos += 2
        if not 2 <= version <= 5:
            raise ValueError(f"unsupported line table version {version}")
        addr_size = cu.addr_size
        if version >= 5:
            addr_size = data[pos]
            pos += 2  # address_size, segment_selector_size
        header_length = self._int(data, pos, off_size)
        pos += off_size
        prog_start = pos + header_length
        min_inst = data[pos]
        pos += 1
        if version >= 4:
            max_ops = data[pos]
            pos += 1
            if max_ops != 1:
                raise ValueError("VLIW line programs are not supported")
        pos += 1  # default_is_stmt
        line_base = data[pos] - 256 if data[pos] >= 128 else data[pos]
        line_range = data[pos + 1]
        opcode_base = data[pos + 2]
        pos += 3
        std_lens = list(data[pos:pos + opcode_base - 1])
        pos += opcode_base - 1
        dirs: list = []
        names: list = []
        dir_of: list[int] = []
        if version >= 5:
            def entries():
                nonlocal pos
                fmt_count = data[pos]
                pos += 1
                fmts = []
                for _ in range(fmt_count):
                    ct, pos = _uleb(data, pos)
                    fm, pos = _uleb(data, pos)
                    fmts.append((ct, fm))
                count, pos = _uleb(data, pos)
                out = []
                for _ in range(count):
                    path, didx = None, 0
                    for ct, fm in fmts:
                        v, pos = self.read_form(data, pos, fm, version, addr_size, off_size)
                        if ct == DW_LNCT_path:
                            path = self.string(fm, v, cu, off_size)
                        elif ct == DW_LNCT_directory_index:
                            didx = v or 0
                    out.append((path or b"", didx))
                return out

            dirs = [p for p, _ in entries()]
            for p, d in entries():
                names.append(p)
                dir_of.append(d)
        else:
            pos = _cstrings(data, pos, dirs)
            while True:
                stop = data.index(b"\0", pos)
                if stop == pos:
                    pos += 1
                    break
                names.append(bytes(data[pos:stop]))
                pos = stop + 1
                d, pos = _uleb(data, pos)
                _mtime, pos = _uleb(data, pos)
                _size, pos = _uleb(data, pos)
                dir_of.append(d)
        seqs = _decode_line_program(data, prog_start, unit_end, min_inst, line_base,
                                    line_range, opcode_base, std_lens, 1, self.little)
        return _LineTable(seqs, names, dir_of, dirs, comp_dir, version >= 5)



class _DwarfLines:
    """file:line lookups for one ELF with DWARF (.debug_info + .debug_line)."""

    def __init__(self, path: str):
        self.path = path
        self._s = Sections(path)
        if not (self._s.has(".debug_line") and self._s.has(".debug_info")):
            raise ValueError("no DWARF line info")
        self._raw = _RawDwarf(self._s)
        self._aranges: tuple[list[int], list[int], list[int]] | None | bool = False
        self._cu_index: tuple[list[int], list[int], list[int]] | None = None
        self._tables: dict[int, _LineTable | None] = {}
        self._pyelf = None  # pyelftools fallback, created on demand
        self.fallbacks = 0

    # CU lookup -----------------------------------------------------------------
    @staticmethod
    def _find(index, vaddr: int, back: int) -> int | None:
        starts, ends, offs = index
        i = bisect.bisect_right(starts, vaddr) - 1
        stop = max(i - back, -1)
        while i > stop:
            if vaddr < ends[i]:
                return offs[i]
            i -= 1
        return None

    def _cu_offset(self, vaddr: int) -> int | None:
        if self._aranges is False:
            try:
                self._aranges = self._raw.aranges()
            except (ValueError, IndexError) as exc:
                log.debug("bad .debug_aranges in %s: %s", self.path, exc)
                self._aranges = None
        if self._aranges:
            off = self._find(self._aranges, vaddr, 16)
            if off is not None:
                return off
        return self._cu_offset_from_index(vaddr)

    def _cu_offset_from_index(self, vaddr: int) -> int | None:
        """Fallback when .debug_aranges is missing or does not describe a CU
        (clang emits none by default): a one-time index of the address ranges
        of the CUs aranges does not cover, read from their top DIEs."""
        if self._cu_index is None:
            covered = set(self._aranges[2]) if self._aranges else set()
            ranges = []
            try:
                for cu in self._raw.iter_cus():
                    if cu.offset in covered:
                        continue
                    try:
                        for lo, hi in self._raw.cu_ranges(cu):
                            if hi > lo:
                                ranges.append((lo, hi, cu.offset))
                    except (ValueError, IndexError, KeyError) as exc:
                        log.debug("CU 0x%x of %s: %s", cu.offset, self.path, exc)
            except (ValueError, IndexError) as exc:
                log.debug("walking the CUs of %s: %s", self.path, exc)
            ranges.sort()
            self._cu_index = ([r[0] for r in ranges], [r[1] for r in ranges],
                              [r[2] for r in ranges])
        return self._find(self._cu_index, vaddr, 64)

    # line tables -----------------------------------------------------------------
    def _table(self, cu_off: int) -> _LineTable | None:
        if cu_off in self._tables:
            return self._tables[cu_off]
        table = None
        try:
            table = self._raw.line_table(self._raw.cu_at(cu_off))
        except (ValueError, IndexError, KeyError, TypeError, struct.error) as exc:
            log.debug("raw DWARF reader failed on CU 0x%x of %s (%s); trying pyelftools",
                      cu_off, self.path, exc)
            self.fallbacks += 1
            table = self._pyelftools_table(cu_off)
        self._tables[cu_off] = table
        return table

    def _pyelftools_table(self, cu_off: int) -> _LineTable | None:
        try:
            if self._pyelf is None:
                self._pyelf = dwarf_info(self.path)
            di = self._pyelf
            cu = di.get_CU_at(cu_off)
            lp = di.line_program_for_CU(cu)
            if lp is None:
                return None
            attrs = cu.get_top_DIE().attributes
            comp_dir = None
            if "DW_AT_comp_dir" in attrs:
                try:
                    comp_dir = _dec(attrs["DW_AT_comp_dir"].value)
                except Exception:
                    comp_dir = None
            rows = ((e.state.address, bool(e.state.end_sequence), e.state.file, e.state.line)
                    for e in lp.get_entries() if e.state is not None)
            seqs = _Sequences.from_rows(rows)
            version = lp.header.get("version", 4)
            names = [fe.name for fe in lp["file_entry"]]
            dir_of = [fe.dir_index for fe in lp["file_entry"]]
            return _LineTable(seqs, names, dir_of, list(lp["include_directory"]), comp_dir,
                              version >= 5)
        except Exception as exc:  # pyelftools raises many things on bad input
            log.debug("pyelftools failed on CU 0x%x of %s: %s", cu_off, self.path, exc)
            return None

    def lookup(self, vaddr: int) -> tuple[str | None, int] | None:
        cu_off = self._cu_offset(vaddr)
        if cu_off is None:
            return None
        table = self._table(cu_off)
        if table is None:
            return None
        return table.lookup(vaddr)


# --------------------------------------------------------------------------
# Per build id module information
# --------------------------------------------------------------------------


class _Module:
    def __init__(self, build_id: bytes, path: str | None, debug_path: str | None,
                 want_lines: bool):
        self.build_id = build_id
        self.path = path
        self.debug_path = debug_path
        self._want_lines = want_lines
        self._loads: list[tuple[int, int, int, int]] | None = None  # (off, filesz, vaddr, memsz)
        self._symbols: SymbolTable | None | bool = False  # False: not loaded yet
        self._lines: _DwarfLines | None | bool = False

    # file offset -> vaddr ----------------------------------------------------
    def _load_segments(self) -> list[tuple[int, int, int, int]]:
        if self._loads is not None:
            return self._loads
        loads: list[tuple[int, int, int, int]] = []
        if self.path is not None:
            try:
                loads = load_segments(self.path)
            except (OSError, ValueError, struct.error) as exc:
                log.debug("cannot read program headers of %s: %s", self.path, exc)
        elif self.debug_path is not None:
            try:
                loads = debug_load_segments(self.debug_path)
            except (OSError, ValueError, struct.error) as exc:
                log.debug("cannot read program headers of %s: %s", self.debug_path, exc)
        self._loads = loads
        return loads

    def vaddr_of(self, file_offset: int) -> int | None:
        loads = self._load_segments()
        for off, filesz, vaddr, _memsz in loads:
            if off <= file_offset < off + filesz:
                return file_offset - off + vaddr
        # Mappings are page granular: accept the page-rounded extent too.
        for off, filesz, vaddr, _memsz in loads:
            lo = off & ~0xFFF
            hi = (off + filesz + 0xFFF) & ~0xFFF
            if lo <= file_offset < hi:
                return file_offset - off + vaddr
        return None

    # symbols -------------------------------------------------------------------
    def symbols(self) -> SymbolTable | None:
        if self._symbols is not False:
            return self._symbols  # type: ignore[return-value]
        tab = None
        sources: list[tuple[str, tuple[int, ...]]] = []
        if self.debug_path:
            sources.append((self.debug_path, (SHT_SYMTAB,)))
        if self.path:
            sources.append((self.path, (SHT_SYMTAB, SHT_DYNSYM)))
        for p, types in sources:
            try:
                tab = SymbolTable.from_file(p, types)
            except (OSError, ValueError, struct.error) as exc:
                log.debug("cannot read symbols of %s: %s", p, exc)
                tab = None
            if tab is not None:
                break
        self._symbols = tab
        return tab

    # lines ---------------------------------------------------------------------
    def lines(self) -> _DwarfLines | None:
        if self._lines is not False:
            return self._lines  # type: ignore[return-value]
        result = None
        if self._want_lines:
            for p in (self.debug_path, self.path):
                if not p:
                    continue
                try:
                    result = _DwarfLines(p)
                    break
                except Exception as exc:  # pyelftools raises many things
                    log.debug("no DWARF lines from %s: %s", p, exc)
        self._lines = result
        return result


# --------------------------------------------------------------------------
# C++ demangling (optional, through c++filt)
# --------------------------------------------------------------------------

_demangle_cache: dict[str, str] = {}
_demangle_lock = threading.Lock()


def _demangle_many(names: Iterable[str]) -> None:
    todo = sorted({n for n in names if n.startswith("_Z") and n not in _demangle_cache
                   and "\n" not in n})
    if not todo:
        return
    exe = shutil.which("c++filt")
    out: list[str] = []
    if exe is not None:
        try:
            res = subprocess.run([exe], input="\n".join(todo) + "\n", capture_output=True,
                                 text=True, timeout=30)
            out = res.stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            out = []
    if len(out) != len(todo):
        out = todo  # no demangler (or it misbehaved): keep mangled names
    with _demangle_lock:
        for k, v in zip(todo, out):
            _demangle_cache[k] = v or k


def _demangle(name: str) -> str:
    if not name.startswith("_Z"):
        return name
    if name not in _demangle_cache:
        _demangle_many([name])
    return _demangle_cache.get(name, name)


# --------------------------------------------------------------------------
# Symbolizer
# --------------------------------------------------------------------------


_MISSING = object()


class Symbolizer:
    """Resolve build-id frames from files on disk.

    One instance is meant to live for a whole session: module files, ELF
    symbol tables and DWARF line tables are cached per build id. Resolved
    frames are not: resolve.Resolver keeps the session's one frame cache.
    """

    def __init__(self, *, debug_dirs: Sequence[str] = ("/usr/lib/debug",),
                 search_ld_cache: bool = True, lines: bool = True,
                 demangle: bool = True, ld_cache_file: str = _LD_CACHE_FILE):
        self.debug_dirs = tuple(debug_dirs)
        self.search_ld_cache = search_ld_cache
        self.lines = lines
        self.demangle = demangle
        self._ld_cache_file = ld_cache_file
        self._lock = threading.RLock()
        self._pending: list[str] = []
        self._candidates_seen: set[str] = set()
        self._by_bid: dict[bytes, str] = {}
        self._modules: dict[bytes, _Module | None] = {}
        self._found = 0                          # build ids found among the candidates so far
        self._missing_at: dict[bytes, int] = {}  # build id not found (fully) -> self._found then

    # registration ------------------------------------------------------------
    def add_candidate(self, path: str) -> None:
        """Register a file a traced process executed or mapped.  Its build id
        is only read when an unknown build id is asked for."""
        with self._lock:
            if path and path not in self._candidates_seen:
                self._candidates_seen.add(path)
                self._pending.append(path)

    # locating files -------------------------------------------------------------
    def _drain_candidates(self) -> None:
        pending, self._pending = self._pending, []
        for p in pending:
            bid = read_build_id(p)
            if bid and norm_build_id(bid) not in self._by_bid:
                self._by_bid[norm_build_id(bid)] = p
                self._found += 1

    def _find_module_path(self, key: bytes) -> str | None:
        p = self._by_bid.get(key)
        if p is not None:
            return p
        if self._pending:
            self._drain_candidates()
            p = self._by_bid.get(key)
            if p is not None:
                return p
        if self.search_ld_cache:
            try:
                return _ld_cache_build_ids(self._ld_cache_file).get(key)
            except Exception as exc:
                log.debug("ld cache scan failed: %s", exc)
        return None

    def _find_debug_file(self, key: bytes, real_bid: bytes | None,
                         module_path: str | None) -> str | None:
        variants = []
        for b in (real_bid, key, key.rstrip(b"\0")):
            if b and len(b) >= 2 and b not in variants:
                variants.append(b)
        for d in self.debug_dirs:
            for b in variants:
                h = b.hex()
                cand = os.path.join(d, ".build-id", h[:2], h[2:] + ".debug")
                if os.path.isfile(cand):
                    return cand
        if module_path is not None:
            return self._find_debuglink(module_path, real_bid)
        return None

    def _find_debuglink(self, module_path: str, real_bid: bytes | None) -> str | None:
        name = debuglink(module_path)
        if not name or "/" in name:
            return None
        mdir = os.path.dirname(os.path.realpath(module_path))
        cands = [os.path.join(mdir, name), os.path.join(mdir, ".debug", name)]
        cands += [os.path.join(d, mdir.lstrip("/"), name) for d in self.debug_dirs]
        for c in cands:
            if os.path.isfile(c) and os.path.realpath(c) != os.path.realpath(module_path):
                bid = read_build_id(c)
                if real_bid is None or bid is None or bid == real_bid:
                    return c
        return None

    def _module(self, key: bytes) -> _Module | None:
        mod = self._modules.get(key, _MISSING)
        if mod is not _MISSING:
            # Not (fully) found before: candidates registered since (drained
            # since, for another build id, or pending) may have it.
            if (mod is not None and mod.path is not None) or \
                    (not self._pending and self._missing_at.get(key) == self._found):
                return mod  # type: ignore[return-value]
        path = self._find_module_path(key)
        real_bid = read_build_id(path) if path else None
        debug = self._find_debug_file(key, real_bid, path)
        mod = _Module(key, path, debug, self.lines) if (path or debug) else None
        self._modules[key] = mod
        if mod is None or mod.path is None:
            self._missing_at[key] = self._found
        else:
            self._missing_at.pop(key, None)
        return mod

    # resolution -------------------------------------------------------------------
    def resolve(self, build_id: bytes | str, file_offset: int, *,
                is_return_address: bool = True) -> Frame:
        """Resolve a (build id, file offset) frame.  Never raises."""
        fr = self._resolve_raw(build_id, file_offset, is_return_address)
        return _with_demangled(fr) if self.demangle else fr

    def _resolve_raw(self, build_id, file_offset: int, is_return_address: bool) -> Frame:
        try:
            if isinstance(build_id, str):
                build_id = bytes.fromhex(build_id)
            key = norm_build_id(bytes(build_id))
            file_offset = int(file_offset)
        except (ValueError, TypeError):
            return Frame(None, None, None, build_id=str(build_id),
                         address=file_offset if isinstance(file_offset, int) else None)
        bid_hex = bytes(build_id).hex()
        with self._lock:
            try:
                return self._resolve(key, bid_hex, file_offset, is_return_address)
            except Exception as exc:  # never let a report die on symbolization
                log.debug("resolving %s+0x%x failed: %s", bid_hex, file_offset, exc)
                return Frame(None, None, None, build_id=bid_hex, address=file_offset)

    def _resolve(self, key: bytes, bid_hex: str, file_offset: int,
                 is_return_address: bool) -> Frame:
        mod = self._module(key)
        if mod is None:
            return Frame(None, None, None, build_id=bid_hex, address=file_offset)
        vaddr = mod.vaddr_of(file_offset)
        if vaddr is None:
            return Frame(None, None, mod.path, build_id=bid_hex, address=file_offset)
        probe = vaddr - 1 if is_return_address and vaddr > 0 else vaddr
        function = offset = None
        tab = mod.symbols()
        if tab is not None:
            hit = tab.lookup(probe)
            if hit is not None:
                name, start = hit
                function = _demangle(name) if self.demangle else name
                offset = vaddr - start
        file = line = None
        dl = mod.lines()
        if dl is not None:
            try:
                hit2 = dl.lookup(probe)
            except Exception as exc:
                log.debug("line lookup failed in %s: %s", dl.path, exc)
                hit2 = None
            if hit2 is not None:
                file, line = hit2
        return Frame(function, offset, mod.path, file, line, bid_hex, file_offset)

    def resolve_many(self, frames: Iterable[tuple]) -> list[Frame]:
        """Resolve ``(build_id, file_offset[, is_return_address])`` tuples,
        demangling C++ names with a single ``c++filt`` run."""
        raw = [self._resolve_raw(it[0], it[1], bool(it[2]) if len(it) > 2 else True)
               for it in frames]
        if not self.demangle:
            return raw
        try:
            _demangle_many(f.function for f in raw if f.function)
        except Exception as exc:
            log.debug("demangling failed: %s", exc)
        return [_with_demangled(f) for f in raw]

    def resolve_raw_ip(self, ip: int) -> Frame:
        """A frame whose build id the kernel could not read.  Without the
        process's memory map (gone by report time) it cannot be resolved."""
        return Frame(None, None, None, address=ip)


def _with_demangled(fr: Frame) -> Frame:
    if fr.function and fr.function.startswith("_Z"):
        try:
            name = _demangle(fr.function)
        except Exception:
            return fr
        return Frame(name, fr.offset, fr.module, fr.file, fr.line,
                     fr.build_id, fr.address)
    return fr
