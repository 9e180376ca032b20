"""LoRA adapters per sample: loading, in-place slots, and mixed batches that equal their solo runs,
with and without the ClusCa cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from clusca import ClusCaConfig, apply_clusca, clusca_run, remove_clusca
from clusca.lora import LoraBank, LoraError, LoraWeights, load_lora
from clusca.testing import euler_sample, tiny_flux

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The attention projections and the feed-forward layers of every block: what style adapters train.
TARGETS = [r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|proj_mlp|proj_out)",
           r".*\.ff\.net\.(0\.proj|2)"]


def _random_adapter(model, name: str, rank: int, seed: int, targets=("to_q", "to_v", "proj_mlp"), scale=0.5):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for module, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and module.rsplit(".", 1)[-1] in targets:
            a = torch.randn(rank, mod.in_features, generator=g) * scale / mod.in_features ** 0.5
            b = torch.randn(mod.out_features, rank, generator=g) * scale / rank ** 0.5
            layers[module] = (a, b)
    return LoraWeights(name, rank, layers, alpha=float(rank))


def _save_peft(weights: LoraWeights, folder):
    folder.mkdir()
    tensors = {}
    for module, (a, b) in weights.layers.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": weights.rank, "lora_alpha": weights.alpha,
                                                            "target_modules": ["to_q", "to_v", "proj_mlp"]}))
    return folder


@pytest.fixture
def flux():
    case = tiny_flux(side=8)
    yield case


def test_peft_folder_and_single_file_load_the_same_adapter(flux, tmp_path):
    w = _random_adapter(flux.model, "outline", 4, seed=1)
    folder = load_lora(_save_peft(w, tmp_path / "outline"))
    assert folder.rank == 4 and folder.scaling == 1.0 and folder.target_modules == ["proj_mlp", "to_q", "to_v"]
    assert set(folder.layers) == set(w.layers)
    single = tmp_path / "pastel.safetensors"
    save_file({f"transformer.{m}.lora_{p}.weight": t.contiguous() for m, (a, b) in w.layers.items()
               for p, t in (("A", a), ("B", b))}, str(single))
    one = load_lora(single)
    assert one.name == "pastel" and one.alpha is None
    for m, (a, b) in w.layers.items():
        assert torch.equal(folder.layers[m][0], a) and torch.equal(one.layers[m][1], b)


def test_an_adapter_in_a_slot_equals_its_weights_merged(flux):
    model = flux.model
    w = _random_adapter(model, "a", 4, seed=2)
    x = flux.latents(2, seed=3)
    kwargs = flux.make_kwargs(x, 0.7, [1, 2])
    bank = LoraBank(model, TARGETS, slots=2, max_rank=8)
    bank.load(1, w)
    bank.select([[(1, 0.8)], [(1, 0.8)]])
    with torch.no_grad():
        with_bank = model(**kwargs)[0]
    bank.remove()
    merged = {m: mod.weight.detach().clone() for m, mod in model.named_modules() if m in w.layers}
    with torch.no_grad():
        for m, mod in model.named_modules():
            if m in w.layers:
                a, b = w.layers[m]
                mod.weight += 0.8 * w.scaling * b @ a
        out = model(**kwargs)[0]
        for m, mod in model.named_modules():
            if m in merged:
                mod.weight.copy_(merged[m])
    torch.testing.assert_close(with_bank, out, atol=2e-5, rtol=1e-4)


def test_loading_swaps_weights_in_place():
    case = tiny_flux(side=6)
    bank = LoraBank(case.model, TARGETS, slots=1, max_rank=8)
    layer = next(iter(bank.layers.values()))
    ptrs = (layer.down.data_ptr(), layer.up.data_ptr())
    bank.load(1, _random_adapter(case.model, "a", 4, seed=1))
    bank.load(1, _random_adapter(case.model, "b", 8, seed=2))
    assert (layer.down.data_ptr(), layer.up.data_ptr()) == ptrs and bank.loaded == {1: "b"}
    bank.clear(1)
    assert bank.loaded == {} and not layer.down.any()


@pytest.mark.parametrize("cache", ["off", "balanced", "fast"])
def test_every_image_of_a_mixed_batch_equals_its_solo_run(cache):
    case = tiny_flux(side=8)
    model = case.model
    bank = LoraBank(model, TARGETS, slots=2, max_rank=8)
    bank.load(1, _random_adapter(model, "outline", 4, seed=5))
    bank.load(2, _random_adapter(model, "pastel", 8, seed=6))
    apply_clusca(model)
    seeds = [11, 4, 29]
    sets = [[(1, 1.0)], [], [(2, 0.6), (1, 0.3)]]
    x = torch.cat([case.latents(1, seed=s) for s in seeds])
    cfg = ClusCaConfig.preset(cache)

    def sample(xs, ss, chosen):
        bank.select(chosen)
        with clusca_run(model, cfg, num_inference_steps=10):
            return euler_sample(case, xs, 10, ss)

    # Batching noise of the base model alone, to read the adapters' against.
    bank.select([[], [], []])
    base_noise = (euler_sample(case, x, 10, seeds)[1] - euler_sample(case, x[1:2], 10, [4])[0]).abs().max().item()
    mixed = sample(x, seeds, sets)
    for k, s in enumerate(seeds):
        alone = sample(x[k:k + 1], [s], [sets[k]])[0]
        diff = (mixed[k] - alone).abs().max().item()
        assert diff <= max(1e-5, 20 * base_noise), (cache, k, diff, base_noise)
    # The adapters did something, each its own.
    plain = sample(x, seeds, [[], [], []])
    assert (mixed[0] - plain[0]).abs().max() > 1e-3 and (mixed[2] - plain[2]).abs().max() > 1e-3
    assert torch.equal(mixed[1], plain[1]) or (mixed[1] - plain[1]).abs().max().item() <= max(1e-5, 20 * base_noise)
    remove_clusca(model)
    bank.remove()


def test_adapters_that_do_not_fit_are_refused_by_name(flux, tmp_path):
    bank = LoraBank(flux.model, TARGETS, slots=1, max_rank=4)
    with pytest.raises(LoraError, match="rank 8 is over"):
        bank.load(1, _random_adapter(flux.model, "big", 8, seed=1))
    bad_module = LoraWeights("m", 2, {"no.such.layer": (torch.zeros(2, 4), torch.zeros(4, 2))})
    with pytest.raises(LoraError, match="'no.such.layer' is not one"):
        bank.load(1, bad_module)
    name, mod = next((n, m) for n, m in flux.model.named_modules() if n.endswith("to_q"))
    with pytest.raises(LoraError, match="do not fit"):
        bank.load(1, LoraWeights("s", 2, {name: (torch.zeros(2, mod.in_features + 1), torch.zeros(mod.out_features, 2))}))
    with pytest.raises(ValueError, match="holds no adapter"):
        bank.select([[(1, 1.0)]])
    with pytest.raises(ValueError, match="at most 2 adapters"):
        bank.select([[(1, 1.0)] * 3])


def test_bad_files_are_refused_with_a_reason(tmp_path, flux):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(LoraError, match="not a readable safetensors"):
        load_lora(junk)
    good = _save_peft(_random_adapter(flux.model, "a", 2, seed=1), tmp_path / "a")
    data = (good / "adapter_model.safetensors").read_bytes()
    (good / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraError, match="not a readable safetensors"):
        load_lora(good)
    big = tmp_path / "big.safetensors"
    save_file({"x.lora_A.weight": torch.zeros(2, 64), "x.lora_B.weight": torch.zeros(64, 2)}, str(big))
    with pytest.raises(LoraError, match="over the limit of 100"):
        load_lora(big, max_bytes=100)
    half = tmp_path / "half.safetensors"
    save_file({"x.lora_A.weight": torch.zeros(2, 4)}, str(half))
    with pytest.raises(LoraError, match="only lora_A"):
        load_lora(half)
    nan = tmp_path / "nan.safetensors"
    save_file({"x.lora_A.weight": torch.full((2, 4), float("nan")), "x.lora_B.weight": torch.zeros(4, 2)}, str(nan))
    with pytest.raises(LoraError, match="NaN"):
        load_lora(nan)
    empty = tmp_path / "empty.safetensors"
    save_file({"weight": torch.zeros(2)}, str(empty))
    with pytest.raises(LoraError, match="no LoRA layers"):
        load_lora(empty)
