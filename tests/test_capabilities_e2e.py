"""End-to-end: a session with only the capabilities the README's "Running without
full root" lists works, with exact figures; a session lacking one of them stops
with the one-paragraph usage error naming it (pytest_memleak_ebpf/preflight.py).

The inner session is a subprocess started by setpriv with a reduced capability
set: as root (uid 0, as in a container given --cap-add BPF --cap-add PERFMON) or
as the user nobody with ambient capabilities. Its first test checks that it
really runs with exactly the capabilities and the user the outer test meant."""

import json
import os
import pathlib
import shutil
import sys
import tempfile
import textwrap

import pytest
from kernel_features import attach_modes

pytestmark = [
    pytest.mark.ebpf,
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
]

NOBODY = 65534
CAP_BITS = {"dac_override": 1, "dac_read_search": 2, "sys_admin": 21, "perfmon": 38, "bpf": 39}
AS_ROOT = ("bpf", "perfmon")
AS_USER = ("bpf", "perfmon", "dac_read_search")

LEAKER = r"""
#include <stdlib.h>
#include <string.h>
__attribute__((noinline)) char *make_leak(size_t n) { char *p = malloc(n); memset(p, 1, n); return p; }
int main(int argc, char **argv) {
    int k = atoi(argv[1]);
    size_t n = strtoul(argv[2], 0, 10);
    void *tmp = malloc(1000); free(tmp);
    for (int i = 0; i < k; i++) make_leak(n);
    return 0;
}
"""


@pytest.fixture
def leaker(cbuild):
    return cbuild("capleaker", LEAKER)


@pytest.fixture(scope="module")
def nobody_cache(tmp_path_factory):
    """A compiled-program cache nobody owns (bpfcache loads only the current user's entries)."""
    d = tmp_path_factory.mktemp("nobody-cache")
    os.chown(d, NOBODY, NOBODY)
    return d


@pytest.fixture
def outdir():
    """Where the inner session runs (its test file, the leaker, its report): a
    directory nobody can reach too (pytest's temporary directories are root's,
    mode 0700, and reading them would take CAP_DAC_READ_SEARCH)."""
    d = tempfile.mkdtemp(prefix="memleak-caps-")
    os.chmod(d, 0o777)
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def session(pytester, ebpf, leaker, nobody_cache, outdir, monkeypatch):
    """session(caps, user=None, attach=None) -> (RunResult, json report or None):
    the inner session under setpriv with exactly `caps` (names as setpriv spells them)."""

    def run(caps, *, user=None, attach=None):
        bits = sum(1 << CAP_BITS[c] for c in caps)
        uid = 0 if user is None else user
        exe = outdir / "capleaker"
        shutil.copy(leaker, exe)
        (outdir / "test_inner.py").write_text(textwrap.dedent(f"""
            import os, subprocess
            def test_runs_with_the_reduced_set():
                with open("/proc/self/status") as f:
                    status = dict(line.split(":", 1) for line in f)
                assert int(status["CapEff"], 16) == {bits:#x}
                assert os.geteuid() == {uid}
            def test_leak():
                subprocess.run([{str(exe)!r}, "3", "100"], check=True)
        """))
        spec = "-all" + "".join(f",+{c}" for c in caps)
        argv = ["setpriv", f"--inh-caps={spec}", f"--bounding-set={spec}"]
        if user is not None:
            argv += [f"--reuid={user}", f"--regid={user}", "--clear-groups", f"--ambient-caps={spec}"]
            monkeypatch.setenv("PYTEST_MEMLEAK_EBPF_CACHE", str(nobody_cache))
            monkeypatch.setenv("HOME", str(outdir))
        if attach:
            monkeypatch.setenv("PYTEST_MEMLEAK_EBPF_ATTACH", attach)
        report = outdir / "leaks.json"
        monkeypatch.chdir(outdir)
        result = pytester.run(*argv, "--", sys.executable, "-m", "pytest", "--ebpf-leaks", "-p", "no:cacheprovider",
                              f"--ebpf-leaks-json={report}", timeout=300)
        return result, (json.loads(report.read_text()) if report.exists() else None)

    return run


