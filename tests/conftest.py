import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Inner sessions (pytester) run with a temporary HOME: give them one shared
# compiled-program cache, so after the first they load their programs from it,
# as users' sessions do from their second run on (tests/test_bpfcache.py checks
# that cached programs count exactly what compiled ones do).
os.environ.setdefault("PYTEST_MEMLEAK_EBPF_CACHE",
                      os.path.join(os.path.expanduser("~"), ".cache", "pytest-memleak-ebpf"))


def pytest_collection_modifyitems(items):
    # run-tests.sh reads this property from the JUnit XML: in CI no eBPF test may skip
    for item in items:
        if item.get_closest_marker("ebpf"):
            item.user_properties.append(("ebpf", "1"))


def ebpf_problem():
    """Why the eBPF end-to-end tests can't run here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root"
    try:
        from pytest_memleak_ebpf.bccloader import load_bcc
        from pytest_memleak_ebpf.preflight import run_all

        load_bcc()
        run_all()
    except Exception as exc:  # noqa: BLE001 - any reason is a skip reason
        return str(exc)
    return None


@pytest.fixture(scope="session")
def ebpf():
    problem = ebpf_problem()
    if problem:
        pytest.skip(f"eBPF unavailable: {problem}")


@pytest.fixture(scope="session")
def cbuild(tmp_path_factory):
    """Compile C sources: cbuild(name, source_text, *extra_flags) -> path."""
    out = tmp_path_factory.mktemp("cbin")
    cache = {}

    def build(name, source, *flags):
        key = (name, source, flags)
        if key not in cache:
            src = out / f"{name}.c"
            src.write_text(source)
            exe = out / name
            subprocess.run(["gcc", "-O0", "-g", "-fno-omit-frame-pointer", "-pthread", "-o", str(exe), str(src), *flags],
                           check=True)
            cache[key] = str(exe)
        return cache[key]

    return build


@pytest.fixture
def run_plugin(pytester, ebpf):
    """Run an inner pytest session with --ebpf-leaks in a subprocess; returns
    (RunResult, json report dict or None)."""
    import json

    def run(*args, json_report=True):
        extra = list(args)
        path = pytester.path / "leaks.json"
        if json_report:
            extra.append(f"--ebpf-leaks-json={path}")
        result = pytester.runpytest_subprocess("--ebpf-leaks", "-p", "no:cacheprovider", *extra, timeout=300)
        doc = json.loads(path.read_text()) if json_report and path.exists() else None
        return result, doc

    return run


EXT_DIR = os.path.join(ROOT, "tests", "fixtures", "ext")


def load_fixture_module(name: str, path: str):
    """Import a fixture's helper module (build.py, expected.py) by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def leakext_moddir(tmp_path_factory):
    """The fixture extension (tests/fixtures/ext/leakext.c), built once per
    session: the directory holding the module."""
    build = load_fixture_module("leakext_build", os.path.join(EXT_DIR, "build.py"))
    return build.build_leakext(tmp_path_factory.mktemp("leakext"))


@pytest.fixture(scope="session")
def leakext_expected():
    """tests/fixtures/ext/expected.py: the extension's exact figures."""
    return load_fixture_module("leakext_expected", os.path.join(EXT_DIR, "expected.py"))
