"""Offline text side of the built-in model: a word-level tokenizer and a tiny encoder.

The encoder is trained together with the diffusion transformer. It returns what FLUX
expects from its text encoders: a per-token sequence (``encoder_hidden_states``) and a
pooled vector (``pooled_projections``).
"""

from __future__ import annotations

import json
import os

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .words import split_words

PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"
VOCAB_FILE = "vocab.json"


class WordTokenizer:
    """Maps words to ids; unknown words become ``<unk>``, so any text is accepted."""

    def __init__(self, words: list[str], max_length: int = 16):
        if max_length < 2:
            raise ValueError("max_length must be at least 2")
        self.itos = [PAD, UNK, BOS] + [w for w in words if w not in (PAD, UNK, BOS)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.itos)

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(input_ids, attention_mask)``, both (batch, max_length).

        Every row starts with ``<bos>``, so even an empty prompt has one real token;
        prompts longer than ``max_length - 1`` words are truncated.
        """
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        unk, bos = self.stoi[UNK], self.stoi[BOS]
        for row, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
            toks = [bos] + [self.stoi.get(w, unk) for w in split_words(prompt)]
            toks = toks[: self.max_length]
            ids[row, : len(toks)] = torch.tensor(toks)
        return ids, (ids != 0)

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, VOCAB_FILE), "w") as f:
            json.dump({"max_length": self.max_length, "words": self.itos[3:]}, f, indent=0)

    @classmethod
    def from_pretrained(cls, folder: str) -> "WordTokenizer":
        with open(os.path.join(folder, VOCAB_FILE)) as f:
            spec = json.load(f)
        return cls(spec["words"], max_length=int(spec["max_length"]))


class ShapesTextEncoder(ModelMixin, ConfigMixin):
    """Word embeddings + a small pre-norm transformer encoder."""

    @register_to_config
    def __init__(
        self,
        vocab_size: int,
        max_length: int = 16,
        width: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        out_dim: int = 128,
        pooled_dim: int = 128,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(max_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, num_heads, dim_feedforward=2 * width, dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj_seq = nn.Linear(width, out_dim)
        self.proj_pooled = nn.Linear(width, pooled_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(input_ids) + self.pos[: input_ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~attention_mask.bool()))
        m = attention_mask.to(x.dtype).unsqueeze(-1)
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        # Padding positions still reach the image tokens through joint attention, so
        # zero them to keep prompts of different lengths on the same footing.
        return self.proj_seq(x) * m, self.proj_pooled(pooled)