def assert_exact(result, doc, header):
    out = result.stdout.str()
    result.assert_outcomes(passed=1, failed=1)
    assert header in out
    assert ("test_inner.py::test_leak: leak budget exceeded: 300 B in 3 blocks leaked by 1 of 1 process "
            "(budget 0 B)") in out
    tests = {t["nodeid"].split("::")[-1]: t for t in doc["tests"]}
    t = tests["test_leak"]
    assert (t["leaked"], t["over_budget"], t["tracking_complete"]) == ({"bytes": 300, "blocks": 3}, True, True)
    (p,) = t["processes"]
    assert (p["comm"], p["exit_code"], p["signal"]) == ("capleaker", 0, None)
    assert p["outstanding"] == {"bytes": 300, "blocks": 3}
    assert p["allocated"] == {"bytes": 1300, "blocks": 4}
    assert tests["test_runs_with_the_reduced_set"]["processes"] == []


HEADERS = {"session": "3 uprobe session/multi links)", "multi": "2 uprobe_multi links)",
           "perf": "a perf event per probe)"}


@pytest.mark.parametrize("attach", attach_modes())
def test_root_with_only_bpf_and_perfmon(session, attach):
    # uid 0 owns tracefs; perf mode: BCC writes the probes into tracefs's
    # uprobe_events (the kernel's perf-event uprobes want CAP_SYS_ADMIN)
    result, doc = session(AS_ROOT, attach=attach)
    assert_exact(result, doc, HEADERS[attach])


def test_a_user_with_bpf_perfmon_and_dac_read_search(session):
    result, doc = session(AS_USER, user=NOBODY)
    assert_exact(result, doc, "ebpf-leaks: tracer ready: ")


@pytest.mark.parametrize("extra", ["sys_admin", "dac_override"])
def test_a_user_in_perf_mode_with_sys_admin_or_dac_override(session, extra):
    result, doc = session((*AS_USER, extra), user=NOBODY, attach="perf")
    assert_exact(result, doc, HEADERS["perf"])


def assert_usage_error(result, paragraph_start, *names):
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    err = result.stderr.str()
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("ERROR: --ebpf-leaks cannot run: ")]
    assert line.startswith("ERROR: --ebpf-leaks cannot run: " + paragraph_start), line
    for name in names:
        assert name in line


@pytest.mark.parametrize("drop", AS_ROOT)
def test_root_lacking_one_is_told_which(session, drop):
    result, _ = session([c for c in AS_ROOT if c != drop])
    assert_usage_error(result, "--ebpf-leaks needs to load eBPF programs and attach uprobes, which requires root "
                       "or the capabilities CAP_BPF and CAP_PERFMON, and this process (root without them) lacks "
                       f"CAP_{drop.upper()}.")


def test_a_user_lacking_bpf_is_told_which(session):
    result, _ = session(("perfmon", "dac_read_search"), user=NOBODY)
    assert_usage_error(result, "--ebpf-leaks needs to load eBPF programs and attach uprobes, which requires root "
                       f"or the capabilities CAP_BPF and CAP_PERFMON, and this process (uid {NOBODY}) lacks CAP_BPF.")


def test_a_user_lacking_dac_read_search_is_told_which(session):
    result, _ = session(("bpf", "perfmon"), user=NOBODY)
    assert_usage_error(result, f"tracefs is mounted at /sys/kernel/tracing but this process (uid {NOBODY}) cannot "
                       "read it", "add CAP_DAC_READ_SEARCH")


def test_a_user_in_perf_mode_lacking_sys_admin_is_told_which(session):
    result, _ = session(AS_USER, user=NOBODY, attach="perf")
    assert_usage_error(result, "PYTEST_MEMLEAK_EBPF_ATTACH=perf asks for one perf-event uprobe per probe, and this "
                       f"process (uid {NOBODY}) may not create them: the kernel allows it with CAP_SYS_ADMIN, "
                       "which this process lacks")
