"""Self-test of the leakext fixture extension (tests/fixtures/ext/).

Checks the figures in tests/fixtures/ext/expected.py without eBPF and without
root:

* under valgrind with PYTHONMALLOC=malloc: each call changes the python
  process's "in use at exit" by exactly the expected (bytes, blocks),
  compared with the same program without that call;
* natively, with the default allocator: tracemalloc sees each leaked object
  at its expected size.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
EXT_DIR = HERE / "fixtures" / "ext"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import oracle  # noqa: E402


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


ext_build = _load("leakext_build", EXT_DIR / "build.py")
expected = _load("leakext_expected", EXT_DIR / "expected.py")

#: Run first by every valgrind program, and alone as the baseline: each
#: function once with a count of 0, so that whatever a first call sets up is
#: in the baseline too.
PRIME = ("leakext.leak_objects(0); leakext.leak_objects(0, length=1000); leakext.leak(0, 48); "
         "leakext.clean(0)")
#: case -> (call, expected (bytes, blocks) difference from the baseline)
VG_CASES = {
    "leak_objects": ("leakext.leak_objects(10)", expected.leak_objects(10)),
    "leak_objects-len1000": ("leakext.leak_objects(10, length=1000)", expected.leak_objects(10, 1000)),
    "leak": ("leakext.leak(7, 48)", expected.leak(7, 48)),
    "leak-size0": ("leakext.leak(5, 0)", expected.leak(5, 0)),
    "clean": ("leakext.clean(200)", expected.CLEAN),
    "cache_once-10-calls": ("[leakext.cache_once() for _ in range(10)]", expected.cache_once(10)),
}


@pytest.fixture(scope="module")
def moddir(tmp_path_factory):
    return ext_build.build_leakext(tmp_path_factory.mktemp("leakext"))


def _env(moddir: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONMALLOC", None)
    env.update(PYTHONPATH=str(moddir), PYTHONHASHSEED="0", **extra)
    return env


@pytest.fixture(scope="module")
def vg_in_use(moddir):
    """{python statement: valgrind (in-use bytes, blocks) at exit}, run in parallel."""
    if not oracle.valgrind_available():
        pytest.skip("valgrind not installed")
    statements = [PRIME] + [f"{PRIME}; {call}" for call, _ in VG_CASES.values()]

    def run(stmt):
        res = oracle.run_valgrind([sys.executable, "-c", f"import leakext; {stmt}"],
                                  env=_env(moddir, PYTHONMALLOC="malloc"), trace_children=False,
                                  timeout=300)
        assert res.returncode == 0, res.stderr.decode(errors="replace")
        return res.root.in_use

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(statements, pool.map(run, statements)))


@pytest.mark.parametrize("case", list(VG_CASES))
def test_valgrind_difference_is_exact(vg_in_use, case):
    call, want = VG_CASES[case]
    (b0, n0), (b1, n1) = vg_in_use[PRIME], vg_in_use[f"{PRIME}; {call}"]
    assert (b1 - b0, n1 - n0) == want


def test_constants_match_the_module(moddir):
    out = subprocess.run(
        [sys.executable, "-c", "import leakext as m; print(m.BYTES_HEADER, m.DEFAULT_OBJECT_LENGTH, "
                               "m.CACHE_ONCE_BYTES, bytes.__basicsize__)"],
        env=_env(moddir), check=True, stdout=subprocess.PIPE, text=True).stdout.split()
    assert list(map(int, out)) == [expected.BYTES_HEADER, expected.DEFAULT_OBJECT_LENGTH,
                                   expected.CACHE_ONCE_BYTES, expected.BYTES_HEADER]


def test_tracemalloc_sees_each_object_at_its_size(moddir):
    code = """if 1:
        import gc, tracemalloc, leakext
        leakext.leak_objects(1); leakext.clean(3); gc.collect()
        tracemalloc.start()
        leakext.leak_objects(7); leakext.leak_objects(3, length=1000); leakext.clean(50); gc.collect()
        snap = tracemalloc.take_snapshot()
        print(sorted(t.size for t in snap.traces if t.traceback[0].filename == "<string>"))
    """
    out = subprocess.run([sys.executable, "-c", code], env=_env(moddir), check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    assert eval(out) == sorted([expected.bytes_object_size()] * 7 + [expected.bytes_object_size(1000)] * 3)


def test_build_is_idempotent(moddir):
    module = next(moddir.glob("leakext.*.so"))
    before = module.stat().st_mtime_ns, module.stat().st_ino
    assert ext_build.build_leakext(moddir) == moddir
    assert (module.stat().st_mtime_ns, module.stat().st_ino) == before
