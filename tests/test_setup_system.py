"""scripts/setup-system.sh picks each distribution's package names (Debian 12/13,
Ubuntu 22.04/24.04) and the fallbacks for a kernel without packages of its own:
run in dry-run mode with a fake /etc/os-release and stand-ins for dpkg, apt-cache
and uname (no root needed, nothing is installed)."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "setup-system.sh"
COMMON = ["python3-bpfcc", "python3-venv", "valgrind", "gcc", "g++", "make", "libc6-dev", "libc6-dbg", "sqlite3",
          "xz-utils", "jq", "gdb", "procps", "libjemalloc-dev", "libgoogle-perftools-dev", "libmimalloc-dev",
          "musl-tools"]
OS_RELEASE = {
    ("debian", "12"): 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\n'
                      'VERSION_CODENAME=bookworm\nID=debian\n',
    ("debian", "13"): 'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nNAME="Debian GNU/Linux"\nVERSION_ID="13"\n'
                      'VERSION_CODENAME=trixie\nID=debian\n',
    ("ubuntu", "22.04"): 'PRETTY_NAME="Ubuntu 22.04.5 LTS"\nNAME="Ubuntu"\nVERSION_ID="22.04"\nID=ubuntu\n'
                         'ID_LIKE=debian\nVERSION_CODENAME=jammy\n',
    ("ubuntu", "24.04"): 'PRETTY_NAME="Ubuntu 24.04.3 LTS"\nNAME="Ubuntu"\nVERSION_ID="24.04"\nID=ubuntu\n'
                         'ID_LIKE=debian\nVERSION_CODENAME=noble\n',
}


@pytest.fixture
def setup(tmp_path):
    """setup(os_release_text, krel, available=(), installed=(), bpftool_works=False)
    -> (exit status, stderr lines)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()

    def stub(name, body):
        p = stubs / name
        p.write_text("#!/bin/bash\n" + body + "\n")
        p.chmod(0o755)

    calls = tmp_path / "apt-get.calls"
    stub("apt-get", f'echo "$*" >> {calls}; exit 1')   # dry run: never called
    stub("apt-cache", 'if [ "$1" = show ] && [[ " $FAKE_AVAILABLE " == *" $2 "* ]]; then\n'
                      '  printf "Package: %s\\nVersion: 1\\n" "$2"; exit 0; fi\n'
                      'echo "E: No packages found" >&2; exit 100')
    stub("dpkg-query", 'pkg="${*: -1}"; if [[ " $FAKE_INSTALLED " == *" $pkg "* ]]; then\n'
                       '  printf "install ok installed"; exit 0; fi\n'
                       'echo "dpkg-query: no packages found matching $pkg" >&2; exit 1')
    stub("dpkg", '[ "$1" = --print-architecture ] && echo amd64')
    stub("uname", '[ "$1" = -r ] && echo "$FAKE_KREL"')
    stub("mountpoint", "exit 0")

    def run(os_release, krel, *, available=(), installed=(), bpftool_works=False):
        (tmp_path / "os-release").write_text(os_release)
        stub("bpftool", "exit 0" if bpftool_works else "exit 1")
        env = {"PATH": f"{stubs}:/usr/bin:/bin", "SETUP_DRY_RUN": "1",
               "SETUP_OS_RELEASE": str(tmp_path / "os-release"), "FAKE_KREL": krel,
               "FAKE_AVAILABLE": " ".join(available), "FAKE_INSTALLED": " ".join(installed)}
        proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
        assert not calls.exists(), calls.read_text()
        return proc.returncode, proc.stderr.splitlines()

    return run


def installs(lines):
    (line,) = [ln for ln in lines if ln.startswith("setup: would run: apt-get install ")]
    assert line.startswith("setup: would run: apt-get install -y -qq --no-install-recommends ")
    return line.split("--no-install-recommends ", 1)[1].split()


@pytest.mark.parametrize("version, krel", [("12", "6.1.0-28-amd64"), ("13", "6.12.48+deb13-amd64")])
def test_debian_kernel_with_its_packages(setup, version, krel):
    rc, lines = setup(OS_RELEASE["debian", version], krel, available=[f"linux-headers-{krel}", "bpftool"])
    assert rc == 0, lines
    assert installs(lines) == [*COMMON, "bpftool", f"linux-headers-{krel}"]
    assert not any("would link" in ln for ln in lines)
    assert lines[-1] == f"setup: system ready (debian {version}, kernel {krel})"


