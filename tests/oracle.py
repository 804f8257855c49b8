"""Reference ("oracle") measurements of heap memory left in use at exit.

This module has no pytest dependency; the plugin's end-to-end tests and
``tests/test_oracle_fixtures.py`` import it.  It provides

* :func:`build_fixtures` -- compile the C/C++ leak fixtures in
  ``tests/fixtures/`` (idempotent, safe to call from parallel workers);
* :func:`run_valgrind` -- run a command under memcheck, following every
  child process, and parse each process' ``HEAP SUMMARY``;
* :func:`run_native_trace` -- a second, independent oracle: run a
  single-process program natively under gdb with breakpoints on libc's
  allocator entry points (the plugin's own vantage point);
* :func:`load_expected` -- the fixture expectations
  (``tests/fixtures/expected.py``), importable without a package layout;
* :func:`libc_breakpoints` / :func:`private_libc_dir` /
  :class:`UprobeInterference` -- neither oracle can use the system libc
  while uprobes are installed in it (the plugin tracing, possibly in
  another test process): valgrind's JIT executes the uprobe's int3 and the
  client dies of SIGTRAP; gdb's breakpoints collide with it.  Both runners
  therefore detect int3s in libc and then run the program against a
  private copy of libc (another inode, so no uprobes) via LD_LIBRARY_PATH;
  a SIGTRAP death under valgrind still raises :class:`UprobeInterference`.

Typical use::

    import oracle
    built = oracle.build_fixtures()                  # {"leak_n": Path, ...}
    expected = oracle.load_expected()
    case = expected.get("fork_noexec")
    r = oracle.run_valgrind(case.argv(built))
    assert r.returncode == case.returncode
    assert not expected.compare(case, r.heaps.values(), r.root_pid, view="valgrind")
    r.root.in_use                                     # (6040, 4)

How valgrind reports process trees (valgrind 3.19, verified by the tests):

* ``--trace-children=yes``: an exec'd program runs under a fresh valgrind
  instance in the same pid.  Valgrind prints **no** heap summary for the
  image that called exec -- its allocations vanish, exactly like under the
  plugin's contract -- and one summary when the final image exits.
* fork without exec: with ``--child-silent-after-fork=no`` and a ``%p`` in
  ``--log-file``, the child reopens its own log file and prints its own
  summary at exit.  That summary includes every block the child inherited
  from its parent and did not free (the plugin does not count those for the
  child: they belong to the ancestor).  Its ``total heap usage`` counters
  also start from the parent's counters at fork time.
* Log files are named ``vg.<pid>.<n>`` (``--log-file=DIR/vg.%p.%n``).
  ``%n`` is valgrind's file sequence number: 1 for a fresh instance
  (program start or exec), greater (in practice 2) for the log a forked
  child reopens.  A fresh instance started by exec in the same pid opens
  ``vg.<pid>.1`` with O_TRUNC, overwriting the header of the image that
  exec'd, if it had that name.  So:

  - :attr:`ValgrindResult.images` has one :class:`ProcessHeap` per log file
    (a pid can have two: the forked-child header written before its exec,
    without heap numbers, and the final image's);
  - :attr:`ValgrindResult.heaps` maps pid -> the final image (the one that
    printed a heap summary).  This is "one entry per pid, for its last
    image", which is precisely what the plugin's contract counts.

* Processes that valgrind cannot follow (e.g. setuid programs) or that are
  killed by an outside SIGKILL print no heap summary and are absent from
  ``heaps``.  A process that sends SIGKILL to itself (raise(SIGKILL)) does
  get a summary.  A pvalloc() call makes valgrind 3.19 abort the program
  ("Program aborting because of call to pvalloc", exit status 1;
  :attr:`ProcessHeap.aborted_call`).
* ``Parent PID`` is what the process saw as its parent when its valgrind
  instance started (i.e. at fork or at exec).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

__all__ = [
    "FIXTURES_DIR",
    "BUILD_DIR",
    "CFLAGS",
    "LeakSummary",
    "ProcessHeap",
    "ValgrindResult",
    "ValgrindError",
    "UprobeInterference",
    "libc_breakpoints",
    "private_libc_dir",
    "build_fixtures",
    "fixture_sources",
    "run_valgrind",
    "parse_log",
    "load_expected",
    "valgrind_available",
    "NativeTrace",
    "run_native_trace",
    "gdb_available",
]

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
BUILD_DIR = FIXTURES_DIR / "build"

#: Flags every fixture is compiled with (gcc for .c, g++ for .cpp).
CFLAGS = ["-O0", "-g", "-fno-omit-frame-pointer", "-pthread", "-Wall"]

#: Options always passed to valgrind by :func:`run_valgrind`.
VALGRIND_BASE_OPTIONS = [
    "--tool=memcheck",
    "--run-libc-freeres=no",
    "--run-cxx-freeres=no",
    "--child-silent-after-fork=no",
]


class ValgrindError(RuntimeError):
    """valgrind is missing, or its output could not be understood."""


class UprobeInterference(ValgrindError):
    """Someone (typically the plugin's own tracer, in another test process)
    has uprobes / breakpoints in libc right now.  A uprobe is an int3 byte
    written into every process' copy of the probed code page; valgrind's
    JIT translates that byte as a real int3, so the client dies with SIGTRAP
    ("Process terminating with default action of signal 5 (SIGTRAP)" at
    the probed function), and gdb's breakpoints collide with it.  Neither
    oracle can run while the plugin is tracing; retry later."""


def _libc_path() -> Optional[str]:
    """Real path of the libc.so.6 mapped into this process."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    addr = ctypes.cast(libc.malloc, ctypes.c_void_p).value
    with open("/proc/self/maps") as f:
        for line in f:
            p = line.split()
            if len(p) >= 6:
                lo, hi = (int(x, 16) for x in p[0].split("-"))
                if lo <= addr < hi:
                    return os.path.realpath(p[5])
    return None


def private_libc_dir() -> str:
    """A directory holding a byte-identical private copy of libc.so.6.

    Uprobes are attached to an inode; a copy is a different inode, so a
    program run with ``LD_LIBRARY_PATH=<this dir>`` executes clean libc code
    even while the plugin's tracer has libc probed.  (Reading the file
    yields the original bytes: uprobes only patch the processes' mapped
    pages.)  The copy is cached under the temp dir, keyed by libc's
    identity, and created atomically.
    """
    path = _libc_path()
    if path is None:
        raise ValgrindError("cannot find libc.so.6 in /proc/self/maps")
    st = os.stat(path)
    key = f"{st.st_dev:x}-{st.st_ino:x}-{st.st_size:x}-{int(st.st_mtime):x}"
    d = Path(tempfile.gettempdir()) / f"oracle-libc-{os.getuid()}-{key}"
    target = d / "libc.so.6"
    if not target.exists():
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".libc.so.6.{os.getpid()}.{id(d)}"
        shutil.copy2(path, tmp)
        os.replace(tmp, target)
    return str(d)


def _libc_env(env, private_libc, argv):
    """(env to use, private libc dir or None) for a run."""
    if private_libc == "auto":
        use = bool(libc_breakpoints())
    elif private_libc in (True, False):
        use = private_libc
        if not use:
            _check_no_uprobes(argv)
    else:
        raise ValueError(f"private_libc must be True, False or 'auto', not {private_libc!r}")
    if not use:
        return (dict(env) if env is not None else None), None
    d = private_libc_dir()
    new = dict(env) if env is not None else dict(os.environ)
    old = new.get("LD_LIBRARY_PATH")
    new["LD_LIBRARY_PATH"] = d + (":" + old if old else "")
    return new, d


def libc_breakpoints() -> List[str]:
    """Where libc's code in *this* process differs from the file on disk by
    an int3 (0xCC) byte -- i.e. where uprobes (or debugger breakpoints) are
    currently installed.  Returns ``["<symbol or offset>", ...]`` (empty
    when libc is clean).  Compares every executable libc mapping."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    probe_addr = ctypes.cast(libc.malloc, ctypes.c_void_p).value
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            p = line.split()
            if len(p) >= 6 and "x" in p[1]:
                lo, hi = (int(x, 16) for x in p[0].split("-"))
                maps.append((lo, hi, int(p[2], 16), p[5]))
    path = next((m[3] for m in maps if m[0] <= probe_addr < m[1]), None)
    if path is None:
        return []
    names = {}
    for n in ("malloc", "calloc", "realloc", "reallocarray", "free", "memalign",
              "aligned_alloc", "posix_memalign", "valloc", "pvalloc"):
        try:
            names[ctypes.cast(getattr(libc, n), ctypes.c_void_p).value] = n
        except AttributeError:
            pass
    hits = []
    with open(path, "rb") as f:
        for lo, hi, off, p in maps:
            if p != path:
                continue
            mem = ctypes.string_at(lo, hi - lo)
            f.seek(off)
            disk = f.read(hi - lo)
            if mem == disk[: len(mem)]:
                continue
            for i in range(min(len(mem), len(disk))):
                if mem[i] == 0xCC and disk[i] != 0xCC:
                    addr = lo + i
                    base = max((a for a in names if a <= addr), default=None)
                    if base is not None and addr - base < 4096:
                        hits.append(f"{names[base]}+{addr - base:#x}")
                    else:
                        hits.append(f"libc+{off + i:#x}")
    return hits


# --------------------------------------------------------------------------
# result types
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeakSummary:
    """memcheck's LEAK SUMMARY (absent when nothing was in use at exit)."""

    definitely_lost: int = 0
    definitely_lost_blocks: int = 0
    indirectly_lost: int = 0
    indirectly_lost_blocks: int = 0
    possibly_lost: int = 0
    possibly_lost_blocks: int = 0
    still_reachable: int = 0
    still_reachable_blocks: int = 0
    suppressed: int = 0
    suppressed_blocks: int = 0

    @property
    def kinds(self) -> dict:
        """The plugin's leak kinds: {kind: (bytes, blocks)} (JSON "reachability")."""
        return {"definite": (self.definitely_lost, self.definitely_lost_blocks),
                "indirect": (self.indirectly_lost, self.indirectly_lost_blocks),
                "possible": (self.possibly_lost, self.possibly_lost_blocks),
                "reachable": (self.still_reachable, self.still_reachable_blocks)}


@dataclasses.dataclass(frozen=True)
class ProcessHeap:
    """What valgrind reported for one process image (one log file).

    ``in_use_bytes``/``in_use_blocks`` are None when the image printed no
    HEAP SUMMARY (it exec'd, or was killed by an outside SIGKILL).
    ``command`` is valgrind's ``Command:`` line: the executable path as
    passed to exec, followed by argv[1:] joined by spaces (a forked child
    without exec repeats its parent's command).  ``exe`` is its first word.
    """

    pid: int
    ppid: Optional[int]
    command: Optional[str]
    in_use_bytes: Optional[int] = None
    in_use_blocks: Optional[int] = None
    total_allocs: Optional[int] = None
    total_frees: Optional[int] = None
    total_bytes_allocated: Optional[int] = None
    leak_summary: Optional[LeakSummary] = None
    #: signal number from "Process terminating with default action of
    #: signal N", if any
    fatal_signal: Optional[int] = None
    #: number of errors from "ERROR SUMMARY: N errors"
    errors: Optional[int] = None
    #: "Program aborting because of call to X" (valgrind gave up)
    aborted_call: Optional[str] = None
    log_path: Optional[str] = None
    #: log-file sequence number (%n): 1 for a fresh valgrind instance
    #: (program start or exec), >1 for forked children
    seq: int = 0

    @property
    def exe(self) -> Optional[str]:
        if not self.command:
            return None
        return self.command.split(" ", 1)[0]

    @property
    def exe_name(self) -> Optional[str]:
        """Basename of :attr:`exe` (e.g. ``"leak_n"``)."""
        exe = self.exe
        return os.path.basename(exe) if exe else None

    @property
    def has_summary(self) -> bool:
        return self.in_use_bytes is not None

    @property
    def in_use(self) -> Optional[tuple]:
        """``(in_use_bytes, in_use_blocks)`` or None."""
        if not self.has_summary:
            return None
        return (self.in_use_bytes, self.in_use_blocks)


@dataclasses.dataclass
class ValgrindResult:
    argv: List[str]
    #: subprocess convention: exit status, or -signal if killed by a signal
    returncode: int
    stdout: bytes
    stderr: bytes
    #: pid of the program (valgrind execs the tool in place: same pid)
    root_pid: int
    #: every image that wrote a log file, ordered by (pid, seq)
    images: List[ProcessHeap]
    #: pid -> final image of that pid (only images with a heap summary)
    heaps: Dict[int, ProcessHeap]
    #: log directory, if kept (``keep_logs=True``)
    log_dir: Optional[str] = None
    #: raw log text per file name (always kept, small)
    logs: Dict[str, str] = dataclasses.field(default_factory=dict)
    #: directory of the private libc copy used, if any
    private_libc: Optional[str] = None

    @property
    def root(self) -> ProcessHeap:
        """Heap summary of the launched program's own pid."""
        try:
            return self.heaps[self.root_pid]
        except KeyError:
            raise ValgrindError(
                f"no heap summary for root pid {self.root_pid}; logs: "
                f"{sorted(self.logs)}"
            ) from None

    def children(self, pid: int) -> List[ProcessHeap]:
        """Final images of the processes whose parent is ``pid``."""
        return sorted(
            (h for h in self.heaps.values() if h.ppid == pid and h.pid != pid),
            key=lambda h: h.pid,
        )

    def descendants(self, pid: Optional[int] = None) -> List[ProcessHeap]:
        """``pid`` (default: root) and everything below it, depth first."""
        pid = self.root_pid if pid is None else pid
        out: List[ProcessHeap] = []
        if pid in self.heaps:
            out.append(self.heaps[pid])
        for child in self.children(pid):
            out.extend(self.descendants(child.pid))
        return out

    def depth(self, pid: int) -> int:
        """0 for the root, 1 for its children, ... (-1 if not below root)."""
        d = 0
        seen = set()
        while pid != self.root_pid:
            if pid in seen or pid not in self.heaps:
                return -1
            seen.add(pid)
            pid = self.heaps[pid].ppid  # type: ignore[assignment]
            d += 1
        return d

    def by_exe(self, name: str) -> List[ProcessHeap]:
        """Final images whose executable basename is ``name``."""
        return sorted(
            (h for h in self.heaps.values() if h.exe_name == name),
            key=lambda h: h.pid,
        )

    def total_in_use(self) -> tuple:
        """Sum of (bytes, blocks) over all processes (valgrind's view)."""
        return (
            sum(h.in_use_bytes for h in self.heaps.values()),
            sum(h.in_use_blocks for h in self.heaps.values()),
        )

    @property
    def exit_signal(self) -> Optional[int]:
        return -self.returncode if self.returncode < 0 else None


# --------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------

_NUM = r"([0-9][0-9,]*)"
_PREFIX_RE = re.compile(r"^==(\d+)== ?(.*)$")
_RE = {
    "command": re.compile(r"^Command: (.*)$"),
    "ppid": re.compile(r"^Parent PID: (\d+)\s*$"),
    "in_use": re.compile(rf"^\s*in use at exit: {_NUM} bytes in {_NUM} blocks"),
    "total": re.compile(
        rf"^\s*total heap usage: {_NUM} allocs, {_NUM} frees, {_NUM} bytes allocated"
    ),
    "leak": re.compile(
        rf"^\s*(definitely lost|indirectly lost|possibly lost|still reachable|suppressed):"
        rf" {_NUM} bytes in {_NUM} blocks"
    ),
    "signal": re.compile(r"^Process terminating with default action of signal (\d+)"),
    "errors": re.compile(rf"^ERROR SUMMARY: {_NUM} errors"),
}
_ABORT_RE = re.compile(r"^\*\*(\d+)\*\* Program aborting because of call to (\S+)")


def _int(s: str) -> int:
    return int(s.replace(",", ""))


def parse_log(text: str, *, log_path: Optional[str] = None, seq: int = 0) -> List[ProcessHeap]:
    """Parse one valgrind log (text output of memcheck).

    Returns one :class:`ProcessHeap` per pid found in the ``==pid==``
    prefixes, in order of first appearance (a ``--log-file`` with ``%p``
    contains one pid; a shared log could contain several).  Numbers may
    carry thousands separators.  Lines without a ``==pid==`` prefix
    (valgrind warnings, client output) are ignored.
    """
    fields: Dict[int, dict] = {}
    order: List[int] = []

    def rec(pid: int) -> dict:
        if pid not in fields:
            fields[pid] = {"pid": pid, "ppid": None, "command": None, "leak": {}}
            order.append(pid)
        return fields[pid]

    for line in text.splitlines():
        m = _ABORT_RE.match(line)
        if m:
            rec(int(m.group(1)))["aborted_call"] = m.group(2)
            continue
        m = _PREFIX_RE.match(line)
        if not m:
            continue
        pid, body = int(m.group(1)), m.group(2)
        r = rec(pid)
        if r["command"] is None and (mm := _RE["command"].match(body)):
            r["command"] = mm.group(1).rstrip()
        elif r["ppid"] is None and (mm := _RE["ppid"].match(body)):
            r["ppid"] = int(mm.group(1))
        elif mm := _RE["in_use"].match(body):
            r["in_use_bytes"] = _int(mm.group(1))
            r["in_use_blocks"] = _int(mm.group(2))
        elif mm := _RE["total"].match(body):
            r["total_allocs"] = _int(mm.group(1))
            r["total_frees"] = _int(mm.group(2))
            r["total_bytes_allocated"] = _int(mm.group(3))
        elif mm := _RE["leak"].match(body):
            key = mm.group(1).replace(" ", "_")
            r["leak"][key] = _int(mm.group(2))
            r["leak"][key + "_blocks"] = _int(mm.group(3))
        elif mm := _RE["signal"].match(body):
            r["fatal_signal"] = int(mm.group(1))
        elif mm := _RE["errors"].match(body):
            r["errors"] = _int(mm.group(1))

    out = []
    for pid in order:
        r = fields[pid]
        leak = r.pop("leak")
        out.append(
            ProcessHeap(
                leak_summary=LeakSummary(**leak) if leak else None,
                log_path=log_path,
                seq=seq,
                **r,
            )
        )
    return out


_LOGNAME_RE = re.compile(r"^vg\.(\d+)\.(\d+)$")


def _collect(log_dir: Path):
    images: List[ProcessHeap] = []
    logs: Dict[str, str] = {}
    for path in log_dir.iterdir():
        m = _LOGNAME_RE.match(path.name)
        if not m:
            continue
        text = path.read_text(errors="replace")
        logs[path.name] = text
        file_pid, seq = int(m.group(1)), int(m.group(2))
        parsed = parse_log(text, log_path=str(path), seq=seq)
        if not parsed:  # empty file (process died before writing anything)
            parsed = [ProcessHeap(pid=file_pid, ppid=None, command=None,
                                  log_path=str(path), seq=seq)]
        images.extend(parsed)
    images.sort(key=lambda h: (h.pid, h.seq))
    heaps: Dict[int, ProcessHeap] = {}
    for img in images:
        if not img.has_summary:
            continue
        if img.pid in heaps:
            raise ValgrindError(
                f"two heap summaries for pid {img.pid}: "
                f"{heaps[img.pid].log_path} and {img.log_path} (pid reuse?)"
            )
        heaps[img.pid] = img
    return images, heaps, logs


# --------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------


def _check_no_uprobes(argv) -> None:
    hits = libc_breakpoints()
    if hits:
        raise UprobeInterference(
            f"not running {argv!r}: libc has int3 breakpoints (uprobes?) at "
            f"{', '.join(hits[:10])}"
        )


def valgrind_available(valgrind: str = "valgrind") -> bool:
    return shutil.which(valgrind) is not None


#: Prefix that disables core dumps (RLIMIT_CORE=0) and execs the command in
#: place (same pid).  Used instead of preexec_fn, which is unsafe when the
#: caller runs oracles from several threads.
_NO_CORE = ["/bin/sh", "-c", 'ulimit -c 0 && exec "$@"', "sh"]


def _communicate(proc: subprocess.Popen, timeout: float):
    """proc.communicate(); on timeout kill the whole process group, then re-raise."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise


def run_valgrind(
    argv: Sequence[Union[str, os.PathLike]],
    *,
    cwd: Optional[Union[str, os.PathLike]] = None,
    env: Optional[Mapping[str, str]] = None,
    trace_children: bool = True,
    timeout: float = 120,
    stdin=subprocess.DEVNULL,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    extra_options: Iterable[str] = (),
    valgrind: str = "valgrind",
    keep_logs: bool = False,
    check_root: bool = True,
    private_libc: Union[bool, str] = "auto",
) -> ValgrindResult:
    """Run ``argv`` under ``valgrind --tool=memcheck`` and parse every log.

    Options used: ``--run-libc-freeres=no --run-cxx-freeres=no
    --child-silent-after-fork=no --trace-children=yes|no
    --log-file=<tmpdir>/vg.%p.%n`` plus ``extra_options``.

    ``stdin``/``stdout``/``stderr`` are passed to :mod:`subprocess`
    (default: stdin from /dev/null, stdout and stderr captured through
    pipes; pass an open file to give the program a regular file).  Core
    dumps are disabled (RLIMIT_CORE=0) so that crashing fixtures leave no
    ``vgcore.*`` files behind.  On timeout the whole process group is
    killed and :class:`subprocess.TimeoutExpired` is raised.

    With ``check_root`` (default), raise :class:`ValgrindError` if the
    launched program's own pid printed no heap summary (e.g. valgrind
    itself failed to start).

    ``private_libc``: run the program against a private copy of libc
    (:func:`private_libc_dir`, via ``LD_LIBRARY_PATH``) so that uprobes on
    the system libc (the plugin tracing in another process) cannot hit it.
    "auto" (default) does so only when :func:`libc_breakpoints` finds
    int3s in libc; False raises :class:`UprobeInterference` instead.  The
    copy does not change any fixture's numbers (tested), but the extra
    ``LD_LIBRARY_PATH`` variable does change the heap use of programs that
    copy their environment (shells: dash/bash); check
    :attr:`ValgrindResult.private_libc` if that matters.  Raises
    :class:`UprobeInterference` if a process died of SIGTRAP anyway (e.g.
    probes in another library, or a program that ignores LD_LIBRARY_PATH).
    """
    vg = shutil.which(valgrind)
    if vg is None:
        raise ValgrindError(f"{valgrind!r} not found in PATH")
    argv = [os.fspath(a) for a in argv]
    env, libc_dir = _libc_env(env, private_libc, argv)
    log_dir = Path(tempfile.mkdtemp(prefix="oracle-vg-"))
    try:
        log_template = str(log_dir).replace("%", "%%") + "/vg.%p.%n"
        cmd = [
            vg,
            *VALGRIND_BASE_OPTIONS,
            f"--trace-children={'yes' if trace_children else 'no'}",
            f"--log-file={log_template}",
            *extra_options,
            *argv,
        ]
        proc = subprocess.Popen(
            _NO_CORE + cmd,
            cwd=cwd,
            env=env,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        out, err = _communicate(proc, timeout)
        images, heaps, logs = _collect(log_dir)
        result = ValgrindResult(
            argv=argv,
            returncode=proc.returncode,
            stdout=out or b"",
            stderr=err or b"",
            root_pid=proc.pid,
            images=images,
            heaps=heaps,
            log_dir=str(log_dir) if keep_logs else None,
            logs=logs,
            private_libc=libc_dir,
        )
    finally:
        if not keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
    trapped = [h.pid for h in result.images if h.fatal_signal == signal.SIGTRAP]
    if trapped:
        raise UprobeInterference(
            f"{argv!r}: pid(s) {trapped} died of SIGTRAP under valgrind -- "
            f"probably uprobes in libc (int3 now at: "
            f"{libc_breakpoints() or 'none any more'})"
        )
    if check_root and proc.pid not in result.heaps:
        raise ValgrindError(
            f"valgrind printed no heap summary for {argv!r} (pid {proc.pid}, "
            f"rc {proc.returncode}); stderr: {result.stderr[-2000:]!r}; "
            f"logs: {logs!r}"
        )
    return result


# --------------------------------------------------------------------------
# native cross-check: gdb breakpoints on libc's allocator entry points
# --------------------------------------------------------------------------

# Runs inside gdb's Python.  Breakpoints sit on the same addresses the
# plugin's uprobes use (libc's exported malloc/calloc/realloc/reallocarray/
# free/memalign(=aligned_alloc)/posix_memalign/valloc/pvalloc), return values
# are read at the caller's return address.  Calls made while another
# allocator call is in progress on the same thread (glibc-internal nesting,
# e.g. realloc(NULL,n) -> malloc, realloc(p,0) -> free, reallocarray ->
# realloc, memalign(<=16) -> malloc) are ignored: the outermost call is the
# one that counts.  Sizes are the caller's arguments (calloc: n*size,
# reallocarray: n*size, pvalloc: the argument, not page-rounded).
_GDB_TRACER = r"""
import gdb, json, os, subprocess

