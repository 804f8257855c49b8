"""Which allocator a process will really use, found before it runs.

:func:`resolve_allocator` answers, for an executable about to run (its path,
environment, cwd and root filesystem), the question the dynamic loader will
answer when the program first calls ``malloc``: which object's ``malloc``
wins.  It replays the loader's search, without running anything:

* **glibc** (``PT_INTERP`` is ``ld-linux*``; glibc 2.36 ``elf/rtld.c``,
  ``elf/dl-load.c``, ``elf/dl-cache.c``): the global scope is the executable,
  then ``LD_PRELOAD`` (split at space and colon; in a secure (setuid) process
  names with a ``/`` are dropped and the others must be set-user-ID files
  found outside ``/etc/ld.so.cache``), then ``/etc/ld.so.preload`` (split at
  white space and colon, ``#`` comments), then every ``DT_NEEDED`` breadth
  first.  A ``DT_NEEDED`` name already loaded (by a name it was loaded under or
  its ``DT_SONAME``) is not loaded again, nor is a file already loaded (same
  device and inode).  A name without ``/`` is searched in: the ``DT_RPATH`` of
  the object needing it and of each object that loaded that one up to the
  executable, then the executable's ``DT_RPATH`` -- all of this only when the
  needing object has no ``DT_RUNPATH``, and an object with a ``DT_RUNPATH``
  has no ``DT_RPATH`` at all; then ``LD_LIBRARY_PATH`` (split at ``:`` and
  ``;``; not in a secure process); then the needing object's own
  ``DT_RUNPATH``; then ``/etc/ld.so.cache`` (not for secure preloads); then
  the interpreter's system directories (read from the interpreter file, as
  ``ld.so --help`` prints them) unless the needing object has
  ``DF_1_NODEFLIB``.  Every directory of a path list is tried with the
  ``glibc-hwcaps/x86-64-v{4,3,2}`` subdirectories the CPU supports first and,
  for glibc < 2.37, the legacy ``tls``/``x86_64`` subdirectories; the
  ``ld.so.cache`` lookup follows ``search_cache`` (named-hwcaps entries by
  priority, legacy hwcap entries skipped).  ``$ORIGIN``/``${ORIGIN}`` expand
  to the directory of the object (the executable's real path for the
  executable), ``$PLATFORM`` to ``x86_64`` and ``$LIB`` to the last
  component of the first system directory (glibc's ``DL_DST_LIB``); in a
  secure process an expanded directory is kept only when it is a system
  directory.  In every path list an empty element is the cwd.  A file of
  another ELF class or machine is skipped and the search goes on.
* **musl** (``PT_INTERP`` is ``ld-musl-*``; musl ``ldso/dynlink.c``): names
  ``libc.*``, ``libpthread.*``, ``librt.*``, ``libm.*``, ``libdl.*``,
  ``libutil.*``, ``libxnet.*`` and the interpreter's own path are the
  loader-and-libc itself; otherwise a name with ``/`` is opened as is, a name
  already loaded by that name is reused, and the search is
  ``LD_LIBRARY_PATH`` (not secure), then the ``DT_RUNPATH`` -- or, without
  one, the ``DT_RPATH`` -- of the needing object and each object that needed
  that one (``$ORIGIN`` only; an rpath with another ``$`` is ignored), then the
  lines/colon-separated list of ``<prefix>/etc/ld-musl-x86_64.path`` (prefix:
  the interpreter's path minus its last two components), or
  ``/lib:/usr/local/lib:/usr/lib`` when that file does not exist.  Empty
  elements are skipped.  ``LD_PRELOAD`` is split at white space and colon.  A
  loaded library that defines both ``__libc_start_main`` and ``stdin`` is
  replaced by the loader-and-libc.
* **static executables** (no ``PT_INTERP``): the executable's own ``.symtab``.

The allocator is the first object of that scope whose dynamic symbol table
*defines* ``malloc`` (``STB_GLOBAL``/``STB_WEAK``/``STB_GNU_UNIQUE``, not
undefined -- even with the value of a canonical PLT entry --, not a hidden
symbol version).

Not modelled (documented limits): the version a reference asks for (a
program's ``malloc@GLIBC_2.2.5`` binds to an unversioned ``malloc`` of an
interposer, as here, but would not to a ``malloc`` with another version
node); ``LD_AUDIT``, ``GLIBC_TUNABLES=glibc.cpu.hwcaps`` and
``LD_HWCAP_MASK``; the legacy hwcaps subdirectories are glibc 2.36's x86-64
list (``avx512_1`` omitted); the loader run as a command
(``ld.so --preload ... prog``); allocators a program dlopens later.

How the kind is told (first rule that matches):

* ``jemalloc``: the object defines ``mallctl`` or ``je_mallctl``, or its
  soname/file name starts with ``libjemalloc``;
* ``tcmalloc``: it defines ``tc_version`` or a ``MallocExtension`` symbol,
  or its name starts with ``libtcmalloc``;
* ``mimalloc``: it defines ``mi_version``, or its name starts with
  ``libmimalloc``;
* ``glibc``: its ``malloc`` carries a ``GLIBC_*`` symbol version;
* ``musl``: it is the executable's ``ld-musl`` interpreter, or it defines
  ``__libc_start_main`` without any ``GLIBC_*`` version;
* static executables: the markers above when present (a statically linked
  jemalloc ... reports that kind, module = the executable); else
  ``static-glibc`` when the file has a GNU ABI tag note (glibc's crt1 adds
  ``.note.ABI-tag``, musl's does not) or ``.symtab`` has
  ``__libc_setup_tls``; ``static-musl`` when ``.symtab`` has musl's
  ``__init_libc``; ``other`` otherwise.  (``__libc_malloc`` tells nothing:
  static musl 1.2.3 has one too, at another address than its weak
  ``malloc``; static glibc's is ``malloc``'s address.)  A static executable
  without ``.symtab`` (stripped) gets the kind its ABI note tells
  (``static-glibc`` or ``other``) and is not covered; a static executable
  whose ``.symtab`` has no ``malloc`` (a Go program) is ``other``, not
  covered;
* ``other``: any other object that defines ``malloc`` (a custom allocator;
  covered when it also defines ``free``).

Sites: the malloc family defined in that object, plus -- when the object
exports them *and* is the object the loader will bind them to -- the C++
``operator new``/``delete`` variants (``_Znwm``, ``_ZdlPvm``, aligned and
nothrow forms; each parsed from its mangled name into a role), plus the
allocator's own entry points (``je_*``, ``tc_*``, ``mi_*``, ``mallocx`` ...)
only when some object of the process imports them and they are not at the
address of a site already listed.  Names sharing an address are one site
(the first in family order keeps the name; the others are its ``aliases``).
Every site carries ``family``: the tracer handler (``tracer.ALLOCATORS``
key) whose argument registers it matches -- ``operator new`` in all its forms
takes the size in ``rdi`` like ``malloc``; every ``operator delete`` takes
the pointer in ``rdi`` like ``free`` (the size and alignment arguments do not
change what is counted).

:class:`AllocatorCache` keeps answers keyed by the executable's identity
(device, inode, mtime, size) and the inputs that change the answer (root,
the preload and library-path variables, secure mode, and the cwd when one of
them is relative).  An answer stays valid while every file the resolver
opened or tried (found or absent) still stats the same: re-checking that
list is a few ``stat`` calls, ``validate=False`` skips even that.
"""

from __future__ import annotations

import mmap
import os
import re
import stat as _stat
import struct
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

KINDS = ("glibc", "jemalloc", "tcmalloc", "mimalloc", "musl", "static-glibc", "static-musl", "other")

# The malloc family, in site order: name -> (role, args, tracer handler)
FAMILY: Dict[str, Tuple[str, Tuple[Tuple[str, int], ...]]] = {
    "malloc": ("alloc", (("size", 0),)),
    "calloc": ("calloc", (("nmemb", 0), ("size", 1))),
    "realloc": ("realloc", (("ptr", 0), ("size", 1))),
    "reallocarray": ("reallocarray", (("ptr", 0), ("nmemb", 1), ("size", 2))),
    "free": ("free", (("ptr", 0),)),
    "posix_memalign": ("posix_memalign", (("memptr", 0), ("align", 1), ("size", 2))),
    "aligned_alloc": ("aligned_alloc", (("align", 0), ("size", 1))),
    "memalign": ("aligned_alloc", (("align", 0), ("size", 1))),
    "valloc": ("alloc", (("size", 0),)),
    "pvalloc": ("alloc", (("size", 0),)),
}

