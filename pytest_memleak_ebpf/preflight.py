"""Checks that the machine can run the tracer, each failing with one paragraph
that says what is missing and how to fix it."""

from __future__ import annotations

import os
import platform
import subprocess


class EnvironmentProblem(RuntimeError):
    """The tracer cannot run here; str() is a user-facing paragraph."""


TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
# How the tracer attaches its allocator probes, best first (tracer/probes.py):
#   session: uprobe session links (entry and return in one program; an entry
#            that needs no return skips it; free: an entry-only uprobe_multi
#            link), multi: an entry and a return
#            uprobe_multi link, perf: BCC's one perf event per probe.
# The environment variable forces one.
ATTACH_MODES = ("session", "multi", "perf")
ATTACH_ENV = "PYTEST_MEMLEAK_EBPF_ATTACH"


# The capabilities the tracer's steps need (measured on Linux 6.18, README "Running
# without full root"): loading the programs and maps, CAP_BPF; the tracing program
# types, their tracepoints and uprobe links, CAP_PERFMON (CAP_SYS_ADMIN stands for
# both, and is all kernels before 5.8 know); a process that is not uid 0 reads
# tracefs (root's, mode 0700: the tracepoints' ids and formats) with
# CAP_DAC_READ_SEARCH, and attaches perf-event uprobes with CAP_SYS_ADMIN (the
# kernel's own check) or, through BCC's tracefs fallback, by writing uprobe_events
# (uid 0 owns it; CAP_DAC_OVERRIDE); mounting tracefs needs CAP_SYS_ADMIN.
CAPABILITIES = {"CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_SYS_ADMIN": 21,
                "CAP_PERFMON": 38, "CAP_BPF": 39}
LOAD_CAPS = ("CAP_BPF", "CAP_PERFMON")
STATUS = "/proc/self/status"
MOUNTINFO = "/proc/self/mountinfo"
KALLSYMS = "/proc/kallsyms"
UPROBE_MULTI_SYMBOL = "bpf_uprobe_multi_link_attach"   # Linux 6.6+: uprobe_multi links
HOW_TO_GRANT = ("e.g. `sudo setpriv --reuid=$(id -u) --regid=$(id -g) --init-groups "
                "--inh-caps=+bpf,+perfmon,+dac_read_search --ambient-caps=+bpf,+perfmon,+dac_read_search "
                "\"$(which python)\" -m pytest --ebpf-leaks`; the README's \"Running without full root\" says what "
                "each step needs")


def effective_caps() -> frozenset[str]:
    """The names of CAPABILITIES this process has in its effective set."""
    try:
        with open(STATUS) as f:
            capeff = next((line.split()[1] for line in f if line.startswith("CapEff:")), "0")
        bits = int(capeff, 16)
    except (OSError, ValueError, IndexError):
        bits = 0
    return frozenset(name for name, bit in CAPABILITIES.items() if bits >> bit & 1)


