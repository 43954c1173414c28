"""mtlrun/report/: imports run one way (the table never imports its figures), modules stay short."""

import ast
from pathlib import Path

import mtlrun.report

PACKAGE = Path(mtlrun.report.__file__).parent


def imports(path: Path) -> set[str]:
    """The mtlrun.report modules a module imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n.removeprefix("mtlrun.report.") for n in names if n.startswith("mtlrun.report.")}
    return found & {p.stem for p in PACKAGE.glob("*.py")}


def test_no_import_circle_in_the_report_package():
    graph = {p.stem: imports(p) for p in PACKAGE.glob("*.py")}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph[start])

    assert [m for m in graph if reaches(m, m, set())] == []
    assert "plots" not in graph["table"] | graph["runs"] | graph["stats"]  # the table never draws


def test_report_modules_stay_short():
    assert {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > 300} == {}