@pytest.mark.parametrize("version", ["22.04", "24.04"])
def test_ubuntu_kernel_with_its_packages(setup, version):
    krel = "6.8.0-1021-azure"
    # Ubuntu's "bpftool" is a virtual package (linux-tools-common provides it): apt-cache has no record of it
    rc, lines = setup(OS_RELEASE["ubuntu", version], krel,
                      available=[f"linux-headers-{krel}", f"linux-tools-{krel}", "linux-tools-common"])
    assert rc == 0, lines
    assert installs(lines) == [*COMMON, "linux-tools-common", f"linux-tools-{krel}", f"linux-headers-{krel}"]
    assert not any("would link" in ln for ln in lines)


def test_ubuntu_with_a_real_bpftool_package(setup):
    # later Ubuntu releases made bpftool a package of its own, as on Debian
    rc, lines = setup(OS_RELEASE["ubuntu", "24.04"], "6.14.0-1012-azure",
                      available=["bpftool", "linux-headers-6.14.0-1012-azure"])
    assert rc == 0, lines
    assert installs(lines) == [*COMMON, "bpftool", "linux-headers-6.14.0-1012-azure"]


def test_debian_kernel_without_packages_gets_the_generic_headers(setup):
    rc, lines = setup(OS_RELEASE["debian", "12"], "6.18.44-custom", available=["bpftool", "linux-headers-amd64"])
    assert rc == 0, lines
    assert installs(lines) == [*COMMON, "bpftool", "linux-headers-amd64"]
    assert "setup: would link /lib/modules/6.18.44-custom/build -> the newest /usr/src/linux-headers-*-amd64" in lines


def test_ubuntu_kernel_without_packages_gets_the_generic_headers_and_tools(setup):
    rc, lines = setup(OS_RELEASE["ubuntu", "22.04"], "6.18.44-custom",
                      available=["linux-tools-common", "linux-tools-generic", "linux-headers-generic"])
    assert rc == 0, lines
    assert installs(lines) == [*COMMON, "linux-tools-common", "linux-tools-generic", "linux-headers-generic"]
    assert "setup: would link /lib/modules/6.18.44-custom/build -> the newest /usr/src/linux-headers-*-generic" in lines
    assert "setup: would link /usr/local/sbin/bpftool -> the newest /usr/lib/linux-tools/*/bpftool" in lines


def test_nothing_to_do_when_all_is_there(setup):
    # the running kernel's headers (present wherever this suite's eBPF tests run) and a working bpftool
    krel = os.uname().release
    if not os.path.exists(f"/lib/modules/{krel}/build/include/generated/autoconf.h") and \
            not os.path.exists(f"/lib/modules/{krel}/build/include/linux/kconfig.h"):
        pytest.skip(f"no kernel headers for {krel} on this machine")
    rc, lines = setup(OS_RELEASE["debian", "12"], krel, installed=COMMON, bpftool_works=True)
    assert rc == 0, lines
    assert lines == [f"setup: system ready (debian 12, kernel {krel})"]   # not even apt-get update


def test_an_unsupported_distribution_is_refused(setup):
    rc, lines = setup('NAME="Fedora Linux"\nID=fedora\nVERSION_ID=41\n', "6.11.4-301.fc41.x86_64")
    assert rc == 1
    assert lines == ["setup: unsupported distribution 'fedora': this script knows Debian and Ubuntu"]


def test_a_derivative_uses_its_parents_names(setup):
    rc, lines = setup('NAME="Linux Mint"\nID=linuxmint\nID_LIKE="ubuntu debian"\nVERSION_ID="22"\n', "6.8.0-51-generic",
                      available=["linux-tools-6.8.0-51-generic", "linux-headers-6.8.0-51-generic"])
    assert rc == 0, lines
    assert lines[0] == "setup: untested distribution linuxmint 22: using the ubuntu package names"
    assert installs(lines)[-3:] == ["linux-tools-common", "linux-tools-6.8.0-51-generic",
                                    "linux-headers-6.8.0-51-generic"]


def test_script_passes_shellcheck():
    from test_ci_workflow import tool

    proc = subprocess.run([tool("shellcheck"), "--severity=style", str(SCRIPT)], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout) == (0, "")
