"""The model registry: which models exist, how to load them, and their defaults.

Entries come from a YAML or JSON file named by ``CLUSCA_MODELS``; without one the
registry holds only the built-in model ``shapes``. Model names are validated here and
only ever used as keys (stream names, dictionary lookups), never as file paths: the
path of a model comes from the operator's file, not from a request.

File format (YAML or JSON)::

    models:
      - name: flux-dev
        kind: diffusers            # builtin | diffusers | noop
        path: /models/FLUX.1-dev   # local folder or hub id
        pipeline_class: auto       # or e.g. FluxPipeline
        dtype: bfloat16
        device: cuda
        defaults: {width: 1024, height: 1024, steps: 28, guidance: 3.5, cache: balanced}
        limits: {size_multiple: 16, max_side: 2048, max_pixels: 4194304, max_steps: 100, max_images: 4,
                 max_cost: 1677721600}  # e.g. 1024x1024 x 50 steps x 32 images
        # optional cost lanes: jobs above this many pixel-steps wait in the model's long lane,
        # e.g. more than two 1024x1024 images of 28 steps:  limits: {..., long_cost: 58720256}
        # optional per-model preset tuning, e.g.
        #   cache_presets: {balanced: {interval: 4, order: 0, clusters: 4, gamma: 0.0}}
        # optional context parallelism: the model's worker is a group of ulysses x ring ranks,
        # one device each, serving every request together (docs/deployment.md)
        #   parallel: {ulysses: 4}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clusca.config import PRESETS, ClusCaConfig

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
BUILTIN_MODEL = "shapes"


class ModelDefaults(BaseModel):
    """Settings used when a request leaves them out."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(1024, ge=8)
    height: int = Field(1024, ge=8)
    steps: int = Field(28, ge=1)
    guidance: float = Field(3.5, ge=0, allow_inf_nan=False)
    # Video models: frames per video and the frame rate it is encoded at.
    num_frames: Optional[int] = Field(None, ge=1)
    fps: int = Field(16, ge=1, le=240)
    cache: str = "balanced"
    # Older spelling of ``limits.size_multiple``; the entry keeps both equal.
    size_multiple: Optional[int] = Field(None, ge=1)
    # Per-model tuning of the named ClusCa presets: {"balanced": {"order": 0, ...}}. A request
    # (or the default above) naming a preset gets the library's preset with these settings on
    # top; presets not listed here keep the library's settings.
    cache_presets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Where ``cache_presets`` came from, e.g. what ``clusca tune`` measured them on (date, device,
    # prompts, the measured quality and speed); shown by ``GET /models``, never used to run.
    cache_presets_source: Optional[dict[str, Any]] = None

    @field_validator("cache", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML reads a bare `off` as false.
        return "off" if v is False else v

    @field_validator("cache")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown cache preset {v!r}; choose one of {sorted(PRESETS)}")
        return v

    @field_validator("cache_presets")
    @classmethod
    def _valid_overrides(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, settings in v.items():
            if name not in PRESETS or name == "off":
                raise ValueError(f"{name!r} is not a tunable preset; choose among "
                                 f"{sorted(p for p in PRESETS if p != 'off')}")
            if not isinstance(settings, dict):
                raise ValueError(f"{name}: expected an object of ClusCa settings")
            for key in ("preset", "modules"):
                if key in settings:
                    raise ValueError(f"{name}.{key}: cannot be set in a preset override")
            try:
                ClusCaConfig.from_dict({"preset": name, **settings})
            except ValueError as exc:
                raise ValueError(f"{name}.{exc}") from None
        return v


# The linear layers of a FLUX-architecture transformer that LoRA adapters usually train (diffusers'
# names): every attention projection and the feed-forward layers of both kinds of block.
FLUX_LORA_TARGETS = [r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|proj_mlp|proj_out)",
                     r".*\.ff(_context)?\.net\.(0\.proj|2)"]


class AdapterSettings(BaseModel):
    """How a model serves LoRA adapters (docs/deployment.md): its worker's adapter bank and what a
    request may ask of it.

    The bank (``clusca.lora.LoraBank``) holds ``slots`` adapters at once on the targeted layers,
    each padded to ``max_rank``; its buffers are allocated once when the model loads, so their
    memory is ``slots`` x the cost of one slot, bounded by ``budget_mb`` (fewer slots when one
    slot of ``max_rank`` costs more). ``pins`` are loaded at start and never evicted.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # Adapters one request (one image) may combine.
    max_per_request: int = Field(2, ge=1, le=8)
    slots: int = Field(8, ge=1, le=64)
    max_rank: int = Field(16, ge=1, le=256)
    # Regular expressions over the transformer's module names (full match); default: FLUX's layers.
    targets: list[str] = Field(default_factory=lambda: list(FLUX_LORA_TARGETS), min_length=1)
    # Memory the bank's slots may take on the model's device, in MiB; None: CLUSCA_ADAPTER_BUDGET_MB.
    budget_mb: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    pins: list[str] = Field(default_factory=list)

    @field_validator("pins")
    @classmethod
    def _pin_names(cls, v: list[str]) -> list[str]:
        import re

        for name in v:
            if not re.match(MODEL_NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not an adapter name (letters, digits, '.', '_', '-')")
        return v

    @field_validator("targets")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        import re

        for t in v:
            try:
                re.compile(t)
            except re.error as exc:
                raise ValueError(f"target {t!r} is not a regular expression: {exc}") from None
        return v


class ModelLimits(BaseModel):
    """What a model's pipeline accepts; the API refuses anything outside it with a 422.

    ``None`` means the model sets no bound of its own: the service-wide ``CLUSCA_MAX_*``
    limits still apply (see :meth:`within`).
    """

    model_config = ConfigDict(extra="forbid")

    # Spatial granularity of the pipeline: widths and heights must be multiples of it.
    size_multiple: int = Field(16, ge=1, le=1024)
    min_side: int = Field(8, ge=1)
    max_side: Optional[int] = Field(None, ge=8)
    max_pixels: Optional[int] = Field(None, ge=64)
    min_steps: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)
    max_images: Optional[int] = Field(None, ge=1)
    # Video models: most frames per video; ``num_frames - 1`` a multiple of ``frame_step`` (Wan and
    # HunyuanVideo: 4, their VAE's temporal compression); most width x height x frames of one
    # video (what bounds the memory a call needs, with the batch size).
    max_frames: Optional[int] = Field(None, ge=1)
    frame_step: int = Field(1, ge=1, le=64)
    max_video_pixels: Optional[int] = Field(None, ge=64)
    # Most work one request may ask for, in pixel-steps (width x height x steps x images x frames,
    # ``JobRequest.cost``): what keeps one admitted request from holding a worker for hours.
    max_cost: Optional[int] = Field(None, ge=1)
    # The sizes ("WxH") the model draws well; when set, only these are admitted (and advertised).
    sizes: Optional[list[str]] = Field(None)
    # Jobs costing more than this (JobRequest.cost: width x height x steps x images x frames) wait in
    # the model's long lane, read after its short lane and never by CLUSCA_WORKER_LANES=short workers
    # (service/broker/lanes.py); None: one lane, every job in arrival order.
    long_cost: Optional[int] = Field(None, ge=1)

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: list[str] | None) -> list[str] | None:
        for size in v or []:
            w, x, h = size.partition("x")
            if not (x and w.isdigit() and h.isdigit()):
                raise ValueError(f"{size!r} is not a size; write WIDTHxHEIGHT, e.g. 1024x1024")
        return v

    def within(self, *, max_side: int, max_pixels: int, max_steps: int, max_images: int,
               max_frames: int | None = None) -> "ModelLimits":
        """These limits tightened by the service's own, every bound set and reachable.

        Sides are rounded to the size multiple (the smallest side is the first multiple at
        or above ``min_side`` and 8; the largest the last one at or below both maxima).
        """
        m = self.size_multiple
        low = -(-max(self.min_side, 8) // m) * m
        high = min(x for x in (self.max_side, max_side) if x is not None) // m * m
        return ModelLimits(size_multiple=m, min_side=low, max_side=high,
                           max_pixels=min(x for x in (self.max_pixels, max_pixels) if x is not None),
                           min_steps=self.min_steps,
                           max_steps=min(x for x in (self.max_steps, max_steps) if x is not None),
                           max_images=min(x for x in (self.max_images, max_images) if x is not None),
                           max_frames=min((x for x in (self.max_frames, max_frames) if x is not None), default=None),
                           frame_step=self.frame_step, max_video_pixels=self.max_video_pixels,
                           max_cost=self.max_cost, sizes=None if self.sizes is None else self._sizes_within(
                               max_side=max_side, max_pixels=max_pixels),
                           long_cost=self.long_cost)

    def _sizes_within(self, *, max_side: int, max_pixels: int) -> list[str]:
        """The listed sizes the service's own caps leave (a listed size it refuses is not offered)."""
        out = []
        for size in self.sizes or []:
            w, h = (int(x) for x in size.split("x"))
            if max(w, h) <= max_side and w * h <= max_pixels:
                out.append(size)
        return out

    def size_problem(self, width: int, height: int) -> tuple[str, str] | None:
        """``(field, message)`` for the first way ``width`` x ``height`` breaks these limits, else None."""
        if self.sizes is not None and f"{width}x{height}" not in self.sizes:
            return "width", f"{width}x{height} is not a size this model draws well; {self.sizes_text()}"
        for field, v in (("width", width), ("height", height)):
            if v % self.size_multiple:
                return field, f"must be a multiple of {self.size_multiple}"
            if v < self.min_side:
                return field, f"must be at least {self.min_side}"
            if self.max_side is not None and v > self.max_side:
                return field, f"must be at most {self.max_side}"
        if self.max_pixels is not None and width * height > self.max_pixels:
            return "width", f"width x height = {width * height} pixels exceeds the limit of {self.max_pixels}"
        return None

    def sizes_text(self) -> str:
        return f"the sizes it draws well: {', '.join(self.sizes or [])}"

    def cost_problem(self, cost: int, field: str) -> tuple[str, str] | None:
        """``(field, message)`` when a request of ``cost`` pixel-steps asks for more than ``max_cost``."""
        if self.max_cost is not None and cost > self.max_cost:
            return field, (f"the request asks for width x height x steps x images{' x frames' if self.max_frames else ''}"
                           f" = {cost} pixel-steps, more than the limit of {self.max_cost}; ask for fewer steps, "
                           f"images or pixels")
        return None

    def frames_problem(self, width: int, height: int, frames: int, videos: int = 1) -> tuple[str, str] | None:
        """``(field, message)`` for the first way ``videos`` videos of ``frames`` frames break these
        limits, else None. ``max_video_pixels`` bounds one request's videos together, as one call
        computes them (the worker never batches more than that into a call either)."""
        if self.max_frames is not None and frames > self.max_frames:
            return "num_frames", f"must be at most {self.max_frames}"
        if (frames - 1) % self.frame_step:
            return "num_frames", f"must be 1 plus a multiple of {self.frame_step}"
        if self.max_video_pixels is not None and width * height * frames > self.max_video_pixels:
            return "num_frames", (f"width x height x num_frames = {width * height * frames} exceeds the limit "
                                  f"of {self.max_video_pixels}")
        if self.max_video_pixels is not None and width * height * frames * videos > self.max_video_pixels:
            return "num_images", (f"width x height x num_frames x num_images = {width * height * frames * videos} "
                                  f"exceeds the limit of {self.max_video_pixels}")
        return None


# diffusers pipeline classes whose output is frames; any other class can be declared `output: video`.
VIDEO_PIPELINES = frozenset({"WanPipeline", "HunyuanVideoPipeline", "CogVideoXPipeline", "LTXPipeline",
                             "MochiPipeline", "AllegroPipeline", "LattePipeline", "SkyReelsV2Pipeline"})


class ParallelSettings(BaseModel):
    """How many ranks split each call of the model (``clusca.parallel``): Ulysses over the
    attention heads times ring over the key/value chunks. 1 x 1 is one process."""

    model_config = ConfigDict(extra="forbid")

    ulysses: int = Field(1, ge=1, le=64)
    ring: int = Field(1, ge=1, le=64)
    # Seconds any collective of the group may take before the group counts as failed (a rank that
    # hangs), and the group is restarted with its jobs back in the queue.
    timeout_s: float = Field(120.0, gt=0, le=3600)

    @property
    def world(self) -> int:
        return self.ulysses * self.ring


def default_edits(kind: str, pipeline_class: str) -> str:
    """What a model edits when its entry does not say: the built-in pipeline inpaints; a diffusers
    class is known by its name (FluxInpaintPipeline, FluxImg2ImgPipeline, ...)."""
    if kind == "builtin":
        return "inpaint"
    if kind != "diffusers":
        return "none"
    return "inpaint" if "Inpaint" in pipeline_class else "image" if "Img2Img" in pipeline_class else "none"


class ModelEntry(BaseModel):
    """One servable model."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    kind: Literal["builtin", "diffusers", "noop"] = "diffusers"
    path: str | None = None
    pipeline_class: str = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"
    defaults: ModelDefaults = Field(default_factory=ModelDefaults)
    limits: ModelLimits = Field(default_factory=ModelLimits)
    # What the pipeline makes: still images or videos (default: video for the known video pipeline classes).
    output: Optional[Literal["image", "video"]] = None
    # What a request may give the pipeline to edit: nothing (text only), an ``image`` (image-to-image:
    # ``image`` and ``strength``), or ``inpaint`` (a ``mask_image`` too). Default: ``inpaint`` for the
    # built-in model, by class name for diffusers pipelines (``...Inpaint...``, ``...Img2Img...``).
    edits: Optional[Literal["none", "image", "inpaint"]] = None
    # Free-form loader options (e.g. the no-op model's per-step delay).
    options: dict[str, Any] = Field(default_factory=dict)
    parallel: ParallelSettings = Field(default_factory=ParallelSettings)
    # LoRA adapters per request (service/adapters/, service/worker/adapters.py).
    adapters: AdapterSettings = Field(default_factory=AdapterSettings)

    @model_validator(mode="after")
    def _needs_path(self) -> "ModelEntry":
        if self.kind == "diffusers" and not self.path:
            raise ValueError(f"model {self.name!r}: kind 'diffusers' needs a path (local folder or hub id)")
        lim, d = self.limits, self.defaults
        if d.size_multiple is not None and d.size_multiple != lim.size_multiple:
            if "size_multiple" in lim.model_fields_set:
                raise ValueError(f"model {self.name!r}: defaults.size_multiple ({d.size_multiple}) and "
                                 f"limits.size_multiple ({lim.size_multiple}) differ; set only limits.size_multiple")
            lim.size_multiple = d.size_multiple
        d.size_multiple = lim.size_multiple
        if self.output is None:
            self.output = "video" if self.pipeline_class in VIDEO_PIPELINES else "image"
        if self.edits is None:
            self.edits = default_edits(self.kind, self.pipeline_class) if self.output == "image" else "none"
        if self.parallel.world > 1:
            self._check_parallel()
        if self.output == "video" and self.edits != "none":
            raise ValueError(f"model {self.name!r}: edits are for still images; a video model takes none")
        if self.output == "video":
            if self.kind not in ("diffusers", "noop"):
                raise ValueError(f"model {self.name!r}: kind {self.kind!r} makes no video")
            if d.num_frames is None:
                d.num_frames = 1 + min(16, (lim.max_frames or 17) - 1) // lim.frame_step * lim.frame_step
            problem = lim.frames_problem(d.width, d.height, d.num_frames)
            if problem:
                raise ValueError(f"model {self.name!r}: default num_frames {d.num_frames} breaks the model's "
                                 f"limits ({problem[1]})")
        # The defaults are requests too: one the model refuses would fail every request that leaves them out.
        problem = lim.size_problem(d.width, d.height)
        if problem:
            raise ValueError(f"model {self.name!r}: default {problem[0]} {d.width if problem[0] == 'width' else d.height} "
                             f"breaks the model's limits ({problem[1]})")
        if d.steps < lim.min_steps or (lim.max_steps is not None and d.steps > lim.max_steps):
            raise ValueError(f"model {self.name!r}: default steps {d.steps} outside the model's limits")
        return self

    @property
    def input_images(self) -> int:
        """How many input images one edit of this model takes: one for image-to-image and inpainting
        (every edit pipeline the service runs takes a single image), none for a text-only model."""
        return 0 if self.edits == "none" else 1

    def _check_parallel(self) -> None:
        """What a group cannot do, refused when the registry is read rather than at the first request."""
        par = self.parallel
        if self.kind == "noop":
            raise ValueError(f"model {self.name!r}: parallel needs a torch model (kind builtin or diffusers)")
        if par.ring > 1 and not self.options.get("attention_backend"):
            raise ValueError(f"model {self.name!r}: parallel.ring needs options.attention_backend naming a backend "
                             f"that returns the log-sum-exp (e.g. flash, _native_cudnn, _native_flash, sage); "
                             f"the default 'native' does not")
        problem = self.split_problem(self.defaults.width, self.defaults.height)
        if problem:
            raise ValueError(f"model {self.name!r}: default size: {problem[1]}")
        if self.kind == "builtin":
            from clusca_shapes import WEIGHTS_DIR

            try:
                config = json.loads((Path(self.path or WEIGHTS_DIR) / "transformer" / "config.json").read_text())
                heads = int(config["num_attention_heads"])
            except (OSError, ValueError, KeyError, TypeError):
                return  # an unreadable checkpoint is refused by its loader, with its own message
            if heads % par.ulysses:
                raise ValueError(f"model {self.name!r}: parallel.ulysses {par.ulysses} does not divide the "
                                 f"model's {heads} attention heads")

    def split_problem(self, width: int, height: int) -> tuple[str, str] | None:
        """``(field, message)`` when a ``width`` x ``height`` image's tokens do not split evenly over
        the model's parallel ranks (its tokens: one per ``size_multiple`` square), else None."""
        world = self.parallel.world
        m = self.limits.size_multiple
        tokens = (width // m) * (height // m)
        if world == 1 or tokens % world == 0:
            return None
        return "width", (f"{width}x{height} makes {tokens} image tokens, which the model's {world} parallel ranks "
                         f"cannot split evenly; choose a size whose (width/{m}) x (height/{m}) is a multiple of {world}")

    def cache_settings(self, requested: dict[str, Any] | None = None) -> dict[str, Any]:
        """A request's ClusCa settings on top of this model's version of the preset they name.

        The preset is the request's, else the model's default; the model's overrides of that
        preset come next and the request's own knobs last. ``ClusCaConfig.from_dict`` turns
        the result into the run's settings.
        """
        settings = dict(requested or {})
        name = settings.pop("preset", None) or self.defaults.cache
        return {"preset": name, **self.defaults.cache_presets.get(name, {}), **settings}

    def cache_config(self, requested: dict[str, Any] | None = None) -> ClusCaConfig:
        """The run's validated ClusCa settings for ``requested`` (see ``cache_settings``)."""
        return ClusCaConfig.from_dict(self.cache_settings(requested))

    @property
    def serves_adapters(self) -> bool:
        """Whether requests for this model may name adapters (its entry's ``adapters.enabled``)."""
        return self.adapters.enabled

    def public(self) -> dict[str, Any]:
        """What clients may see (no filesystem paths)."""
        return {"name": self.name, "kind": self.kind, "output": self.output, "edits": self.edits,
                "pipeline_class": self.pipeline_class,
                "dtype": self.dtype, "defaults": self.defaults.model_dump(),
                "parallel": {"ulysses": self.parallel.ulysses, "ring": self.parallel.ring,
                             "world": self.parallel.world}}

    def limits_within(self, settings: Any) -> ModelLimits:
        """What the API accepts for this model: its own limits tightened by the service's ``CLUSCA_MAX_*``."""
        return self.limits.within(max_side=settings.max_side, max_pixels=settings.max_pixels,
                                  max_steps=settings.max_steps, max_images=settings.max_images,
                                  max_frames=settings.max_frames if self.output == "video" else None)


def builtin_entry(path: str | Path | None = None) -> ModelEntry:
    """The built-in model's entry, read from the checkpoint at ``path`` (default: the shipped weights).

    Its defaults (size, steps, guidance, preset), preset tuning and limits are what the
    checkpoint's ``model_index.json`` records: what it was trained and tuned for and what its
    pipeline accepts. Reading the JSON keeps the API process free of torch.
    """
    from clusca_shapes import read_index

    index = read_index(path)
    # Where the checkpoint's presets came from, as its index records it; an index that does not
    # say (a checkpoint saved without it) is still named as their source (no path: clients see it).
    source = index.get("cache_presets_source")
    if not isinstance(source, dict):
        source = {"tool": "the checkpoint's model_index.json, which records no more"}
    return ModelEntry(name=BUILTIN_MODEL, kind="builtin", dtype="float32",
                      defaults=ModelDefaults(width=int(index["default_width"]), height=int(index["default_height"]),
                                             steps=int(index["default_steps"]),
                                             guidance=float(index["default_guidance"]),
                                             cache=index["default_cache"], cache_presets=index["cache_presets"],
                                             cache_presets_source=source),
                      limits=builtin_limits(index))


def builtin_limits(index: dict[str, Any]) -> ModelLimits:
    """The built-in pipeline's limits as :func:`clusca_shapes.read_index` gives them (the pipeline
    enforces the same numbers); sizes are multiples of its patch size."""
    return ModelLimits(size_multiple=int(index["patch_size"]), **index["limits"])


class RegistryError(ValueError):
    """The models file is missing or malformed."""


class Registry:
    """Models by name, in file order."""

    def __init__(self, entries: list[ModelEntry]):
        if not entries:
            raise RegistryError("the model registry is empty")
        self._entries: dict[str, ModelEntry] = {}
        for e in entries:
            if e.name in self._entries:
                raise RegistryError(f"model {e.name!r} is listed twice")
            self._entries[e.name] = e

    @classmethod
    def load(cls, path: str | Path | None) -> "Registry":
        if not path:
            return cls([builtin_entry()])
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise RegistryError(f"CLUSCA_MODELS: cannot read {p}: {exc.strerror}") from None
        try:
            if p.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:  # noqa: BLE001 - parser errors differ by format
            raise RegistryError(f"CLUSCA_MODELS: {p} is not valid YAML/JSON: {exc}") from None
        items = data.get("models") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise RegistryError(f"CLUSCA_MODELS: {p} must contain a list under 'models'")
        entries = []
        for i, item in enumerate(items):
            if isinstance(item, dict) and item.get("kind") == "builtin":
                own = item.get("path") if isinstance(item.get("path"), str) else None
                if not item.get("defaults"):
                    item = {**builtin_entry(own).model_dump(exclude={"name"}), **item}
                elif isinstance(item["defaults"], dict) and "cache_presets" not in item["defaults"]:
                    # The checkpoint's own preset tuning applies unless the operator replaces it, and
                    # so does what it says of their source.
                    checkpoint = builtin_entry(own).defaults
                    item = {**item, "defaults": {"cache_presets_source": checkpoint.cache_presets_source,
                                                 **item["defaults"], "cache_presets": checkpoint.cache_presets}}
                if "limits" not in item:
                    # So do its pipeline's limits.
                    item = {**item, "limits": builtin_entry(own).limits.model_dump(exclude_none=True)}
            try:
                entries.append(ModelEntry.model_validate(item))
            except ValidationError as exc:
                err = exc.errors()[0]
                loc = "".join(f".{x}" for x in err["loc"])
                raise RegistryError(f"CLUSCA_MODELS: models[{i}]{loc}: {err['msg']}") from None
        try:
            return cls(entries)
        except RegistryError as exc:
            raise RegistryError(f"CLUSCA_MODELS: {p}: {exc}") from None

    def get(self, name: str) -> ModelEntry | None:
        return self._entries.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())
