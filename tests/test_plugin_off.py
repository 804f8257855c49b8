"""The plugin with --ebpf-leaks off, and the environment problems it explains.
Markers are registered always; nothing heavy is imported when off."""

import os
import shutil
import subprocess
import sys

import pytest


def test_marker_registered_without_the_option(pytester):
    pytester.makepyfile(test_m="""
        import pytest
        @pytest.mark.leak_budget("1 KiB")
        def test_x(): pass
    """)
    result = pytester.runpytest_subprocess("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result = pytester.runpytest_subprocess("--markers")
    assert "@pytest.mark.leak_budget(limit, *, blocks=None, warmup=None, repeat=None, suppress=None):" in result.stdout.str()


def test_nothing_loaded_when_off(pytester):
    pytester.makepyfile(test_m="""
        import sys
        def test_x():
            assert "bcc" not in sys.modules
            for mod in ("tracer", "engine", "symbolize", "placement", "accounting"):
                assert "pytest_memleak_ebpf." + mod not in sys.modules, mod
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "ebpf-leaks" not in result.stdout.str()


def test_missing_bcc_is_one_paragraph(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("PYTEST_MEMLEAK_EBPF_BCC_PATH", str(tmp_path / "nowhere"))
    pytester.makepyfile(test_m="def test_x(): pass")
    result = pytester.runpytest_subprocess("--ebpf-leaks")
    if os.geteuid() != 0:
        pytest.skip("the root check comes first when not root")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "BCC's Python binding was not found" in err and "apt-get install python3-bpfcc" in err
    assert "Traceback" not in err


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to drop privileges")
def test_not_root_is_one_paragraph():
    import pathlib
    import tempfile

    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="memleak-nonroot-"))
    os.chmod(tmp_path, 0o777)
    (tmp_path / "test_m.py").write_text("def test_x(): pass\n")
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         sys.executable, "-m", "pytest", "--ebpf-leaks", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert "requires root" in proc.stderr and "Traceback" not in proc.stderr
