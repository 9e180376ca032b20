"""The images carry the built-in model: its weights are package data of the wheel that
the Dockerfile's builder stages install (other models are mounted, never copied)."""

from __future__ import annotations

from pathlib import Path

from tests.deploy.test_deploy import _wheel_names, image_wheel  # noqa: F401 - image_wheel is a fixture

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "clusca_shapes" / "weights"


def test_image_wheel_carries_the_builtin_weights(image_wheel):  # noqa: F811 - the fixture
    expected = {p.relative_to(ROOT).as_posix() for p in WEIGHTS.rglob("*") if p.is_file()}
    assert any(n.endswith(".safetensors") for n in expected), f"no weights under {WEIGHTS}"
    names = _wheel_names(image_wheel)
    assert expected <= names, sorted(expected - names)


def test_image_wheel_carries_the_playground_page(image_wheel):  # noqa: F811 - the fixture
    static = ROOT / "service" / "api" / "static"
    expected = {p.relative_to(ROOT).as_posix() for p in static.iterdir() if p.is_file()}
    assert "service/api/static/index.html" in expected
    names = _wheel_names(image_wheel)
    assert expected <= names, sorted(expected - names)
