"""Tiny randomly initialised video pipelines (Wan, HunyuanVideo), built offline, for the video tests.

Each has a character-level tokenizer written here, random text encoders and a random
transformer and VAE small enough to run a handful of steps on a CPU in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _chars() -> list[str]:
    return [chr(c) for c in range(32, 127)]


def char_tokenizer(folder: Path, max_length: int = 16):
    """A CLIP-style tokenizer whose vocabulary is single characters (no merges), saved in ``folder``."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _chars():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    return tok, len(vocab)


def build_tiny_wan(folder: Path) -> None:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    tok, vocab = char_tokenizer(folder.parent / f"{folder.name}-tok")
    text = UMT5EncoderModel(UMT5Config(vocab_size=vocab, d_model=32, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                       relative_attention_num_buckets=8))
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    WanPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0)).save_pretrained(folder)


def build_tiny_hunyuan_video(folder: Path) -> None:
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    # The Llama prompt is the pipeline's template plus the prompt, character by character: room for both.
    tok, vocab = char_tokenizer(folder.parent / f"{folder.name}-tok", max_length=512)
    tok2, vocab2 = char_tokenizer(folder.parent / f"{folder.name}-tok2", max_length=77)
    llama = LlamaModel(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                   pad_token_id=1, bos_token_id=0, eos_token_id=1))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab2, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=8,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 3, block_out_channels=(8, 8, 8),
                                    layers_per_block=1, norm_num_groups=4, scaling_factor=0.476986,
                                    spatial_compression_ratio=4, temporal_compression_ratio=4,
                                    mid_block_add_attention=False)
    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=10, num_layers=2, num_single_layers=2,
                                                 num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                 guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                                                 rope_axes_dim=(2, 4, 4))
    HunyuanVideoPipeline(text_encoder=llama, tokenizer=tok, transformer=transformer, vae=vae,
                         scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip,
                         tokenizer_2=tok2).save_pretrained(folder)
