#!/usr/bin/env python3
"""Real C-extension packages' own test suites, plain and under the plugin
(issue 15): wall time and the tests that fail only under each mode.

    flock /tmp/ebpf.lock .venv/bin/python bench/suites.py --sources DIR [--only ujson,msgpack] [--runs 3]

DIR holds one git checkout (or bare git directory) per package, named as in
SUITES (e.g. DIR/ujson); with --clone the missing ones are cloned from
GitHub first (needs the network). Each package is built from its tagged
source with CFLAGS="-g -O2" into a venv of its own (bench/out/suites/venv,
with pytest, hypothesis, Cython and this checkout installed), then its own
suite runs:

  plain        python -m pytest <its tests>
  plugin       ... --ebpf-leaks                 (the default: pymalloc probed in the
                                                 windows; every block a window leaves counts)
  kinds        ... --ebpf-leaks --ebpf-leaks-in-process-kinds (the window's blocks classified)
  memray       ... --memray (pytest-memray), when it can be installed here

Per mode: the median wall time of --runs whole sessions, and the tests that
fail (or error) under the mode but pass plain, read from pytest's own
--junitxml. The release pair (RELEASE_PAIR): ujson 5.11.0 leaks the buffer
of every big integer it decodes (fixed in 5.12.0, commit 4baeb95 "Fix memory
leak parsing large integers"); each release's own test of big integers runs
under the plugin: it must fail on the first and pass on the second.

Writes bench/suites.json and the tables between the <!-- suites.py -->
markers of bench/RESULTS.md, and prints them. Run as root with no other
tracer loaded (bench/README.md).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out" / "suites"
MARK_BEGIN, MARK_END = "<!-- suites.py -->", "<!-- /suites.py -->"

# name -> where it comes from, the tag measured, how its extension is built, its tests
SUITES = {
    "ujson": dict(url="https://github.com/ultrajson/ultrajson", tag="5.13.0", cython=(),
                  tests=["tests"], exclude=["src/ujson/deps/double-conversion/test"]),
    "msgpack": dict(url="https://github.com/msgpack/msgpack-python", tag="v1.2.1",
                    cython=["msgpack/_cmsgpack.pyx"], tests=["test"], exclude=[]),
    "simplejson": dict(url="https://github.com/simplejson/simplejson", tag="v4.1.1", cython=(),
                       tests=["simplejson.tests"], pyargs=True, exclude=[]),
    "markupsafe": dict(url="https://github.com/pallets/markupsafe", tag="3.0.2", cython=(),
                       tests=["tests"], exclude=[]),
}
# a release with a documented C leak, and the release that fixed it
RELEASE_PAIR = dict(package="ujson", leaking="5.11.0", fixed="5.12.0", commit="4baeb95",
                    test="tests/test_ujson.py::test_encode_decode_big_int",
                    what="the buffer Object_newIntegerFromString takes with PyObject_Malloc for "
                         "every big integer it decodes is never freed")
MODES = ("plain", "plugin", "kinds", "memray")
VENV_PACKAGES = ["pytest", "hypothesis", "cython", "setuptools>=80", "setuptools-scm", "wheel"]


def log(msg: str) -> None:
    print(f"[suites] {msg}", file=sys.stderr, flush=True)


def sh(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def venv() -> Path:
    py = OUT / "venv" / "bin" / "python"
    if not py.exists():
        log("creating the suites' venv")
        sh([sys.executable, "-m", "venv", str(OUT / "venv")])
        sh([str(py), "-m", "pip", "install", "-q", *VENV_PACKAGES])
        sh([str(py), "-m", "pip", "install", "-q", "-e", str(ROOT)])
    return py


def memray_available(py: Path) -> str | None:
    """None when pytest-memray is importable (installed if it can be), else why not."""
    ok = subprocess.run([str(py), "-c", "import pytest_memray"], capture_output=True).returncode == 0
    if ok:
        return None
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "pytest-memray"], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    return "pytest-memray could not be installed here (" + (r.stderr.strip().splitlines() or ["?"])[-1] + ")"


def checkout(sources: Path, name: str, tag: str, clone: bool) -> Path:
    """A work tree of package `name` at `tag` under OUT/src."""
    spec = SUITES[name]
    src = sources / name
    if not src.exists():
        if not clone:
            raise SystemExit(f"bench/suites.py: no source of {name} in {sources} (give --clone to clone {spec['url']})")
        sh(["git", "clone", "-q", spec["url"], str(src)])
    git_dir = src / ".git" if (src / ".git").exists() else src
    tree = OUT / "src" / f"{name}-{tag}"
    if tree.exists():
        return tree
    tree.mkdir(parents=True)
    env = dict(os.environ, GIT_DIR=str(git_dir), GIT_WORK_TREE=str(tree), GIT_INDEX_FILE=str(tree / ".git-index"))
    sh(["git", "checkout", "-q", tag, "--", ".", *[f":!{x}" for x in spec["exclude"]]], env=env, cwd=tree)
    os.unlink(tree / ".git-index")
    return tree


def build(py: Path, name: str, tree: Path, version: str) -> None:
    spec = SUITES[name]
    for pyx in spec["cython"]:
        sh([str(py.parent / "cython"), pyx], cwd=tree)
    env = dict(os.environ, CFLAGS="-g -O2", CXXFLAGS="-g -O2", SETUPTOOLS_SCM_PRETEND_VERSION=version)
    sh([str(py), "-m", "pip", "install", "-q", "--no-build-isolation", "--force-reinstall", "--no-deps", "."],
       cwd=tree, env=env)


def outcomes(junit: Path) -> dict[str, str]:
    """test id -> passed / failed / skipped, from pytest's JUnit XML."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            out[tid] = "failed"
        elif case.find("skipped") is not None:
            out[tid] = "skipped"
        else:
            out[tid] = "passed"
    return out


