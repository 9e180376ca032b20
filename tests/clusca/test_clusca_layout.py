"""The library's layout: small modules with one job each, diffusers' hook internals in one
file, the Taylor math in one file."""

from __future__ import annotations

import ast
from pathlib import Path

CLUSCA = Path(__file__).resolve().parents[2] / "clusca"
FILES = sorted(CLUSCA.rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_no_module_over_600_lines_and_no_class_over_300():
    too_long = [f"{p.relative_to(CLUSCA)}: {n} lines" for p in FILES
                if (n := len(p.read_text().splitlines())) > 600]
    big = []
    for p in FILES:
        for node in ast.walk(_tree(p)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                big.append(f"{p.relative_to(CLUSCA)}:{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long and not big, too_long + big


def test_diffusers_hook_internals_are_read_in_one_file():
    users = []
    for p in FILES:
        for node in ast.walk(_tree(p)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers.hooks"):
                users.append(p.name)
            if isinstance(node, ast.Import) and any(a.name.startswith("diffusers.hooks") for a in node.names):
                users.append(p.name)
    assert set(users) == {"diffusers_compat.py"}, users


def test_the_taylor_coefficients_are_written_once():
    # d^k / k! appears as code in taylor.py only; everyone else asks it.
    users = sorted({p.name for p in FILES if "factorial" in p.read_text()})
    assert users == ["taylor.py"], users


def test_the_tuners_modules_import_no_cycle():
    # plot and tuner both read the result; neither reads the other, even for type hints.
    tune = CLUSCA / "tune"
    graph = {}
    for p in tune.glob("*.py"):
        graph[p.stem] = {n.module for n in ast.walk(_tree(p)) if isinstance(n, ast.ImportFrom) and n.level == 1
                         and n.module and (tune / f"{n.module}.py").exists()}

    def reaches(a: str, b: str, seen: set[str]) -> bool:
        return any(m == b or (m not in seen and reaches(m, b, seen | {m})) for m in graph.get(a, ()))

    cycles = sorted(m for m in graph if reaches(m, m, {m}))
    assert not cycles, cycles
