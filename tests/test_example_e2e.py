"""End to end on example_project: the demo's verdicts and exact figures, and
no false failures when its clean tests run 50 times in one session."""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ebpf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "example_project")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """A private copy of example_project, built with this interpreter."""
    dst = tmp_path_factory.mktemp("ex") / "example_project"
    shutil.copytree(EXAMPLE, dst, ignore=shutil.ignore_patterns("build", "__pycache__"))
    subprocess.run(["make", "-s", "-C", str(dst), f"PYTHON={sys.executable}"], check=True,
                   stdout=subprocess.DEVNULL)
    return dst


def _run(example, *args):
    report = example / "build" / "leaks.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "--ebpf-leaks", "-p", "no:cacheprovider", "-q",
                           f"--ebpf-leaks-json={report}", *args], cwd=example, capture_output=True, text=True,
                          timeout=900)
    return proc, json.loads(report.read_text())


def test_demo_verdicts(example, ebpf):
    proc, doc = _run(example)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    tests = {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}
    failed = [n for n, t in tests.items() if t["outcome"] == "failed"]
    assert failed == ["test_dump_flat_lists_keys_sorted"]
    assert tests["test_dump_flat_lists_keys_sorted"]["leaked"] == {"bytes": 1353, "blocks": 44}
    assert tests["test_get_missing_key_is_an_error"]["leaked"] == {"bytes": 15, "blocks": 1}
    assert tests["test_leaky_copy_truncates_to_its_buffer"]["in_process"]["leaked"] == {"bytes": 768, "blocks": 3}
    assert tests["test_leaky_tuple_records"]["in_process"]["leaked"] == {"bytes": 665, "blocks": 5}
    # Python objects (test_leaky_tuple_records' tuples, above) are seen through pymalloc's own
    # functions, probed in the windows: no restart with PYTHONMALLOC=malloc
    assert "restarting pytest" not in proc.stdout


def test_clean_tests_fifty_times_no_false_failure(example, ebpf):
    (example / "tests" / "test_repeat_clean.py").write_text(
        "import subprocess, pytest, kvext\n"
        "from conftest import DATA_DIR as DATA\n"
        "@pytest.mark.parametrize('i', range(50))\n"
        "def test_parse_pairs_again(i):\n"
        "    assert kvext.parse_pairs('a=1;b=2') == {'a': '1', 'b': '2'}\n"
        "@pytest.mark.parametrize('i', range(50))\n"
        "def test_kvtool_again(i, kvtool):\n"
        "    subprocess.run([kvtool, 'check', str(DATA / 'server.conf')], check=True, stdout=subprocess.PIPE)\n")
    proc, doc = _run(example, "tests/test_repeat_clean.py")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(doc["tests"]) == 100
    assert all(t["leaked"] == {"bytes": 0, "blocks": 0} and t["outcome"] == "passed" for t in doc["tests"])
    assert all(t["tracking_complete"] for t in doc["tests"])
