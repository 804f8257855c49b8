"""Compiled-program cache.

BCC compiles the BPF C source with clang every time it loads it (~0.6 s of a
session's start here). The first session with a given source, set of flags,
kernel and BCC saves what the compile produced: each function's instructions
and each map's definition (type, sizes, flags, and BCC's description of its
key and value types). Later sessions create the maps and load the programs
straight from that, patching the map file descriptors the instructions refer
to. Anything unexpected (a damaged or foreign entry, a program the kernel
refuses) falls back to compiling. A fresh compile is loaded the same way
(whether or not it can be saved), so every session's programs go through
one loader.

Kernel functions (kfuncs): BCC cannot emit a kfunc call, so the BPF source
calls placeholder helper ids (KFUNCS); the loader rewrites each such call
into a call of the kernel function by its BTF id in this kernel's vmlinux
BTF (looked up with libbpf, which BCC itself depends on). A program that
calls a kfunc this kernel lacks is refused with an error naming it.

The entries are BPF bytecode that root loads into the kernel: a cache
directory or entry that is not owned by the current user, or that others may
write, is never used. PYTEST_MEMLEAK_EBPF_CACHE=off turns the cache off;
any other value is the directory to use (default: ~/.cache/pytest-memleak-ebpf).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

CACHE_ENV = "PYTEST_MEMLEAK_EBPF_CACHE"
FORMAT = 1
_BPF_MAP_CREATE, _BPF_PROG_LOAD = 0, 5
_PSEUDO_MAP = (1, 2)   # BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE: imm is a map fd
_LD_IMM64 = 0x18
_CALL = 0x85            # BPF_JMP | BPF_CALL
_PSEUDO_KFUNC_CALL = 2
_BTF_KIND_FUNC = 12
_INSN = struct.Struct("<BBhi")
# placeholder helper id in the BPF source -> kernel function (bpf/memleak.bpf.c)
KFUNCS = {0x7FFFF001: "bpf_session_cookie", 0x7FFFF002: "bpf_session_is_return"}


def cache_dir() -> Path | None:
    v = os.environ.get(CACHE_ENV)
    if v is not None and v.strip().lower() in ("", "0", "off", "no", "false"):
        return None
    if v:
        return Path(v)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-memleak-ebpf"


def _safe(path: Path) -> bool:
    """Owned by us and writable by nobody else."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def cache_key(source: bytes, cflags: list[str], bcc_version: str) -> str:
    u = os.uname()
    h = hashlib.sha256()
    for part in (str(FORMAT), u.release, u.version, u.machine, bcc_version, *cflags):
        h.update(part.encode() + b"\0")
    h.update(source)
    return h.hexdigest()[:32]


def load(bcc, src_path: Path, cflags: list[str]):
    """(a BCC BPF object for this source and flags, True when it came from the cache)."""
    source = Path(src_path).read_bytes()
    d = cache_dir()
    path = d / f"{cache_key(source, cflags, getattr(bcc, '__version__', '?'))}.json" if d else None
    if path is not None and path.is_file() and _safe(d) and _safe(path):
        try:
            bpf = _from_entry(bcc, json.loads(path.read_text()))
            with contextlib.suppress(OSError):
                os.utime(path)   # recently used: kept
            return bpf, True
        except Exception:
            pass   # damaged, or refused by this kernel: compile
    compiled = bcc.BPF(src_file=str(src_path).encode(), cflags=cflags)
    try:
        entry = _entry(bcc, compiled)
    finally:
        compiled.cleanup()   # its maps and programs: the entry's are loaded below
    if path is not None:
        with contextlib.suppress(Exception):
            _save(path, entry)
    return _from_entry(bcc, entry), False


KEEP = 32   # entries kept (each set of map sizes is an entry of its own)


def _save(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not _safe(path.parent):
        return
    old = sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime)
    for stale in old[:max(0, len(old) - KEEP + 1)]:
        with contextlib.suppress(OSError):
            stale.unlink()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _lib(bcc):
    lib = bcc.lib
    for name, res, args in (("bpf_num_tables", ctypes.c_size_t, [ctypes.c_void_p]),
                            ("bpf_table_name", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_size_t]),
                            ("bpf_table_key_size_id", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_size_t]),
                            ("bpf_table_leaf_size_id", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_size_t])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def _entry(bcc, bpf) -> dict:
    """What the compile produced, as JSON-able builtin types."""
    lib = _lib(bcc)
    mod = bpf.module
    maps = []
    for i in range(lib.bpf_num_tables(mod)):
        name = lib.bpf_table_name(mod, i)
        maps.append({
            "name": name.decode(),
            "fd": lib.bpf_table_fd(mod, name),
            "type": lib.bpf_table_type_id(mod, i),
            "key_size": lib.bpf_table_key_size_id(mod, i),
            "leaf_size": lib.bpf_table_leaf_size_id(mod, i),
            "max_entries": lib.bpf_table_max_entries_id(mod, i),
            "flags": lib.bpf_table_flags_id(mod, i),
            "key_desc": (lib.bpf_table_key_desc(mod, name) or b"").decode(),
            "leaf_desc": (lib.bpf_table_leaf_desc(mod, name) or b"").decode(),
        })
    funcs = {}
    for i in range(lib.bpf_num_functions(mod)):
        name = lib.bpf_function_name(mod, i)
        funcs[name.decode()] = base64.b64encode(bpf.dump_func(name)).decode()
    return {"format": FORMAT, "license": lib.bpf_module_license(mod).decode(), "maps": maps, "functions": funcs}


