"""Unit tests (no root needed): each missing kernel feature or privilege gives
one paragraph saying what is missing and how to fix it; and the plugin turns
it into a usage error without a traceback."""

import os

import pytest

from pytest_memleak_ebpf import preflight
from pytest_memleak_ebpf.preflight import EnvironmentProblem


def test_tracefs_missing_and_unmountable(monkeypatch):
    monkeypatch.setattr(preflight, "TRACEFS_DIRS", ("/nonexistent/tracing",))
    mounts = []
    monkeypatch.setattr(preflight.subprocess, "run", lambda argv, **kw: mounts.append(argv))
    with pytest.raises(EnvironmentProblem) as e:
        preflight.ensure_tracefs()
    msg = str(e.value)
    assert "tracefs is not mounted" in msg and "mount -t tracefs tracefs /sys/kernel/tracing" in msg
    assert "\n" not in msg
    if os.path.isdir("/sys/kernel/tracing"):
        assert mounts == [["mount", "-t", "tracefs", "tracefs", "/sys/kernel/tracing"]]


def test_tracefs_mounted_on_demand(monkeypatch, tmp_path):
    d = tmp_path / "tracing"
    d.mkdir()
    monkeypatch.setattr(preflight, "TRACEFS_DIRS", (str(d),))
    monkeypatch.setattr(preflight.subprocess, "run", lambda argv, **kw: (d / "uprobe_events").write_text(""))
    monkeypatch.setattr(preflight.os.path, "isdir", lambda p: True)
    preflight.ensure_tracefs()   # the "mount" made uprobe_events appear: no error


def test_no_uprobes(monkeypatch):
    monkeypatch.setattr(preflight, "TRACEFS_DIRS", ("/nonexistent/tracing",))
    real = os.path.exists
    monkeypatch.setattr(preflight.os.path, "exists",
                        lambda p: False if p == "/sys/bus/event_source/devices/uprobe" else real(p))
    with pytest.raises(EnvironmentProblem) as e:
        preflight.check_uprobes()
    assert "no uprobe support" in str(e.value) and "CONFIG_UPROBES=y" in str(e.value)


def test_no_kernel_headers(monkeypatch):
    monkeypatch.setattr(preflight.platform, "release", lambda: "9.9.9-test")
    real_exists, real_isdir = os.path.exists, os.path.isdir
    monkeypatch.setattr(preflight.os.path, "exists",
                        lambda p: False if p == "/sys/kernel/kheaders.tar.xz" else real_exists(p))
    monkeypatch.setattr(preflight.os.path, "isdir",
                        lambda p: False if p.startswith("/lib/modules/9.9.9-test") else real_isdir(p))
    with pytest.raises(EnvironmentProblem) as e:
        preflight.check_kernel_headers()
    msg = str(e.value)
    assert "9.9.9-test" in msg and "apt-get install linux-headers-9.9.9-test" in msg


def test_not_linux(monkeypatch):
    monkeypatch.setattr(preflight.platform, "system", lambda: "Darwin")
    with pytest.raises(EnvironmentProblem, match="Linux only"):
        preflight.run_all()


def test_plugin_reports_a_missing_feature_as_a_usage_error(pytester):
    # the plugin runs its preflight before loading anything: a conftest that
    # hides uprobes from it stands in for a kernel without them
    pytester.makeconftest("""
        from pytest_memleak_ebpf import preflight
        def _no_uprobes():
            raise preflight.EnvironmentProblem("This kernel has no uprobe support (test stand-in).")
        preflight.check_uprobes = _no_uprobes
    """)
    pytester.makepyfile(test_m="def test_x(): pass")
    result = pytester.runpytest_subprocess("--ebpf-leaks", "-p", "no:cacheprovider")
    if os.geteuid() != 0:
        pytest.skip("the root check comes first when not root")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "no uprobe support (test stand-in)" in err
    assert "Traceback" not in err
