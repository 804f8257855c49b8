"""pymalloc serves Python objects of 512 B or less from arenas the libc probes
never see. Its own functions are probed in the pytest process while a test's
window is open (tracer/probes.py PYMALLOC_SITES) when the kernel and the
interpreter allow it; otherwise pytest restarts once with PYTHONMALLOC=malloc
(opt out with PYTEST_MEMLEAK_EBPF_REEXEC=0). The in-process header notes say
which."""

from __future__ import annotations

import os
import sys
from typing import Callable

REEXEC_ENV = "PYTEST_MEMLEAK_EBPF_REEXEC"
_PYMALLOC_NOTE = ("pymalloc is active: Python objects of 512 B or less made by C extensions are invisible "
                  "(pytest restarts itself with PYTHONMALLOC=malloc when extension modules are loaded at "
                  "collection; raw malloc-family blocks are exact either way)")
PYMALLOC_PROBED_NOTE = ("pymalloc kept: Python objects are seen through CPython's pymalloc functions, probed in "
                        "this process only while a test's window is open")


def restart_reason(mode: str, own_modules: frozenset, probed: bool = False) -> str | None:
    """Why this session should restart with PYTHONMALLOC=malloc (the text the
    restart line shows), or None: pymalloc is off already or `probed`, or
    nothing needs it (extensions mode and no extension module loaded at
    collection)."""
    from .inprocess import extension_modules, pymalloc_active

    if mode == "off" or probed or not pymalloc_active():
        return None
    mods = extension_modules(own_modules)
    if mods:
        names = ", ".join(sorted(os.path.basename(m).split(".")[0] for m in mods)[:5])
        return f"(extension modules loaded: {names}) "
    if mode == "all":
        return "(--ebpf-leaks-in-process=all) "
    return None


def in_process_notes(*, probe_problem: str | None = "", restart: bool = False, why: str = "",
                     before_exec: Callable[[], None] | None = None) -> list[str]:
    """The header's notes on what in-process checking can see. probe_problem:
    None when pymalloc is probed in the windows, else why it cannot be ("":
    not asked). With restart=True (a standalone session, never an xdist
    worker), first restart pytest once with PYTHONMALLOC=malloc; returns only
    when it did not."""
    from .inprocess import free_threaded, pymalloc_active

    notes = []
    if free_threaded():
        notes.append("free-threaded CPython: Python objects come from mimalloc, which libc probes cannot see; "
                     "in-process checking covers raw malloc-family blocks only")
        return notes
    if not pymalloc_active():
        if os.environ.get(REEXEC_ENV) == "done":
            notes.append("pytest was restarted with PYTHONMALLOC=malloc so Python objects made by extensions "
                         "are visible")
        else:
            notes.append("PYTHONMALLOC=malloc: Python objects are visible to the tracer")
        return notes
    if probe_problem is None:
        notes.append(PYMALLOC_PROBED_NOTE)
        return notes
    if restart and os.environ.get(REEXEC_ENV) not in ("0", "done") and hasattr(sys, "orig_argv"):
        problem = _exec_with_malloc(why, before_exec)
        notes.append(f"could not restart pytest with PYTHONMALLOC=malloc ({problem})")
    if probe_problem:
        notes.append(f"pymalloc cannot be probed here: {probe_problem}")
    notes.append(_PYMALLOC_NOTE)
    return notes


def _exec_with_malloc(why: str, before_exec: Callable[[], None] | None) -> OSError:
    """Replace this process by pytest with PYTHONMALLOC=malloc; returns only the reason it could not."""
    env = dict(os.environ, PYTHONMALLOC="malloc", **{REEXEC_ENV: "done"})
    sys.stdout.write(f"ebpf-leaks: restarting pytest with PYTHONMALLOC=malloc {why}"
                     f"(set {REEXEC_ENV}=0 to skip)\n")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if not os.access(sys.executable, os.X_OK):
            raise OSError(f"{sys.executable} is not executable")
        if before_exec is not None:
            before_exec()
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError as exc:
        return exc
