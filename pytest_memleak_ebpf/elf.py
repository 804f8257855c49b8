"""ELF reading for the whole plugin: headers, program headers, sections,
build ids, symbol tables, and the two special-purpose readers (placement's
named function symbols, the suppressions' static-constructor table).

Two ways of reading, chosen by how hot the caller is:

* the hand-written reader below (``ElfHeader``, ``read_phdrs``,
  ``read_shdrs``, ``section_data``, ``read_build_id``, ``SymbolTable``,
  ``Sections``) serves symbolization: a report may read the build id of every
  library in the dynamic loader cache (hundreds of files, only the first
  4 KiB of each) and whole ``.symtab`` sections of libc-sized objects, where
  pyelftools' per-record parsing costs 10-100x more;
* pyelftools (``ELFFile``) serves the one-time, per-file readers that look
  up a few sections by name: ``function_symbols`` (probe placement, once per
  libc) and ``init_functions`` (only for a frame without a function name in
  a module without a symbol table); their record tables (symbols,
  relocations) are still unpacked with ``struct`` in one pass. ``dwarf_info``
  hands symbolize.py's fallback DWARF reader a pyelftools DWARFInfo
  (bench/elf_lines.py measures why it is only the fallback).

Nothing here raises on a file that is not ELF except where documented
(``ValueError``); readers that callers use on arbitrary files return None.
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple
from elftools.elf.constants import P_FLAGS

__all__ = [
    "ElfHeader", "Phdr", "Shdr", "read_phdrs", "read_shdrs", "section_data", "read_build_id",
    "norm_build_id", "stat_key", "SymbolTable", "Sections", "load_segments", "debug_load_segments",
    "debuglink", "dwarf_info", "FunctionSymbols", "function_symbols", "InitFunctions", "init_functions",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Minimal, fast ELF reading (header, program headers, notes, sections)
# --------------------------------------------------------------------------

_ELF_MAGIC = b"\x7fELF"
PT_LOAD = 1
PT_NOTE = 4
SHT_SYMTAB = 2
SHT_NOTE = 7
SHT_NOBITS = 8
SHT_DYNSYM = 11
SHF_COMPRESSED = 0x800
NT_GNU_BUILD_ID = 3
STT_FUNC = 2
STT_GNU_IFUNC = 10
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2

HEAD_READ = 4096  # header + phdrs + build-id note almost always fit in here


class ElfHeader:
    __slots__ = ("is64", "endian", "e_type", "phoff", "phentsize", "phnum",
                 "shoff", "shentsize", "shnum", "shstrndx")

    def __init__(self, buf: bytes):
        if len(buf) < 52 or buf[:4] != _ELF_MAGIC:
            raise ValueError("not an ELF file")
        ei_class, ei_data = buf[4], buf[5]
        if ei_class not in (1, 2) or ei_data not in (1, 2):
            raise ValueError("bad ELF ident")
        self.is64 = ei_class == 2
        self.endian = "<" if ei_data == 1 else ">"
        e = self.endian
        if self.is64:
            if len(buf) < 64:
                raise ValueError("truncated ELF header")
            (self.e_type,) = struct.unpack_from(e + "H", buf, 0x10)
            self.phoff, self.shoff = struct.unpack_from(e + "QQ", buf, 0x20)
            (self.phentsize, self.phnum, self.shentsize, self.shnum,
             self.shstrndx) = struct.unpack_from(e + "HHHHH", buf, 0x36)
        else:
            (self.e_type,) = struct.unpack_from(e + "H", buf, 0x10)
            self.phoff, self.shoff = struct.unpack_from(e + "II", buf, 0x1C)
            (self.phentsize, self.phnum, self.shentsize, self.shnum,
             self.shstrndx) = struct.unpack_from(e + "HHHHH", buf, 0x2A)


class Phdr:
    __slots__ = ("type", "flags", "offset", "vaddr", "filesz", "memsz", "align")

    def __init__(self, type_, flags, offset, vaddr, filesz, memsz, align):
        self.type, self.flags, self.offset, self.vaddr = type_, flags, offset, vaddr
        self.filesz, self.memsz, self.align = filesz, memsz, align


class Shdr:
    __slots__ = ("name_off", "name", "type", "flags", "addr", "offset", "size",
                 "link", "info", "addralign", "entsize")

    def __init__(self, name_off, type_, flags, addr, offset, size, link, info,
                 addralign, entsize):
        self.name_off, self.type, self.flags, self.addr = name_off, type_, flags, addr
        self.offset, self.size, self.link, self.info = offset, size, link, info
        self.addralign, self.entsize = addralign, entsize
        self.name = ""


def pread(f, offset: int, size: int, head: bytes = b"") -> bytes:
    """Read ``size`` bytes at ``offset``, served from ``head`` when possible."""
    if offset + size <= len(head):
        return head[offset:offset + size]
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated ELF file")
    return data


def read_phdrs(f, h: ElfHeader, head: bytes = b"") -> list[Phdr]:
    if h.phnum == 0 or h.phoff == 0:
        return []
    if h.phnum > 4096 or h.phentsize < (56 if h.is64 else 32):
        raise ValueError("bad program header table")
    raw = pread(f, h.phoff, h.phnum * h.phentsize, head)
    out = []
    e = h.endian
    for i in range(h.phnum):
        base = i * h.phentsize
        if h.is64:
            t, fl, off, va, _pa, fsz, msz, al = struct.unpack_from(e + "IIQQQQQQ", raw, base)
        else:
            t, off, va, _pa, fsz, msz, fl, al = struct.unpack_from(e + "IIIIIIII", raw, base)
        out.append(Phdr(t, fl, off, va, fsz, msz, al))
    return out


def read_shdrs(f, h: ElfHeader, file_size: int) -> list[Shdr]:
    if h.shnum == 0 or h.shoff == 0:
        return []
    if h.shnum > 65535 or h.shentsize < (64 if h.is64 else 40):
        raise ValueError("bad section header table")
    if h.shoff + h.shnum * h.shentsize > file_size:
        raise ValueError("section header table past end of file")
    raw = pread(f, h.shoff, h.shnum * h.shentsize)
    e = h.endian
    out = []
    for i in range(h.shnum):
        base = i * h.shentsize
        if h.is64:
            vals = struct.unpack_from(e + "IIQQQQIIQQ", raw, base)
        else:
            vals = struct.unpack_from(e + "IIIIIIIIII", raw, base)
        out.append(Shdr(*vals))
    if 0 < h.shstrndx < len(out):
        strsec = out[h.shstrndx]
        if strsec.type != SHT_NOBITS and strsec.offset + strsec.size <= file_size:
            names = pread(f, strsec.offset, strsec.size)
            for s in out:
                end = names.find(b"\0", s.name_off)
                if end >= 0:
                    s.name = names[s.name_off:end].decode("utf-8", "replace")
    return out


def section_data(f, h: ElfHeader, s: Shdr, file_size: int) -> bytes:
    if s.type == SHT_NOBITS or s.offset + s.size > file_size:
        raise ValueError(f"section {s.name!r} has no data in this file")
    data = pread(f, s.offset, s.size)
    if s.flags & SHF_COMPRESSED:
        e = h.endian
        if h.is64:
            ch_type, _res, ch_size, _al = struct.unpack_from(e + "IIQQ", data, 0)
            hdr = 24
        else:
            ch_type, ch_size, _al = struct.unpack_from(e + "III", data, 0)
            hdr = 12
        if ch_type != 1:  # ELFCOMPRESS_ZLIB; zstd is not in the stdlib
            raise ValueError(f"unsupported section compression {ch_type}")
        data = zlib.decompress(data[hdr:])
        if len(data) != ch_size:
            raise ValueError("bad compressed section")
    return data


def _parse_build_id_notes(data: bytes, endian: str, align: int) -> bytes | None:
    pos, n = 0, len(data)
    align = 8 if align == 8 else 4
    while pos + 12 <= n:
        namesz, descsz, ntype = struct.unpack_from(endian + "III", data, pos)
        pos += 12
        name_end = pos + namesz
        desc_start = (name_end + align - 1) & ~(align - 1)
        desc_end = desc_start + descsz
        if desc_end > n:
            return None
        if ntype == NT_GNU_BUILD_ID and data[pos:name_end] == b"GNU\0" and descsz:
            return bytes(data[desc_start:desc_end])
        pos = (desc_end + align - 1) & ~(align - 1)
    return None


def _build_id_from_open_file(f, file_size: int) -> bytes | None:
    head = f.read(HEAD_READ)
    h = ElfHeader(head)
    for ph in read_phdrs(f, h, head):
        if ph.type == PT_NOTE and ph.filesz and ph.offset + ph.filesz <= file_size \
                and ph.filesz < (1 << 20):
            bid = _parse_build_id_notes(pread(f, ph.offset, ph.filesz, head),
                                        h.endian, ph.align)
            if bid:
                return bid
    # No usable PT_NOTE (separate debug files, relocatable objects): sections.
    for s in read_shdrs(f, h, file_size):
        if s.type == SHT_NOTE and s.size and s.size < (1 << 20) \
                and s.offset + s.size <= file_size:
            bid = _parse_build_id_notes(pread(f, s.offset, s.size),
                                        h.endian, s.addralign)
            if bid:
                return bid
    return None


_bid_cache: dict[tuple, bytes | None] = {}
_bid_cache_lock = threading.Lock()


def stat_key(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def read_build_id(path: str) -> bytes | None:
    """GNU build id of the ELF at ``path`` (None if none or unreadable).

    Only the ELF header, the program headers and the PT_NOTE segments are
    read; results are cached by (st_dev, st_ino, st_mtime_ns, st_size).
    """
    try:
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            key = stat_key(st)
            with _bid_cache_lock:
                if key in _bid_cache:
                    return _bid_cache[key]
            try:
                bid = _build_id_from_open_file(f, st.st_size)
            except (ValueError, struct.error):
                bid = None
    except OSError:
        return None
    with _bid_cache_lock:
        if len(_bid_cache) > 65536:
            _bid_cache.clear()
        _bid_cache[key] = bid
    return bid


def norm_build_id(bid: bytes) -> bytes:
    """Kernel build ids are 20 bytes, zero padded; normalise ours the same way."""
    return bid + b"\0" * (20 - len(bid)) if len(bid) < 20 else bid


# --------------------------------------------------------------------------
# Function symbol tables (symbolize.py: address -> name)
# --------------------------------------------------------------------------

def _name_rank(name: str, binding: int) -> tuple:
    """Sort key choosing the display name among aliases at one address:
    global/weak before local, unversioned before ``name@VER``, fewer leading
    underscores, GLOBAL before WEAK, shorter, then alphabetical."""
    nonlocal_ = 0 if binding in (STB_GLOBAL, STB_WEAK) else 1
    underscores = len(name) - len(name.lstrip("_"))
    return (nonlocal_, "@" in name, underscores, 0 if binding == STB_GLOBAL else 1,
            len(name), name)


class SymbolTable:
    """Function symbols as sorted parallel arrays; lookups are a bisect."""

    _BACKTRACK = 8  # nested/overlapping symbols: look a few entries back

    def __init__(self, starts, ends, names, strtab: bytes, source: str):
        self.starts: list[int] = starts
        self.ends: list[int] = ends
        self._names: list = names  # int (offset into strtab) or str
        self._strtab = strtab
        self.source = source

    def __len__(self):
        return len(self.starts)

    def _name(self, i: int) -> str:
        n = self._names[i]
        if isinstance(n, int):
            stop = self._strtab.find(b"\0", n)
            n = self._strtab[n:stop if stop >= 0 else len(self._strtab)].decode("utf-8", "replace")
            n = n.split("@", 1)[0] or n
            self._names[i] = n
        return n

    def lookup(self, vaddr: int) -> tuple[str, int] | None:
        i = bisect.bisect_right(self.starts, vaddr) - 1
        stop = max(i - self._BACKTRACK, -1)
        while i > stop:
            if vaddr < self.ends[i]:
                return self._name(i), self.starts[i]
            i -= 1
        return None

    @classmethod
    def from_file(cls, path: str, types: Sequence[int]) -> SymbolTable | None:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h = ElfHeader(f.read(64))
            shdrs = read_shdrs(f, h, size)
            for want in types:
                for s in shdrs:
                    if s.type != want or not s.size or not (0 < s.link < len(shdrs)):
                        continue
                    try:
                        syms = section_data(f, h, s, size)
                        strtab = section_data(f, h, shdrs[s.link], size)
                    except (ValueError, zlib.error, struct.error):
                        continue
                    tab = cls._build(syms, strtab, h, f"{path}:{s.name}")
                    if tab is not None and len(tab):
                        return tab
        return None

    @classmethod
    def _build(cls, syms: bytes, strtab: bytes, h: ElfHeader, source: str):
        if h.is64:
            fmt, esz = h.endian + "IBBHQQ", 24
            rows = struct.iter_unpack(fmt, memoryview(syms)[:len(syms) - len(syms) % esz])
            funcs = [(value, value + size, info >> 4, name)
                     for name, info, _other, shndx, value, size in rows
                     if size and shndx and ((info & 0xF) == STT_FUNC or (info & 0xF) == STT_GNU_IFUNC)]
        else:
            fmt, esz = h.endian + "IIIBBH", 16
            rows = struct.iter_unpack(fmt, memoryview(syms)[:len(syms) - len(syms) % esz])
            funcs = [(value, value + size, info >> 4, name)
                     for name, value, size, info, _other, shndx in rows
                     if size and shndx and ((info & 0xF) == STT_FUNC or (info & 0xF) == STT_GNU_IFUNC)]
        if not funcs:
            return None
        funcs.sort()
        starts: list[int] = []
        ends: list[int] = []
        names: list = []

        def decode(off: int) -> str:
            stop = strtab.find(b"\0", off)
            return strtab[off:stop if stop >= 0 else len(strtab)].decode("utf-8", "replace")

        i, n = 0, len(funcs)
        while i < n:
            start = funcs[i][0]
            j = i + 1
            while j < n and funcs[j][0] == start:
                j += 1
            if j - i == 1:
                starts.append(start)
                ends.append(funcs[i][1])
                names.append(funcs[i][3])
            else:
                group = funcs[i:j]
                best = min(group, key=lambda g: _name_rank(decode(g[3]), g[2]))
                nm = decode(best[3])
                starts.append(start)
                ends.append(max(g[1] for g in group))
                names.append(nm.split("@", 1)[0] or nm)
            i = j
        return cls(starts, ends, names, strtab, source)


# --------------------------------------------------------------------------
# Sections read lazily (symbolize.py's DWARF reader)
# --------------------------------------------------------------------------

class Sections:
    """Lazily read (and decompressed) sections of one ELF file."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._h = ElfHeader(f.read(64))
            self._shdrs = {s.name: s for s in read_shdrs(f, self._h, size)
                           if s.type != SHT_NOBITS}
        self._size = size
        self.little = self._h.endian == "<"
        self._data: dict[str, bytes | None] = {}

    def has(self, name: str) -> bool:
        return name in self._shdrs and self._shdrs[name].size > 0

    def get(self, name: str) -> bytes | None:
        if name in self._data:
            return self._data[name]
        data = None
        s = self._shdrs.get(name)
        if s is not None and s.size:
            try:
                with open(self.path, "rb") as f:
                    data = section_data(f, self._h, s, self._size)
            except (OSError, ValueError, zlib.error, struct.error) as exc:
                log.debug("cannot read %s of %s: %s", name, self.path, exc)
                data = None
        self._data[name] = data
        return data



