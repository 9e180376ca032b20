"""ClusCaConfig: presets, schedule, validation, and the no-torch import contract."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clusca.config import PRESETS, ClusCaConfig


def test_presets_match_the_documented_settings():
    assert set(PRESETS) >= {"off", "quality", "balanced", "fast"}
    assert PRESETS["off"].mode == "off"
    assert PRESETS["quality"].interval == 4
    b = PRESETS["balanced"]
    assert (b.interval, b.warmup, b.order, b.clusters, b.gamma) == (5, 3, 1, 16, 0.005)
    f = PRESETS["fast"]
    assert (f.interval, f.gamma) == (6, 0.007)


def test_preset_returns_an_independent_copy():
    a = ClusCaConfig.preset("fast")
    a.interval = 2
    assert PRESETS["fast"].interval == 6
    assert ClusCaConfig.preset("fast", clusters=8).clusters == 8


def test_schedule_fast_50_steps_gives_ten_full_steps():
    cfg = ClusCaConfig.preset("fast")
    assert cfg.full_steps(50) == [0, 1, 2, 8, 14, 20, 26, 32, 38, 44]


def test_interval_one_and_off_make_every_step_full():
    assert ClusCaConfig(interval=1).full_steps(20) == list(range(20))
    assert ClusCaConfig(mode="off", interval=7).full_steps(20) == list(range(20))


def test_round_trip_through_json():
    cfg = ClusCaConfig.preset("balanced", seed=7, modules={"attention": [r"blocks\.\d+\.attn$"]})
    again = ClusCaConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_from_dict_with_preset_and_override():
    cfg = ClusCaConfig.from_dict({"preset": "fast", "clusters": 32})
    assert (cfg.interval, cfg.gamma, cfg.clusters) == (6, 0.007, 32)


@pytest.mark.parametrize(
    "data, field",
    [
        ({"mode": "turbo"}, "mode"),
        ({"interval": 0}, "interval"),
        ({"interval": "5"}, "interval"),
        ({"warmup": 0}, "warmup"),
        ({"order": 9}, "order"),
        ({"clusters": 0}, "clusters"),
        ({"fresh_tokens": -1}, "fresh_tokens"),
        ({"gamma": 1.5}, "gamma"),
        ({"gamma": "x"}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"kmeans_iters": 0}, "kmeans_iters"),
        ({"kmeans_distance": "cosine"}, "kmeans_distance"),
        ({"propagation": "magic"}, "propagation"),
        ({"propagate_text": "yes"}, "propagate_text"),
        ({"seed": -3}, "seed"),
        ({"modules": {"mlp": ["x"]}}, "modules"),
        ({"modules": {"attention": ["("]}}, "modules"),
        ({"clustres": 3}, "clustres"),
        ({"preset": "ultra"}, "preset"),
    ],
)
def test_validation_names_the_bad_field(data, field):
    with pytest.raises(ValueError) as err:
        ClusCaConfig.from_dict(data)
    assert str(err.value).startswith(f"{field}:"), str(err.value)


def test_validate_on_a_constructed_config():
    with pytest.raises(ValueError, match="^clusters:"):
        ClusCaConfig(clusters=0).validate()
    assert ClusCaConfig().validate() == ClusCaConfig()


def test_fora_and_taylorseer_derived_settings():
    assert ClusCaConfig(mode="fora", order=2).effective_order == 0
    assert not ClusCaConfig(mode="taylorseer").uses_clusters
    assert ClusCaConfig(mode="clusca").uses_clusters


def test_config_import_does_not_load_torch():
    code = (
        "import sys\n"
        "from clusca.config import ClusCaConfig\n"
        "from clusca import ClusCaConfig as C2, PRESETS\n"
        "C2.from_dict({'preset': 'fast'})\n"
        "bad = [m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_torch_names_load_on_first_use():
    import clusca

    assert callable(clusca.apply_clusca) and callable(clusca.clusca_run)
    assert clusca.RunStats.__name__ == "RunStats"
    assert "flux" in clusca.ARCHITECTURES
    with pytest.raises(AttributeError):
        clusca.not_a_name  # noqa: B018
