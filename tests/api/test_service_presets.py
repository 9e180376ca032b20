"""Per-model preset tuning: a model may declare its own version of the named ClusCa presets."""

from __future__ import annotations

import json

import pytest

from clusca import ClusCaConfig
from service.api.errors import ApiError
from service.api.resolve import resolve_cache
from service.api.schemas import CacheSettings
from clusca_shapes import WEIGHTS_DIR
from service.registry import BUILTIN_MODEL, Registry, RegistryError, builtin_entry
from tests.support import registry_error

FLUX_YAML = ("models:\n  - name: flux\n    kind: diffusers\n    path: /models/flux\n"
             "    defaults: {width: 1024, height: 1024, steps: 28, guidance: 3.5, cache: balanced}\n")


def _index() -> dict:
    return json.loads((WEIGHTS_DIR / "model_index.json").read_text())


def _resolved(entry, **cache) -> dict:
    return resolve_cache(entry, CacheSettings(**cache) if cache else None).to_dict()


def test_builtin_checkpoint_declares_tuned_presets():
    tuned = _index()["cache_presets"]
    assert set(tuned) == {"quality", "balanced", "fast"}
    assert builtin_entry().defaults.cache_presets == tuned


def test_builtin_balanced_resolves_to_the_models_tuning():
    entry = Registry.load(None).get(BUILTIN_MODEL)
    tuned = _index()["cache_presets"]["balanced"]
    expected = ClusCaConfig.preset("balanced", **tuned).to_dict()
    # By name, and as the model's default when the request names no preset.
    assert _resolved(entry, preset="balanced") == expected
    assert _resolved(entry) == expected
    assert expected != ClusCaConfig.preset("balanced").to_dict()
    # Presets the model does not tune, and "off", stay the library's.
    assert _resolved(entry, preset="off") == ClusCaConfig.preset("off").to_dict()


def test_request_knobs_still_override_the_tuned_preset():
    entry = Registry.load(None).get(BUILTIN_MODEL)
    out = _resolved(entry, preset="balanced", clusters=7, mode="clusca")
    tuned = _index()["cache_presets"]["balanced"]
    assert out["clusters"] == 7
    assert out == ClusCaConfig.preset("balanced", **{**tuned, "clusters": 7}).to_dict()


def test_flux_entry_gets_the_papers_presets(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text(FLUX_YAML)
    flux = Registry.load(p).get("flux")
    assert flux.defaults.cache_presets == {}
    for name in ("quality", "balanced", "fast"):
        assert _resolved(flux, preset=name) == ClusCaConfig.preset(name).to_dict()
    assert flux.public()["defaults"]["cache_presets"] == {}


def test_operator_can_tune_a_diffusers_entry(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text(FLUX_YAML.replace("cache: balanced}", "cache: fast,\n"
                                   "               cache_presets: {fast: {interval: 7, gamma: 0.01}}}"))
    flux = Registry.load(p).get("flux")
    out = _resolved(flux)
    assert (out["interval"], out["gamma"], out["clusters"]) == (7, 0.01, 16)
    assert flux.public()["defaults"]["cache_presets"] == {"fast": {"interval": 7, "gamma": 0.01}}


def test_builtin_entry_with_operator_defaults_keeps_the_checkpoint_tuning(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("models:\n  - name: shapes\n    kind: builtin\n"
                 "    defaults: {width: 32, height: 32, steps: 20, guidance: 5, cache: balanced, size_multiple: 4}\n"
                 "  - name: plain\n    kind: builtin\n"
                 "    defaults: {width: 32, height: 32, cache: balanced, size_multiple: 4, cache_presets: {}}\n")
    reg = Registry.load(p)
    assert reg.get("shapes").defaults.cache_presets == _index()["cache_presets"]
    assert reg.get("shapes").defaults.steps == 20
    # An explicit empty mapping switches the tuning off.
    assert _resolved(reg.get("plain")) == ClusCaConfig.preset("balanced").to_dict()


def test_builtin_entry_reads_the_index_of_its_own_checkpoint(tmp_path):
    # A retrained checkpoint served under another name brings its own steps and tuning.
    ckpt = tmp_path / "retrained"
    ckpt.mkdir()
    index = {**_index(), "default_steps": 24, "default_guidance": 3.0,
             "cache_presets": {"balanced": {"interval": 6, "order": 0, "clusters": 2, "gamma": 0.0}}}
    (ckpt / "model_index.json").write_text(json.dumps(index))
    p = tmp_path / "m.yaml"
    p.write_text(f"models:\n  - name: mine\n    kind: builtin\n    path: {ckpt}\n"
                 f"  - name: tuned-only\n    kind: builtin\n    path: {ckpt}\n"
                 "    defaults: {width: 32, height: 32, cache: balanced, size_multiple: 4}\n")
    reg = Registry.load(p)
    mine = reg.get("mine")
    assert (mine.defaults.steps, mine.defaults.guidance) == (24, 3.0)
    assert mine.path == str(ckpt)
    for name in ("mine", "tuned-only"):
        assert reg.get(name).defaults.cache_presets == index["cache_presets"]
        assert _resolved(reg.get(name))["interval"] == 6


@pytest.mark.parametrize("presets,fragment", [
    ("{ludicrous: {interval: 4}}", "not a tunable preset"),
    ("{'off': {interval: 4}}", "not a tunable preset"),
    ("{balanced: {intervall: 4}}", "intervall: unknown setting"),
    ("{balanced: {interval: 0}}", "interval: must be between 1 and 1000"),
    ("{balanced: {preset: fast}}", "balanced.preset: cannot be set"),
    ("{balanced: {modules: {attention: []}}}", "balanced.modules: cannot be set"),
    ("{balanced: 3}", "cache_presets.balanced"),
])
def test_bad_preset_overrides_name_the_problem(tmp_path, presets, fragment):
    overridden = FLUX_YAML.replace("cache: balanced}", f"cache: balanced, cache_presets: {presets}}}")
    message = registry_error(tmp_path, overridden)
    assert "models[0].defaults" in message and fragment in message


def test_unknown_default_preset_is_a_registry_error(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text(FLUX_YAML.replace("cache: balanced", "cache: turbo"))
    with pytest.raises(RegistryError, match="unknown cache preset 'turbo'"):
        Registry.load(p)


def test_bad_request_knob_on_a_tuned_preset_is_a_422():
    entry = Registry.load(None).get(BUILTIN_MODEL)
    with pytest.raises(ApiError) as exc:
        resolve_cache(entry, CacheSettings(preset="balanced", kmeans_distance="l1", propagate_text=True))
    assert exc.value.status == 422 and exc.value.param == "cache.propagate_text"


def test_checkpoint_keeps_its_preset_tuning_through_load_and_save(tmp_path):
    from clusca_shapes import ShapesFluxPipeline

    pipe = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    assert pipe.cache_presets == _index()["cache_presets"]
    pipe.save_pretrained(tmp_path / "copy")
    saved = json.loads((tmp_path / "copy" / "model_index.json").read_text())
    assert saved["cache_presets"] == _index()["cache_presets"]
