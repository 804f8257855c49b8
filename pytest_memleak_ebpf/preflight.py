"""Checks that the machine can run the tracer, each failing with one paragraph
that says what is missing and how to fix it."""

from __future__ import annotations

import os
import platform
import subprocess


class EnvironmentProblem(RuntimeError):
    """The tracer cannot run here; str() is a user-facing paragraph."""


TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
# How the tracer attaches its allocator probes, best first (tracer.py):
#   session: uprobe session links (entry and return in one program; an entry
#            that needs no return skips it; free: an entry-only uprobe_multi
#            link), multi: an entry and a return
#            uprobe_multi link, perf: BCC's one perf event per probe.
# The environment variable forces one.
ATTACH_MODES = ("session", "multi", "perf")
ATTACH_ENV = "PYTEST_MEMLEAK_EBPF_ATTACH"


def _tracefs_ready() -> bool:
    return any(os.path.exists(os.path.join(d, "uprobe_events")) for d in TRACEFS_DIRS)


def ensure_tracefs() -> None:
    if _tracefs_ready():
        return
    if os.path.isdir("/sys/kernel/tracing"):
        subprocess.run(["mount", "-t", "tracefs", "tracefs", "/sys/kernel/tracing"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if _tracefs_ready():
        return
    raise EnvironmentProblem(
        "tracefs is not mounted and could not be mounted, so uprobes and tracepoints cannot be "
        "attached. Mount it with `mount -t tracefs tracefs /sys/kernel/tracing` (as root), or add "
        "`tracefs /sys/kernel/tracing tracefs defaults 0 0` to /etc/fstab; in a container, run it "
        "privileged with /sys/kernel/tracing available. The kernel also needs CONFIG_UPROBE_EVENTS=y."
    )


def check_privileges() -> None:
    if os.geteuid() == 0:
        return
    try:
        with open("/proc/self/status") as f:
            capeff = next((line.split()[1] for line in f if line.startswith("CapEff:")), "0")
        caps = int(capeff, 16)
    except (OSError, ValueError):
        caps = 0
    CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
    if caps & (1 << CAP_SYS_ADMIN) or (caps & (1 << CAP_BPF) and caps & (1 << CAP_PERFMON)):
        return
    raise EnvironmentProblem(
        "--ebpf-leaks needs to load eBPF programs and attach uprobes, which requires root "
        "(or CAP_BPF + CAP_PERFMON + CAP_SYS_ADMIN for tracefs). Run pytest as root, e.g. "
        "`sudo -E env PATH=$PATH pytest --ebpf-leaks`, or grant the capabilities to the Python "
        "interpreter; run without --ebpf-leaks to skip leak checking."
    )


def check_kernel_headers() -> None:
    release = platform.release()
    build = f"/lib/modules/{release}/build"
    if os.path.exists("/sys/kernel/kheaders.tar.xz") or os.path.isdir(build):
        return
    raise EnvironmentProblem(
        f"BCC compiles the tracer against kernel headers, and none were found for kernel {release} "
        f"({build} is missing and /sys/kernel/kheaders.tar.xz is not available). Install them: "
        f"`apt-get install linux-headers-{release}` (Debian/Ubuntu) or `dnf install kernel-devel-{release}` "
        "(Fedora); if your distribution has no package for this exact kernel, install its generic "
        "headers package and link /lib/modules/$(uname -r)/build to it (this repository's "
        "scripts/setup-system.sh does that), or load the kheaders module (`modprobe kheaders`)."
    )


def check_uprobes() -> None:
    if os.path.exists("/sys/bus/event_source/devices/uprobe") or any(
        os.path.exists(os.path.join(d, "uprobe_events")) for d in TRACEFS_DIRS
    ):
        return
    raise EnvironmentProblem(
        "This kernel has no uprobe support (no /sys/bus/event_source/devices/uprobe and no "
        "uprobe_events in tracefs). Use a kernel built with CONFIG_UPROBES=y and "
        "CONFIG_UPROBE_EVENTS=y (every mainstream distribution kernel has them)."
    )


def check_attach_env() -> None:
    value = os.environ.get(ATTACH_ENV) or "auto"
    if value == "auto" or value in ATTACH_MODES:
        return
    raise EnvironmentProblem(
        f"{ATTACH_ENV}={value!r} is not a way to attach the allocator probes: use auto (the default: "
        "the best the kernel has), session (uprobe session link, Linux 6.13+), multi (uprobe_multi "
        "links, Linux 6.6+) or perf (one perf event per probe, any kernel with uprobes)."
    )


def run_all() -> None:
    if platform.system() != "Linux":
        raise EnvironmentProblem("--ebpf-leaks works on Linux only (it uses eBPF uprobes).")
    check_attach_env()
    check_privileges()
    ensure_tracefs()
    check_uprobes()
    check_kernel_headers()