FUNCS = {"malloc": 1, "calloc": 2, "realloc": 2, "reallocarray": 3,
         "free": 1, "memalign": 2, "aligned_alloc": 2,
         "posix_memalign": 3, "valloc": 1, "pvalloc": 1}
ST = {"live": {}, "active": {}, "allocs": 0, "frees": 0, "unknown_frees": 0,
      "libc": None, "exec_seen": False, "bps": [], "written": False,
      "error": None}

def _u(expr):
    return int(gdb.parse_and_eval("(unsigned long)(%s)" % expr))

def _tid():
    return gdb.selected_thread().ptid

def _record(kind, a, rv):
    live = ST["live"]
    if kind == "posix_memalign":
        if rv & 0xffffffff == 0:
            live[_u("*(unsigned long *)%d" % a[0])] = a[2]
            ST["allocs"] += 1
        return
    if kind in ("realloc", "reallocarray"):
        n = a[1] if kind == "realloc" else a[1] * a[2]
        if n >= 1 << 64:           # reallocarray overflow: fails, no change
            return
        if rv:
            if a[0] and live.pop(a[0], None) is not None:
                ST["frees"] += 1
            live[rv] = n
            ST["allocs"] += 1
        elif n == 0 and a[0]:      # realloc(p, 0): frees p
            if live.pop(a[0], None) is not None:
                ST["frees"] += 1
        return
    if rv:
        if kind == "calloc":
            n = a[0] * a[1]
        elif kind in ("memalign", "aligned_alloc"):
            n = a[1]
        else:
            n = a[0]
        live[rv] = n
        ST["allocs"] += 1

