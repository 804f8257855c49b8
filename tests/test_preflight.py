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


# -- capabilities (README "Running without full root"): faked /proc/self/status,
# mountinfo and kallsyms; tests/test_capabilities_e2e.py runs the real thing.

def _caps_file(tmp_path, *names, uid=0):
    bits = sum(1 << preflight.CAPABILITIES[n] for n in names)
    p = tmp_path / "status"
    p.write_text(f"Name:\tpython\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nCapInh:\t0000000000000000\n"
                 f"CapPrm:\t{bits:016x}\nCapEff:\t{bits:016x}\nCapBnd:\t{bits:016x}\n")
    return str(p)


def test_effective_caps_reads_capeff(monkeypatch, tmp_path):
    monkeypatch.setattr(preflight, "STATUS", _caps_file(tmp_path, "CAP_BPF", "CAP_DAC_READ_SEARCH"))
    assert preflight.effective_caps() == {"CAP_BPF", "CAP_DAC_READ_SEARCH"}
    # a kernel before 5.8 (no CAP_BPF, CAP_PERFMON): root's full set is bits 0-37
    (tmp_path / "old").write_text("CapEff:\t0000003fffffffff\n")
    monkeypatch.setattr(preflight, "STATUS", str(tmp_path / "old"))
    assert preflight.effective_caps() == {"CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_SYS_ADMIN"}
    preflight.check_privileges()   # CAP_SYS_ADMIN stands for both


@pytest.mark.parametrize("caps", [("CAP_BPF", "CAP_PERFMON"), ("CAP_SYS_ADMIN",)])
def test_privileges_that_suffice(monkeypatch, tmp_path, caps):
    monkeypatch.setattr(preflight, "STATUS", _caps_file(tmp_path, *caps))
    preflight.check_privileges()


@pytest.mark.parametrize("caps, missing", [
    (("CAP_PERFMON", "CAP_DAC_READ_SEARCH"), "lacks CAP_BPF."),
    (("CAP_BPF",), "lacks CAP_PERFMON."),
    ((), "lacks CAP_BPF and CAP_PERFMON."),
])
@pytest.mark.parametrize("euid, who", [(0, "root without them"), (1000, "uid 1000")])
def test_a_missing_capability_is_named(monkeypatch, tmp_path, caps, missing, euid, who):
    monkeypatch.setattr(preflight, "STATUS", _caps_file(tmp_path, *caps))
    monkeypatch.setattr(preflight.os, "geteuid", lambda: euid)
    with pytest.raises(EnvironmentProblem) as e:
        preflight.check_privileges()
    msg = str(e.value)
    assert f"requires root or the capabilities CAP_BPF and CAP_PERFMON, and this process ({who}) {missing}" in msg
    if euid == 0:   # sudo cannot help: a container started without them
        assert "Start it with them: a container, e.g. with Docker's or Podman's `--cap-add BPF --cap-add PERFMON`" in msg
        assert "sudo" not in msg
    else:
        assert "sudo \"$(which python)\" -m pytest --ebpf-leaks" in msg
        assert "--ambient-caps=+bpf,+perfmon,+dac_read_search" in msg
    assert msg.endswith("Run without --ebpf-leaks to skip leak checking.") and "\n" not in msg


def _mountinfo(tmp_path, *mounts):
    p = tmp_path / "mountinfo"
    p.write_text("".join(f"{30 + i} 25 0:{12 + i} / {where} rw,relatime shared:{i} - {fs} {fs} rw\n"
                         for i, (where, fs) in enumerate(mounts)))
    return str(p)


def test_tracefs_mounted_but_unreadable_names_dac_read_search(monkeypatch, tmp_path):
    # what a user who is not uid 0 sees: tracefs is root's, mode 0700
    d = tmp_path / "tracing"
    d.mkdir()
    monkeypatch.setattr(preflight, "TRACEFS_DIRS", (str(d),))
    monkeypatch.setattr(preflight, "MOUNTINFO", _mountinfo(tmp_path, ("/sys", "sysfs"), (str(d), "tracefs")))
    monkeypatch.setattr(preflight.os, "geteuid", lambda: 65534)
    mounts = []
    monkeypatch.setattr(preflight.subprocess, "run", lambda argv, **kw: mounts.append(argv))
    with pytest.raises(EnvironmentProblem) as e:
        preflight.ensure_tracefs()
    msg = str(e.value)
    assert msg.startswith(f"tracefs is mounted at {d} but this process (uid 65534) cannot read it: it belongs "
                          "to root with mode 0700")
    assert "add CAP_DAC_READ_SEARCH to the capabilities it runs with" in msg and "\n" not in msg
    assert mounts == []   # mounted already: no second mount


def test_mountinfo_other_filesystems_are_not_tracefs(monkeypatch, tmp_path):
    monkeypatch.setattr(preflight, "TRACEFS_DIRS", ("/sys/kernel/tracing",))
    monkeypatch.setattr(preflight, "MOUNTINFO", _mountinfo(
        tmp_path, ("/sys/kernel/tracing", "debugfs"), ("/mnt/tracing", "tracefs")))
    assert preflight._tracefs_mounts() == []
    monkeypatch.setattr(preflight, "MOUNTINFO", _mountinfo(tmp_path, ("/sys/kernel/tracing", "tracefs")))
    assert preflight._tracefs_mounts() == ["/sys/kernel/tracing"]


