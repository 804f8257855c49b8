"""No import cycle inside the package: every `import` of one of our modules by
another — at module level or inside a function — is an edge; the graph must
have no cycle. (A late import inside a function hides a cycle from Python,
not from the design: the two modules still depend on each other.)"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "pytest_memleak_ebpf"


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under root (a package)."""
    out = {}
    base = root.name
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).with_suffix("")
        parts = [base, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    return mods[name].name == "__init__.py"


def import_graph(root: Path) -> dict[str, set[str]]:
    mods = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if _is_package(name, mods) else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    # `from pkg import submodule` depends on the submodule (the
                    # package's own __init__ runs first in any case)
                    targets.append(sub if sub in mods else base)
            for t in targets:
                # `import a.b.c` of ours: the deepest module of ours named
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_package_has_no_import_cycle():
    graph = import_graph(PKG)
    assert len(graph) > 10   # the walk found the package's modules
    assert cycles(graph) == []


# Layers (README "Architecture"): what a module must never reach up to.
_TOP = {"plugin", "roles", "options", "growth", "reexec"}
_PIPELINE = {"classify", "accounting", "verdict", "suppressions", "report", "flamegraph"}
_IO = {"tracer", "engine", "resolve", "symbolize", "inprocess"}
FORBIDDEN = {
    **{m: _TOP | _IO for m in _PIPELINE},
    "engine": _TOP,
    "tracer": _TOP | _PIPELINE | {"engine", "resolve"},
}


def layer_violations(graph: dict[str, set[str]], pkg: str = "pytest_memleak_ebpf") -> list[tuple[str, str]]:
    def top(name: str) -> str:
        return name[len(pkg) + 1:].split(".")[0] if name != pkg else ""

    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if top(b) in FORBIDDEN.get(top(a), ()) and top(a) != top(b))


def test_no_layer_reaches_up():
    assert layer_violations(import_graph(PKG)) == []


def test_layer_check_sees_a_violation():
    graph = {"pytest_memleak_ebpf.accounting": {"pytest_memleak_ebpf.tracer.core"},
             "pytest_memleak_ebpf.tracer.core": {"pytest_memleak_ebpf.tracer.abi"},
             "pytest_memleak_ebpf.tracer.abi": set()}
    assert layer_violations(graph) == [("pytest_memleak_ebpf.accounting", "pytest_memleak_ebpf.tracer.core")]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@pytest.mark.parametrize("files, expected", [
    # a late (function-level) import closing a cycle
    ({"a.py": "from .b import x\n", "b.py": "def f():\n    from .a import y\n"}, [["p.a", "p.b"]]),
    # three modules, one absolute import
    ({"a.py": "from . import b\n", "b.py": "import p.c\n", "c.py": "from .a import z\n"}, [["p.a", "p.b", "p.c"]]),
    # a subpackage's module importing a name of its own package's __init__, which imports it
    ({"sub/__init__.py": "from .m import T\n", "sub/m.py": "from . import helper\n"}, [["p.sub", "p.sub.m"]]),
    # no cycle: a package's __init__ importing its submodules, which import each other one way
    ({"sub/__init__.py": "from .m import T\nfrom .n import U\n", "sub/m.py": "from .n import U\n",
      "sub/n.py": "import os\n"}, []),
])
def test_cycle_detector(tmp_path, files, expected):
    root = tmp_path / "p"
    _write(root, {"__init__.py": "", **files})
    assert cycles(import_graph(root)) == expected