# --------------------------------------------------------------------------
# Program headers: file offset <-> virtual address
# --------------------------------------------------------------------------

def load_segments(path: str) -> list[tuple[int, int, int, int]]:
    """(p_offset, p_filesz, p_vaddr, p_memsz) of each PT_LOAD of the ELF at
    ``path``. Raises OSError / ValueError."""
    with open(path, "rb") as f:
        head = f.read(HEAD_READ)
        h = ElfHeader(head)
        return [(p.offset, p.filesz, p.vaddr, p.memsz) for p in read_phdrs(f, h, head) if p.type == PT_LOAD]


def debug_load_segments(path: str) -> list[tuple[int, int, int, int]]:
    """The PT_LOADs of a separate debug file, whose program headers keep the
    right vaddrs but NOBITS offsets: the usual linker layout is assumed,
    offset == vaddr - first PT_LOAD vaddr (exact for -z separate-code text
    segments, which is where code lives). Raises OSError / ValueError."""
    with open(path, "rb") as f:
        head = f.read(HEAD_READ)
        h = ElfHeader(head)
        ph = sorted((p for p in read_phdrs(f, h, head) if p.type == PT_LOAD), key=lambda p: p.vaddr)
    if not ph:
        return []
    base = ph[0].vaddr - ph[0].vaddr % max(ph[0].align, 1)
    return [(p.vaddr - base, p.memsz, p.vaddr, p.memsz) for p in ph]


