"""End-to-end: every allocator a process really uses is found at exec and
probed before its first allocation, or the process is flagged (issue 14).
The fixtures (tests/fixtures/alloc/builds.py) are built the twelve ways;
numbers are asserted exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures", "alloc"))
import builds  # noqa: E402

pytestmark = pytest.mark.ebpf

CONFIGS = {c.name: c for c in builds.C_CONFIGS + builds.CXX_CONFIGS}

# leak6.c: 6,756 B in 6 blocks outstanding; 8 calls allocating 6,906 B in its lifetime.
# leaknew.cpp: 3,756 B in 4 blocks; 7 operator new calls, 6,312 B.
C_LEAK, C_ALLOC = (6756, 6), (6906, 8)
CXX_LEAK, CXX_ALLOC = (3756, 4), (6312, 7)


@pytest.fixture(scope="module")
def exes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("alloc"))
    built = {}
    for name, cfg in CONFIGS.items():
        if builds.missing(cfg.packages):
            continue
        built[name] = builds.build(cfg, out)
    return built


def _need(exes, name):
    if name not in exes:
        miss = builds.missing(CONFIGS[name].packages)
        if os.environ.get("CI"):
            pytest.fail(f"{name}: packages missing: {miss}")
        pytest.skip(f"{name}: packages missing: {miss}")
    return exes[name]


def _inner_test(name, exe, cfg, budget="0", runs=1):
    env = builds.env_for(cfg, base={})
    return f"""
import os, subprocess, pytest
@pytest.mark.leak_budget({budget})
def test_{name.replace('-', '_')}():
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None); env.pop("LD_LIBRARY_PATH", None)
    env.update({env!r})
    for _ in range({runs}):
        subprocess.run([{exe!r}], env=env, check=True)
"""


def _proc(doc):
    t = doc["tests"][0]
    assert len(t["processes"]) >= 1
    return t, t["processes"][-1]


ALL = [n for n in CONFIGS if "stripped" not in n]


@pytest.mark.parametrize("name", ALL)
def test_each_allocator_counts_exactly(pytester, run_plugin, exes, name):
    cfg = CONFIGS[name]
    exe = _need(exes, name)
    pytester.makepyfile(test_inner=_inner_test(name, exe, cfg, budget="None"))
    result, doc = run_plugin()
    t, p = _proc(doc)
    print(json.dumps({"name": name, "outstanding": p["outstanding"], "leaked": p["leaked"],
                      "allocated": p["allocated"], "allocator": p["allocator"],
                      "stacks": [(s["bytes"], s["blocks"], s["suppressed"], s["suppression"],
                                  [f.get("function") for f in s["frames"]][:6]) for s in p["stacks"]]}))
    assert 0