class _Ret(gdb.Breakpoint):
    def __init__(self, kind, args, tid):
        self.rsp = _u("$rsp") + 8
        super().__init__("*%d" % _u("*(unsigned long *)$rsp"), internal=True)
        self.kind, self.args, self.tid, self.dead = kind, args, tid, False
    def stop(self):
        if self.dead or _tid() != self.tid or _u("$rsp") != self.rsp:
            return False
        self.dead = True
        gdb.post_event(self.delete)
        ST["active"].pop(self.tid, None)
        _record(self.kind, self.args, _u("$rax"))
        return False

class _Entry(gdb.Breakpoint):
    def __init__(self, addr, names):
        super().__init__("*%d" % addr, internal=True)
        self.kind = names[0]
    def stop(self):
        if ST["exec_seen"]:
            return False
        tid = _tid()
        if tid in ST["active"]:
            return False
        regs = ("$rdi", "$rsi", "$rdx")[:FUNCS[self.kind]]
        a = [_u(r) for r in regs]
        if self.kind == "free":
            if a[0]:
                if ST["live"].pop(a[0], None) is not None:
                    ST["frees"] += 1
                else:
                    ST["unknown_frees"] += 1
            return False
        ST["active"][tid] = True
        _Ret(self.kind, a, tid)
        return False