def _create_map(m: dict) -> int:
    from .tracer import _bpf_syscall   # (tracer imports this module)

    attr = (ctypes.c_uint8 * 128)()
    for off, v in ((0, m["type"]), (4, m["key_size"]), (8, m["leaf_size"]), (12, m["max_entries"]),
                   (16, m["flags"])):
        ctypes.c_uint32.from_buffer(attr, off).value = v
    name = m["name"].encode()[:15]
    ctypes.memmove(ctypes.addressof(attr) + 28, name, len(name))
    return _bpf_syscall(_BPF_MAP_CREATE, attr)


def _load_prog(name: bytes, prog_type: int, insns: bytes, license_: bytes, attach_type: int) -> int:
    from .tracer import _bpf_syscall

    buf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license_)
    attr = (ctypes.c_uint8 * 128)()
    ctypes.c_uint32.from_buffer(attr, 0).value = prog_type
    ctypes.c_uint32.from_buffer(attr, 4).value = len(insns) // 8
    ctypes.c_uint64.from_buffer(attr, 8).value = ctypes.addressof(buf)
    ctypes.c_uint64.from_buffer(attr, 16).value = ctypes.addressof(lic)
    n = name[:15]
    ctypes.memmove(ctypes.addressof(attr) + 48, n, len(n))
    if attach_type >= 0:
        ctypes.c_uint32.from_buffer(attr, 68).value = attach_type
    try:
        return _bpf_syscall(_BPF_PROG_LOAD, attr)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EINVAL):
            raise
        # the verifier's reason: load again with its log
        log = ctypes.create_string_buffer(1 << 20)
        ctypes.c_uint32.from_buffer(attr, 24).value = 1            # log_level
        ctypes.c_uint32.from_buffer(attr, 28).value = len(log)     # log_size
        ctypes.c_uint64.from_buffer(attr, 32).value = ctypes.addressof(log)
        try:
            return _bpf_syscall(_BPF_PROG_LOAD, attr)
        except OSError:
            pass
        tail = log.value.decode(errors="replace").strip().splitlines()[-12:]
        raise OSError(e.errno, f"the kernel refused BPF program {name.decode()}: {e.strerror}"
                      + ("; verifier: " + " | ".join(tail) if tail else "")) from None


_KFUNC_IDS: dict[str, int] = {}


def kfunc_btf_id(name: str) -> int:
    """The BTF id of kernel function `name` in this kernel's vmlinux BTF."""
    if name not in _KFUNC_IDS:
        try:
            lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError as e:
            raise RuntimeError(f"cannot call kernel function {name}: libbpf.so.1 is missing ({e})") from None
        lib.btf__load_vmlinux_btf.restype = ctypes.c_void_p
        lib.btf__find_by_name_kind.restype = ctypes.c_int
        lib.btf__find_by_name_kind.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
        lib.btf__free.argtypes = [ctypes.c_void_p]
        btf = lib.btf__load_vmlinux_btf()
        if not btf:
            raise RuntimeError(f"cannot call kernel function {name}: this kernel's BTF "
                               f"(/sys/kernel/btf/vmlinux) cannot be read")
        try:
            for n in KFUNCS.values():
                fid = lib.btf__find_by_name_kind(btf, n.encode(), _BTF_KIND_FUNC)
                if fid > 0:
                    _KFUNC_IDS[n] = fid
        finally:
            lib.btf__free(btf)
        if name not in _KFUNC_IDS:
            raise RuntimeError(f"this kernel has no kernel function {name} (uprobe sessions need Linux 6.13+)")
    return _KFUNC_IDS[name]


def _each_insn(buf: bytearray):
    """(byte offset, code, regs, off, imm) of each instruction; an ld_imm64's
    second half is part of it."""
    i = 0
    while i + 8 <= len(buf):
        code, regs, off, imm = _INSN.unpack_from(buf, i)
        yield i, code, regs, off, imm
        i += 16 if code == _LD_IMM64 else 8


