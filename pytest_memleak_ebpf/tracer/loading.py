"""Loading: compile the BPF program with BCC, keep what the compile
produced in the compiled-program cache, and load its maps and programs
into the kernel through libbpf (bpf_map_create, bpf_prog_load), linking the
calls of kernel functions.

The compiled-program cache: BCC compiles the BPF C source with clang every
time it loads it (~0.6 s of a session's start here). The first session with
a given source, header (bpf/memleak.h), set of flags, kernel and BCC saves
what the compile produced: each function's instructions and each map's
definition (type, sizes, flags, and BCC's description of its key and value
types). Later sessions create the maps and load the programs straight from
that, patching the map file descriptors the instructions refer to. Anything
unexpected (a damaged or foreign entry, a program the kernel refuses) falls
back to compiling. A fresh compile is loaded the same way (whether or not it
can be saved), so every session's programs go through one loader.

Kernel functions (kfuncs): BCC cannot emit a kfunc call, so the BPF source
calls placeholder helper ids (memleak.h: KFUNC_*, abi.KFUNCS); the loader
rewrites each such call into a call of the kernel function by its BTF id in
this kernel's vmlinux BTF (looked up with libbpf, which BCC itself depends
on). A program that calls a kfunc this kernel lacks is refused with an error
naming it.

The entries are BPF bytecode that root loads into the kernel: a cache
directory or entry that is not owned by the current user, or that others may
write, is never used. PYTEST_MEMLEAK_EBPF_CACHE=off turns the cache off;
any other value is the directory to use (default: ~/.cache/pytest-memleak-ebpf).

Raw bpf(2) calls: only BPF_LINK_CREATE of uprobe_multi and uprobe session
links (link_uprobe_multi). libbpf.so.1 has bpf_link_create, but its options
carry the uprobe_multi fields only from libbpf 1.3 on, and it passes them for
uprobe sessions only from 1.6 on; Debian 12's libbpf.so.1 is 1.1.2.
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
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_json_atomic
from . import abi
from .abi import KFUNCS


@dataclass
class TracerConfig:
    """The BPF program's map sizes and limits (compile-time parameters)."""

    max_blocks: int = 1 << 20
    max_procs: int = 1 << 15
    max_stacks: int = 1 << 15
    max_handoffs: int = 1 << 14
    stack_depth: int = 32
    ringbuf_pages: int = 512
    exe_len: int = 256
    max_ext_pages: int = 1 << 16
    max_rawcache: int = 1 << 16
    scan_words: int = 128
    max_roots: int = 1024
    # where live blocks are kept: "table" (an open-addressed, preallocated
    # array, the overflow in the hash; kernel 5.12+) or "hash" (the hash map
    # only, with the per-process ring); the environment's BLOCK_STORE_ENV wins
    block_store: str = "table"


BLOCK_STORE_ENV = "PYTEST_MEMLEAK_EBPF_BLOCK_STORE"
BLOCK_STORES = ("table", "hash")
TABLE_MAX_SLOTS = 1 << 21   # 80 MiB of table (40 bytes a slot)


def block_store(c: TracerConfig) -> str:
    v = (os.environ.get(BLOCK_STORE_ENV) or c.block_store).strip().lower()
    if v not in BLOCK_STORES:
        raise ValueError(f"{BLOCK_STORE_ENV}={v!r}: expected one of {', '.join(BLOCK_STORES)}")
    return v


