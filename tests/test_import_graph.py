"""The project's import graph has no cycles, and its layers point one way.

Every ``import`` in ``ctal/``, ``kernels/`` (installed as ``ctal.kernels``), ``benchmarks/`` and
``train.py`` counts, including the ones inside functions (a function-local import hides a cycle
from Python, not from the design). An import of ``pkg.mod`` is an edge to ``pkg.mod``; the parent
packages Python initializes on the way are not edges of their own.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

SOURCES = {"ctal": ROOT / "ctal", "ctal.kernels": ROOT / "kernels", "benchmarks": ROOT / "benchmarks"}
COMPILED = {"ctal._C"}  # the extension: a module, but no Python source to read


def _modules() -> dict[str, Path]:
    mods = {"train": ROOT / "train.py"}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix] + parts)] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Project modules ``name`` imports (anywhere in the file)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                pkg = ".".join(base + ([node.module] if node.module else []))
            else:
                pkg = node.module
            targets = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in MODULES.keys() | COMPILED else pkg for a in node.names]
        else:
            continue
        for t in targets:
            if t in COMPILED:
                continue
            while t and t not in MODULES:  # `import ctal.ops.cost as c` names the module itself
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    assert {"ctal.ops.registry", "ctal.ops.cost", "ctal.kernels.fused", "ctal.engine.trainer"} <= set(GRAPH)
    assert "ctal.ops.custom_op" in GRAPH["ctal.kernels.fused"]
    assert "ctal.ops.registry" in GRAPH["ctal.ops.cost"]


def test_no_import_cycles():
    cycles = _cycles()
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _reaches(src: str) -> set[str]:
    seen, todo = set(), [src]
    while todo:
        for w in GRAPH[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


@pytest.mark.parametrize("low,high", [
    ("ctal.ops.registry", "implementations"),  # the registry imports no implementation
    ("ctal.ops.cost", "implementations"),
    ("ctal.ops.custom_op", "implementations"),
    ("ctal.models", "ctal.engine"),  # models never depend on the trainer
    ("ctal.ops", "ctal.models"),
    ("ctal.data", "ctal.engine"),
    ("ctal.metrics", "ctal.engine"),
    ("ctal.losses", "ctal.engine"),
    ("ctal.nn", "ctal.engine"),
    ("ctal.vis", "ctal.engine"),
    ("ctal.figures", "ctal.engine"),
    ("ctal.models.registry", "model modules"),  # so that every model module can register itself
])
def test_layers(low, high):
    forbidden = {m for m in GRAPH if m.startswith(high + ".") or m == high}
    if high == "model modules":
        forbidden = {m for m in GRAPH if m.startswith("ctal.models.")} - {
            "ctal.models.registry", "ctal.models.backbones", "ctal.models.base"}
    if high == "implementations":
        forbidden = {"ctal.ops.backends", "ctal.ops.extension", "ctal.ops.linear", "ctal.ops.quadratic",
                     "ctal.ops.reference", "ctal.kernels"} | {m for m in GRAPH if m.startswith("ctal.kernels.")}
    sources = [m for m in GRAPH if m == low or m.startswith(low + ".")]
    bad = {s: sorted(_reaches(s) & forbidden) for s in sources}
    assert not any(bad.values()), {s: b for s, b in bad.items() if b}


# Function-local imports of project modules, where a module-level one would not do.
LOCAL_IMPORTS_OK = {
    "ctal.kernels.compile_check": "imports the kernels after choosing compiled (not interpreted) mode",
    "ctal.data.pascal": "the edge-label reader is needed only for the edge task",
}


def test_project_modules_are_imported_at_module_level():
    """Inside ``ctal`` and ``kernels`` an import of a project module sits at the top of the file
    (the benchmark scripts may set up their environment before importing ctal)."""
    local = []
    for name, path in MODULES.items():
        if not name.startswith("ctal") or name in LOCAL_IMPORTS_OK:
            continue
        tree = ast.parse(path.read_text())
        top, todo = set(), list(tree.body)  # module-level statements, also inside if / try blocks
        while todo:
            node = todo.pop()
            top.add(id(node))
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, (ast.stmt, ast.excepthandler)))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if (isinstance(node, ast.ImportFrom) and node.level) or (mod or "").startswith("ctal"):
                    local.append(f"{name}:{node.lineno}")
    assert not local, local
