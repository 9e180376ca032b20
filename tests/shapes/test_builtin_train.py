"""The training script: a tiny run writes a loadable checkpoint, repeatably from the seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clusca_shapes import ShapesFluxPipeline
from clusca_shapes.tools import train

TINY = ["--steps", "3", "--batch", "4", "--threads", "1", "--heads", "2", "--layers", "1",
        "--single-layers", "1", "--log-every", "1", "--warmup", "1"]


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_tiny_run_is_repeatable_and_loadable(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert train.main(["--out", str(a), "--seed", "3", *TINY]) == 0
    assert train.main(["--out", str(b), "--seed", "3", *TINY]) == 0
    assert train.main(["--out", str(c), "--seed", "4", *TINY]) == 0
    log = capsys.readouterr().out
    assert "step 3 loss" in log and "done: 3 steps" in log

    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)

    pipe = ShapesFluxPipeline.from_pretrained(a)
    img = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
    assert len(pipe.transformer.transformer_blocks) == 1 and len(pipe.transformer.single_transformer_blocks) == 1


def test_t_mean_moves_the_timesteps_towards_noise():
    torch.manual_seed(0)
    mid, noisy = train.sample_timesteps(20000, 0.0), train.sample_timesteps(20000, 0.8)
    assert 0.0 < mid.min() and noisy.max() < 1.0
    assert abs(mid.median().item() - 0.5) < 0.01
    assert abs(noisy.median().item() - torch.sigmoid(torch.tensor(0.8)).item()) < 0.01
    assert (noisy > 0.8).float().mean() > 2 * (mid > 0.8).float().mean()
    assert train.parse_args(["--out", "unused", "--steps", "1"]).t_mean == 0.0


def test_budget_is_required(tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path), "--minutes", "0"])


def _expected_and_pooled(seed: int, n: int):
    """The first ``n`` batches drawn in this process, and a stream of the same run on 2 workers."""
    args = train.parse_args(["--out", "unused", "--steps", "1", "--batch", "3", "--seed", str(seed)])
    local = train.BatchStream(args)
    expected = [next(local) for _ in range(n)]
    args.data_workers = 2
    return expected, train.BatchStream(args)


def _assert_same_batches(expected, got) -> None:
    assert len(expected) == len(got)
    for (img_e, cap_e), (img_g, cap_g) in zip(expected, got):
        np.testing.assert_array_equal(img_e, img_g)
        assert cap_e == cap_g


def test_worker_processes_draw_the_same_batches_as_the_trainer():
    expected, pooled = _expected_and_pooled(5, 3)
    try:
        got = [next(pooled) for _ in range(3)]
    finally:
        pooled.close()
    _assert_same_batches(expected, got)
    assert not np.array_equal(expected[0][0], expected[1][0])


def test_a_dead_data_worker_costs_nothing_but_time():
    expected, pooled = _expected_and_pooled(6, 12)
    try:
        got = [next(pooled)]
        for proc in list(pooled._pool._processes.values()):
            proc.kill()
        # Six batches may be done already; the stream draws the others itself.
        got += [next(pooled) for _ in range(11)]
        assert pooled._pool is None
    finally:
        pooled.close()
    _assert_same_batches(expected, got)


def test_init_continues_from_a_checkpoint(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert train.main(["--out", str(first), "--seed", "3", *TINY]) == 0
    # A different seed would give different initial weights; with --init and a zero
    # learning rate the checkpoint must come back unchanged.
    assert train.main(["--out", str(second), "--seed", "9", "--init", str(first), *TINY, "--lr", "0"]) == 0
    w1, w2 = _weights(first), _weights(second)
    assert all(torch.allclose(w1[k], w2[k]) for k in w1)


def test_the_data_stream_draws_every_prompt_form():
    from clusca_shapes.tools import data

    args = train.parse_args(["--out", "unused", "--steps", "1"])
    mix = (args.pair_fraction, args.count_fraction, args.unplaced_fraction)
    forms = set()
    for index in range(4):
        _, captions = train.draw_batch(0, index, 64, 0.0, 0.0, mix)
        forms.update(data.parse_prompt(c).form for c in captions)
    assert forms == set(data.FORMS)
    _, counts = train.draw_batch(0, 0, 32, 0.0, 0.0, (0.0, 1.0, 0.0))
    assert all(data.parse_prompt(c).form in ("two_of_a_kind", "three_of_a_kind") for c in counts)
    _, dropped = train.draw_batch(0, 0, 200, 1.0, 0.0, mix)
    assert set(dropped) == {""}  # every caption dropped for guidance


@pytest.mark.parametrize("bad", [["--pair-fraction", "0.7", "--count-fraction", "0.4"],
                                 ["--unplaced-fraction", "1.5"], ["--count-fraction", "-0.1"]])
def test_data_mix_is_checked(tmp_path, bad):
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path), "--steps", "1", *bad])


NUMBER_WORDS = ("two", "three", "are")


def _checkpoint_without(words, folder):
    """The shipped weights as a checkpoint from before ``words`` joined the data: those
    words, their embedding rows and the vocabulary size taken out."""
    import json
    import shutil

    from safetensors.torch import save_file

    from clusca_shapes import WEIGHTS_DIR

    shutil.copytree(WEIGHTS_DIR, folder)
    vocab_file = folder / "tokenizer" / "vocab.json"
    vocab = json.loads(vocab_file.read_text())
    itos = ["<pad>", "<unk>", "<bos>"] + vocab["words"]
    keep = [i for i, w in enumerate(itos) if w not in words]
    vocab["words"] = [w for w in vocab["words"] if w not in words]
    vocab_file.write_text(json.dumps(vocab))
    weights_file = folder / "text_encoder" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(weights_file))
    weights["embed.weight"] = weights["embed.weight"][keep].contiguous()
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    config_file = folder / "text_encoder" / "config.json"
    config = json.loads(config_file.read_text())
    config["vocab_size"] = len(keep)
    config_file.write_text(json.dumps(config))
    return folder


def test_init_from_older_weights_keeps_what_they_learnt(tmp_path, capsys):
    """When the data's vocabulary outgrows a checkpoint's, continuing keeps every learnt word."""
    start = _checkpoint_without(NUMBER_WORDS, tmp_path / "older")
    out = tmp_path / "next"
    assert train.main(["--out", str(out), "--init", str(start), "--steps", "1", "--batch", "2",
                       "--threads", "1", "--lr", "0", "--warmup", "1"]) == 0
    assert "words new to it: are three two" in capsys.readouterr().out
    old, new = ShapesFluxPipeline.from_pretrained(start), ShapesFluxPipeline.from_pretrained(out)
    wo, wn = _weights(start), _weights(out)
    assert all(torch.allclose(wo[k], wn[k]) for k in wo)
    eo, en = old.text_encoder.embed.weight, new.text_encoder.embed.weight
    for word, i in new.tokenizer.stoi.items():
        j = old.tokenizer.stoi.get(word, old.tokenizer.stoi["<unk>"])
        assert torch.allclose(en[i], eo[j]), word
    assert {"two", "three"} <= set(new.tokenizer.itos) and "two" not in old.tokenizer.stoi
    # The cache tuning the service applies to this model travels with the weights.
    assert old.cache_presets and new.cache_presets == old.cache_presets
