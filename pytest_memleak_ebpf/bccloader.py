"""Find the distribution's BCC Python package from any interpreter or venv.

BCC's Python binding (``python3-bpfcc`` on Debian/Ubuntu, ``python3-bcc`` on
Fedora) is pure Python over ``libbcc.so`` and lives in the system
dist-packages, which a virtualenv does not see. We load exactly that one
package (never the whole dist-packages directory, and never the unrelated
PyPI package that is also called ``bcc``).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from types import ModuleType

INSTALL_HINT = (
    "Install the distribution's BCC Python binding: `apt-get install python3-bpfcc` "
    "(Debian/Ubuntu) or `dnf install python3-bcc` (Fedora/RHEL). The PyPI package named "
    "'bcc' is an unrelated project and will not work."
)


class BCCNotFound(RuntimeError):
    pass


def _candidate_dirs() -> list[str]:
    env = os.environ.get("PYTEST_MEMLEAK_EBPF_BCC_PATH")
    if env:  # explicit: look only there
        return [env]
    return [
        "/usr/lib/python3/dist-packages",
        *sorted(glob.glob("/usr/lib/python3*/site-packages"), reverse=True),
        *sorted(glob.glob("/usr/lib64/python3*/site-packages"), reverse=True),
        *sorted(glob.glob("/usr/local/lib/python3*/dist-packages"), reverse=True),
        *sorted(glob.glob("/usr/share/bcc/python")),
    ]


def _is_real_bcc(module: ModuleType) -> bool:
    return hasattr(module, "BPF") and hasattr(module, "lib")


def load_bcc() -> ModuleType:
    """Return the ``bcc`` module of the system's BCC, importing it if needed."""
    mod = sys.modules.get("bcc")
    if mod is not None and _is_real_bcc(mod):
        return mod
    if mod is not None:
        del sys.modules["bcc"]
    errors = []
    for d in _candidate_dirs():
        pkg = os.path.join(d, "bcc")
        init = os.path.join(pkg, "__init__.py")
        if not os.path.isfile(init) or not os.path.isfile(os.path.join(pkg, "libbcc.py")):
            continue
        spec = importlib.util.spec_from_file_location("bcc", init, submodule_search_locations=[pkg])
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules["bcc"] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # libbcc.so missing or incompatible
            for name in [n for n in sys.modules if n == "bcc" or n.startswith("bcc.")]:
                del sys.modules[name]
            errors.append(f"{pkg}: {exc}")
            continue
        if _is_real_bcc(module):
            return module
    detail = ("; ".join(errors) + ". ") if errors else ""
    raise BCCNotFound(
        f"BCC's Python binding was not found (looked in {', '.join(_candidate_dirs()[:3])}, ...). "
        f"{detail}{INSTALL_HINT}"
    )
