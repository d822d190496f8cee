"""Imports: the packages are this repository's, and dependencies run one way between the three layers.

caches (the frozen side) <- adapters (the method contract and the methods) <- fewclip (the application). Every
import statement of every module is read with ``ast``, function-local ones included; imports under
``if TYPE_CHECKING:`` never run and are left out. PyPI has unrelated packages named ``adapters`` and ``caches``:
the ones imported must be this repository's.
"""

from __future__ import annotations

import ast
from pathlib import Path

import adapters
import caches
import fewclip

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"caches": REPO / "caches", "adapters": REPO / "adapters", "fewclip": REPO / "scripts" / "fewclip"}
LAYERS = ("caches", "adapters", "fewclip")
"""Lowest first: a module may import its own layer and the layers before it, never one after it."""


def test_packages_come_from_this_repository():
    assert Path(adapters.__file__).resolve().parent == ROOTS["adapters"]
    assert Path(caches.__file__).resolve().parent == ROOTS["caches"]
    assert Path(fewclip.__file__).resolve().parent == ROOTS["fewclip"]


# ------------------------------------------------------------------------------------------ the import graph
def module_files(roots: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under each root (``root/x/__init__.py`` is ``name.x``)."""
    out = {}
    for name, root in roots.items():
        for py in sorted(root.rglob("*.py")):
            parts = [name, *py.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = py
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The known modules ``module`` imports anywhere in its file: ``from a.b import c`` names ``a.b.c`` when that
    is a module, else ``a.b``; a name that is not a known module is cut back to its known parent package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_only(tree)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in known and t != module:
                found.add(t)
    return found


def import_graph(roots: dict[str, Path]) -> dict[str, set[str]]:
    files = module_files(roots)
    return {m: imports_of(m, p, set(files)) for m, p in files.items()}


def layer_violations(graph: dict[str, set[str]], layers: tuple[str, ...] = LAYERS) -> list[str]:
    rank = {name: i for i, name in enumerate(layers)}
    return sorted(f"{a} imports {b}" for a, deps in graph.items() for b in deps
                  if rank[b.split(".")[0]] > rank[a.split(".")[0]])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted; none in an acyclic graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


# ------------------------------------------------------------------------------------------------ the checks
def test_the_graph_sees_the_repository():
    graph = import_graph(ROOTS)
    # Known edges of each kind (top level, function-local, through a package) so that a parser that silently
    # finds nothing cannot pass the checks below.
    assert "adapters.base" in graph["adapters.tip"]
    assert "caches.builder" in graph["fewclip.runner"] and "adapters.base" in graph["fewclip.runner"]
    assert "fewclip.runner" in graph["fewclip.cli"]  # imported inside a function
    assert "caches.backbone" in graph["caches.data.augment"]
    assert {m.split(".")[0] for m in graph} == set(LAYERS) and len(graph) > 40


def test_layers_import_one_way():
    """caches imports neither adapters nor fewclip; adapters never imports fewclip."""
    assert layer_violations(import_graph(ROOTS)) == []


def test_no_import_cycles():
    assert cycles(import_graph(ROOTS)) == []


def test_the_checks_catch_a_cycle_and_a_layer_breach(tmp_path):
    """The checker on a planted tree: a cycle through a function-local import, a TYPE_CHECKING import that does
    not count, a relative import, and a low layer importing a higher one."""
    low, high = tmp_path / "low", tmp_path / "high"
    for d in (low, high):
        d.mkdir()
        (d / "__init__.py").write_text("")
    (low / "a.py").write_text("def f():\n    from low import b\n    return b\n")
    (low / "b.py").write_text("from . import a\n")
    (low / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from high.h import H\n")
    (low / "d.py").write_text("import high.h\n")
    (high / "h.py").write_text("from low.c import x\nH = 1\n")
    graph = import_graph({"low": low, "high": high})
    assert graph["low.c"] == set() and graph["high.h"] == {"low.c"}
    assert cycles(graph) == [["low.a", "low.b"]]
    assert layer_violations(graph, ("low", "high")) == ["low.d imports high.h"]