def session(py: Path, tree: Path, tests: list[str], mode: str, junit: Path, pyargs: bool = False) -> float:
    # run from outside the source tree (its package directory would shadow the built one), the
    # test paths absolute
    tests = ["--pyargs", *tests] if pyargs else [str(tree / t) for t in tests]
    args = [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
            f"--junitxml={junit}", *tests]
    if mode in ("plugin", "kinds"):
        args.append("--ebpf-leaks")
    if mode == "kinds":
        args.append("--ebpf-leaks-in-process-kinds")
    if mode == "memray":
        args.append("--memray")
    t0 = time.monotonic()
    subprocess.run(args, cwd=OUT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t0


def bench_suite(py: Path, name: str, tree: Path, modes: list[str], runs: int) -> dict:
    spec = SUITES[name]
    res = {"tag": spec["tag"], "modes": {}}
    for mode in modes:
        walls, fails = [], None
        for i in range(runs):
            junit = OUT / f"{name}-{mode}-{i}.xml"
            walls.append(session(py, tree, spec["tests"], mode, junit, spec.get("pyargs", False)))
            got = outcomes(junit) if junit.exists() else {}
            fails = got if fails is None else fails
        res["modes"][mode] = {"wall_s": walls, "wall_median_s": statistics.median(walls), "outcomes": fails}
        log(f"{name} {mode}: {statistics.median(walls):.2f} s")
    plain = res["modes"]["plain"]["outcomes"]
    res["tests"] = len(plain)
    for mode, m in res["modes"].items():
        m["ratio"] = m["wall_median_s"] / res["modes"]["plain"]["wall_median_s"]
        m["failing_only_here"] = sorted(t for t, o in m["outcomes"].items()
                                        if o == "failed" and plain.get(t) == "passed")
        del m["outcomes"]
    return res


def release_pair(py: Path, sources: Path, clone: bool) -> dict:
    rp = RELEASE_PAIR
    out = {**rp, "runs": {}}
    for key in ("leaking", "fixed"):
        tag = rp[key]
        tree = checkout(sources, rp["package"], tag, clone)
        build(py, rp["package"], tree, tag)
        junit = OUT / f"pair-{tag}.xml"
        session(py, tree, [rp["test"]], "plugin", junit)
        got = outcomes(junit)
        failed = sorted(t for t, o in got.items() if o == "failed")
        out["runs"][key] = {"tag": tag, "tests": len(got), "failed": len(failed), "failed_tests": failed}
        log(f"release pair {tag}: {len(failed)} of {len(got)} failed")
    lk, fx = out["runs"]["leaking"], out["runs"]["fixed"]
    out["caught"] = lk["failed"] > 0
    out["fixed_passes"] = fx["failed"] == 0
    return out


def markdown(res: dict) -> str:
    lines = [f"Real C-extension suites (bench/suites.py, {res['date']}, {res['runs']} run(s) per mode, "
             "median wall time; *only here*: tests failing under the mode that pass plain)", "",
             "| suite | tests | plain | `--ebpf-leaks` | with `--ebpf-leaks-in-process-kinds` | pytest-memray |",
             "|---|---|---|---|---|---|"]
    for name, s in res["suites"].items():
        cells = []
        for mode in MODES:
            m = s["modes"].get(mode)
            if m is None:
                cells.append("—")
            elif mode == "plain":
                cells.append(f"{m['wall_median_s']:.2f} s")
            else:
                cells.append(f"{m['wall_median_s']:.1f} s ({m['ratio']:.1f}×), {len(m['failing_only_here'])} only here")
        lines.append(f"| {name} {s['tag']} | {s['tests']} | " + " | ".join(cells) + " |")
    if res.get("memray"):
        lines += ["", f"pytest-memray: {res['memray']}."]
    rp = res.get("release_pair")
    if rp:
        lk, fx = rp["runs"]["leaking"], rp["runs"]["fixed"]
        lines += ["", f"Release pair: {rp['package']} {lk['tag']} ({rp['what']}; fixed in {fx['tag']}, "
                      f"commit {rp['commit']}), `{rp['test']}` under `--ebpf-leaks`: {lk['failed']} of "
                      f"{lk['tests']} fail on {lk['tag']}, {fx['failed']} of {fx['tests']} on {fx['tag']}."]
    return "\n".join(lines) + "\n"


def write_results(res: dict) -> None:
    (BENCH / "suites.json").write_text(json.dumps(res, indent=1) + "\n")
    md = BENCH / "RESULTS.md"
    text = md.read_text() if md.exists() else ""
    block = f"{MARK_BEGIN}\n{markdown(res)}{MARK_END}"
    if MARK_BEGIN in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## C-extension suites\n\n" + block + "\n"
    md.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", type=Path, required=True, help="a directory of the packages' git checkouts")
    ap.add_argument("--clone", action="store_true", help="clone the packages missing from --sources")
    ap.add_argument("--only", default=",".join(SUITES), help="suites, comma-separated")
    ap.add_argument("--modes", default=",".join(MODES), help="modes, comma-separated: " + ",".join(MODES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-pair", action="store_true", help="skip the release pair")
    a = ap.parse_args(argv)
    names = [n for n in a.only.split(",") if n]
    modes = [m for m in a.modes.split(",") if m]
    for bad in [n for n in names if n not in SUITES] + [m for m in modes if m not in MODES]:
        ap.error(f"unknown suite or mode {bad!r}")
    if "plain" not in modes:
        modes.insert(0, "plain")
    OUT.mkdir(parents=True, exist_ok=True)
    py = venv()
    res = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "runs": a.runs,
           "python": sys.version.split()[0], "suites": {}}
    if "memray" in modes:
        why = memray_available(py)
        if why:
            res["memray"] = why
            modes.remove("memray")
            log(why)
    for name in names:
        tag = SUITES[name]["tag"]
        tree = checkout(a.sources, name, tag, a.clone)
        build(py, name, tree, tag.lstrip("v"))
        res["suites"][name] = bench_suite(py, name, tree, modes, a.runs)
    if not a.no_pair:
        res["release_pair"] = release_pair(py, a.sources, a.clone)
        build(py, "ujson", checkout(a.sources, "ujson", SUITES["ujson"]["tag"], a.clone), SUITES["ujson"]["tag"])
    write_results(res)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