@pytest.mark.parametrize("caps, says", [((), True), (("CAP_SYS_ADMIN",), False)])
def test_tracefs_unmountable_says_when_cap_sys_admin_is_missing(monkeypatch, tmp_path, caps, says):
    monkeypatch.setattr(preflight, "TRACEFS_DIRS", ("/nonexistent/tracing",))
    monkeypatch.setattr(preflight, "MOUNTINFO", _mountinfo(tmp_path))
    monkeypatch.setattr(preflight, "STATUS", _caps_file(tmp_path, *caps))
    monkeypatch.setattr(preflight.subprocess, "run", lambda argv, **kw: None)
    with pytest.raises(EnvironmentProblem) as e:
        preflight.ensure_tracefs()
    msg = str(e.value)
    assert msg.startswith("tracefs is not mounted and could not be mounted")
    assert ("(mounting it needs CAP_SYS_ADMIN, which this process lacks)" in msg) is says


def _perf_setup(monkeypatch, tmp_path, caps, *, mode, uprobe_multi, writable):
    monkeypatch.setattr(preflight, "STATUS", _caps_file(tmp_path, *caps))
    if mode is None:
        monkeypatch.delenv(preflight.ATTACH_ENV, raising=False)
    else:
        monkeypatch.setenv(preflight.ATTACH_ENV, mode)
    syms = tmp_path / "kallsyms"
    syms.write_text("0000000000000000 T bpf_kprobe_multi_link_attach\n"
                    + ("0000000000000000 T bpf_uprobe_multi_link_attach\n" if uprobe_multi else "")
                    + "0000000000000000 t bpf_uprobe_multi_link_attach_helper\n")
    monkeypatch.setattr(preflight, "KALLSYMS", str(syms))
    monkeypatch.setattr(preflight, "_uprobe_events_writable", lambda: writable)
    monkeypatch.setattr(preflight.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(preflight.platform, "release", lambda: "6.1.0-test")


@pytest.mark.parametrize("caps, mode, uprobe_multi, writable", [
    (("CAP_BPF", "CAP_PERFMON"), None, True, False),          # auto: uprobe_multi links need no more
    (("CAP_BPF", "CAP_PERFMON"), "session", False, False),
    (("CAP_BPF", "CAP_PERFMON"), "multi", False, False),
    (("CAP_BPF", "CAP_PERFMON"), "perf", False, True),        # uid 0 or CAP_DAC_OVERRIDE: BCC's tracefs fallback
    (("CAP_SYS_ADMIN",), "perf", False, False),
    (("CAP_SYS_ADMIN",), None, False, False),
])
def test_perf_uprobes_allowed(monkeypatch, tmp_path, caps, mode, uprobe_multi, writable):
    _perf_setup(monkeypatch, tmp_path, caps, mode=mode, uprobe_multi=uprobe_multi, writable=writable)
    preflight.check_perf_uprobes()


def test_perf_uprobes_forced_without_cap_sys_admin(monkeypatch, tmp_path):
    _perf_setup(monkeypatch, tmp_path, ("CAP_BPF", "CAP_PERFMON", "CAP_DAC_READ_SEARCH"), mode="perf",
                uprobe_multi=True, writable=False)
    with pytest.raises(EnvironmentProblem) as e:
        preflight.check_perf_uprobes()
    msg = str(e.value)
    assert msg.startswith("PYTEST_MEMLEAK_EBPF_ATTACH=perf asks for one perf-event uprobe per probe, and this "
                          "process (uid 1000) may not create them: the kernel allows it with CAP_SYS_ADMIN, "
                          "which this process lacks")
    assert msg.endswith("or unset PYTEST_MEMLEAK_EBPF_ATTACH (uprobe_multi and session links need only CAP_BPF "
                        "and CAP_PERFMON).")


def test_kernel_without_uprobe_multi_needs_cap_sys_admin(monkeypatch, tmp_path):
    _perf_setup(monkeypatch, tmp_path, ("CAP_BPF", "CAP_PERFMON", "CAP_DAC_READ_SEARCH"), mode=None,
                uprobe_multi=False, writable=False)
    with pytest.raises(EnvironmentProblem) as e:
        preflight.check_perf_uprobes()
    msg = str(e.value)
    assert msg.startswith("this kernel (6.1.0-test) has no uprobe_multi links (Linux 6.6+), so the tracer needs "
                          "one perf-event uprobe per probe")
    assert "CAP_SYS_ADMIN" in msg and msg.endswith("or use a kernel with uprobe_multi links (Linux 6.6+).")


def test_uprobe_events_writable_uses_the_effective_ids(monkeypatch, tmp_path):
    d = tmp_path / "tracing"
    d.mkdir()
    (d / "uprobe_events").write_text("")
    monkeypatch.setattr(preflight, "TRACEFS_DIRS", (str(tmp_path / "none"), str(d)))
    seen = []
    real = os.access
    monkeypatch.setattr(preflight.os, "access", lambda p, m, **kw: seen.append((p, m, kw)) or real(p, m, **kw))
    assert preflight._uprobe_events_writable() is True
    assert seen[-1] == (str(d / "uprobe_events"), os.W_OK, {"effective_ids": True})


def test_attach_modes_by_kernel_release():
    from kernel_features import attach_modes

    assert attach_modes("6.18.0-1-amd64") == ["session", "multi", "perf"]
    assert attach_modes("6.13.2") == ["session", "multi", "perf"]
    assert attach_modes("6.8.0-1021-azure") == ["multi", "perf"]
    assert attach_modes("5.15.0-91-generic") == ["perf"]