# Allocator-specific entry points: name -> (role, args, handler whose registers match, or None)
_ALIASES: Dict[str, Tuple[str, Tuple[Tuple[str, int], ...], Optional[str]]] = {}
for _p in ("tc_", "je_", "mi_"):
    for _n in FAMILY:
        _ALIASES[_p + _n] = (FAMILY[_n][0], FAMILY[_n][1], _n)
_ALIASES.update({
    # jemalloc's non-standard API (flags args do not move size/ptr)
    "mallocx": ("alloc", (("size", 0),), "malloc"), "je_mallocx": ("alloc", (("size", 0),), "malloc"),
    "rallocx": ("realloc", (("ptr", 0), ("size", 1)), "realloc"),
    "je_rallocx": ("realloc", (("ptr", 0), ("size", 1)), "realloc"),
    "dallocx": ("free", (("ptr", 0),), "free"), "je_dallocx": ("free", (("ptr", 0),), "free"),
    "sdallocx": ("sized_free", (("ptr", 0), ("size", 1)), "free"),
    "je_sdallocx": ("sized_free", (("ptr", 0), ("size", 1)), "free"),
    # tcmalloc's C++ entry points
    "tc_new": ("alloc", (("size", 0),), "malloc"), "tc_newarray": ("alloc", (("size", 0),), "malloc"),
    "tc_new_nothrow": ("alloc", (("size", 0),), "malloc"),
    "tc_newarray_nothrow": ("alloc", (("size", 0),), "malloc"),
    "tc_delete": ("free", (("ptr", 0),), "free"), "tc_deletearray": ("free", (("ptr", 0),), "free"),
    "tc_delete_nothrow": ("free", (("ptr", 0),), "free"),
    "tc_deletearray_nothrow": ("free", (("ptr", 0),), "free"),
    "tc_delete_sized": ("sized_free", (("ptr", 0), ("size", 1)), "free"),
    "tc_deletearray_sized": ("sized_free", (("ptr", 0), ("size", 1)), "free"),
    "tc_new_aligned": ("aligned_alloc", (("size", 0), ("align", 1)), "malloc"),
    "tc_newarray_aligned": ("aligned_alloc", (("size", 0), ("align", 1)), "malloc"),
    # mimalloc's
    "mi_zalloc": ("alloc", (("size", 0),), "malloc"),
    "mi_malloc_aligned": ("aligned_alloc", (("size", 0), ("align", 1)), "malloc"),
    "mi_zalloc_aligned": ("aligned_alloc", (("size", 0), ("align", 1)), "malloc"),
    "mi_new": ("alloc", (("size", 0),), "malloc"), "mi_new_nothrow": ("alloc", (("size", 0),), "malloc"),
    "mi_new_aligned": ("aligned_alloc", (("size", 0), ("align", 1)), "malloc"),
    "mi_new_aligned_nothrow": ("aligned_alloc", (("size", 0), ("align", 1)), "malloc"),
    "mi_free_size": ("sized_free", (("ptr", 0), ("size", 1)), "free"),
    "mi_free_aligned": ("free", (("ptr", 0),), "free"),
    "mi_free_size_aligned": ("sized_free", (("ptr", 0), ("size", 1)), "free"),
})

# operator new / delete, Itanium mangling on LP64: _Zn[wa]m [St11align_val_t] [RKSt9nothrow_t],
# _Zd[la]Pv [m] [St11align_val_t] [RKSt9nothrow_t]
_OPERATOR_RE = re.compile(r"^_Z(?P<op>n[wa]m|d[la]Pv)(?P<sized>m)?(?P<aligned>St11align_val_t)?"
                          r"(?P<nothrow>RKSt9nothrow_t)?$")

_DEFAULT_MUSL_PATH = "/lib:/usr/local/lib:/usr/lib"
_FALLBACK_SYSTEM_DIRS = ("/lib64", "/usr/lib64")
_MUSL_SELF = ("c.", "pthread.", "rt.", "m.", "dl.", "util.", "xnet.")
_LD_CACHE = "/etc/ld.so.cache"
_LD_PRELOAD_FILE = "/etc/ld.so.preload"

_PT_LOAD, _PT_INTERP, _PT_DYNAMIC, _PT_NOTE = 1, 3, 2, 4
_SHN_UNDEF = 0
_STT_OBJECT, _STT_FUNC, _STT_TLS, _STT_GNU_IFUNC = 1, 2, 6, 10
_OK_BINDS = (1, 2, 10)      # GLOBAL, WEAK, GNU_UNIQUE
_DF_1_NODEFLIB = 0x800


@dataclass(frozen=True)
class Site:
    """One place to probe: ``name`` at ``address`` (st_value), ``file_offset``
    in the object file.  ``role``: alloc, calloc, realloc, reallocarray,
    posix_memalign, aligned_alloc, free or sized_free; ``args``: (argument,
    index) pairs; ``family``: the tracer handler whose argument registers it
    matches; ``aliases``: other names at the same address (not probed again)."""

    name: str
    role: str
    args: Tuple[Tuple[str, int], ...]
    family: Optional[str]
    address: int
    file_offset: int
    aliases: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Allocator:
    """The answer for one executable.  ``module`` is the object's path as the
    process sees it, ``host_path`` the same file seen from here (under
    ``root``); ``scope`` is the loader's global scope (process paths, in
    lookup order) when it was computed."""

    kind: str
    module: Optional[str]
    covered: bool
    reason: Optional[str] = None
    sites: Tuple[Site, ...] = ()
    host_path: Optional[str] = None
    interpreter: Optional[str] = None
    scope: Tuple[str, ...] = ()
    deduped: Tuple[Tuple[str, str], ...] = ()     # (alias, the site name it shares an address with)
    notes: Tuple[str, ...] = ()

    def json(self) -> dict:
        """The report's per-process ``"allocator"`` object."""
        return {"kind": self.kind, "module": self.module, "covered": self.covered}


class ResolveError(Exception):
    """The executable itself cannot be read as an ELF file."""


# --------------------------------------------------------------------------
# ELF reading
# --------------------------------------------------------------------------

@dataclass
class _Sym:
    name: str
    value: int
    size: int
    bind: int
    type: int
    shndx: int
    version: Optional[str]      # defined version name (None: unversioned)
    hidden: bool


def _parse_symtab(data: bytes, strtab: bytes, versym, verdef) -> Tuple[Dict[str, List[_Sym]], set]:
    """(defined name -> symbols, undefined names) of a raw Elf64_Sym table."""
    defs: Dict[str, List[_Sym]] = {}
    undef: set = set()
    n = len(data) // 24
    for i, (st_name, st_info, _other, shndx, value, size) in enumerate(
            struct.iter_unpack("<IBBHQQ", data[:n * 24])):
        if i == 0 or st_name == 0:
            continue
        end = strtab.find(b"\0", st_name)
        name = strtab[st_name:end].decode("utf-8", "surrogateescape")
        if shndx == _SHN_UNDEF:
            undef.add(name)
            continue
        version, hidden = None, False
        if versym is not None and i < len(versym):
            hidden = bool(versym[i] & 0x8000)
            version = verdef.get(versym[i] & 0x7FFF)
        defs.setdefault(name.split("@", 1)[0], []).append(
            _Sym(name, value, size, st_info >> 4, st_info & 0xF, shndx, version, hidden))
    return defs, undef


