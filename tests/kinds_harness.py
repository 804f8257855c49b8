"""Run a program twice for the leak-kinds tests: once stopped at exit and
scanned by :mod:`pytest_memleak_ebpf.kinds` (blocks from the LD_PRELOAD
recorder, tests/fixtures/kinds/recorder.c), once under valgrind memcheck;
return both LEAK SUMMARYs.  No pytest dependency."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from pytest_memleak_ebpf.kinds import roots as kroots

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "kinds"
KINDS = ("definite", "indirect", "possible", "reachable")
# valgrind puts its client heap at low addresses (a 1 MiB block at 0x4a40040):
# any word holding a small integer in that range (a count, a time) is an
# interior pointer to it, and the block is "possibly lost" on one run in many
# (seen in CI on the fixtures' 1 MiB block).  --aspace-minaddr moves the heap
# above 8 GiB, where such words don't reach; the blocks' kinds are the same.
VALGRIND_OPTS = ["--leak-check=full", "--show-leak-kinds=all", "--run-libc-freeres=no",
                 "--run-cxx-freeres=no", "--child-silent-after-fork=yes", "--aspace-minaddr=0x200000000"]


def build(out_dir: Path) -> Dict[str, Path]:
    """Compile the recorder and the fixtures into out_dir (idempotent)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = {
        "recorder.so": ["gcc", "-O2", "-shared", "-fPIC", "-o", None, str(FIXTURES / "recorder.c"), "-ldl"],
        "cases": ["gcc", "-O0", "-g", "-pthread", "-o", None, str(FIXTURES / "cases.c")],
        "cases_cxx": ["g++", "-O0", "-g", "-D_GLIBCXX_USE_CXX11_ABI=0", "-o", None,
                      str(FIXTURES / "cases_cxx.cpp")],
        "stale": ["gcc", "-O0", "-g", "-o", None, str(FIXTURES / "stale.c")],
    }
    built = {}
    for name, cmd in jobs.items():
        dst = out_dir / name
        src = Path(cmd[-1] if not cmd[-1].startswith("-") else cmd[-2])
        if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
            tmp = out_dir / f".{name}.{os.getpid()}"
            subprocess.run([str(tmp) if c is None else c for c in cmd], check=True)
            os.replace(tmp, dst)
        built[name] = dst
    return built


@dataclasses.dataclass
class Summary:
    kinds: Dict[str, Tuple[int, int]]  # kind -> (bytes, blocks)
    heuristics: Dict[str, Tuple[int, int]]

    def __str__(self):
        return ", ".join(f"{k} {b}B/{n}" for k, (b, n) in self.kinds.items())


_VG_LINE = re.compile(r"==\d+==\s+(definitely lost|indirectly lost|possibly lost|still reachable):"
                      r" ([\d,]+) bytes in ([\d,]+) blocks")
_VG_HEUR = re.compile(r"==\d+==\s+(stdstring|length64|newarray|multipleinheritance)\s*: ([\d,]+) bytes in ([\d,]+) blocks")
_VG_NAMES = {"definitely lost": "definite", "indirectly lost": "indirect",
             "possibly lost": "possible", "still reachable": "reachable"}


def parse_valgrind(text: str) -> Summary:
    kinds = {k: (0, 0) for k in KINDS}
    heur = {}
    if "All heap blocks were freed" in text:
        return Summary(kinds, heur)
    if "LEAK SUMMARY" not in text:
        raise RuntimeError(f"no LEAK SUMMARY in valgrind output:\n{text[-3000:]}")
    tail = text[text.index("LEAK SUMMARY"):]
    for m in _VG_LINE.finditer(tail):
        kinds[_VG_NAMES[m.group(1)]] = (int(m.group(2).replace(",", "")), int(m.group(3).replace(",", "")))
    for m in _VG_HEUR.finditer(tail):
        heur[m.group(1)] = (int(m.group(2).replace(",", "")), int(m.group(3).replace(",", "")))
    return Summary(kinds, heur)


