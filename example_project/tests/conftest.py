"""Fixtures for the kvtool test-suite: build the project once, hand out paths."""
import fcntl
import subprocess
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parent.parent
BUILD_DIR = PROJECT_DIR / "build"
DATA_DIR = Path(__file__).resolve().parent / "data"

_built = False


def build_project():
    """Run `make -C example_project` once per session (serialised for xdist workers)."""
    global _built
    if _built:
        return
    BUILD_DIR.mkdir(exist_ok=True)
    with open(BUILD_DIR / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run(["make", "-C", str(PROJECT_DIR)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        pytest.exit(f"building example_project failed:\n{proc.stdout}", returncode=3)
    _built = True


def pytest_sessionstart(session):
    # Build before the first test starts, so that make/cc (which never free
    # their heap) run outside every test and never count against a leak budget.
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
