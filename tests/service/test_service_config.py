"""Settings from the environment and the model registry (no processes needed)."""

from __future__ import annotations

import json

import pytest

from clusca_shapes import WEIGHTS_DIR
from service.registry import BUILTIN_MODEL, Registry, RegistryError
from service.settings import ENV_NAMES, Settings, SettingsError
from tests.support import registry_error


def test_defaults_match_the_documented_contract():
    s = Settings.from_env({})
    assert (s.redis_url, s.host, s.port, s.default_model, s.device) == (None, "127.0.0.1", 8000, "shapes", "auto")
    assert (s.max_queue, s.sync_timeout_s, s.result_ttl_s, s.max_batch, s.batch_wait_ms) == (1000, 120, 86400, 4, 10)
    assert (s.visibility_timeout_s, s.max_attempts, s.worker_metrics_port) == (30, 3, 9101)
    assert s.api_keys == () and s.webhook_allow_private is False
    # One torch thread per worker unless set (0: torch's own default, a thread per core).
    assert s.torch_threads == 1 and Settings.from_env({"CLUSCA_TORCH_THREADS": "0"}).torch_threads == 0


def test_every_setting_comes_from_its_variable():
    s = Settings.from_env({"REDIS_URL": "redis://r:6379/1", "CLUSCA_PORT": "9000", "CLUSCA_API_KEYS": "a, b,,",
                           "CLUSCA_WEBHOOK_ALLOW_PRIVATE": "1", "CLUSCA_MAX_BATCH": "8", "CLUSCA_DEVICE": "cuda:1"})
    assert s.redis_url == "redis://r:6379/1" and s.port == 9000 and s.api_keys == ("a", "b")
    assert s.webhook_allow_private and s.max_batch == 8 and s.device == "cuda:1"
    assert set(ENV_NAMES) == set(Settings.model_fields)


@pytest.mark.parametrize("var,value", [("CLUSCA_PORT", "http"), ("CLUSCA_MAX_BATCH", "0"), ("CLUSCA_DEVICE", "tpu"),
                                       ("CLUSCA_WEBHOOK_ALLOW_PRIVATE", "maybe"), ("CLUSCA_SYNC_TIMEOUT_S", "-1")])
def test_bad_values_name_their_variable(var, value):
    with pytest.raises(SettingsError, match=var):
        Settings.from_env({var: value})


def test_default_registry_is_the_builtin_model():
    reg = Registry.load(None)
    assert reg.names == [BUILTIN_MODEL]
    e = reg.get(BUILTIN_MODEL)
    assert e.kind == "builtin" and e.defaults.width == 32
    # Steps and guidance are the ones the shipped checkpoint records.
    index = json.loads((WEIGHTS_DIR / "model_index.json").read_text())
    assert (e.defaults.steps, e.defaults.guidance) == (index["default_steps"], index["default_guidance"])


def test_a_builtin_entry_in_a_models_file_says_where_its_presets_came_from(tmp_path):
    shipped = json.loads((WEIGHTS_DIR / "model_index.json").read_text())["cache_presets_source"]
    for defaults in ("", "    defaults: {width: 32, height: 32, steps: 20}\n"):
        path = tmp_path / "models.yaml"
        path.write_text("models:\n  - name: shapes\n    kind: builtin\n" + defaults)
        d = Registry.load(path).get("shapes").defaults
        assert d.cache_presets and d.cache_presets_source == shipped, defaults
    # An operator's own presets carry no claim about where the checkpoint's came from.
    path.write_text("models:\n  - name: shapes\n    kind: builtin\n    defaults: {width: 32, height: 32, cache_presets: {}}\n")
    assert Registry.load(path).get("shapes").defaults.cache_presets_source is None


def test_registry_file_yaml_and_json(tmp_path):
    y = tmp_path / "m.yaml"
    y.write_text("models:\n  - name: flux\n    kind: diffusers\n    path: /models/flux\n    dtype: bfloat16\n"
                 "    defaults: {width: 1024, height: 1024, steps: 28, guidance: 3.5, cache: off}\n"
                 "  - name: shapes\n    kind: builtin\n")
    reg = Registry.load(y)
    assert reg.names == ["flux", "shapes"]
    assert reg.get("flux").defaults.cache == "off"  # YAML's bare `off` is read as the preset name
    assert reg.get("shapes").defaults.width == 32
    assert "path" not in reg.get("flux").public()
    j = tmp_path / "m.json"
    j.write_text('[{"name": "n", "kind": "noop"}]')
    assert Registry.load(j).names == ["n"]


@pytest.mark.parametrize("text,fragment", [
    ("models:\n  - name: ../../etc\n    kind: noop\n", "models[0].name"),
    ("models:\n  - name: a\n    kind: diffusers\n", "needs a path"),
    ("models:\n  - name: a\n    kind: noop\n  - name: a\n    kind: noop\n", "listed twice"),
    ("models: 3\n", "list under 'models'"),
    ("models: [\n", "not valid YAML"),
    ("models:\n  - name: a\n    kind: onnx\n", "models[0].kind"),
])
def test_bad_registry_files(tmp_path, text, fragment):
    assert fragment in registry_error(tmp_path, text)


def test_missing_registry_file(tmp_path):
    with pytest.raises(RegistryError, match="cannot read"):
        Registry.load(tmp_path / "nope.yaml")


def test_openapi_states_the_configured_limits_and_auth():
    from service.api import create_app

    s = Settings.from_env({"REDIS_URL": "redis://127.0.0.1:1/0", "CLUSCA_MAX_STEPS": "50",
                           "CLUSCA_MAX_IMAGES": "3", "CLUSCA_MAX_PROMPT_CHARS": "100"})
    schema = create_app(s).openapi()
    props = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert props["steps"]["anyOf"][0]["maximum"] == 50
    assert props["num_images"]["maximum"] == 3 and props["prompt"]["maxLength"] == 100
    assert "securitySchemes" not in schema["components"]
    locked = create_app(s.model_copy(update={"api_keys": ("k",)})).openapi()
    assert "HTTPBearer" in locked["components"]["securitySchemes"]
    assert "401" in locked["paths"]["/generate"]["post"]["responses"]