def run_valgrind_tree(argv: Sequence[str], env=None, timeout=300) -> Dict[int, Summary]:
    """Like :func:`run_valgrind`, following forked children: ``{pid: summary}``
    of every process that printed a leak summary (the root's pid first)."""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ if env is None else env)
        env.update(KINDS_RECORDER_INFO=str(Path(d) / "info"), KINDS_STOP="1")
        opts = [o for o in VALGRIND_OPTS if not o.startswith("--child-silent-after-fork")]
        proc = subprocess.Popen(["valgrind", *opts, "--child-silent-after-fork=no",
                                 f"--log-file={d}/vg.%p", *argv], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        proc.wait(timeout=timeout)
        out = {}
        for log in sorted(Path(d).glob("vg.*"), key=lambda p: int(p.name[3:]) != proc.pid):
            text = log.read_text()
            if "LEAK SUMMARY" in text or "All heap blocks were freed" in text:
                out[int(log.name[3:])] = parse_valgrind(text)
        return out


def run_valgrind(argv: Sequence[str], env=None, timeout=300, opts: Sequence[str] = ()) -> Summary:
    """LEAK SUMMARY of argv under memcheck (``opts``: more valgrind options).
    The environment also holds the recorder's variables, with values of the
    same lengths as in :func:`run_scanned` (the program sees the same
    environment sizes)."""
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "vg.log"
        env = dict(os.environ if env is None else env)
        env.update(KINDS_RECORDER_INFO=str(Path(d) / "info"), KINDS_STOP="1")
        subprocess.run(["valgrind", *VALGRIND_OPTS, *opts, f"--log-file={log}", *argv], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                       timeout=timeout)
        text = log.read_text()
        if "signal 5 (SIGTRAP)" in text:
            raise RuntimeError("the program died of SIGTRAP under valgrind: uprobes in libc "
                               "(an eBPF tracer running?); run under flock /tmp/ebpf.lock")
        return parse_valgrind(text)


_VG_ENV: Optional[Dict[str, str]] = None


def valgrind_client_env() -> Dict[str, str]:
    """The variables valgrind adds to (or changes in) its client's environment
    (Debian's: GLIBCXX_FORCE_NEW, GLIBCPP_FORCE_NEW, LD_LIBRARY_PATH,
    LD_PRELOAD of its preload objects), found once by running env under it."""
    global _VG_ENV
    if _VG_ENV is None:
        base = dict(os.environ)
        # env= explicitly: the C environment can hold variables os.environ
        # lacks (some library's setenv), and the other runs pass os.environ
        out = subprocess.run(["valgrind", "-q", "/usr/bin/env", "-0"], env=base, capture_output=True,
                             check=True).stdout
        seen = dict(kv.split("=", 1) for kv in out.decode().split("\0") if "=" in kv)
        _VG_ENV = {k: v for k, v in seen.items() if base.get(k) != v and k != "_"}
    return dict(_VG_ENV)


def native_env(recorder: Path) -> Dict[str, str]:
    """The environment for the recorded run: valgrind's client environment,
    with LD_PRELOAD naming the recorder through a path padded (with "./")
    to the length of valgrind's value, so the program sees environment
    strings of the same sizes in both runs (programs copy their environment
    into the heap: perl's %ENV, git, make)."""
    env = dict(os.environ)
    vg = valgrind_client_env()
    env.update(vg)
    path = str(recorder)
    want = len(vg.get("LD_PRELOAD", path))
    if want > len(path):
        head, tail = os.path.split(path)
        pad = want - len(path)
        path = head + "/" * (pad % 2) + "/." * (pad // 2) + "/" + tail
    env["LD_PRELOAD"] = path
    return env


def read_recorder_table(pid: int, addr: int, length: int) -> Tuple[np.ndarray, np.ndarray]:
    from pytest_memleak_ebpf.kinds.memory import ProcessMemory

    with ProcessMemory(pid) as mem:
        w = mem.read_words(addr, length)
    if w.size < 4 or int(w[0]) != 0x4B494E44535245:
        raise RuntimeError(f"recorder table not found at {addr:#x} in pid {pid}")
    pairs = w[4:4 + 2 * int(w[1])].reshape(-1, 2)
    live = pairs[:, 0] > 1
    starts, sizes = pairs[live, 0].copy(), pairs[live, 1].copy()
    if starts.size != int(w[2]):
        raise RuntimeError(f"recorder table holds {starts.size} blocks, its count says {int(w[2])}")
    return starts, sizes


@dataclasses.dataclass
class Scanned:
    summary: Summary
    scan: kroots.Scan
    starts: np.ndarray
    sizes: np.ndarray
    table: Tuple[int, int]
    returncode: int


def _stopped_children(pid: int) -> List[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        if fields[0] == "T" and int(fields[1]) == pid:
            out.append(int(d))
    return out


def run_scanned_tree(argv: Sequence[str], recorder: Path, env=None, timeout=60,
                     inspect=None) -> Tuple[Scanned, Dict[int, Scanned]]:
    """Run argv with the recorder, wait for its stop at exit, scan it, resume
    it. Children it forks without exec inherit the recorder (its table and its
    stop at exit): each one stopped at exit is scanned and continued first.
    ``env``: the whole environment, LD_PRELOAD included (default: ours plus
    the recorder; :func:`native_env` gives valgrind's).
    ``inspect(pid, scan)`` may look at the stopped root process.
    Returns (root, {child pid: scanned})."""
    children: Dict[int, Scanned] = {}
    with tempfile.TemporaryDirectory() as d:
        info = Path(d) / "info"
        e = dict(os.environ) if env is None else dict(env)
        if env is None:
            e["LD_PRELOAD"] = str(recorder)
        e.update(KINDS_RECORDER_INFO=str(info), KINDS_STOP="1")
        proc = subprocess.Popen(list(argv), env=e, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while True:
                for child in _stopped_children(proc.pid):
                    children[child] = _scan_one(child, info, 0)
                    os.kill(child, signal.SIGCONT)
                pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
                if pid and os.WIFSTOPPED(status):
                    break
                if pid:
                    raise RuntimeError(f"{argv[0]} ended (status {status:#x}) without stopping at exit")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{argv[0]} did not stop within {timeout}s")
                time.sleep(0.005)
            root = _scan_one(proc.pid, info, 0)
            if inspect is not None:
                inspect(proc.pid, root.scan)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        root.returncode = rc
        return root, children


def _scan_one(pid: int, info: Path, rc: int) -> Scanned:
    addr, length = (int(x, 16) for x in info.read_text().split())
    starts, sizes = read_recorder_table(pid, addr, length)
    scan = kroots.scan_process(pid, starts, sizes, exclude=[(addr, addr + length)])
    c = scan.classification
    return Scanned(Summary(c.summary(), c.heuristic_summary()), scan, starts, sizes, (addr, addr + length), rc)


def run_scanned(argv: Sequence[str], recorder: Path, env=None, timeout=60, inspect=None) -> Scanned:
    """:func:`run_scanned_tree` for the root process alone."""
    return run_scanned_tree(argv, recorder, env=env, timeout=timeout, inspect=inspect)[0]
