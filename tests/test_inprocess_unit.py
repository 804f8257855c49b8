"""Unit tests (no root): which code counts as an extension module, map parsing."""

import os
import sys
import sysconfig

from pytest_memleak_ebpf.inprocess import is_extension
from pytest_memleak_ebpf.procmaps import locate, read_maps


def test_interpreter_stdlib_and_system_libraries_are_not_extensions(tmp_path):
    assert not is_extension(sys.executable)
    dynload = sysconfig.get_config_var("DESTSHARED")
    assert not is_extension(os.path.join(dynload, "_json.cpython-311-x86_64-linux-gnu.so"))
    assert not is_extension("/usr/lib/x86_64-linux-gnu/libc.so.6")
    assert not is_extension("/lib64/ld-linux-x86-64.so.2")
    assert not is_extension("/usr/lib/x86_64-linux-gnu/libffi.so.8")
    assert not is_extension("/opt/py/lib/libpython3.11.so.1.0")


def test_extension_modules_and_project_libraries_are(tmp_path):
    assert is_extension("/home/u/proj/build/kvext.cpython-311-x86_64-linux-gnu.so")
    assert is_extension("/usr/lib/python3/dist-packages/numpy/core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so")
    assert is_extension("/home/u/proj/build/libkvconf.so")          # loaded through ctypes
    assert is_extension("/usr/local/lib/python3.11/site-packages/foo/_speedups.abi3.so")


def test_own_libraries_are_never_extensions(tmp_path):
    lib = str(tmp_path / "libcapstone.so")
    assert is_extension(lib)
    assert not is_extension(lib, frozenset({os.path.realpath(lib)}))


def test_read_maps_and_locate(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f0000000000-7f0000001000 r--p 00000000 08:01 1 /x/libfoo.so\n"
        "7f0000001000-7f0000003000 r-xp 00001000 08:01 1 /x/libfoo.so\n"
        "7f0000003000-7f0000004000 rw-p 00000000 00:00 0 \n"
        "7ffd00000000-7ffd00001000 r-xp 00000000 00:00 0 [vdso]\n")
    got = read_maps(str(maps))
    assert got == [(0x7F0000001000, 0x7F0000003000, 0x1000, "/x/libfoo.so")]
    assert locate(got, 0x7F0000001234) == ("/x/libfoo.so", 0x1234)
    assert locate(got, 0x7F0000003000) is None