def _and(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _tracefs_ready() -> bool:
    return any(os.path.exists(os.path.join(d, "uprobe_events")) for d in TRACEFS_DIRS)


def _tracefs_mounts() -> list[str]:
    """The TRACEFS_DIRS where a tracefs is mounted (/proc/self/mountinfo)."""
    found = []
    try:
        with open(MOUNTINFO) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5 and right.split()[:1] == ["tracefs"] and fields[4] in TRACEFS_DIRS:
                    found.append(fields[4])
    except OSError:
        pass
    return found


def ensure_tracefs() -> None:
    if _tracefs_ready():
        return
    mounted = _tracefs_mounts()
    if mounted:
        raise EnvironmentProblem(
            f"tracefs is mounted at {mounted[0]} but this process (uid {os.geteuid()}) cannot read it: it "
            "belongs to root with mode 0700, and the tracer reads its tracepoints' ids and formats there. "
            "Run pytest as root, or add CAP_DAC_READ_SEARCH to the capabilities it runs with, "
            f"{HOW_TO_GRANT}."
        )
    if os.path.isdir("/sys/kernel/tracing"):
        subprocess.run(["mount", "-t", "tracefs", "tracefs", "/sys/kernel/tracing"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if _tracefs_ready():
        return
    lacking = "" if "CAP_SYS_ADMIN" in effective_caps() else \
        " (mounting it needs CAP_SYS_ADMIN, which this process lacks)"
    raise EnvironmentProblem(
        f"tracefs is not mounted and could not be mounted{lacking}, so uprobes and tracepoints cannot be "
        "attached. Mount it with `mount -t tracefs tracefs /sys/kernel/tracing` (as root), or add "
        "`tracefs /sys/kernel/tracing tracefs defaults 0 0` to /etc/fstab; in a container, run it "
        "privileged with /sys/kernel/tracing available. The kernel also needs CONFIG_UPROBE_EVENTS=y."
    )


def check_privileges() -> None:
    caps = effective_caps()
    if "CAP_SYS_ADMIN" in caps or caps.issuperset(LOAD_CAPS):
        return
    missing = [c for c in LOAD_CAPS if c not in caps]
    if os.geteuid() == 0:
        who, fix = "root without them", (
            "Start it with them: a container, e.g. with Docker's or Podman's `--cap-add BPF --cap-add PERFMON`; "
            "the README's \"Running without full root\" says what each step needs")
    else:
        who, fix = f"uid {os.geteuid()}", (
            "Run pytest as root with the virtualenv's interpreter, e.g. `sudo \"$(which python)\" -m pytest "
            f"--ebpf-leaks` or `sudo -E env PATH=$PATH pytest --ebpf-leaks`, or grant the capabilities, {HOW_TO_GRANT}")
    raise EnvironmentProblem(
        "--ebpf-leaks needs to load eBPF programs and attach uprobes, which requires root or the "
        f"capabilities CAP_BPF and CAP_PERFMON, and this process ({who}) lacks {_and(missing)}. {fix}. "
        "Run without --ebpf-leaks to skip leak checking."
    )


def _uprobe_events_writable() -> bool:
    return any(os.access(os.path.join(d, "uprobe_events"), os.W_OK, effective_ids=True) for d in TRACEFS_DIRS)


def _has_uprobe_multi() -> bool:
    try:
        with open(KALLSYMS) as f:
            return any(line.rstrip("\n").endswith(" " + UPROBE_MULTI_SYMBOL) for line in f)
    except OSError:
        return False


def check_perf_uprobes() -> None:
    """The perf attach mode (forced, or the only one a kernel before 6.6 has)
    creates perf-event uprobes: the kernel lets CAP_SYS_ADMIN do that, and BCC
    falls back to writing tracefs's uprobe_events, which uid 0 owns."""
    mode = os.environ.get(ATTACH_ENV) or "auto"
    if mode in ("session", "multi"):
        return
    if "CAP_SYS_ADMIN" in effective_caps() or _uprobe_events_writable():
        return
    if mode == "auto" and _has_uprobe_multi():
        return
    why = (f"{ATTACH_ENV}=perf asks for" if mode == "perf" else
           f"this kernel ({platform.release()}) has no uprobe_multi links (Linux 6.6+), so the tracer needs")
    raise EnvironmentProblem(
        f"{why} one perf-event uprobe per probe, and this process (uid {os.geteuid()}) may not create them: "
        "the kernel allows it with CAP_SYS_ADMIN, which this process lacks, and the fallback writes "
        "tracefs's uprobe_events, which is root's (CAP_DAC_OVERRIDE would allow that). Run pytest as root, "
        "add CAP_SYS_ADMIN to its capabilities"
        + (", or use a kernel with uprobe_multi links (Linux 6.6+)." if mode == "auto" else
           f", or unset {ATTACH_ENV} (uprobe_multi and session links need only CAP_BPF and CAP_PERFMON).")
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
    check_perf_uprobes()
    check_uprobes()
    check_kernel_headers()
