"""The package's shape: its modules import one another without a cycle.

Imports inside functions count (a function-level import is how a cycle is usually hidden), those
under ``if TYPE_CHECKING:`` do not (they never run).
"""

import ast
from pathlib import Path

import mnpo

SOURCE = Path(mnpo.__file__).resolve().parent.parent


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted((SOURCE / "mnpo").rglob("*.py")):
        parts = list(path.relative_to(SOURCE).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere but under ``TYPE_CHECKING``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_cycle_finder_on_a_hand_made_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set(), "g": {"g"}}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d", "e"]]


def test_imports_are_read_inside_functions_and_not_under_type_checking(tmp_path):
    known = {"mnpo.x": tmp_path / "x.py", "mnpo.y": tmp_path / "y.py", "mnpo.z": tmp_path / "z.py",
             "mnpo.pkg": tmp_path / "pkg" / "__init__.py", "mnpo.pkg.w": tmp_path / "pkg" / "w.py"}
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mnpo import z\n"
              "def f():\n    from mnpo.y import thing\n    from .pkg import w\n")
    (tmp_path / "x.py").write_text(source)
    assert imported("mnpo.x", tmp_path / "x.py", known) == {"mnpo.y", "mnpo.pkg.w"}


def test_the_package_has_no_import_cycle():
    known = module_names()
    assert {"mnpo.engine.evaluate", "mnpo.engine.localize", "mnpo.models.backbones"} <= set(known)
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert "mnpo.engine.views" in graph["mnpo.engine.localize"]  # imports are found at all
    assert cycles(graph) == []
