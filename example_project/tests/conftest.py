"""Fixtures for the kvtool test-suite: build the project once, hand out paths."""
import fcntl
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parent.parent
BUILD_DIR = PROJECT_DIR / "build"
DATA_DIR = Path(__file__).resolve().parent / "data"

_built = False


def build_project():
    """Run `make -C example_project` once per session (serialised for xdist workers).

    PYTHON is the running interpreter, so kvext is built against its headers and
    ABI tag (the Makefile rebuilds kvext when the interpreter changes)."""
    global _built
    if _built:
        return
    BUILD_DIR.mkdir(exist_ok=True)
    with open(BUILD_DIR / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run(["make", "-C", str(PROJECT_DIR), f"PYTHON={sys.executable}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        pytest.exit(f"building example_project failed:\n{proc.stdout}", returncode=3)
    # build/ holds the kvext extension module: put it on sys.path so that
    # `import kvext` works.  This is done only after make has run, because the
    # import system caches a path entry that did not exist yet as "no finder".
    if str(BUILD_DIR) not in sys.path:
        sys.path.insert(0, str(BUILD_DIR))
        importlib.invalidate_caches()
    _built = True


def pytest_sessionstart(session):
    # Build before the first test starts, so that make/cc (which never free
    # their heap) run outside every test and never count against a leak budget,
    # and before collection, which imports kvext (test_kvext.py).
    build_project()


@pytest.fixture(scope="session")
def kvtool():
    """Path of the freshly built build/kvtool binary."""
    build_project()
    return BUILD_DIR / "kvtool"


@pytest.fixture(scope="session")
def data_dir():
    return DATA_DIR


@pytest.fixture(scope="session")
def server_conf():
    return DATA_DIR / "server.conf"