def link_kfuncs(insns: bytes, kfunc_id=kfunc_btf_id) -> bytes:
    """The instructions with each call of a KFUNCS placeholder made a call
    of its kernel function (at load: a kernel without it refuses only the
    programs that call it)."""
    out = bytearray(insns)
    for i, code, regs, _off, imm in _each_insn(out):
        if code == _CALL and regs >> 4 == 0 and imm in KFUNCS:
            # src_reg = BPF_PSEUDO_KFUNC_CALL, imm = BTF id, off 0: vmlinux
            _INSN.pack_into(out, i, code, (regs & 0x0F) | _PSEUDO_KFUNC_CALL << 4, 0, kfunc_id(KFUNCS[imm]))
    return bytes(out)


def _patch(insns: bytes, fds: dict[int, int]) -> bytes:
    """The instructions with each map fd (ld_imm64 of a map) replaced."""
    out = bytearray(insns)
    for i, code, regs, off, imm in _each_insn(out):
        if code != _LD_IMM64:
            continue
        src = regs >> 4
        if src in _PSEUDO_MAP:
            if imm not in fds:
                raise ValueError(f"instruction {i // 8} refers to unknown map fd {imm}")
            _INSN.pack_into(out, i, code, regs, off, fds[imm])
        elif src:
            raise ValueError(f"instruction {i // 8}: ld_imm64 of kind {src} is not handled")
    return bytes(out)


_TABLE_CLASSES = {1: "HashTable", 2: "Array", 6: "PerCpuArray", 9: "LruHash", 27: "RingBuf"}


def _from_entry(bcc, entry: dict):
    if entry.get("format") != FORMAT:
        raise ValueError("cache entry of another format")
    bt = bcc.table
    cls = _cached_bpf_class(bcc)
    bpf = cls()
    try:
        fds: dict[int, int] = {}
        for i, m in enumerate(entry["maps"]):
            if m["type"] not in _TABLE_CLASSES:
                raise ValueError(f"map type {m['type']} not handled")
            fd = _create_map(m)
            bpf._map_fds.append(fd)
            fds[m["fd"]] = fd
            key = bcc.BPF._decode_table_type(json.loads(m["key_desc"])) if m["key_desc"] else ctypes.c_int
            leaf = bcc.BPF._decode_table_type(json.loads(m["leaf_desc"])) if m["leaf_desc"] else ctypes.c_int
            t = getattr(bt, _TABLE_CLASSES[m["type"]])(bpf, i, fd, key, leaf, m["name"].encode())
            t.ttype, t.flags, t.max_entries = m["type"], m["flags"], m["max_entries"]
            bpf.tables[m["name"].encode()] = t
        bpf._insns = {n.encode(): _patch(base64.b64decode(b), fds) for n, b in entry["functions"].items()}
        bpf._license = entry["license"].encode()
        for name in bpf._insns:
            if name.startswith(b"tracepoint__"):
                bpf.attach_tracepoint(tp=name[len(b"tracepoint__"):].replace(b"__", b":"), fn_name=name)
    except BaseException:
        bpf.cleanup()
        raise
    return bpf


_CLASS = None


def _cached_bpf_class(bcc):
    """bcc.BPF whose programs and maps come from a cache entry, not from a
    compile: every other method (attach, detach, tables, ring buffers) is BCC's."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    import atexit

    class CachedBPF(bcc.BPF):
        def __init__(self):   # what bcc.BPF.__init__ sets up, without compiling
            self.kprobe_fds, self.uprobe_fds, self.tracepoint_fds = {}, {}, {}
            self.raw_tracepoint_fds, self.kfunc_entry_fds, self.kfunc_exit_fds, self.lsm_fds = {}, {}, {}, {}
            self.perf_buffers, self.open_perf_events = {}, {}
            self._ringbuf_manager = None
            self.tracefile = None
            self.debug = 0
            self.funcs, self.tables = {}, {}
            self.module = None
            self._map_fds: list[int] = []
            self._insns: dict[bytes, bytes] = {}
            self._license = b"GPL"
            atexit.register(self.cleanup)

        def load_func(self, func_name, prog_type, device=None, attach_type=-1):
            func_name = func_name if isinstance(func_name, bytes) else func_name.encode()
            if func_name in self.funcs:
                return self.funcs[func_name]
            if func_name not in self._insns:
                raise Exception(f"Unknown program {func_name!r}")
            fd = _load_prog(func_name, prog_type, link_kfuncs(self._insns[func_name]), self._license, attach_type)
            fn = bcc.BPF.Function(self, func_name, fd)
            self.funcs[func_name] = fn
            return fn

        def dump_func(self, func_name):
            return self._insns[func_name if isinstance(func_name, bytes) else func_name.encode()]

        def cleanup(self):
            super().cleanup()
            self.tables.clear()
            while self._map_fds:
                with contextlib.suppress(OSError):
                    os.close(self._map_fds.pop())

    _CLASS = CachedBPF
    return CachedBPF
