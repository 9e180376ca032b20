"""Which modules ClusCa hooks, per architecture: a table, not code paths.

Each entry names, by regular expressions matched with ``re.fullmatch`` against
``model.named_modules()`` names:

* ``attention``: modules whose whole output is predicted by the Taylor formula on
  cached steps (attention is never recomputed there).
* ``blocks``: whole blocks whose *contribution* (output minus input) is predicted
  (FLUX / HunyuanVideo single-stream blocks). ``block_residuals`` says which forward
  argument each output corresponds to, in output order.
* ``feedforward``: feed-forward modules that recompute one token per cluster on cached
  steps; the value is the token group (``"image"`` or ``"text"``) their input belongs to.
* ``text_stream``: modules of the text half of dual-stream blocks whose outputs, on a
  cached step, reach only modules that are predicted there (attention, the next text
  feed-forward, single-stream blocks) or are dropped at the output: they return their
  last full-step output on cached steps instead of recomputing (unless the run asks for
  ``refresh_text``). Only valid while attention and blocks are predicted, so an override
  of those patterns clears it.
* ``text_outputs``: while the text stream is dead in that sense, which outputs of the
  other hooked modules are text tokens: ``"attention"`` names the position of the text
  output of an attention module, ``"block"`` the residual argument of a block's text tokens;
  the feed-forward modules of the ``"text"`` group are text as a whole. Such outputs get no
  Taylor factors: a cached step answers them with a same-shaped input (or their last
  full-step value), which cannot change the result.
* ``cluster``: where the per-sample k-means runs on full steps: the LAST module matching
  ``cluster_module``, and for each token group where its tokens are read: ``("output", i)``
  (i-th output of that module, ``None`` index for a plain tensor) or ``("input", name)``.

Adding an architecture is one more entry in ``ARCHITECTURES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

TokenSource = tuple[str, "int | str | None"]


@dataclass(frozen=True)
class ArchitecturePatterns:
    name: str
    model_classes: tuple[str, ...]
    attention: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()
    block_residuals: tuple[str, ...] = ("hidden_states",)
    chain_blocks: bool = False
    feedforward: Mapping[str, str] = field(default_factory=dict)
    text_stream: tuple[str, ...] = ()
    text_outputs: Mapping[str, "int | str"] = field(default_factory=dict)
    cluster_module: str | None = None
    cluster_sources: Mapping[str, TokenSource] = field(default_factory=dict)

    def with_overrides(self, modules: Mapping[str, list[str]] | None) -> "ArchitecturePatterns":
        """Apply a user override (``ClusCaConfig.modules``) on top of this entry."""
        if not modules:
            return self
        kwargs: dict = {}
        if "attention" in modules:
            kwargs["attention"] = tuple(modules["attention"])
        if "block" in modules:
            kwargs["blocks"] = tuple(modules["block"])
        if "attention" in modules or "block" in modules:
            # The text stream is dead on cached steps only because these are predicted.
            kwargs["text_stream"] = ()
            kwargs["text_outputs"] = {}
        if "text_stream" in modules:
            kwargs["text_stream"] = tuple(modules["text_stream"])
        if "feedforward" in modules:
            # An override lists image-stream FFNs; a trailing "@text" marks a text-stream one.
            ff: dict[str, str] = {}
            for pat in modules["feedforward"]:
                pat, _, group = pat.partition("@")
                ff[pat] = group or "image"
            kwargs["feedforward"] = ff
        if "cluster" in modules:
            pats = modules["cluster"]
            kwargs["cluster_module"] = pats[0] if pats else None
        return ArchitecturePatterns(**{**self.__dict__, **kwargs})


_N = r"\d+"
# Dual-stream blocks (FLUX, HunyuanVideo, SD3) run one feed-forward per token stream.
_DUAL_STREAM_FF = {rf"transformer_blocks\.{_N}\.ff": "image", rf"transformer_blocks\.{_N}\.ff_context": "text"}
# Their text-side norms: AdaLayerNormZero (a projection of the timestep embedding plus a
# norm over the text tokens) and the norm in front of the text feed-forward.
_DUAL_STREAM_TEXT = (rf"transformer_blocks\.{_N}\.norm1_context", rf"transformer_blocks\.{_N}\.norm2_context")
# Their joint attention returns (image, text); their single-stream blocks take the text
# tokens as ``encoder_hidden_states``.
_DUAL_STREAM_TEXT_OUTPUTS = {"attention": 1, "block": "encoder_hidden_states"}


def _dual_then_single_stream(name: str, model_class: str, *, text_first: bool) -> ArchitecturePatterns:
    """Dual-stream blocks followed by chained single-stream ones (FLUX, HunyuanVideo); ``text_first``:
    both kinds of block return the text tokens before the image tokens."""
    residuals = ("encoder_hidden_states", "hidden_states")
    image, text = (1, 0) if text_first else (0, 1)
    return ArchitecturePatterns(
        name=name,
        model_classes=(model_class,),
        attention=(rf"transformer_blocks\.{_N}\.attn",),
        blocks=(rf"single_transformer_blocks\.{_N}",),
        block_residuals=residuals if text_first else residuals[::-1],
        chain_blocks=True,
        feedforward=_DUAL_STREAM_FF,
        text_stream=_DUAL_STREAM_TEXT,
        text_outputs=_DUAL_STREAM_TEXT_OUTPUTS,
        cluster_module=rf"transformer_blocks\.{_N}",
        cluster_sources={"image": ("output", image), "text": ("output", text)},
    )


def _one_stream(name: str, model_class: str, blocks: str = "transformer_blocks",
                ff: str = "ff") -> ArchitecturePatterns:
    """One token stream (PixArt, DiT, Wan): each block's attention modules and its feed-forward."""
    return ArchitecturePatterns(
        name=name,
        model_classes=(model_class,),
        attention=(rf"{blocks}\.{_N}\.attn[12]",),
        feedforward={rf"{blocks}\.{_N}\.{ff}": "image"},
        cluster_module=rf"{blocks}\.{_N}",
        cluster_sources={"image": ("output", None)},
    )


