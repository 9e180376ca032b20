"""The service's layout: its rooms show the process boundary, and the arrows between them
only point one way. These are the rules docs/architecture.md draws, written as tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service"
FILES = sorted(SERVICE.rglob("*.py"))

# room -> rooms it must never import (a room is a subpackage or a shared top-level module)
FORBIDDEN = {
    "api": {"worker", "cli"},
    "broker": {"api", "worker", "cli", "outputs"},
    "worker": {"api", "cli"},
    "outputs": {"api", "worker", "broker", "cli"},
    "adapters": {"api", "worker", "broker", "cli", "outputs"},
    "contract": {"api", "worker", "broker", "cli", "outputs", "registry", "settings"},
    "registry": {"api", "worker", "broker", "cli", "outputs"},
    "settings": {"api", "worker", "broker", "cli"},
    "metrics": {"api", "worker", "broker", "cli", "outputs"},
    "webhooks": {"api", "worker", "broker", "cli", "outputs"},
}


def _room(path: Path) -> str:
    rel = path.relative_to(SERVICE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_rooms(path: Path, package: list[str] | None = None) -> set[str]:
    """Every service room a module imports, at its top or inside a function."""
    package = package or list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # `from service import metrics` names a room in its imported names
            names = [f"{base}.{a.name}" for a in node.names] if base == "service" else [base]
        for name in names:
            parts = name.split(".")
            if parts[0] == "service" and len(parts) > 1:
                rooms.add(parts[1])
    return rooms


def test_every_module_lives_in_a_known_room():
    rooms = {_room(p) for p in FILES} - {"__init__"}
    assert rooms == set(FORBIDDEN) | {"cli"}, rooms


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_imports_only_point_down(room):
    wrong = [f"{p.relative_to(ROOT)} imports service.{r}" for p in FILES if _room(p) == room
             for r in sorted(_imported_rooms(p) & FORBIDDEN[room])]
    assert not wrong, wrong


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    # The rule above must not pass because it reads too little.
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..worker import loop\n    from service import cli\n")
    assert _imported_rooms(probe, package=["service", "api"]) == {"worker", "cli"}


def test_no_module_over_600_lines_and_no_class_over_300():
    too_long = [f"{p.relative_to(ROOT)}: {n} lines" for p in FILES if (n := len(p.read_text().splitlines())) > 600]
    big = [f"{p.relative_to(ROOT)}:{node.name}: {node.end_lineno - node.lineno + 1} lines" for p in FILES
           for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.ClassDef)
           and node.end_lineno - node.lineno + 1 > 300]
    assert not too_long and not big, too_long + big


def test_no_service_module_reaches_into_the_built_in_models_tools():
    # clusca_shapes.evaluation is the door; tools/ is the model's offline kit.
    users = []
    for p in FILES:
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            users += [f"{p.relative_to(ROOT)}: {n}" for n in names if n.startswith("clusca_shapes.tools")]
    assert not users, users