def _on_objfile(ev):
    try:
        _setup(ev.new_objfile.filename or "")
    except Exception as e:
        ST["error"] = "%s: %s" % (type(e).__name__, e)

def _setup(name):
    if "/libc.so" not in name:
        return
    if ST["libc"] is not None:
        ST["exec_seen"] = True     # a second libc: the process exec'd
        return
    ST["libc"] = name
    pid = gdb.selected_inferior().pid
    base = None
    with open("/proc/%d/maps" % pid) as f:
        for line in f:
            p = line.split()
            if (len(p) >= 6 and int(p[2], 16) == 0
                    and os.path.realpath(p[5]) == os.path.realpath(name)):
                base = int(p[0].split("-")[0], 16)
                break
    if base is None:
        raise RuntimeError("libc base not found for " + name)
    nm = subprocess.run(["nm", "-D", "--defined-only", name],
                        capture_output=True, text=True, check=True).stdout
    by_addr = {}
    for line in nm.splitlines():
        p = line.split()
        if len(p) == 3 and p[1] in "TtWwi":
            sym = p[2].split("@")[0]
            if sym in FUNCS:
                by_addr.setdefault(int(p[0], 16), []).append(sym)
    for off, names in sorted(by_addr.items()):
        names.sort(key=lambda s: list(FUNCS).index(s))
        ST["bps"].append(_Entry(base + off, names))