def debuglink(path: str) -> str | None:
    """The file name in the module's ``.gnu_debuglink`` section, or None."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h = ElfHeader(f.read(64))
            link = next((s for s in read_shdrs(f, h, size) if s.name == ".gnu_debuglink"), None)
            if link is None:
                return None
            data = section_data(f, h, link, size)
    except (OSError, ValueError, struct.error, zlib.error):
        return None
    name = os.fsdecode(data.split(b"\0", 1)[0])
    return name or None


def dwarf_info(path: str):
    """pyelftools' DWARFInfo of the file (symbolize.py's fallback DWARF
    reader); the sections' contents are copied into memory, so the file is
    closed again. Raises what pyelftools raises on bad input."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        return ELFFile(f).get_dwarf_info(relocate_dwarf_sections=False, follow_links=False)


# --------------------------------------------------------------------------
# Named function symbols (probe placement), with pyelftools
# --------------------------------------------------------------------------

SEGMENT_EXECUTABLE = P_FLAGS.PF_X   # p_flags bit of an executable PT_LOAD segment


@dataclass
class FunctionSymbols:
    # name -> list of (value, size, bind, hidden_version, symtab_kind: 0 .dynsym, 1 .symtab)
    symbols: Dict[str, List[Tuple[int, int, int, bool, int]]]
    loads: List[Tuple[int, int, int, int]]  # (vaddr, filesz, offset, flags)
    ifuncs: Dict[str, int] = field(default_factory=dict)


