"""An executable rewritten in place (same inode: `cp` over it, an in-place
rebuild) between two runs in one session is resolved again: the exec pause's
key holds the executable's size and modification time besides its device
and inode (bpf/memleak.h resolved_key_t), so the second run is not given the
first build's allocator answer."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_allocators_e2e import C_LEAK, _need, exes  # noqa: E402,F401 - exes: the fixture

pytestmark = pytest.mark.ebpf


def test_an_executable_rewritten_in_place_is_resolved_again(pytester, run_plugin, exes, tmp_path):
    glibc, _ = _need(exes, "glibc")
    jemalloc, _ = _need(exes, "link-jemalloc")
    prog = tmp_path / "prog"
    prog.write_bytes(open(glibc, "rb").read())
    prog.chmod(0o755)
    pytester.makepyfile(test_inner=f"""
import os, subprocess, pytest
@pytest.mark.leak_budget(None)
def test_rewrite():
    subprocess.run([{str(prog)!r}], check=True)
    ino = os.stat({str(prog)!r}).st_ino
    with open({str(prog)!r}, "r+b") as f:            # the same inode, another program
        f.truncate(0)
        f.write(open({jemalloc!r}, "rb").read())
    assert os.stat({str(prog)!r}).st_ino == ino
    subprocess.run([{str(prog)!r}], check=True)
""")
    result, doc = run_plugin("--ebpf-leaks-kinds=all")
    result.assert_outcomes(passed=1)
    first, second = doc["tests"][0]["processes"]
    assert first["allocator"]["kind"] == "glibc" and second["allocator"]["kind"] == "jemalloc"
    assert second["allocator"]["covered"] and second["allocator"]["module"].endswith("libjemalloc.so.2")
    assert first["leaked"] == second["leaked"] == C_LEAK
