"""Leak kinds of well-kept distro programs against valgrind memcheck.

Each program (but VERDICT_ONLY's) runs natively with the LD_PRELOAD recorder (stopped in its last
atexit handler, scanned) and under valgrind, both with valgrind's client
environment (harness.native_env); all four kinds must agree in bytes and
blocks.  Programs missing on the machine are skipped.

Runs valgrind: run under the machine-wide lock (flock /tmp/ebpf.lock ...).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import kinds_harness as harness  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")


def _programs(w: Path):
    nums = w / "nums.txt"
    return {
        "ls": ["ls", "-la", "/usr/lib"],
        "sort": ["sort", "-n", nums],
        "grep": ["grep", "-c", "1", nums],
        "sed": ["sed", "s/1/x/g", nums],
        "mawk": ["mawk", "{s+=$1} END {print s}", nums],
        "find": ["find", "/usr/share/doc", "-name", "*.gz"],
        "tar": ["tar", "cf", "/dev/null", "/usr/share/doc/valgrind"],
        "gzip": ["gzip", "-c", nums],
        "bzip2": ["bzip2", "-c", nums],
        "xz": ["xz", "-c", nums],
        "zstd": ["zstd", "-c", nums],
        "jq": ["jq", "-n", "[range(100)] | map(. * 2) | add"],
        "sqlite3": ["sqlite3", ":memory:", "create table t(a); insert into t values(1),(2); select sum(a) from t;"],
        "git": ["git", "-C", str(HERE.parent), "log", "--oneline", "-3"],
        "perl": ["perl", "-e", "my %h = map { $_ => 1 } 1..1000; print scalar(keys %h), qq(\\n)"],
        "diff": ["diff", w / "a.txt", w / "b.txt"],
        "file": ["file", "/usr/bin/ls"],
        "bc": ["bc", "-l", w / "expr.bc"],
        "sha256sum": ["sha256sum", nums],
        "du": ["du", "-s", "/usr/share/doc"],
        "date": ["date", "-d", "2024-02-29 12:00 UTC"],
        "make": ["make", "-f", w / "Makefile"],
        "openssl": ["openssl", "sha256", nums],
        "python3": ["/usr/bin/python3", "-c", "import json; print(json.dumps({'a': [1, 2]}))"],
        "git-status": ["git", "-C", str(HERE.parent), "status", "--short"],
        "ps": ["ps", "-eo", "pid,comm"],
        "curl": ["curl", "-s", "-o", "/dev/null", f"file://{w / 'nums.txt'}"],
        "gpg": ["gpg", "--homedir", w / "gnupg", "--batch", "--list-keys"],
        "ssh": ["ssh", "-G", "-F", "/dev/null", "example.invalid"],
        "sh-pipeline": ["sh", "-c", f"sort -n {w / 'nums.txt'} | uniq -c | sort -rn | head -3"],
    }


# Programs whose two runs (native, then under valgrind) are not the same
# computation, so their still-reachable figures differ between runs: ps lists
# the processes of the moment, git status refreshes the index, gpg creates
# its keybox on the first run, curl's figures move from run to run, and the
# shell pipeline exits through _exit (no atexit stop for the recorder here).
# Their verdicts are compared with valgrind's in tests/test_kinds_e2e.py.
VERDICT_ONLY = {"git-status", "ps", "curl", "gpg", "sh-pipeline"}
NAMES = [n for n in _programs(Path(".")) if n not in VERDICT_ONLY]


def program_inputs(w: Path) -> None:
    """The files _programs(w) reads, written into w."""
    (w / "nums.txt").write_text("".join(f"{(i * 7919) % 2000}\n" for i in range(2000)))
    (w / "a.txt").write_text("hello\nworld\n")
    (w / "b.txt").write_text("hello\nthere\n")
    (w / "expr.bc").write_text("scale=20\n4*a(1)\nquit\n")
    (w / "Makefile").write_text("all:\n\t@true\n")
    (w / "gnupg").mkdir(mode=0o700)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("kinds_work")
    program_inputs(w)
    built = harness.build(w / "build")
    return w, built


@pytest.mark.parametrize("name", NAMES)
def test_program_kinds_match_valgrind(work, name):
    w, built = work
    argv = [str(a) for a in _programs(w)[name]]
    exe = shutil.which(argv[0])
    if exe is None:
        pytest.skip(f"{argv[0]} not installed")
    argv[0] = os.path.realpath(exe)
    # perl randomises its hash seed per run (bucket splits change its blocks)
    fixed = {"PERL_HASH_SEED": "0", "PERL_PERTURB_KEYS": "0"}
    env = harness.native_env(built["recorder.so"])
    env.update(fixed)
    ours = harness.run_scanned(argv, built["recorder.so"], env=env)
    theirs = harness.run_valgrind(argv, env=dict(os.environ, **fixed))
    got = {k: ours.summary.kinds[k] for k in harness.KINDS}
    want = {k: theirs.kinds[k] for k in harness.KINDS}
    assert got == want