def _on_exit(ev):
    if ST["written"]:
        return
    ST["written"] = True
    code = getattr(ev, "exit_code", None)
    sig = None
    if code is None:
        try:
            sig = int(gdb.parse_and_eval("$_exitsignal"))
        except Exception:
            sig = None
    with open(ORACLE_OUT, "w") as f:
        json.dump({"sizes": sorted(ST["live"].values()),
                   "allocs": ST["allocs"], "frees": ST["frees"],
                   "unknown_frees": ST["unknown_frees"],
                   "exit_code": code, "exit_signal": sig,
                   "exec_seen": ST["exec_seen"], "libc": ST["libc"],
                   "breakpoints": len(ST["bps"]), "error": ST["error"]}, f)

for cmd in ("set pagination off", "set confirm off", "set width 0",
            "set startup-with-shell off", "set detach-on-fork on",
            "set follow-fork-mode parent", "set print thread-events off",
            "set print inferior-events off", "unset environment LINES",
            "unset environment COLUMNS", "handle all nostop noprint pass"):
    gdb.execute(cmd, to_string=True)
gdb.events.new_objfile.connect(_on_objfile)
gdb.events.exited.connect(_on_exit)
gdb.execute("run")
"""


@dataclasses.dataclass
class NativeTrace:
    """In-use heap of one process, measured natively (no valgrind) by gdb
    breakpoints on libc's allocator entry points.  Only the launched
    process is traced (forked children are detached; an exec makes the
    measurement invalid and raises)."""

    argv: List[str]
    returncode: int
    #: sizes of the blocks still allocated at exit (sorted)
    sizes: List[int]
    allocs: int
    frees: int
    #: frees of pointers not allocated by a traced call (e.g. glibc freeing
    #: its internal tcache struct at thread exit)
    unknown_frees: int
    stdout: bytes
    stderr: bytes
    #: directory of the private libc copy used, if any
    private_libc: Optional[str] = None

    @property
    def in_use_bytes(self) -> int:
        return sum(self.sizes)

    @property
    def in_use_blocks(self) -> int:
        return len(self.sizes)

    @property
    def in_use(self) -> tuple:
        return (self.in_use_bytes, self.in_use_blocks)


def gdb_available(gdb: str = "gdb") -> bool:
    return shutil.which(gdb) is not None and shutil.which("nm") is not None


def run_native_trace(
    argv: Sequence[Union[str, os.PathLike]],
    *,
    cwd: Optional[Union[str, os.PathLike]] = None,
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 120,
    stdin=subprocess.DEVNULL,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    gdb: str = "gdb",
    private_libc: Union[bool, str] = "auto",
) -> NativeTrace:
    """Run ``argv`` natively under gdb, tracing libc's allocator calls.

    A second, independent oracle for single-process programs: it sees what
    the plugin's uprobes see (real glibc, real libstdc++, no valgrind
    malloc replacement), so it also covers what valgrind cannot run or
    reports differently (pvalloc, C++ aligned new).  Slow per call (a
    breakpoint round trip), fine for the fixtures.  The program's stdout and
    stderr are shared with gdb's (gdb itself prints next to nothing).
    ``private_libc`` as for :func:`run_valgrind` (gdb's breakpoints and the
    plugin's uprobes must not share code pages).  Raises
    :class:`ValgrindError` if the process exec'd or gdb produced no result.
    """
    gdb_path = shutil.which(gdb)
    if gdb_path is None:
        raise ValgrindError(f"{gdb!r} not found in PATH")
    argv = [os.fspath(a) for a in argv]
    env, libc_dir = _libc_env(env, private_libc, argv)
    tmp = Path(tempfile.mkdtemp(prefix="oracle-gdb-"))
    try:
        script = tmp / "tracer.py"
        script.write_text(_GDB_TRACER)
        out_path = tmp / "result.json"
        cmd = [
            gdb_path, "-nx", "-q", "-batch",
            "-ex", f"python ORACLE_OUT = {str(out_path)!r}",
            "-x", str(script),
            "--args", *argv,
        ]
        proc = subprocess.Popen(
            _NO_CORE + cmd, cwd=cwd, env=env,
            stdin=stdin, stdout=stdout, stderr=stderr,
            start_new_session=True,
        )
        out, err = _communicate(proc, timeout)
        if not out_path.exists():
            raise ValgrindError(
                f"gdb tracer produced no result for {argv!r} (gdb rc "
                f"{proc.returncode}); stderr: {(err or b'')[-2000:]!r}"
            )
        res = json.loads(out_path.read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if libc_dir is None and libc_breakpoints():
        raise UprobeInterference(f"{argv!r}: uprobes appeared in libc during the trace")
    if res["error"] or not res["breakpoints"]:
        raise ValgrindError(f"gdb tracer failed for {argv!r}: {res['error']}")
    if res["exec_seen"]:
        raise ValgrindError(f"{argv!r} exec'd: the gdb tracer cannot follow exec")
    if res["exit_code"] is not None:
        rc = res["exit_code"]
    elif res["exit_signal"] is not None:
        rc = -res["exit_signal"]
    else:
        raise ValgrindError(
            f"gdb tracer: no exit status for {argv!r} (did it exec? the gdb "
            f"tracer cannot follow exec)"
        )
    if libc_dir is not None and not (res["libc"] or "").startswith(libc_dir):
        raise ValgrindError(f"{argv!r} did not load the private libc: {res['libc']}")
    return NativeTrace(
        argv=argv, returncode=rc, sizes=res["sizes"], allocs=res["allocs"],
        frees=res["frees"], unknown_frees=res["unknown_frees"],
        stdout=out or b"", stderr=err or b"", private_libc=libc_dir,
    )


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


def fixture_sources(src_dir: Union[str, os.PathLike] = FIXTURES_DIR) -> Dict[str, Path]:
    """name -> source path for every ``*.c``/``*.cpp`` in ``src_dir``."""
    src_dir = Path(src_dir)
    out: Dict[str, Path] = {}
    for pattern in ("*.c", "*.cpp"):
        for src in sorted(src_dir.glob(pattern)):
            if src.stem in out:
                raise ValueError(f"two fixtures named {src.stem!r}")
            out[src.stem] = src
    return out


def build_fixtures(
    outdir: Optional[Union[str, os.PathLike]] = None,
    *,
    src_dir: Union[str, os.PathLike] = FIXTURES_DIR,
    cc: str = "gcc",
    cxx: str = "g++",
    force: bool = False,
) -> Dict[str, Path]:
    """Compile every fixture; return ``{name: executable path}``.

    ``outdir`` defaults to ``tests/fixtures/build`` (gitignored).  A binary
    is rebuilt only when missing or older than its source, any header in
    ``src_dir``, or this file (which holds the flags).  Each binary is
    linked under a temporary name and renamed into place, so concurrent
    callers (pytest-xdist workers) never see a half-written file.
    Raises :class:`subprocess.CalledProcessError` (with the compiler's
    output) if a fixture does not compile.
    """
    src_dir = Path(src_dir)
    outdir = Path(outdir) if outdir is not None else BUILD_DIR
    outdir.mkdir(parents=True, exist_ok=True)
    deps_mtime = max(
        [p.stat().st_mtime for p in src_dir.glob("*.h")] + [Path(__file__).stat().st_mtime]
    )
    built: Dict[str, Path] = {}
    for name, src in fixture_sources(src_dir).items():
        exe = outdir / name
        newest = max(deps_mtime, src.stat().st_mtime)
        if force or not exe.exists() or exe.stat().st_mtime < newest:
            compiler = cxx if src.suffix == ".cpp" else cc
            tmp = outdir / f".{name}.{os.getpid()}.tmp"
            cmd = [compiler, *CFLAGS, "-I", str(src_dir), str(src), "-o", str(tmp)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise subprocess.CalledProcessError(
                    proc.returncode, cmd, output=proc.stdout
                )
            os.replace(tmp, exe)
        built[name] = exe
    return built


def load_expected():
    """Import ``tests/fixtures/expected.py`` (as module ``fixture_expected``)."""
    name = "fixture_expected"
    if name in sys.modules:
        return sys.modules[name]
    path = FIXTURES_DIR / "expected.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module