def _read_named(elf, sec, versym, kind: int, wanted, symbols, ifuncs) -> None:
    strtab = elf.get_section(sec["sh_link"]).data()
    data = sec.data()
    ent = sec["sh_entsize"] or 24
    n = len(data) // ent
    vs = None
    if versym is not None:
        vdata = versym.data()
        if len(vdata) >= 2 * n:
            vs = struct.unpack_from(f"<{n}H", vdata)
    for i, (st_name, st_info, _other, shndx, value, size) in enumerate(
        struct.iter_unpack("<IBBHQQ", data[: n * 24] if ent == 24 else b"")
    ):
        if shndx == 0 or value == 0:  # undefined / absent
            continue
        typ = st_info & 0xF
        if typ not in (STT_FUNC, STT_GNU_IFUNC):
            continue
        end = strtab.find(b"\0", st_name)
        name = strtab[st_name:end].decode("utf-8", "replace")
        base = name.split("@", 1)[0]  # .symtab may spell versions inline
        if base not in wanted:
            continue
        if typ == STT_GNU_IFUNC:
            ifuncs[base] = value
            continue
        hidden = bool(vs[i] & 0x8000) if vs is not None else ("@" in name and "@@" not in name)
        symbols.setdefault(base, []).append((value, size, st_info >> 4, hidden, kind))


