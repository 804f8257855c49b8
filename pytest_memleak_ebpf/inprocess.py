"""In-process checking helpers: which code in the pytest process is an
extension module (as opposed to the interpreter, libc, the dynamic loader or
the plugin's own libraries), and the pymalloc question."""

from __future__ import annotations

import os
import sys
import sysconfig

from .procmaps import read_maps

SYSTEM_DIRS = ("/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/", "/usr/local/lib/")


def mapped_modules() -> frozenset:
    return frozenset(os.path.realpath(p) for _, _, _, p in read_maps())


def is_extension(path: str, own: frozenset = frozenset()) -> bool:
    """Native code that is not the interpreter, its standard library, the C
    runtime, the dynamic loader or the plugin's own libraries (BCC, LLVM,
    capstone). Python extension modules anywhere count; so does any other
    shared object outside the system library directories (e.g. a project's
    own library loaded through ctypes)."""
    real = os.path.realpath(path)
    if real in own:
        return False
    if real == os.path.realpath(sys.executable):
        return False
    base = os.path.basename(real)
    if base.startswith("libpython"):
        return False
    dynload = sysconfig.get_config_var("DESTSHARED")
    if dynload and os.path.dirname(real) == os.path.realpath(dynload):
        return False
    pyext = ".cpython-" in base or ".abi3." in base or base.endswith(".pyd")
    if real.startswith(SYSTEM_DIRS) and "-packages/" not in real and not pyext:
        return False
    return True


_verdicts: dict[tuple[str, frozenset], bool] = {}


def _extension_maps(own: frozenset) -> list[tuple[int, int, int, str]]:
    """The executable mappings of extension modules (verdicts cached per path)."""
    out = []
    for m in read_maps():
        key = (m[3], own)
        v = _verdicts.get(key)
        if v is None:
            v = _verdicts[key] = is_extension(m[3], own)
        if v:
            out.append(m)
    return out


def extension_ranges(own: frozenset = frozenset()) -> list[tuple[int, int]]:
    return [(s, e) for s, e, _, _ in _extension_maps(own)]


def extension_modules(own: frozenset = frozenset()) -> list[str]:
    """Paths of the extension modules (see is_extension) mapped now."""
    return list(dict.fromkeys(p for _, _, _, p in _extension_maps(own)))


def pymalloc_active() -> bool:
    """True when small Python objects come from pymalloc arenas (invisible
    to libc probes) rather than malloc."""
    if os.environ.get("PYTHONMALLOC", "") in ("malloc", "malloc_debug"):
        return False
    try:
        return sys.getallocatedblocks() > 0
    except AttributeError:  # pragma: no cover - non-CPython
        return False


def free_threaded() -> bool:
    return bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