ARCHITECTURES: dict[str, ArchitecturePatterns] = {
    # FluxTransformerBlock and FluxSingleTransformerBlock return (encoder_hidden_states, hidden_states).
    "flux": _dual_then_single_stream("flux", "FluxTransformer2DModel", text_first=True),
    # HunyuanVideo's blocks return (hidden_states, encoder_hidden_states).
    "hunyuan_video": _dual_then_single_stream("hunyuan_video", "HunyuanVideoTransformer3DModel", text_first=False),
    "sd3": ArchitecturePatterns(
        name="sd3",
        model_classes=("SD3Transformer2DModel",),
        attention=(rf"transformer_blocks\.{_N}\.attn2?",),
        feedforward=_DUAL_STREAM_FF,
        text_stream=_DUAL_STREAM_TEXT,
        text_outputs=_DUAL_STREAM_TEXT_OUTPUTS,
        cluster_module=rf"transformer_blocks\.{_N}",
        # The last SD3 block drops the text stream (context_pre_only), so text tokens are
        # clustered on that block's text input, i.e. the previous block's text output.
        cluster_sources={"image": ("output", 1), "text": ("input", "encoder_hidden_states")},
    ),
    "pixart": _one_stream("pixart", "PixArtTransformer2DModel"),
    "dit": _one_stream("dit", "DiTTransformer2DModel"),
    "wan": _one_stream("wan", "WanTransformer3DModel", blocks="blocks", ff="ffn"),
}


def find_architecture(model: object) -> ArchitecturePatterns:
    """Table entry for ``model``'s class (or one of its base classes)."""
    for cls in type(model).__mro__:
        for arch in ARCHITECTURES.values():
            if cls.__name__ in arch.model_classes:
                return arch
    supported = sorted(c for a in ARCHITECTURES.values() for c in a.model_classes)
    raise ValueError(
        f"modules: no ClusCa patterns for {type(model).__name__}; supported models are {supported}. "
        "Add an entry to clusca.patterns.ARCHITECTURES or pass architecture=ArchitecturePatterns(...)."
    )