def function_symbols(f, path: str, wanted: frozenset) -> FunctionSymbols:
    """The function symbols named in ``wanted`` (.dynsym with symbol versions,
    then .symtab for names .dynsym lacks) and the PT_LOADs of the x86-64
    ELF64 object open as ``f``. Raises ValueError for any other object."""
    from elftools.elf.elffile import ELFFile

    elf = ELFFile(f)
    if elf.elfclass != 64 or not elf.little_endian or elf["e_machine"] != "EM_X86_64":
        raise ValueError(f"{path}: not an x86-64 ELF64 object")
    # Program headers read directly: elf.iter_segments() would also build
    # the PT_DYNAMIC segment and parse the hash tables (~10 ms for libc).
    loads = []
    phoff, phentsize = elf["e_phoff"], elf["e_phentsize"] or 56
    for i in range(elf.num_segments()):
        f.seek(phoff + i * phentsize)
        p_type, p_flags, p_offset, p_vaddr, _paddr, p_filesz, _memsz, _align = \
            struct.unpack("<IIQQQQQQ", f.read(56))
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_filesz, p_offset, p_flags))
    symbols: Dict[str, List[Tuple[int, int, int, bool, int]]] = {}
    ifuncs: Dict[str, int] = {}
    dynsym = elf.get_section_by_name(".dynsym")
    versym = elf.get_section_by_name(".gnu.version")
    if dynsym is not None:
        _read_named(elf, dynsym, versym, 0, wanted, symbols, ifuncs)
    missing = wanted - symbols.keys() - ifuncs.keys()
    symtab = elf.get_section_by_name(".symtab") if missing else None
    if symtab is not None:
        _read_named(elf, symtab, None, 1, missing, symbols, ifuncs)
    return FunctionSymbols(symbols, loads, ifuncs)


