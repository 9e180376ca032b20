"""A real diffusers FluxPipeline (tiny, random weights, built here) served end to end.

This is the path every FLUX/SD3/PixArt registry entry takes: ``kind: diffusers``,
``DiffusionPipeline.from_pretrained`` from a local folder, the diffusers call
convention, ClusCa hooks on ``pipe.transformer``.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.support import Service

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = 32  # T5 tokens per prompt (FLUX's max_sequence_length), kept small for speed


def _byte_chars() -> list[str]:
    # The printable stand-ins byte-level BPE uses for the 256 byte values.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(extra))]


def _tokenizer(folder):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _byte_chars():  # character-level vocabulary: no merges needed
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77), len(vocab)


def build_tiny_flux(folder) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok, vocab = _tokenizer(folder.parent / "tok1")
    tok2, _ = _tokenizer(folder.parent / "tok2")
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=16, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=tok,
                 text_encoder_2=t5, tokenizer_2=tok2, transformer=transformer).save_pretrained(folder)


@pytest.fixture(scope="module")
def tinyflux(service, tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyflux")
    build_tiny_flux(root / "pipe")
    models = root / "models.yaml"
    models.write_text(
        "models:\n  - name: tinyflux\n    kind: diffusers\n    pipeline_class: auto\n"
        f"    path: {root / 'pipe'}\n"
        "    defaults: {width: 32, height: 32, steps: 4, guidance: 3.5, cache: \"off\", size_multiple: 16}\n"
        f"    options: {{call_kwargs: {{max_sequence_length: {SEQ}}}}}\n")
    worker = service.start_worker("tinyflux", {"CLUSCA_MODELS": str(models), "CLUSCA_VISIBILITY_TIMEOUT_S": "60"},
                                  timeout=180)
    yield root / "pipe"
    Service.stop(worker, timeout=60)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def test_flux_pipeline_through_the_service_equals_a_direct_call(service, tinyflux):
    from diffusers import FluxPipeline

    with service.client(timeout=120) as c:
        r = c.post("/generate", json={"model": "tinyflux", "prompt": "a red circle", "seed": 4, "steps": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        job = c.post("/generate", json={"model": "tinyflux", "prompt": "a red circle", "steps": 3},
                     headers={"Prefer": "respond-async"}).json()
        with c.stream("GET", f"/jobs/{job['id']}/events") as ev:
            kinds = [line[7:] for line in ev.iter_lines() if line.startswith("event: ")]
    assert kinds.count("progress") == 3 and kinds[-1] == "finished"
    pipe = FluxPipeline.from_pretrained(tinyflux)
    pipe.set_progress_bar_config(disable=True)
    direct = pipe(prompt=["a red circle"], num_inference_steps=4, guidance_scale=3.5, height=32, width=32,
                  generator=[torch.Generator().manual_seed(4)], max_sequence_length=SEQ).images[0]
    assert np.array_equal(_pixels(body["images"][0]), np.asarray(direct.convert("RGB"), dtype=np.int16))


def test_flux_pipeline_with_clusca_per_request(service, tinyflux):
    with service.client(timeout=120) as c:
        runs = {p: c.post("/generate", json={"model": "tinyflux", "prompt": "two squares", "seed": 1, "steps": 12,
                                             "cache": {"preset": p}}).json() for p in ("off", "fast")}
        again = c.post("/generate", json={"model": "tinyflux", "prompt": "two squares", "seed": 1, "steps": 12,
                                          "cache": {"preset": "off"}}).json()
        other = {"model": "tinyflux", "prompt": "a wide picture", "seed": 2, "steps": 9, "width": 64, "height": 32,
                 "cache": {"preset": "balanced", "clusters": 4}}
        wide1 = c.post("/generate", json=other).json()
        fast_again = c.post("/generate", json={"model": "tinyflux", "prompt": "two squares", "seed": 1, "steps": 12,
                                               "cache": {"preset": "fast"}}).json()
        wide2 = c.post("/generate", json=other).json()
    off, fast = runs["off"]["cache_stats"], runs["fast"]["cache_stats"]
    assert off["cached_steps"] == 0 and off["full_steps"] == 12
    assert fast["cached_steps"] > 0 and fast["flops_speedup"] > 1.5 and fast["token_fraction"] < 1
    # Runs with other sizes and settings in between leave no trace: each request gives
    # exactly what it gives alone.
    assert again["images"] == runs["off"]["images"]
    assert fast_again["images"] == runs["fast"]["images"]
    assert wide1["images"] == wide2["images"] and _pixels(wide1["images"][0]).shape == (32, 64, 3)
    assert wide1["cache_stats"]["cached_steps"] > 0


def test_flux_batched_images_match_lone_requests(service, tinyflux):
    body = {"model": "tinyflux", "prompt": "three dots", "steps": 6, "cache": {"preset": "balanced"}}
    with service.client(timeout=120) as c:
        pair = c.post("/generate", json={**body, "seed": 30, "num_images": 2}).json()
        alone = [c.post("/generate", json={**body, "seed": s}).json() for s in (30, 31)]
    assert pair["batch_images"] == 2 and pair["seeds"] == [30, 31]
    # One pipeline call with a generator per image: each image is its lone twin, up to float
    # summation order in batched kernels (at most a couple of 8-bit levels).
    for k in range(2):
        assert np.abs(_pixels(pair["images"][k]) - _pixels(alone[k]["images"][0])).max() <= 2
