"""mtlrun's modules import one another without a circle, and only modules that exist: read from the source (ast),
so the test needs no import to succeed."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mtlrun"




def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _executed_at_import(tree: ast.Module, in_functions: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements run when the module is imported (those in function bodies too with `in_functions`);
    `if TYPE_CHECKING:` blocks never run."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        elif in_functions or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return found


def imports(name: str, path: Path, known: dict[str, Path], in_functions: bool) -> set[str]:
    """The mtlrun modules that module `name` imports (`from a import b` imports a.b where b is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in _executed_at_import(ast.parse(path.read_text(encoding="utf-8")), in_functions):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            module = f"{base}.{alias.name}"
            if module in known or base not in known:
                targets.add(module if module in known else base)
            else:  # a name the package does not define is taken for a module: one missing here is reported
                targets.add(base if alias.name in _defined(known[base]) else module)
    return {t for t in targets if t == "mtlrun" or t.startswith("mtlrun.")}


def _defined(path: Path) -> set[str]:
    """The names a module binds at its top level."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def graph(in_functions: bool) -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known, in_functions) for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The circles a depth-first walk meets (each a list of modules, the first repeated at the end): none
    exactly when the graph has none."""
    found: list[list[str]] = []
    state: dict[str, str] = {}  # "open" while on the current path, then "done"
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state and target in edges:
                visit(target)
        path.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_the_walk_finds_a_circle_and_names_it():
    edges = {"mtlrun.a": {"mtlrun.b"}, "mtlrun.b": {"mtlrun.c"}, "mtlrun.c": {"mtlrun.a"}, "mtlrun.d": {"mtlrun.a"}}
    assert circles(edges) == [["mtlrun.a", "mtlrun.b", "mtlrun.c", "mtlrun.a"]]
    assert circles({"mtlrun.a": {"mtlrun.b"}, "mtlrun.b": set()}) == []


def test_imports_resolve_relative_and_from_package_forms(tmp_path):
    known = {"mtlrun.x": tmp_path / "x.py", "mtlrun.y": tmp_path / "y.py", "mtlrun.z": tmp_path / "z.py",
             "mtlrun.p": tmp_path / "p" / "__init__.py", "mtlrun.p.q": tmp_path / "p" / "q.py",
             "mtlrun": tmp_path / "__init__.py"}
    (tmp_path / "__init__.py").write_text("CONF_DIR = 1\n")
    source = tmp_path / "x.py"
    source.write_text("from typing import TYPE_CHECKING\nfrom . import y\nfrom .p import q\nimport mtlrun.z\n"
                      "from mtlrun import CONF_DIR\nif TYPE_CHECKING:\n    from mtlrun import w\ndef f():\n"
                      "    from mtlrun import gone\n")
    assert imports("mtlrun.x", source, known, in_functions=False) == {"mtlrun", "mtlrun.y", "mtlrun.p.q",
                                                                             "mtlrun.z"}
    assert "mtlrun.gone" in imports("mtlrun.x", source, known, in_functions=True)  # not there: reported


def test_no_module_imports_a_module_that_does_not_exist():
    """An editable install of another checkout answers for a module missing here: a stale import would run
    that checkout's code without failing. The tests' and the Hydra plugins' imports are checked too."""
    known = modules()
    edges = graph(in_functions=True)
    for path in sorted(PACKAGE.parent.glob("tests/**/*.py")) + sorted(PACKAGE.parent.glob("hydra_plugins/**/*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        edges[name] = imports(name, path, known, in_functions=True)
    missing = {(name, target) for name, targets in edges.items() for target in targets if target not in known}
    assert not missing, f"imports of modules that do not exist: {sorted(missing)}"


def test_no_import_circle_at_module_level():
    """What runs on import must not go round in a circle: a module would see another half-initialised.
    Imports inside functions run once both are loaded, so they are checked apart (next test)."""
    found = circles(graph(in_functions=False))
    assert not found, "import circle: " + "; ".join(" -> ".join(c) for c in found)


def test_no_import_circle_through_imports_in_functions():
    """Deferred imports (torch-heavy modules loaded only once needed) keep the one-way order too."""
    found = [c for c in circles(graph(in_functions=True)) ]
    assert not found, "import circle: " + "; ".join(" -> ".join(c) for c in found)