# --------------------------------------------------------------------------
# Static constructors (.init_array) and function starts (.eh_frame_hdr)
# --------------------------------------------------------------------------

R_X86_64_RELATIVE = 8


@dataclass(frozen=True)
class InitFunctions:
    """What tells whether a file offset lies in a static constructor of a
    module without a symbol table."""
    build_id: str | None                       # hex
    loads: tuple[tuple[int, int, int], ...]    # (p_offset, p_vaddr, p_filesz) of the PT_LOADs
    function_starts: tuple[int, ...]           # sorted, from .eh_frame_hdr's search table
    inits: frozenset                           # .init_array targets (vaddrs)

    def vaddr_of(self, file_offset: int) -> int | None:
        for p_offset, p_vaddr, p_filesz in self.loads:
            if p_offset <= file_offset < p_offset + p_filesz:
                return file_offset - p_offset + p_vaddr
        return None

    def in_initializer(self, file_offset: int) -> bool:
        vaddr = self.vaddr_of(file_offset)
        if vaddr is None or not self.function_starts:
            return False
        i = bisect.bisect_right(self.function_starts, vaddr) - 1
        return i >= 0 and self.function_starts[i] in self.inits


def init_functions(path: str) -> InitFunctions | None:
    """InitFunctions of a 64-bit little-endian ELF file (cached per file
    identity), or None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _init_functions(path, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _init_functions(path: str, ino: int, size: int, mtime_ns: int) -> InitFunctions | None:
    from elftools.common.exceptions import ELFError

    try:
        with open(path, "rb") as f:
            return _read_init_functions(f)
    except (OSError, ValueError, struct.error, IndexError, ELFError):
        return None


def _read_init_functions(f) -> InitFunctions | None:
    from elftools.elf.elffile import ELFFile

    ident = f.read(6)
    if len(ident) < 6 or ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
        return None
    f.seek(0)
    elf = ELFFile(f)
    bid = read_build_id(f.name)
    loads = tuple((seg["p_offset"], seg["p_vaddr"], seg["p_filesz"])
                  for seg in (elf.get_segment(i) for i in range(elf.num_segments()))
                  if seg["p_type"] == "PT_LOAD")
    build_id = bid.hex() if bid else None
    ia = elf.get_section_by_name(".init_array")
    hdr = elf.get_section_by_name(".eh_frame_hdr")
    if ia is None or hdr is None:
        return InitFunctions(build_id, loads, (), frozenset())
    ia_addr, ia_size = ia["sh_addr"], ia["sh_size"]
    data = ia.data()
    inits = {w for (w,) in struct.iter_unpack("<Q", data[:len(data) - len(data) % 8])
             if w not in (0, 0xFFFFFFFFFFFFFFFF)}
    rela = elf.get_section_by_name(".rela.dyn")
    if rela is not None and rela["sh_size"]:
        data = rela.data()
        for r_offset, r_info, r_addend in struct.iter_unpack("<QQq", data[:len(data) - len(data) % 24]):
            if ia_addr <= r_offset < ia_addr + ia_size and (r_info & 0xFFFFFFFF) == R_X86_64_RELATIVE:
                inits.add(r_addend)
    # .eh_frame_hdr binary search table: sorted function start addresses
    h_addr = hdr["sh_addr"]
    h = hdr.data()
    version, ptr_enc, count_enc, table_enc = h[0], h[1], h[2], h[3]
    if version != 1 or table_enc != 0x3B or count_enc != 0x03 or ptr_enc not in (0x1B, 0x03):
        return InitFunctions(build_id, loads, (), frozenset(inits))
    (fde_count,) = struct.unpack_from("<I", h, 8)
    starts = sorted(h_addr + rel for rel, _fde in struct.iter_unpack("<ii", h[12:12 + 8 * fde_count]))
    return InitFunctions(build_id, loads, tuple(starts), frozenset(inits))
