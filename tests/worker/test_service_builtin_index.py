"""The built-in model's registry entry is read from its checkpoint index, never hard-coded."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest

from service import registry
from clusca_shapes import INDEX_DEFAULTS, WEIGHTS_DIR, read_index
from service.registry import builtin_entry


def _shipped() -> dict:
    return json.loads((WEIGHTS_DIR / "model_index.json").read_text())


def test_the_shipped_index_records_every_default_the_registry_reads():
    index = _shipped()
    assert set(INDEX_DEFAULTS) <= set(index), set(INDEX_DEFAULTS) - set(index)
    d = builtin_entry().defaults
    assert (d.width, d.height, d.steps, d.guidance, d.cache) == (
        index["default_width"], index["default_height"], index["default_steps"], index["default_guidance"],
        index["default_cache"])
    assert d.cache_presets == index["cache_presets"]
    # Where those presets came from, as the checkpoint records it (GET /models shows it).
    assert d.cache_presets_source == index["cache_presets_source"]
    assert d.cache_presets_source["measured"] and d.cache_presets_source["tool"]


def test_another_checkpoint_brings_its_own_defaults_and_presets(tmp_path):
    shipped = _shipped()
    index = {**shipped, "default_width": 64, "default_height": 48, "default_steps": 12, "default_guidance": 2.5,
             "default_cache": "fast", "cache_presets": {"fast": {"interval": 6}},
             "limits": {**shipped["limits"], "sizes": ["64x48", "32x32"]}}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    entry = builtin_entry(tmp_path)
    d = entry.defaults
    assert (d.width, d.height, d.steps, d.guidance, d.cache) == (64, 48, 12, 2.5, "fast")
    assert entry.limits.sizes == ["64x48", "32x32"]
    # A checkpoint trained at one size and defaulting to another is refused by name.
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "limits": shipped["limits"]}))
    with pytest.raises(ValueError, match="64x48 is not a size this model draws well"):
        builtin_entry(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert d.cache_presets == {"fast": {"interval": 6}}
    # An index that leaves keys out means the package's defaults, not the registry's.
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "ShapesFluxPipeline"}))
    d = builtin_entry(tmp_path).defaults
    assert (d.width, d.steps, d.cache, d.cache_presets) == (INDEX_DEFAULTS["default_width"],
                                                          INDEX_DEFAULTS["default_steps"],
                                                          INDEX_DEFAULTS["default_cache"], {})
    # One that does not say where its presets came from still names the checkpoint, with no path.
    assert d.cache_presets_source and str(tmp_path) not in json.dumps(d.cache_presets_source)
    assert {k: v for k, v in read_index(tmp_path).items() if k != "_class_name"} == read_index(tmp_path / "missing")


def test_the_registry_spells_no_number_or_preset_of_the_builtin_model():
    module = ast.parse(Path(registry.__file__).read_text())
    functions = {n.name: n for n in module.body if isinstance(n, ast.FunctionDef)}
    for name in ("builtin_entry", "builtin_limits"):
        tree = functions[name]
        consts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                  and not isinstance(n.value, str) and n.value is not None]
        presets = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                   and n.value in ("off", "quality", "balanced", "fast")]
        assert not consts and not presets, (name, consts, presets)


def test_the_pipeline_saves_and_reads_the_same_index(tmp_path):
    pytest.importorskip("torch")
    from clusca_shapes import ShapesFluxPipeline

    pipe = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    assert pipe.default_size == (_shipped()["default_height"], _shipped()["default_width"])
    pipe.default_size, pipe.default_cache = (16, 24), "quality"
    pipe.save_pretrained(tmp_path)
    d = builtin_entry(tmp_path).defaults
    assert (d.height, d.width, d.cache, d.cache_presets) == (16, 24, "quality", pipe.cache_presets)
    again = ShapesFluxPipeline.from_pretrained(tmp_path)
    assert again(prompt="a red circle", num_inference_steps=1).images[0].size == (24, 16)


def test_the_runtime_does_not_import_the_offline_tools():
    """Pipeline, model, text encoder and word splitting load a checkpoint without the data
    generator, checker or trainer."""
    pkg = Path(inspect.getfile(read_index)).parent
    tools = {"data", "checker", "train"}
    for name in ("__init__", "pipeline", "model", "text", "words"):
        tree = ast.parse((pkg / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported = {(node.module or "").split(".")[-1]} | {a.name for a in node.names}
                assert not imported & tools, f"{name}.py imports {imported & tools}"