def table_geometry(max_blocks: int) -> tuple[int, int]:
    """(buckets, buckets per region) of the live-block table holding
    max_blocks slots (both powers of 2; memleak.h: bucket_t)."""
    ways = abi.TABLE_WAYS
    # preallocated: past TABLE_MAX_SLOTS the rest of the capacity is the hash's
    buckets = _pow2(max(1, -(-min(int(max_blocks), TABLE_MAX_SLOTS) // ways)))
    return buckets, min(buckets, max(1, abi.TABLE_REGION_SLOTS // ways))


# The programs the BPF source builds for each attach mode (preflight.ATTACH_MODES)
MODE_CFLAGS = {"session": ["-DATTACH_SESSION=1"], "multi": ["-DATTACH_MULTI=1"], "perf": ["-DATTACH_PERF=1"]}


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return min(max(int(f.read()), 64), 1 << 22)   # PID_MAX_LIMIT on 64-bit
    except (OSError, ValueError):
        return 1 << 22


def _tracepoint_has_field(event: str, name: str) -> bool:
    for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        try:
            with open(f"{d}/events/{event}/format") as f:
                return any(f" {name};" in line for line in f)
        except OSError:
            continue
    return False


def program_cflags(c: TracerConfig, pidmap_words: int) -> list[str]:
    """The parameters the BPF source is compiled with (all but the attach mode's)."""
    cflags = [
        f"-DMAX_BLOCKS={int(c.max_blocks)}",
        f"-DMAX_PROCS={int(c.max_procs)}",
        f"-DMAX_STACKS={int(c.max_stacks)}",
        f"-DMAX_HANDOFFS={int(c.max_handoffs)}",
        f"-DSTACK_DEPTH={int(c.stack_depth)}",
        f"-DRINGBUF_PAGES={_pow2(c.ringbuf_pages)}",
        f"-DEXE_LEN={int(c.exe_len)}",
        f"-DMAX_EXT_PAGES={int(c.max_ext_pages)}",
        f"-DMAX_RAWCACHE={int(c.max_rawcache)}",
        f"-DSCAN_WORDS={int(c.scan_words)}",
        f"-DPIDMAP_WORDS={pidmap_words}",
        f"-DMAX_ROOTS={int(c.max_roots)}",
        "-Wno-macro-redefined",
    ]
    if block_store(c) == "table":
        buckets, region = table_geometry(c.max_blocks)
        cflags += ["-DBLOCK_TABLE=1", f"-DTABLE_BUCKETS={buckets}", f"-DTABLE_REGION_BUCKETS={region}"]
    if _tracepoint_has_field("sched/sched_process_exit", "group_dead"):
        cflags.append("-DHAVE_GROUP_DEAD=1")
    if has_task_pt_regs():
        cflags.append("-DHAVE_TASK_PT_REGS=1")
    return cflags


_BPF_PROG_TYPE_TRACEPOINT = 5
_BPF_FUNC_TASK_PT_REGS = 175
_BPF_FUNC_GET_CURRENT_TASK_BTF = 158


def has_task_pt_regs() -> bool:
    """Tracepoint programs may call bpf_task_pt_regs and
    bpf_get_current_task_btf (kernel 5.15+): the registers at a stop at exit
    come from the BPF program (memleak.bpf.c stop_registers)."""
    try:
        lib = libbpf()
        probe = lib.libbpf_probe_bpf_helper
    except (RuntimeError, AttributeError):
        return False
    probe.restype = ctypes.c_int
    probe.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return all(probe(_BPF_PROG_TYPE_TRACEPOINT, h, None) == 1
               for h in (_BPF_FUNC_TASK_PT_REGS, _BPF_FUNC_GET_CURRENT_TASK_BTF))

CACHE_ENV = "PYTEST_MEMLEAK_EBPF_CACHE"
FORMAT = 1
_PSEUDO_MAP = (1, 2)   # BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE: imm is a map fd
_LD_IMM64 = 0x18
_CALL = 0x85            # BPF_JMP | BPF_CALL
_PSEUDO_KFUNC_CALL = 2
_BTF_KIND_FUNC = 12
_INSN = struct.Struct("<BBhi")


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


def cache_key(source: bytes, cflags: list[str], bcc_version: str, header: bytes = b"") -> str:
    u = os.uname()
    h = hashlib.sha256()
    for part in (str(FORMAT), u.release, u.version, u.machine, bcc_version, *cflags):
        h.update(part.encode() + b"\0")
    h.update(source)
    h.update(b"\0" + header)
    return h.hexdigest()[:32]


def bpf_source_path() -> Path:
    """The BPF C source, shipped inside the package (or the checkout's bpf/)."""
    return abi.bpf_dir() / abi.SOURCE_NAME


def load(bcc, src_path: Path, cflags: list[str]):
    """(a BCC BPF object for this source and flags, True when it came from
    the cache). The source includes bpf/memleak.h (abi.header_path()): it is
    compiled with that directory on its include path, and the header is part
    of the cache key."""
    source = Path(src_path).read_bytes()
    header_file = abi.header_path()
    header = header_file.read_bytes()
    cflags = [*cflags, f"-I{header_file.parent}"]
    d = cache_dir()
    key = cache_key(source, cflags, getattr(bcc, "__version__", "?"), header)
    path = d / f"{key}.json" if d else None
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
    write_json_atomic(path, entry, indent=None, prefix=".tmp-", suffix=".json")


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


_LIBBPF = None


def libbpf():
    """libbpf.so.1 (BCC depends on it), its calls' types declared."""
    global _LIBBPF
    if _LIBBPF is None:
        try:
            lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError as e:
            raise RuntimeError(f"libbpf.so.1 is missing ({e})") from None
        lib.bpf_map_create.restype = ctypes.c_int
        lib.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                                       ctypes.c_uint32, ctypes.POINTER(MapCreateOpts)]
        lib.bpf_prog_load.restype = ctypes.c_int
        lib.bpf_prog_load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p,
                                      ctypes.c_size_t, ctypes.POINTER(ProgLoadOpts)]
        lib.btf__load_vmlinux_btf.restype = ctypes.c_void_p
        lib.btf__find_by_name_kind.restype = ctypes.c_int
        lib.btf__find_by_name_kind.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
        lib.btf__free.argtypes = [ctypes.c_void_p]
        _LIBBPF = lib
    return _LIBBPF


class MapCreateOpts(ctypes.Structure):
    """libbpf's struct bpf_map_create_opts (libbpf 0.6+; `sz` tells libbpf
    which fields we know)."""

    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
                ("numa_node", ctypes.c_uint32), ("map_ifindex", ctypes.c_uint32)]


class ProgLoadOpts(ctypes.Structure):
    """libbpf's struct bpf_prog_load_opts, up to the verifier log (libbpf 0.6+)."""

    _fields_ = [("sz", ctypes.c_size_t), ("attempts", ctypes.c_int), ("expected_attach_type", ctypes.c_uint32),
                ("prog_btf_fd", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32), ("prog_ifindex", ctypes.c_uint32),
                ("kern_version", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
                ("attach_prog_fd", ctypes.c_uint32), ("attach_btf_obj_fd", ctypes.c_uint32),
                ("fd_array", ctypes.c_void_p), ("func_info", ctypes.c_void_p), ("func_info_cnt", ctypes.c_uint32),
                ("func_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_void_p),
                ("line_info_cnt", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32), ("log_buf", ctypes.c_void_p)]


def _fd_or_raise(ret: int) -> int:
    """A libbpf call's result: the fd, or OSError (libbpf 1.0+ returns -errno)."""
    if ret < 0:
        err = -ret if ret != -1 else (ctypes.get_errno() or errno.EPERM)
        raise OSError(err, os.strerror(err))
    return int(ret)


def _create_map(m: dict) -> int:
    opts = MapCreateOpts(sz=ctypes.sizeof(MapCreateOpts), map_flags=m["flags"])
    return _fd_or_raise(libbpf().bpf_map_create(m["type"], m["name"].encode()[:15], m["key_size"],
                                                m["leaf_size"], m["max_entries"], ctypes.byref(opts)))


def _load_prog(name: bytes, prog_type: int, insns: bytes, license_: bytes, attach_type: int) -> int:
    lib = libbpf()
    buf = ctypes.create_string_buffer(insns, len(insns))
    opts = ProgLoadOpts(sz=ctypes.sizeof(ProgLoadOpts))
    if attach_type >= 0:
        opts.expected_attach_type = attach_type
    try:
        return _fd_or_raise(lib.bpf_prog_load(prog_type, name[:15], license_, buf, len(insns) // 8,
                                              ctypes.byref(opts)))
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EINVAL):
            raise
        # the verifier's reason: load again with its log
        log = ctypes.create_string_buffer(1 << 20)
        opts.log_level, opts.log_size, opts.log_buf = 1, len(log), ctypes.addressof(log)
        try:
            return _fd_or_raise(lib.bpf_prog_load(prog_type, name[:15], license_, buf, len(insns) // 8,
                                                  ctypes.byref(opts)))
        except OSError:
            pass
        tail = log.value.decode(errors="replace").strip().splitlines()[-12:]
        raise OSError(e.errno, f"the kernel refused BPF program {name.decode()}: {e.strerror}"
                      + ("; verifier: " + " | ".join(tail) if tail else "")) from None


# -- links: the one raw bpf(2) call (see the module's docstring) --------------

BPF_TRACE_UPROBE_MULTI = 48      # enum bpf_attach_type (Linux 6.6+)
BPF_TRACE_UPROBE_SESSION = 57    # (Linux 6.13+)
BPF_F_UPROBE_MULTI_RETURN = 1
_BPF_LINK_CREATE = 28
_NR_BPF = {"x86_64": 321, "aarch64": 280}


class LinkCreateUprobeMulti(ctypes.Structure):
    """union bpf_attr's link_create member, uprobe_multi variant (uapi/linux/bpf.h)."""

    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("path", ctypes.c_uint64), ("offsets", ctypes.c_uint64),
                ("ref_ctr_offsets", ctypes.c_uint64), ("cookies", ctypes.c_uint64), ("cnt", ctypes.c_uint32),
                ("uprobe_flags", ctypes.c_uint32), ("pid", ctypes.c_uint32)]


def _bpf_syscall(cmd: int, attr) -> int:
    """bpf(cmd, attr): the fd it returns; OSError(errno) when the kernel refuses."""
    nr = _NR_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"no bpf syscall number known for {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def link_uprobe_multi(prog_fd: int, path: str, sites: list[tuple[int, int]], retprobe: bool,
                      attach_type: int = BPF_TRACE_UPROBE_MULTI, pid: int = 0) -> int:
    """BPF_LINK_CREATE of a uprobe_multi (or session) link: prog_fd on every (file offset,
    cookie) of `path`; pid: in that process only (0: in every process). Returns the link
    fd; OSError when the kernel refuses."""
    n = len(sites)
    offsets = (ctypes.c_uint64 * n)(*[o for o, _ in sites])
    cookies = (ctypes.c_uint64 * n)(*[c for _, c in sites])
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    attr = LinkCreateUprobeMulti(prog_fd=prog_fd, attach_type=attach_type, path=ctypes.addressof(cpath),
                                 offsets=ctypes.addressof(offsets), cookies=ctypes.addressof(cookies), cnt=n,
                                 uprobe_flags=BPF_F_UPROBE_MULTI_RETURN if retprobe else 0, pid=pid)
    try:
        return _bpf_syscall(_BPF_LINK_CREATE, attr)
    except OSError as e:
        raise OSError(e.errno, f"uprobe link (attach type {attach_type}) on {path}: {e.strerror}") from None


_KFUNC_IDS: dict[str, int] = {}


def kfunc_btf_id(name: str) -> int:
    """The BTF id of kernel function `name` in this kernel's vmlinux BTF."""
    if name not in _KFUNC_IDS:
        try:
            lib = libbpf()
        except RuntimeError as e:
            raise RuntimeError(f"cannot call kernel function {name}: {e}") from None
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


_TABLE_CLASSES = {1: "HashTable", 2: "Array", 4: "PerfEventArray", 6: "PerCpuArray", 9: "LruHash", 27: "RingBuf"}


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