class _Obj:
    """What the resolver needs of one ELF file (opened at ``host``)."""

    def __init__(self, host: str, f):
        self.host = host
        st = os.fstat(f.fileno())
        self.dev_ino = (st.st_dev, st.st_ino)
        self.mode = st.st_mode
        if st.st_size < 64:
            raise ValueError("too short for an ELF header")
        self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        m = self.map
        if m[:4] != b"\x7fELF":
            raise ValueError("not an ELF file")
        self.ok = m[4] == 2 and m[5] == 1 and struct.unpack_from("<H", m, 18)[0] == _EM_X86_64
        self.loads: List[Tuple[int, int, int]] = []
        self.interp: Optional[str] = None
        self.abi_tag = False
        self.needed: List[str] = []
        self.rpath: Optional[str] = None
        self.runpath: Optional[str] = None
        self.soname: Optional[str] = None
        self.flags_1 = 0
        self.has_dynamic = False
        self._defs: Optional[Dict[str, List[_Sym]]] = None
        self._undef: set = set()
        self._verdef: Dict[int, str] = {}
        self._verdef_done = False
        self._prepared: Optional[bool] = None
        self._dt: Dict[int, int] = {}
        if not self.ok:
            return
        phoff, = struct.unpack_from("<Q", m, 32)
        phentsize, phnum = struct.unpack_from("<HH", m, 54)
        dyn = None
        for i in range(phnum):
            p_type, _fl, p_offset, p_vaddr, _pa, p_filesz, _msz, _al = struct.unpack_from(
                "<IIQQQQQQ", m, phoff + i * phentsize)
            if p_type == _PT_LOAD:
                self.loads.append((p_vaddr, p_filesz, p_offset))
            elif p_type == _PT_INTERP:
                self.interp = bytes(m[p_offset:p_offset + p_filesz]).split(b"\0", 1)[0].decode(
                    "utf-8", "surrogateescape")
            elif p_type == _PT_DYNAMIC:
                dyn = (p_offset, p_filesz)
            elif p_type == _PT_NOTE:
                self.abi_tag |= _has_abi_tag(m, p_offset, p_filesz)
        if dyn is None:
            return
        self.has_dynamic = True
        tags: List[Tuple[int, int]] = []
        for d_tag, d_val in struct.iter_unpack("<qQ", m[dyn[0]:dyn[0] + dyn[1] // 16 * 16]):
            if d_tag == 0:
                break
            tags.append((d_tag, d_val))
        t = dict(tags)
        strtab_off = self._off(t.get(_DT_STRTAB, 0))
        strsz = t.get(_DT_STRSZ, 0)
        if strtab_off is None or not strsz:
            return
        self._strtab = bytes(m[strtab_off:strtab_off + strsz])

        def s(i: int) -> str:
            return self._strtab[i:self._strtab.find(b"\0", i)].decode("utf-8", "surrogateescape")

        for d_tag, d_val in tags:
            if d_tag == _DT_NEEDED:
                self.needed.append(s(d_val))
            elif d_tag == _DT_RPATH:
                self.rpath = s(d_val)
            elif d_tag == _DT_RUNPATH:
                self.runpath = s(d_val)
            elif d_tag == _DT_SONAME:
                self.soname = s(d_val)
            elif d_tag == _DT_FLAGS_1:
                self.flags_1 = d_val
        if self.runpath is not None:
            self.rpath = None           # glibc get-dynamic-info.h: RUNPATH voids RPATH
        self._dt = t

    def _off(self, vaddr: int) -> Optional[int]:
        return self.file_offset(vaddr) if vaddr else None

    # The dynamic symbol table is read the way the loader reads it -- through
    # the dynamic tags and the hash table, not the section headers -- which
    # also keeps a lookup at ~0.1 ms (pyelftools' section map costs ~10 ms a
    # library, paid by a paused process).
    def _sym_at(self, i: int) -> Optional[_Sym]:
        m = self.map
        off = self._symtab_off + 24 * i
        if off + 24 > len(m):
            return None
        st_name, st_info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", m, off)
        name = self._str(st_name)
        version, hidden = None, False
        if self._versym_off is not None:
            v, = struct.unpack_from("<H", m, self._versym_off + 2 * i)
            hidden = bool(v & 0x8000)
            version = self._verdefs().get(v & 0x7FFF)
        return _Sym(name, value, size, st_info >> 4, st_info & 0xF, shndx, version, hidden)

    def _str(self, i: int) -> str:
        st = self._strtab
        return st[i:st.find(b"\0", i)].decode("utf-8", "surrogateescape")

    def _verdefs(self) -> Dict[int, str]:
        if self._verdef_done:
            return self._verdef
        self._verdef_done = True
        off = self._off(self._dt.get(_DT_VERDEF, 0)) if self.has_dynamic else None
        n = self._dt.get(_DT_VERDEFNUM, 0) if self.has_dynamic else 0
        m = self.map
        for _ in range(n if off is not None else 0):
            _ver, _fl, ndx, cnt, _h, aux, nxt = struct.unpack_from("<HHHHIII", m, off)
            if cnt:
                vda_name, = struct.unpack_from("<I", m, off + aux)
                self._verdef[ndx] = self._str(vda_name)
            if not nxt:
                break
            off += nxt
        return self._verdef

    def _prepare(self) -> bool:
        if self._prepared is not None:
            return self._prepared
        self._prepared = False
        if not self.has_dynamic or not hasattr(self, "_strtab"):
            return False
        so = self._off(self._dt.get(_DT_SYMTAB, 0))
        if so is None:
            return False
        self._symtab_off = so
        self._versym_off = self._off(self._dt.get(_DT_VERSYM, 0))
        self._gnu = self._off(self._dt.get(_DT_GNU_HASH, 0))
        self._sysv = self._off(self._dt.get(_DT_HASH, 0))
        self._prepared = self._gnu is not None or self._sysv is not None
        return self._prepared

    def _nsyms(self) -> int:
        m = self.map
        if self._sysv is not None:
            return struct.unpack_from("<II", m, self._sysv)[1]
        nb, symoff, bloom, _sh = struct.unpack_from("<IIII", m, self._gnu)
        boff = self._gnu + 16 + 8 * bloom
        buckets = struct.unpack_from(f"<{nb}I", m, boff)
        last = max(buckets) if buckets else 0
        if last < symoff:
            return symoff
        coff = boff + 4 * nb
        while not struct.unpack_from("<I", m, coff + 4 * (last - symoff))[0] & 1:
            last += 1
        return last + 1

    def _lookup(self, name: str) -> List[_Sym]:
        m = self.map
        out = []
        bname = name.encode("utf-8", "surrogateescape")
        if self._gnu is not None:
            h = 5381
            for c in bname:
                h = (h * 33 + c) & 0xFFFFFFFF
            nb, symoff, bloom, _sh = struct.unpack_from("<IIII", m, self._gnu)
            boff = self._gnu + 16 + 8 * bloom
            i, = struct.unpack_from("<I", m, boff + 4 * (h % nb))
            if i == 0:
                return out
            coff = boff + 4 * nb
            while True:
                ch, = struct.unpack_from("<I", m, coff + 4 * (i - symoff))
                if (ch | 1) == (h | 1):
                    s = self._sym_at(i)
                    if s is not None and s.name == name:
                        out.append(s)
                if ch & 1:
                    return out
                i += 1
        nb, _nc = struct.unpack_from("<II", m, self._sysv)
        h = 0
        for c in bname:
            h = ((h << 4) + c) & 0xFFFFFFFF
            g = h & 0xF0000000
            if g:
                h ^= g >> 24
            h &= ~g & 0xFFFFFFFF
        i, = struct.unpack_from("<I", m, self._sysv + 8 + 4 * (h % nb))
        coff = self._sysv + 8 + 4 * nb
        seen = 0
        while i and seen < _nc:
            s = self._sym_at(i)
            if s is not None and s.name == name:
                out.append(s)
            i, = struct.unpack_from("<I", m, coff + 4 * i)
            seen += 1
        return out

    def _load_dynsym(self) -> None:
        if self._defs is not None:
            return
        self._defs = {}
        if not self._prepare():
            return
        n = self._nsyms()
        for i in range(1, n):
            sym = self._sym_at(i)
            if sym is None or not sym.name:
                continue
            if sym.shndx == _SHN_UNDEF:
                self._undef.add(sym.name)
            else:
                self._defs.setdefault(sym.name, []).append(sym)

    def dynamic_def(self, name: str) -> Optional[_Sym]:
        """The definition the loader binds an unversioned or default-version
        reference to (None: not defined here)."""
        if self._defs is not None:
            cands = self._defs.get(name, ())
        elif self._prepare():
            cands = self._lookup(name)
        else:
            return None
        for s in cands:
            if s.shndx == _SHN_UNDEF or s.hidden or s.bind not in _OK_BINDS:
                continue
            if s.value == 0 and s.type != _STT_TLS:
                continue
            return s
        return None

    def dynamic_defs(self) -> Dict[str, List[_Sym]]:
        self._load_dynsym()
        return self._defs  # type: ignore[return-value]

    def imports(self) -> set:
        """Names this object references without defining them."""
        if self._defs is None and self._prepare():
            n = self._nsyms()
            raw = self.map[self._symtab_off:self._symtab_off + 24 * n]
            self._undef = {self._str(st_name) for st_name, _i, _o, shndx, _v, _s
                           in struct.iter_unpack("<IBBHQQ", raw) if shndx == _SHN_UNDEF and st_name}
            return self._undef
        self._load_dynsym()
        return self._undef

    def verdef_names(self) -> List[str]:
        return list(self._verdefs().values()) if self.has_dynamic else []

    def symtab(self) -> Optional[Dict[str, List[_Sym]]]:
        try:
            elf = ELFFile(self.map)
            sec = elf.get_section_by_name(".symtab")
            if sec is None:
                return None
            strtab = elf.get_section(sec["sh_link"]).data()
            return _parse_symtab(sec.data(), strtab, None, {})[0]
        except (ELFError, ValueError, struct.error, IndexError):
            return None

    def file_offset(self, vaddr: int) -> Optional[int]:
        for p_vaddr, filesz, p_offset in self.loads:
            if p_vaddr <= vaddr < p_vaddr + filesz:
                return vaddr - p_vaddr + p_offset
        return None


def _has_abi_tag(m, off: int, size: int) -> bool:
    end = off + size
    while off + 12 <= end:
        namesz, descsz, ntype = struct.unpack_from("<III", m, off)
        name = bytes(m[off + 12:off + 12 + namesz])
        if ntype == 1 and name == b"GNU\0":
            return True
        off += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


_EM_X86_64 = 62
_DT_NEEDED, _DT_STRTAB, _DT_STRSZ, _DT_SONAME, _DT_RPATH, _DT_RUNPATH = 1, 5, 10, 14, 15, 29
_DT_FLAGS_1 = 0x6FFFFFFB
_DT_HASH, _DT_SYMTAB, _DT_GNU_HASH, _DT_VERSYM, _DT_VERDEF, _DT_VERDEFNUM = 4, 6, 0x6FFFFEF5, 0x6FFFFFF0, 0x6FFFFFFC, 0x6FFFFFFD


# --------------------------------------------------------------------------
# the filesystem as the process sees it
# --------------------------------------------------------------------------

class _Fs:
    """Maps the process's paths to paths here, following symlinks inside
    ``root`` (an absolute link target is relative to ``root``), and records
    every path tried so a cached answer can be re-checked."""

    def __init__(self, root: str, cwd: str):
        self.root = os.path.abspath(root)
        self.cwd = cwd
        self.tried: Dict[str, Optional[tuple]] = {}

    def absolute(self, path: str) -> str:
        return os.path.normpath(path if path.startswith("/") else os.path.join(self.cwd, path))

    def host(self, path: str) -> str:
        """Host path of a process path (resolved inside root)."""
        if self.root == "/":
            return self.absolute(path)
        return self.root.rstrip("/") + self.realpath(path)

    def realpath(self, path: str) -> str:
        """The process-view real path (symlinks resolved inside root)."""
        if self.root == "/":
            return os.path.realpath(self.absolute(path))
        parts = [p for p in self.absolute(path).split("/") if p]
        done: List[str] = []
        hops = 0
        while parts:
            p = parts.pop(0)
            if p == ".":
                continue
            if p == "..":
                if done:
                    done.pop()
                continue
            cand = self.root.rstrip("/") + "/" + "/".join(done + [p])
            try:
                target = os.readlink(cand)
            except OSError:
                done.append(p)
                continue
            hops += 1
            if hops > 40:
                raise OSError(40, "too many levels of symbolic links", path)
            tparts = [x for x in target.split("/") if x]
            if target.startswith("/"):
                done = []
            parts = tparts + parts
        return "/" + "/".join(done)

    def _note(self, host: str) -> Optional[os.stat_result]:
        try:
            st = os.stat(host)
        except OSError:
            self.tried[host] = None
            return None
        self.tried[host] = _stat_key(st)
        return st

    def read(self, path: str) -> Optional[bytes]:
        h = self.host(path)
        if self._note(h) is None:
            return None
        try:
            with open(h, "rb") as f:
                return f.read()
        except OSError:
            return None

    def open_obj(self, path: str) -> Optional[_Obj]:
        """The ELF object at process path ``path``; None when absent or not
        an x86-64 ELF64 object."""
        h = self.host(path)
        st = self._note(h)
        if st is None or not _stat.S_ISREG(st.st_mode):
            return None
        try:
            with open(h, "rb") as f:
                obj = _Obj(h, f)
        except (OSError, ValueError, struct.error):
            return None
        return obj if obj.ok else None


def _stat_key(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


# --------------------------------------------------------------------------
# /etc/ld.so.cache
# --------------------------------------------------------------------------

_CACHE_OLD = b"ld.so-1.7.0"
_CACHE_NEW = b"glibc-ld.so.cache1.1"
_CACHE_DEFAULT_ID = 0x0303           # FLAG_ELF_LIBC6 | FLAG_X8664_LIB64
_HWCAP_EXTENSION = 1 << 62
_EXT_MAGIC = (-358342284) & 0xFFFFFFFF
_EXT_TAG_HWCAPS = 1


@dataclass(frozen=True)
class CacheEntry:
    name: str
    path: str
    flags: int
    hwcap: int
    hwcaps_subdir: Optional[str]    # named glibc-hwcaps entry: its subdirectory


def parse_ld_so_cache(data: bytes) -> List[CacheEntry]:
    """Entries of a glibc ``ld.so.cache`` (``glibc-ld.so.cache1.1``, alone or
    after the old ``ld.so-1.7.0`` table), in file order.  ValueError when the
    data is neither."""
    off = 0
    if data.startswith(_CACHE_OLD):
        (nlibs,) = struct.unpack_from("<I", data, len(_CACHE_OLD))
        off = len(_CACHE_OLD) + 4 + nlibs * 12
        off = (off + 7) & ~7                     # the new table is 8-aligned
        if not data.startswith(_CACHE_NEW, off):
            raise ValueError("ld.so.cache: old format only (not read by glibc >= 2.32)")
    if not data.startswith(_CACHE_NEW, off):
        raise ValueError("ld.so.cache: unknown magic")
    nlibs, len_strings, flags, ext_off = struct.unpack_from("<IIB3xI", data, off + 20)
    if flags & 3 == 3:
        raise ValueError("ld.so.cache: big-endian cache")
    if flags & 3 == 1:
        raise ValueError("ld.so.cache: marked invalid")
    # string offsets are relative to the start of the new header
    base = off

    def cstr(i: int) -> str:
        j = data.index(b"\0", base + i)
        return data[base + i:j].decode("utf-8", "surrogateescape")

    hwcaps: List[str] = []
    if ext_off and ext_off + 8 <= len(data):
        magic, count = struct.unpack_from("<II", data, base + ext_off)
        if magic == _EXT_MAGIC:
            for k in range(count):
                tag, _fl, s_off, s_size = struct.unpack_from("<IIII", data, base + ext_off + 8 + 16 * k)
                if tag == _EXT_TAG_HWCAPS:
                    idxs = struct.unpack_from(f"<{s_size // 4}I", data, base + s_off)
                    hwcaps = [cstr(i) for i in idxs]
    out = []
    ents = off + 48
    for k in range(nlibs):
        fl, key, value, _osv, hwcap = struct.unpack_from("<iIIIQ", data, ents + 24 * k)
        sub = None
        if ((hwcap >> 32) & ~((1 << 10) - 1)) == (_HWCAP_EXTENSION >> 32):
            i = hwcap & 0xFFFFFFFF
            sub = hwcaps[i] if i < len(hwcaps) else ""
        out.append(CacheEntry(cstr(key), cstr(value), fl, hwcap, sub))
    return out


def cache_lookup(entries: Sequence[CacheEntry], name: str, hwcaps_order: Sequence[str]) -> Optional[str]:
    """glibc's ``search_cache``: among the entries for ``name`` with usable
    flags, the named-hwcaps entry of highest priority (``hwcaps_order``:
    supported subdirectories, best first), else the first plain entry
    (legacy hwcap entries are skipped)."""
    best, best_prio = None, None
    for e in entries:
        if e.name != name or e.flags not in (1, _CACHE_DEFAULT_ID):
            continue
        if e.hwcaps_subdir is not None:
            if e.hwcaps_subdir not in hwcaps_order:
                continue
            prio = hwcaps_order.index(e.hwcaps_subdir)
            if best is None or prio < best_prio:
                best, best_prio = e.path, prio
            continue
        if best is not None:
            return best
        if e.hwcap != 0:
            continue
        best = e.path
        if e.flags == _CACHE_DEFAULT_ID:
            return best
    return best


# --------------------------------------------------------------------------
# CPU and interpreter facts
# --------------------------------------------------------------------------

_ISA_LEVELS = (
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
)
_hwcaps_cache: Optional[Tuple[str, ...]] = None


def glibc_hwcaps_subdirs() -> Tuple[str, ...]:
    """The ``glibc-hwcaps`` subdirectories this CPU supports, best first
    (glibc's x86-64-v2/v3/v4 definitions, from /proc/cpuinfo's flags)."""
    global _hwcaps_cache
    if _hwcaps_cache is None:
        flags: set = set()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
        levels = []
        for name, need in _ISA_LEVELS:
            if not need <= flags:
                break
            levels.append(name)
        _hwcaps_cache = tuple(reversed(levels))
    return _hwcaps_cache


# glibc < 2.37 also tries these (2.36 on x86-64, as LD_DEBUG=libs shows them)
_LEGACY_SUBDIRS = ("tls/x86_64/x86_64", "tls/x86_64", "tls", "x86_64/x86_64", "x86_64")


@dataclass
class _Interp:
    kind: str                          # "glibc" | "musl"
    path: str
    obj: Optional[_Obj]
    system_dirs: Tuple[str, ...] = ()
    subdirs: Tuple[str, ...] = ()


def _glibc_interp_facts(data: bytes) -> Tuple[Tuple[str, ...], bool]:
    """(system dirs, legacy hwcaps subdirs searched) read from ld.so's bytes:
    its ``system_dirs`` string (NUL-separated absolute directories ending in
    ``/``) and its ``release version 2.NN``."""
    dirs: Tuple[str, ...] = ()
    pos = data.find(b"/\0/")
    while pos >= 0 and not dirs:
        start = pos
        while start > 0 and 0x21 <= data[start - 1] <= 0x7E:
            start -= 1
        end = pos + 2
        while True:                      # extend over following "/...../\0" items
            j = end
            while j < len(data) and 0x21 <= data[j] <= 0x7E:
                j += 1
            if j > end and j < len(data) and data[j] == 0 and data[j - 1] == ord("/") and data[end] == ord("/"):
                end = j + 1
            else:
                break
        cand = [d.decode() for d in data[start:end].split(b"\0") if d]
        if len(cand) >= 2 and all(d.startswith("/") and d.endswith("/") and "lib" in d for d in cand):
            dirs = tuple(d.rstrip("/") or "/" for d in cand)
        pos = data.find(b"/\0/", end)
    v = re.search(rb"release version 2\.(\d+)", data)
    legacy = v is None or int(v.group(1)) < 37
    return dirs or _FALLBACK_SYSTEM_DIRS, legacy


# --------------------------------------------------------------------------
# the resolver
# --------------------------------------------------------------------------

@dataclass
class _Loaded:
    path: str                  # process path it was loaded under (as found)
    obj: _Obj
    names: set = field(default_factory=set)
    loader: Optional["_Loaded"] = None
    is_interp: bool = False


def _is_secure(st: os.stat_result, uid: int, gid: int, host: str) -> bool:
    if st.st_mode & _stat.S_ISUID and st.st_uid != uid:
        return True
    if st.st_mode & _stat.S_ISGID and st.st_gid != gid:
        return True
    try:
        os.getxattr(host, "security.capability")
        return True
    except OSError:
        return False


class _Resolver:
    def __init__(self, fs: _Fs, env: Mapping[str, str], secure: bool):
        self.fs = fs
        self.env = env
        self.secure = secure
        self.scope: List[_Loaded] = []
        self.notes: List[str] = []
        self._cache_entries: Optional[List[CacheEntry]] = None
        self.dst_lib = "lib64"

    # -- glibc ----------------------------------------------------------
    def _expand(self, ent: str, origin: Optional[str], glibc: bool) -> Optional[str]:
        """``$ORIGIN`` (glibc also ``$PLATFORM``, ``$LIB``) expanded; None
        when the element must be dropped."""
        if "$" not in ent:
            return ent
        if origin is None:
            return None
        out = re.sub(r"\$(\{ORIGIN\}|ORIGIN(?![A-Za-z0-9_]))", lambda _m: origin, ent)
        if glibc:
            out = re.sub(r"\$(\{PLATFORM\}|PLATFORM(?![A-Za-z0-9_]))", "x86_64", out)
            out = re.sub(r"\$(\{LIB\}|LIB(?![A-Za-z0-9_]))", lambda _m: self.dst_lib, out)
        return None if "$" in out else out

    def _path_list(self, value: str, origin: Optional[str], glibc: bool, seps: str = ":") -> List[str]:
        """glibc (``fillin_rpath``): split at ``seps``, an empty element is the
        cwd, DSTs expanded; musl (``path_open``): split at colon and newline,
        empty elements skipped, no expansion here."""
        out = []
        for p in re.split("[" + re.escape(seps) + "]", value):
            if p == "":
                if not glibc:
                    continue
                out.append("")
                continue
            e = self._expand(p, origin, glibc) if glibc else p
            if not e:
                continue
            out.append(e.rstrip("/") or "/")
        return out

    def _try_dirs(self, name: str, dirs: Sequence[str], subdirs: Sequence[str],
                  want_suid: bool = False) -> Optional[Tuple[str, _Obj]]:
        for d in dirs:
            for sub in subdirs:
                pre = f"{d}/" if d else ""
                path = f"{pre}{sub}/{name}" if sub else f"{pre}{name}"
                obj = self.fs.open_obj(path)
                if obj is None:
                    continue
                if want_suid and not obj.mode & _stat.S_ISUID:
                    continue
                return self.fs.absolute(path), obj
        return None

    def _origin(self, l: _Loaded) -> str:
        if l is self.scope[0]:
            return os.path.dirname(self.fs.realpath(l.path))
        return os.path.dirname(self.fs.absolute(l.path))

    def _find_loaded(self, name: str) -> Optional[_Loaded]:
        for l in self.scope:
            if name in l.names or (l.obj.soname == name):
                l.names.add(name)
                return l
        return None

    def _add(self, path: str, obj: _Obj, name: str, loader: Optional[_Loaded]) -> _Loaded:
        for l in self.scope:
            if l.obj.dev_ino == obj.dev_ino:
                l.names.add(name)
                return l
        l = _Loaded(path, obj, {name, path}, loader)
        self.scope.append(l)
        return l

    def _glibc_search(self, name: str, loader: _Loaded, interp: _Interp, preload: bool) -> Optional[Tuple[str, _Obj]]:
        subdirs = interp.subdirs
        secure_pre = preload and self.secure
        main = self.scope[0]

        def search(spec: str, origin_of: _Loaded):
            """One DT_RPATH/DT_RUNPATH list (a secure process keeps only the
            system directories of a list that uses $ substitutions)."""
            dirs = self._path_list(spec, self._origin(origin_of), True)
            if "$" in spec and self.secure:
                dirs = [d for d in dirs if d in interp.system_dirs]
            return self._try_dirs(name, dirs, subdirs, secure_pre)

        if loader.obj.runpath is None:
            did_main = False
            l: Optional[_Loaded] = loader
            while l is not None:
                if l.obj.rpath is not None:
                    hit = search(l.obj.rpath, l)
                    if hit:
                        return hit
                    did_main |= l is main
                l = l.loader
            if not did_main and main.obj.rpath is not None:
                hit = search(main.obj.rpath, main)
                if hit:
                    return hit
        llp = self.env.get("LD_LIBRARY_PATH")
        if llp and not self.secure:
            dirs = self._path_list(llp, self._origin(main), True, ":;")
            hit = self._try_dirs(name, dirs, subdirs, secure_pre)
            if hit:
                return hit
        if loader.obj.runpath is not None:
            hit = search(loader.obj.runpath, loader)
            if hit:
                return hit
        nodeflib = bool(loader.obj.flags_1 & _DF_1_NODEFLIB)
        if not secure_pre:
            cached = cache_lookup(self._ld_cache(), name, glibc_hwcaps_subdirs())
            if cached is not None:
                if not (nodeflib and os.path.dirname(cached) in interp.system_dirs):
                    obj = self.fs.open_obj(cached)
                    if obj is not None:
                        return cached, obj
        if not nodeflib:
            return self._try_dirs(name, interp.system_dirs, subdirs, secure_pre)
        return None

    def _ld_cache(self) -> List[CacheEntry]:
        if self._cache_entries is None:
            self._cache_entries = []
            got = _parsed(self.fs, _LD_CACHE, parse_ld_so_cache)
            if isinstance(got, Exception):
                self.notes.append(f"{_LD_CACHE} ignored: {got}")
            elif got is not None:
                self._cache_entries = got
        return self._cache_entries

    def _glibc_load(self, name: str, loader: _Loaded, interp: _Interp, preload: bool) -> Optional[_Loaded]:
        if "/" not in name:
            hit = self._find_loaded(name)
            if hit is not None:
                return hit
            found = self._glibc_search(name, loader, interp, preload)
        else:
            obj = self.fs.open_obj(name)
            found = (self.fs.absolute(name), obj) if obj is not None else None
        if found is None:
            self.notes.append(f"{name}: not found (needed by {loader.path})" if not preload
                              else f"{name}: cannot be preloaded (not found)")
            return None
        return self._add(found[0], found[1], name, loader)

    def glibc(self, interp: _Interp) -> None:
        main = self.scope[0]
        il = _Loaded(interp.path, interp.obj, {interp.path}, None, True) if interp.obj else None
        if il is not None:
            self.scope.append(il)     # rtld is loaded first; its place in the scope is fixed below
        preloads: List[str] = []
        pre = self.env.get("LD_PRELOAD")
        if pre:
            for n in re.split(r"[ :]", pre):
                if n and not (self.secure and "/" in n):
                    preloads.append(n)
        pre_data = self.fs.read(_LD_PRELOAD_FILE)
        file_preloads = []
        if pre_data is not None:
            text = re.sub(rb"#[^\n]*", b" ", pre_data).decode("utf-8", "surrogateescape")
            file_preloads = [n for n in re.split(r"[: \t\n]", text) if n]
        order: List[_Loaded] = [main]
        for n in preloads + file_preloads:         # both with __RTLD_SECURE (rtld.c do_preload)
            l = self._glibc_load(n, main, interp, preload=True)
            if l is not None and l not in order:
                order.append(l)
        self._bfs(order, lambda n, p: self._glibc_load(n, p, interp, False), il)

    def _bfs(self, order: List[_Loaded], load, interp_l: Optional[_Loaded]) -> None:
        i = 0
        while i < len(order):
            p = order[i]
            for n in p.obj.needed:
                dep = load(n, p)
                if dep is not None and dep not in order:
                    order.append(dep)
            i += 1
        if interp_l is not None and interp_l not in order:
            order.append(interp_l)
        self.scope = order

    # -- musl -------------------------------------------------------------
    def _musl_sys_path(self, interp: _Interp) -> List[str]:
        name = interp.path
        prefix = ""
        if name.startswith("/"):
            slashes = [i for i, c in enumerate(name) if c == "/"]
            prefix = name[:slashes[-2]] if len(slashes) >= 2 else ""
        pf = f"{prefix}/etc/ld-musl-x86_64.path"
        data = self.fs.read(pf)
        if data is None:
            if os.path.lexists(self.fs.host(pf)):
                return []             # exists but unreadable: musl uses an empty path
            return self._path_list(_DEFAULT_MUSL_PATH, None, False, ":\n")
        return self._path_list(data.decode("utf-8", "surrogateescape"), None, False, ":\n")

    def _musl_load(self, name: str, needed_by: Optional[_Loaded], interp: _Interp,
                   interp_l: _Loaded) -> Optional[_Loaded]:
        if name.startswith("lib") and any(name[3:].startswith(r) for r in _MUSL_SELF):
            return interp_l
        if name == interp.path:
            return interp_l
        if "/" in name:
            obj = self.fs.open_obj(name)
            found = (self.fs.absolute(name), obj) if obj is not None else None
        else:
            for l in self.scope:
                if name in l.names:
                    return l
            found = None
            llp = self.env.get("LD_LIBRARY_PATH")
            if llp and not self.secure:
                found = self._try_dirs(name, self._path_list(llp, None, False, ":\n"), ("",))
            p = needed_by
            while found is None and p is not None:
                rp = p.obj.runpath if p.obj.runpath is not None else p.obj.rpath
                if rp is not None:
                    dirs = self._musl_rpath(rp, p)
                    if dirs:
                        found = self._try_dirs(name, dirs, ("",))
                p = p.loader
            if found is None:
                found = self._try_dirs(name, self._musl_sys_path(interp), ("",))
        if found is None:
            self.notes.append(f"{name}: not found" + (f" (needed by {needed_by.path})" if needed_by else ""))
            return None
        obj = found[1]
        for l in self.scope:
            if l.obj.dev_ino == obj.dev_ino:
                l.names.add(name)
                return l
        if obj.dynamic_def("__libc_start_main") and obj.dynamic_def("stdin"):
            return self._musl_load("libc.so", needed_by, interp, interp_l)
        l = _Loaded(found[0], obj, {name} if "/" not in name else set(), needed_by)
        self.scope.append(l)
        return l

    def _musl_rpath(self, rp: str, p: _Loaded) -> List[str]:
        if "$" in rp:
            if re.search(r"\$(?!ORIGIN|\{ORIGIN\})", rp):
                return []
            if p is self.scope[0]:
                if self.secure:
                    return []
            origin = self._origin(p)
            if self.secure and not origin.startswith("/"):
                return []
            rp = rp.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
        return self._path_list(rp, None, False, ":\n")

    def musl(self, interp: _Interp) -> None:
        main = self.scope[0]
        il = _Loaded(interp.path, interp.obj, {"libc.so"}, None, True)
        order = [main]
        pre = self.env.get("LD_PRELOAD")
        if pre and not self.secure:
            for n in re.split(r"[\s:]", pre):
                if n:
                    l = self._musl_load(n, None, interp, il)
                    if l is not None and l not in order:
                        order.append(l)
        self._bfs(order, lambda n, p: self._musl_load(n, p, interp, il), None)
        # musl adds itself where first needed; a program needing no libc still has it last
        if il not in self.scope:
            self.scope.append(il)


_parsed_lock = threading.Lock()
_parsed_cache: Dict[Tuple[str, str], Tuple[tuple, object]] = {}


def _parsed(fs: "_Fs", path: str, parse):
    """``parse(bytes)`` of the file at process path ``path``, kept per file
    identity for the whole process (ld.so.cache, an interpreter's facts).
    None when the file is absent; the exception when parse raised
    ValueError."""
    host = fs.host(path)
    st = fs._note(host)
    if st is None:
        return None
    key = (host, parse.__name__)
    with _parsed_lock:
        hit = _parsed_cache.get(key)
    if hit is not None and hit[0] == _stat_key(st):
        return hit[1]
    try:
        with open(host, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        val: object = parse(data)
    except (ValueError, struct.error, IndexError) as exc:
        val = ValueError(str(exc))
    with _parsed_lock:
        _parsed_cache[key] = (_stat_key(st), val)
    return val


def clear_caches() -> None:
    """Forget the process-wide parses (ld.so.cache, interpreters)."""
    with _parsed_lock:
        _parsed_cache.clear()


def _interp_kind(path: str) -> str:
    return "musl" if "ld-musl" in os.path.basename(path) else "glibc"


def resolve_allocator(executable: str, env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                      root: str = "/", *, uid: Optional[int] = None, gid: Optional[int] = None,
                      secure: Optional[bool] = None) -> Allocator:
    """The allocator ``executable`` will use when run with ``env`` in ``cwd``
    under ``root`` (paths are the process's view; ``root`` is where that view
    is found from here, e.g. ``/proc/PID/root``).  ``secure``: AT_SECURE
    (default: from the file's set-user/group-ID bits against ``uid``/``gid``
    and file capabilities).  Raises :class:`ResolveError` when the executable
    cannot be read as an ELF file; an ELF file of another class or machine is
    an answer (not covered)."""
    return _resolve(executable, env, cwd, root, uid, gid, secure)[0]


def _resolve(executable, env, cwd, root, uid, gid, secure) -> Tuple[Allocator, Dict[str, Optional[tuple]]]:
    env = dict(os.environ if env is None else env)
    fs = _Fs(root, cwd or os.getcwd())
    host = fs.host(executable)
    try:
        st = os.stat(host)
        fs.tried[host] = _stat_key(st)
        with open(host, "rb") as f:
            exe = _Obj(host, f)
    except (OSError, ValueError, struct.error) as exc:
        raise ResolveError(f"{executable}: cannot be read as an ELF file: {exc}") from None
    if not exe.ok:
        return Allocator("other", None, False, "not an x86-64 ELF64 program (another class or machine): "
                         "not probed"), fs.tried
    if secure is None:
        secure = _is_secure(st, os.getuid() if uid is None else uid, os.getgid() if gid is None else gid, host)
    main_path = fs.absolute(executable)
    if exe.interp is None and exe.has_dynamic and (
            (exe.soname or "").startswith("ld-linux")           # glibc's ld.so
            or exe.dynamic_def("__dls3") is not None):          # musl's loader-and-libc
        return Allocator("other", None, False, "the dynamic loader run as a command (ld.so PROGRAM ...): "
                         "the allocator is the one of the program it loads", interpreter=main_path), fs.tried
    if exe.interp is None:
        return _static(exe, main_path, host), fs.tried
    r = _Resolver(fs, env, secure)
    main = _Loaded(main_path, exe, {main_path})
    r.scope = [main]
    ikind = _interp_kind(exe.interp)
    iobj = fs.open_obj(exe.interp)
    interp = _Interp(ikind, exe.interp, iobj)
    if iobj is None:
        return Allocator("other", None, False, f"its interpreter {exe.interp} cannot be read",
                         interpreter=exe.interp), fs.tried
    if ikind == "glibc":
        facts = _parsed(fs, exe.interp, _glibc_interp_facts)
        interp.system_dirs, legacy = facts if isinstance(facts, tuple) else (_FALLBACK_SYSTEM_DIRS, True)
        r.dst_lib = os.path.basename(interp.system_dirs[0])     # DL_DST_LIB: notdir(slibdir)
        interp.subdirs = tuple(f"glibc-hwcaps/{s}" for s in glibc_hwcaps_subdirs()) + \
            (_LEGACY_SUBDIRS if legacy else ()) + ("",)
        r.glibc(interp)
    else:
        r.musl(interp)
    scope = r.scope
    for l in scope:
        sym = l.obj.dynamic_def("malloc")
        if sym is not None:
            return _dynamic(l, sym, scope, interp, r, fs), fs.tried
    return Allocator("other", None, False,
                     "no object of the process defines malloc (" + "; ".join(r.notes or ["scope: " + ", ".join(
                         x.path for x in scope)]) + ")",
                     interpreter=exe.interp, scope=tuple(x.path for x in scope), notes=tuple(r.notes)), fs.tried


def _kind_of(obj: _Obj, has, path: str, malloc_version: Optional[str],
             interp: Optional[_Interp], is_interp: bool) -> str:
    """The allocator kind (see the module docstring); ``has(name)``: the
    object defines ``name``."""
    names = {os.path.basename(path)} | ({obj.soname} if obj.soname else set())
    if has("mallctl") or has("je_mallctl") or any(n.startswith("libjemalloc") for n in names):
        return "jemalloc"
    if has("tc_version") or has("MallocExtension_GetNumericProperty") or \
            any(n.startswith("libtcmalloc") for n in names):
        return "tcmalloc"
    if has("mi_version") or any(n.startswith("libmimalloc") for n in names):
        return "mimalloc"
    if malloc_version is not None and malloc_version.startswith("GLIBC_"):
        return "glibc"
    glibc_versions = any(v.startswith("GLIBC_") for v in obj.verdef_names())
    if (is_interp and interp is not None and interp.kind == "musl") or \
            (has("__libc_start_main") and not glibc_versions):
        return "musl"
    return "other"


# every operator new/delete an LP64 C++ runtime can export
OPERATORS: Tuple[str, ...] = tuple(
    [f"_Zn{k}m{a}{t}" for k in "wa" for a in ("", "St11align_val_t") for t in ("", "RKSt9nothrow_t")] +
    [f"_Zd{k}Pv{z}{a}{t}" for k in "la" for z in ("", "m") for a in ("", "St11align_val_t")
     for t in ("", "RKSt9nothrow_t")])


def _operator_role(name: str) -> Optional[Tuple[str, Tuple[Tuple[str, int], ...], str]]:
    m = _OPERATOR_RE.match(name)
    if m is None:
        return None
    if m.group("op").startswith("n"):
        if m.group("sized"):
            return None
        if m.group("aligned"):
            return "aligned_alloc", (("size", 0), ("align", 1)), "malloc"
        return "alloc", (("size", 0),), "malloc"
    if m.group("sized"):
        return "sized_free", (("ptr", 0), ("size", 1)), "free"
    return "free", (("ptr", 0),), "free"


def _build_sites(obj: _Obj, lookup, names_roles: List[Tuple[str, str, tuple, Optional[str]]]
                 ) -> Tuple[List[Site], List[Tuple[str, str]], List[str]]:
    """Sites for (name, role, args, family) in priority order, deduped by address."""
    by_addr: Dict[int, int] = {}
    sites: List[Site] = []
    deduped: List[Tuple[str, str]] = []
    notes: List[str] = []
    for name, role, args, fam in names_roles:
        sym = lookup(name)
        if sym is None:
            continue
        if sym.type == _STT_GNU_IFUNC:
            notes.append(f"{name} is an IFUNC (its st_value is the resolver): not probed")
            continue
        off = obj.file_offset(sym.value)
        if off is None:
            notes.append(f"{name}: address {sym.value:#x} is in no PT_LOAD segment")
            continue
        if sym.value in by_addr:
            i = by_addr[sym.value]
            s = sites[i]
            sites[i] = Site(s.name, s.role, s.args, s.family, s.address, s.file_offset, s.aliases + (name,))
            deduped.append((name, s.name))
            continue
        by_addr[sym.value] = len(sites)
        sites.append(Site(name, role, args, fam, sym.value, off))
    return sites, deduped, notes


def _fold_aliases(sites: List[Site], deduped: List[Tuple[str, str]], names: Sequence[str], lookup) -> None:
    """Names not probed for themselves that share a site's address become its
    aliases (and are reported in ``deduped``)."""
    at = {s.address: i for i, s in enumerate(sites)}
    for n in names:
        sym = lookup(n)
        if sym is None or sym.value not in at:
            continue
        i = at[sym.value]
        s = sites[i]
        sites[i] = Site(s.name, s.role, s.args, s.family, s.address, s.file_offset, s.aliases + (n,))
        deduped.append((n, s.name))


def _dynamic(l: _Loaded, msym: _Sym, scope: List[_Loaded], interp: _Interp, r: _Resolver, fs: _Fs) -> Allocator:
    obj = l.obj
    has = obj.dynamic_def
    kind = _kind_of(obj, lambda n: has(n) is not None, fs.realpath(l.path), msym.version, interp, l.is_interp)
    fam = [(n, FAMILY[n][0], FAMILY[n][1], n) for n in FAMILY]

    def first_definer(name: str) -> Optional[_Loaded]:
        for x in scope:
            if x.obj.dynamic_def(name) is not None:
                return x
        return None

    # operators the loader binds to this object (it is their first definer)
    ops = []
    for n in OPERATORS:
        if has(n) is not None and first_definer(n) is l:
            role, args, f = _operator_role(n)  # type: ignore[misc]
            ops.append((n, role, args, f))
    # allocator-specific names: probed only when some other object of the
    # process imports them; at a family address they are reported as aliases
    defined = [n for n in _ALIASES if has(n) is not None]
    fam_addrs = {has(n).value for n in FAMILY if has(n) is not None}  # type: ignore[union-attr]
    fam_addrs |= {has(n).value for n, *_ in ops}  # type: ignore[union-attr]
    imported: set = set()
    if any(has(n).value not in fam_addrs for n in defined):  # type: ignore[union-attr]
        for x in scope:
            if x is not l:
                imported |= x.obj.imports()
    extra = [(n, *_ALIASES[n]) for n in defined if n in imported]
    sites, deduped, notes = _build_sites(obj, has, fam + ops + extra)
    _fold_aliases(sites, deduped, [n for n in defined if n not in imported], has)
    names = {s.name for s in sites}
    covered = "malloc" in names and "free" in names
    reason = None if covered else "its " + " and ".join(
        n for n in ("malloc", "free") if n not in names) + " cannot be probed (" + "; ".join(notes) + ")"
    real = fs.realpath(l.path)
    return Allocator(kind, real, covered, reason, tuple(sites), fs.host(real), interp.path,
                     tuple(x.path for x in scope), tuple(deduped), tuple(r.notes + notes))


def _static(exe: _Obj, path: str, host: str) -> Allocator:
    tab = exe.symtab()
    if tab is None:
        kind = "static-glibc" if exe.abi_tag else "other"
        return Allocator(kind, None, False, "static executable without a symbol table (stripped): "
                         "its malloc cannot be located", host_path=None)
    if "malloc" not in tab:
        return Allocator("other", None, False, "static executable without malloc (a runtime with its "
                         "own allocator, e.g. Go): its allocations are not visible", host_path=None)

    def lookup(name: str) -> Optional[_Sym]:
        for s in tab.get(name, ()):
            if s.shndx != _SHN_UNDEF and s.value and s.type in (_STT_FUNC, _STT_GNU_IFUNC, 0) \
                    and s.bind in _OK_BINDS:
                return s
        return None

    if lookup("malloc") is None:
        return Allocator("other", None, False, "static executable without a global malloc")
    kind = _kind_of(exe, lambda n: n in tab, path, None, None, False)
    if kind in ("glibc", "musl", "other"):
        if exe.abi_tag or "__libc_setup_tls" in tab:
            kind = "static-glibc"
        elif "__init_libc" in tab:
            kind = "static-musl"
        else:
            kind = "other"
    fam = [(n, FAMILY[n][0], FAMILY[n][1], n) for n in FAMILY]
    sites, deduped, notes = _build_sites(exe, lookup, fam)
    _fold_aliases(sites, deduped, [n for n in _ALIASES if n in tab] +
                  [n for n in ("__libc_malloc", "__libc_calloc", "__libc_free") if n in tab], lookup)
    names = {s.name for s in sites}
    covered = "malloc" in names and "free" in names
    reason = None if covered else "its malloc/free cannot be probed (" + "; ".join(notes) + ")"
    return Allocator(kind, path, covered, reason, tuple(sites), host, None, (path,), tuple(deduped), tuple(notes))


# --------------------------------------------------------------------------
# a live process (e.g. one stopped at exec)
# --------------------------------------------------------------------------

_AT_NULL, _AT_SECURE = 0, 23


def process_inputs(pid: int, exe: Optional[str] = None) -> dict:
    """The inputs of :func:`resolve_allocator` for process ``pid`` as it is
    now (meant for a process stopped right after its exec, before its
    loader runs): its executable, environment (``/proc/PID/environ``), cwd,
    root (``"/"`` when it is this process's root, else ``/proc/PID/root``) and
    AT_SECURE (from ``/proc/PID/auxv``).  ``exe``: the path it exec'd as it
    sees it (needed when its root is not ours); default ``/proc/PID/exe``'s
    target.  OSError when the process is gone or not readable."""
    proc = f"/proc/{pid}"
    rst, ours = os.stat(f"{proc}/root"), os.stat("/")
    same_root = (rst.st_dev, rst.st_ino) == (ours.st_dev, ours.st_ino)
    if exe is None:
        if not same_root:
            raise ValueError(f"process {pid} has another root: pass the path it exec'd")
        exe = os.readlink(f"{proc}/exe")
    with open(f"{proc}/environ", "rb") as f:
        raw = f.read()
    env = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            env.setdefault(k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
    with open(f"{proc}/auxv", "rb") as f:
        aux = f.read()
    secure = False
    for typ, val in struct.iter_unpack("<QQ", aux[:len(aux) // 16 * 16]):
        if typ == _AT_NULL:
            break
        if typ == _AT_SECURE:
            secure = bool(val)
    cwd = os.readlink(f"{proc}/cwd")
    return {"executable": exe, "env": env, "cwd": cwd, "root": "/" if same_root else f"{proc}/root",
            "secure": secure}


def resolve_process(pid: int, cache: Optional["AllocatorCache"] = None, exe: Optional[str] = None) -> Allocator:
    """:func:`resolve_allocator` (through ``cache`` when given) for process
    ``pid``, from :func:`process_inputs`."""
    args = process_inputs(pid, exe)
    if cache is not None:
        return cache.resolve(**args)
    return resolve_allocator(**args)


# --------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------

class AllocatorCache:
    """Answers of :func:`resolve_allocator`, kept per executable identity
    (st_dev, st_ino, mtime, size) and the inputs that change the answer."""

    ENV_KEYS = ("LD_PRELOAD", "LD_LIBRARY_PATH")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: Dict[tuple, Tuple[Allocator, Tuple[Tuple[str, Optional[tuple]], ...]]] = {}
        self.hits = 0
        self.misses = 0

    def _key(self, executable, env, cwd, root, uid, gid, secure) -> Optional[tuple]:
        fs = _Fs(root, cwd or os.getcwd())
        try:
            st = os.stat(fs.host(executable))
        except OSError:
            return None
        vals = tuple(env.get(k) for k in self.ENV_KEYS)
        relative = not executable.startswith("/") or any(
            v and any(not p.startswith("/") for p in re.split(r"[ :]", v) if p) for v in vals)
        return (_stat_key(st), os.path.abspath(root), vals, secure, uid, gid,
                fs.cwd if relative else None, executable if relative else None)

    def resolve(self, executable: str, env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                root: str = "/", *, uid: Optional[int] = None, gid: Optional[int] = None,
                secure: Optional[bool] = None, validate: bool = True) -> Allocator:
        """As :func:`resolve_allocator`; a repeated question is answered from
        the cache (``validate``: after re-checking that the files it depended on
        are unchanged)."""
        env = dict(os.environ if env is None else env)
        key = self._key(executable, env, cwd, root, uid, gid, secure)
        if key is not None:
            with self._lock:
                hit = self._entries.get(key)
            if hit is not None and (not validate or _still_valid(hit[1])):
                self.hits += 1
                return hit[0]
        self.misses += 1
        ans, tried = _resolve(executable, env, cwd, root, uid, gid, secure)
        if key is not None:
            with self._lock:
                self._entries[key] = (ans, tuple(tried.items()))
        return ans

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _still_valid(deps) -> bool:
    for path, key in deps:
        try:
            cur = _stat_key(os.stat(path))
        except OSError:
            cur = None
        if cur != key:
            return False
    return True
