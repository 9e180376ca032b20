"""The job contract, written once: what a job asks for, what it produced, where it stands.

The API builds a :class:`JobRequest`, the queue stores it as JSON (and the Lua scripts
use the statuses and caps below), the worker reads it back and writes a
:class:`JobResult`, and the API's views read both from a :class:`JobRecord`. Keeping
every field and status name in this one module means a field added here travels the
whole way, and a reader can never disagree with the writer about a spelling.

Plain dataclasses, the standard library and ClusCa's torch-free settings and statistics
(:class:`~clusca.config.ClusCaConfig`, :class:`~clusca.stats.RunStats`) only: the API process
imports this without torch, and the worker without pydantic models of the HTTP schema. The
cache settings and statistics are typed objects here and dictionaries only in the JSON.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Mapping, TypeVar, get_args

from clusca.config import ClusCaConfig, ClusCaConfigError
from clusca.stats import RunStats

# ---------------------------------------------------------------------------- shared constants
# Consumer group every worker reads the model streams with.
GROUP = "workers"
# Approximate cap (XADD MAXLEN ~) of each job's event stream: one event per step plus a few.
EVENTS_MAXLEN = 2000

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
QUEUED: JobState = "queued"
RUNNING: JobState = "running"
SUCCEEDED: JobState = "succeeded"
FAILED: JobState = "failed"
CANCELLED: JobState = "cancelled"
STATUSES: tuple[str, ...] = get_args(JobState)
# A job in one of these states never changes again.
TERMINAL: tuple[str, ...] = (SUCCEEDED, FAILED, CANCELLED)

EventType = Literal["queued", "started", "progress", "finished", "failed", "cancelled"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
# The event that ends a job's event stream, by terminal status.
FINAL_EVENT: dict[str, str] = {SUCCEEDED: "finished", FAILED: "failed", CANCELLED: "cancelled"}
TERMINAL_EVENTS: tuple[str, ...] = tuple(FINAL_EVENT.values())

OutputFormat = Literal["png", "jpeg", "webp", "mp4", "gif"]
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
# Formats of a still image, and of a video (WebP and GIF animated); a request's format is one of
# the first when it has no frame count, one of the second when it has one.
IMAGE_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp")
VIDEO_FORMATS: tuple[str, ...] = ("mp4", "webp", "gif")
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp",
                                 "mp4": "video/mp4", "gif": "image/gif"}


# How the error of a job that ran past its deadline begins (the API answers it with a 408, not a 500).
DEADLINE_EXCEEDED = "deadline exceeded"

# How an edit's input is named in a request: the SHA-256 of its stored PNG, in hex.
INPUT_DIGEST = re.compile(r"^[0-9a-f]{64}$")

# How an adapter is named (the model-name rule: never a path) and the scales a request may give one.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ADAPTER_SCALE_RANGE = (-4.0, 4.0)
# Adapters one request may name at most, whatever its model allows (a model's own limit is lower).
MAX_ADAPTERS = 8
# How the error of a job whose adapter could not be used begins (the API answers it with a 422).
ADAPTER_UNAVAILABLE = "adapter unavailable"


@dataclass(frozen=True)
class AdapterUse:
    """One LoRA adapter a job runs with, by its name in the model's adapter store, and its scale."""

    name: str
    scale: float = 1.0

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "AdapterUse":
        if not isinstance(d, Mapping) or not _is(d.get("name"), str) or not ADAPTER_NAME.match(d["name"]):
            raise ContractError(f"{where}.name: expected an adapter name")
        scale = d.get("scale", 1.0)
        lo, hi = ADAPTER_SCALE_RANGE
        if not _is(scale, int, float) or not (math.isfinite(scale) and lo <= scale <= hi):
            raise ContractError(f"{where}.scale: expected a finite number in [{lo:g}, {hi:g}]")
        return cls(d["name"], float(scale))


def denoised_steps(steps: int, strength: float) -> int:
    """Steps an edit of ``strength`` denoises out of a schedule of ``steps``: diffusers' image-to-image
    rule (the first ``int(steps - steps * strength)`` steps are skipped), which the built-in pipeline
    follows too, so the worker, the cache and the pipeline agree on the count. At least one."""
    return steps - int(max(steps - steps * strength, 0))


class ContractError(ValueError):
    """A stored value is not one this service could have written."""


def _is(v: Any, *types: type) -> bool:
    # JSON has no separate bool type in Python's eyes (bool is an int): refuse it unless asked for.
    return isinstance(v, types) and (bool in types or not isinstance(v, bool))


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _loads(raw: str | bytes | bytearray) -> Any:
    if isinstance(raw, (bytes, bytearray)):
        raw = raw.decode(errors="replace")
    return json.loads(raw)


Stored = TypeVar("Stored", bound="_StoredAsJson")


class _StoredAsJson:
    """What a request and a result share: stored as JSON, and a stored value this service could
    not have written (another program's, or a corrupted one) read back as ``None``."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return _json(self.to_dict())

    @classmethod
    def parse(cls: type[Stored], raw: Any) -> Stored | None:
        """The value stored as ``raw`` (JSON text or bytes), or None when this service could not have written it."""
        try:
            return cls.from_dict(_loads(raw))
        except (TypeError, ValueError):
            return None


# ---------------------------------------------------------------------------- the request
@dataclass(frozen=True)
class JobRequest(_StoredAsJson):
    """One fully resolved request: every default filled in, every limit already checked.

    ``seed`` is the first image's seed; image ``k`` uses ``seed + k`` (:attr:`seeds`), so an
    image depends only on its own seed. A video request has ``num_frames`` (and ``fps``, used
    only to encode it); each of its "images" is then one video of that many frames. ``cache`` is the
    resolved ClusCa configuration (the model's preset with the request's knobs), not what the client sent.
    """

    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    num_images: int = 1
    output_format: OutputFormat = "png"
    cache: ClusCaConfig = field(default_factory=ClusCaConfig)
    negative_prompt: str | None = None
    webhook_url: str | None = None
    num_frames: int | None = None
    fps: int | None = None
    # Seconds from submission (the record's ``created``) after which the job fails; None: no deadline.
    timeout_s: float | None = None
    # Edits: the input image and mask (white = repaint) as the SHA-256 of the PNG the API stored
    # (service/outputs/inputs.py), never the bytes themselves; ``strength`` (0, 1] is set exactly when
    # ``image`` is: the share of the steps that are denoised, from the image noised to that level.
    image: str | None = None
    mask: str | None = None
    strength: float | None = None
    # LoRA adapters by name, each with its scale, in the order the request gave them (none: the base model).
    adapters: tuple[AdapterUse, ...] = ()

    @property
    def is_video(self) -> bool:
        return self.num_frames is not None

    @property
    def is_edit(self) -> bool:
        return self.image is not None

    @property
    def denoised_steps(self) -> int:
        """The steps the pipeline runs: all of them, or the last ``strength`` share of an edit's."""
        return self.steps if self.strength is None else denoised_steps(self.steps, self.strength)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.num_images)]

    @property
    def cost(self) -> int:
        """What the job asks of a worker, in pixel-steps: width x height x steps x images (x frames),
        an edit's steps being those it denoises. Admission (a model's ``max_cost``) and the worker
        lanes compare jobs by it."""
        return self.width * self.height * self.denoised_steps * self.num_images * (self.num_frames or 1)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.output_format]

    @property
    def cache_mode(self) -> str:
        return self.cache.mode

    def batch_key(self, model: str) -> str:
        """Requests with equal keys can share one pipeline call: everything the call takes
        once for all its images (size, steps, guidance, cache settings, whether there are
        negative prompts, an edit's strength and whether it has a mask) is equal; prompts, seeds,
        counts, formats, input images and adapters may differ (the adapter bank gathers each
        sample's own adapters; the worker splits a batch whose adapters do not fit its slots)."""
        return json.dumps([model, self.width, self.height, self.steps, self.guidance,
                           self.negative_prompt is None, self.cache.to_dict(), self.num_frames,
                           self.is_edit, self.strength, self.mask is not None], sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "JobRequest":
        """Check every field's type and range; :class:`ContractError` names the first bad one."""
        if not isinstance(d, Mapping):
            raise ContractError("request: expected an object")
        checks: dict[str, tuple[type, ...]] = {
            "prompt": (str,), "negative_prompt": (str, type(None)), "width": (int,), "height": (int,),
            "steps": (int,), "guidance": (int, float), "seed": (int,), "num_images": (int,),
            "output_format": (str,), "cache": (dict,), "webhook_url": (str, type(None))}
        for name, types in checks.items():
            if name not in d or not _is(d[name], *types):
                raise ContractError(f"request.{name}: missing or of the wrong type")
        for name in ("num_frames", "fps"):  # absent in requests stored before video was served
            if d.get(name) is not None and (not _is(d[name], int) or d[name] < 1):
                raise ContractError(f"request.{name}: expected an integer of at least 1")
        timeout = d.get("timeout_s")  # absent in requests stored before deadlines
        if timeout is not None and (not _is(timeout, int, float) or not 0 < timeout < math.inf):
            raise ContractError("request.timeout_s: expected a positive number of seconds")
        image, mask, strength = d.get("image"), d.get("mask"), d.get("strength")  # absent before edits
        for name, value in (("image", image), ("mask", mask)):
            if value is not None and not (_is(value, str) and INPUT_DIGEST.match(value)):
                raise ContractError(f"request.{name}: expected the SHA-256 (hex) of a stored input")
        if (image is None) != (strength is None) or (mask is not None and image is None):
            raise ContractError("request.strength: set exactly when image is, and a mask only with an image")
        if strength is not None and (not _is(strength, int, float) or not 0 < strength <= 1):
            raise ContractError("request.strength: expected a number in (0, 1]")
        raw_adapters = d.get("adapters") or []  # absent in requests stored before adapters
        if not isinstance(raw_adapters, list) or len(raw_adapters) > MAX_ADAPTERS:
            raise ContractError(f"request.adapters: expected a list of at most {MAX_ADAPTERS}")
        adapters = tuple(AdapterUse.from_dict(a, f"request.adapters[{i}]") for i, a in enumerate(raw_adapters))
        if len({a.name for a in adapters}) != len(adapters):
            raise ContractError("request.adapters: an adapter is named twice")
        formats = VIDEO_FORMATS if d.get("num_frames") is not None else IMAGE_FORMATS
        if d["output_format"] not in formats:
            raise ContractError(f"request.output_format: not one of {list(formats)}")
        for name in ("width", "height", "steps", "num_images"):
            if d[name] < 1:
                raise ContractError(f"request.{name}: must be at least 1")
        try:
            cache = ClusCaConfig.from_dict(d["cache"])
        except ClusCaConfigError as exc:
            raise ContractError(f"request.cache.{exc.field}: {exc.reason}") from None
        if d["seed"] < 0 or not math.isfinite(d["guidance"]):
            raise ContractError("request: seed must be >= 0 and guidance finite")
        return cls(prompt=d["prompt"], negative_prompt=d["negative_prompt"], width=d["width"],
                   height=d["height"], steps=d["steps"], guidance=float(d["guidance"]), seed=d["seed"],
                   num_images=d["num_images"], output_format=d["output_format"], cache=cache,
                   webhook_url=d["webhook_url"], num_frames=d.get("num_frames"), fps=d.get("fps"),
                   timeout_s=None if timeout is None else float(timeout), image=image, mask=mask,
                   strength=None if strength is None else float(strength), adapters=adapters)


# ---------------------------------------------------------------------------- the result
@dataclass(frozen=True)
class Timings:
    """Where a job's time went, in seconds (``None``: not measured, e.g. never started)."""

    queue_wait_s: float | None = None
    inference_s: float | None = None
    total_s: float | None = None


@dataclass(frozen=True)
class JobResult(_StoredAsJson):
    """What the worker stores when a job ends, whatever the outcome.

    A job that failed before it ran (an invalid stored request) has only the defaults.
    ``cache_stats`` are the statistics of the batch's ClusCa run, shared by every
    job of that batch; ``batch_images`` / ``batch_jobs`` say how big that batch was.
    """

    seed: int | None = None
    seeds: list[int] = field(default_factory=list)
    cache_mode: str = "off"
    cache_stats: RunStats | None = None
    batch_images: int | None = None
    batch_jobs: int | None = None
    worker: str | None = None
    attempt: int | None = None
    content_type: str | None = None
    timings: Timings = field(default_factory=Timings)
    # Seconds the call spent loading adapters into the worker's slots before it ran (0: all were loaded).
    adapter_load_s: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "JobResult":
        if not isinstance(d, Mapping):
            raise ContractError("result: expected an object")
        optional: dict[str, tuple[type, ...]] = {
            "seed": (int,), "cache_mode": (str,), "cache_stats": (dict,), "batch_images": (int,),
            "batch_jobs": (int,), "worker": (str,), "attempt": (int,), "content_type": (str,),
            "adapter_load_s": (int, float)}
        for name, types in optional.items():
            if d.get(name) is not None and not _is(d[name], *types):
                raise ContractError(f"result.{name}: of the wrong type")
        seeds = d.get("seeds", [])
        if not isinstance(seeds, list) or not all(_is(s, int) for s in seeds):
            raise ContractError("result.seeds: expected a list of integers")
        t = d.get("timings") or {}
        if not isinstance(t, Mapping) or any(t.get(k) is not None and not _is(t[k], int, float)
                                             for k in ("queue_wait_s", "inference_s", "total_s")):
            raise ContractError("result.timings: expected numbers")
        timings = Timings(**{f.name: None if t.get(f.name) is None else float(t[f.name]) for f in fields(Timings)})
        values = {name: d.get(name) for name in optional}
        values["cache_mode"] = values["cache_mode"] or "off"
        if values["cache_stats"] is not None:
            try:
                values["cache_stats"] = RunStats.from_dict(values["cache_stats"])
            except (TypeError, ValueError) as exc:
                raise ContractError(f"result.cache_stats: {exc}") from None
        return cls(**values, seeds=list(seeds), timings=timings)


# ---------------------------------------------------------------------------- the record
def as_text(v: Any) -> Any:
    """A value read from Redis as text; undecodable bytes are replaced, so a foreign value is
    refused later rather than crashing its reader. Anything not bytes is returned as it is."""
    return v.decode(errors="replace") if isinstance(v, (bytes, bytearray)) else v


def _float(v: Any) -> float | None:
    try:
        return float(as_text(v)) if v not in (None, b"", "") else None
    except ValueError:
        return None


def _int(v: Any) -> int:
    try:
        return int(as_text(v)) if v not in (None, b"", "") else 0
    except ValueError:
        return 0


@dataclass(frozen=True)
class JobRecord:
    """A job as the queue holds it (the ``job:{id}`` hash), decoded.

    Values another program wrote into the hash never fail a read: a request or result
    that is not this contract's reads as ``None``, a number that is not one as 0 or None.
    """

    id: str
    model: str
    status: str
    request: JobRequest | None = None
    result: JobResult | None = None
    step: int = 0
    steps: int = 0
    attempts: int = 0
    error: str | None = None
    worker: str | None = None
    created: float | None = None
    started: float | None = None
    finished: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def deadline_exceeded(self) -> bool:
        """The job failed because it ran past its ``timeout_s`` (the client's limit, not a fault)."""
        return self.status == FAILED and (self.error or "").startswith(DEADLINE_EXCEEDED)

    @property
    def adapter_unavailable(self) -> bool:
        """The job failed because an adapter it names was removed or does not fit its model (the request's fault)."""
        return self.status == FAILED and (self.error or "").startswith(ADAPTER_UNAVAILABLE)

    @classmethod
    def queued(cls, job_id: str, model: str, request: JobRequest, created: float) -> "JobRecord":
        """The record the enqueue script writes, known without reading it back."""
        return cls(id=job_id, model=model, status=QUEUED, request=request, steps=request.steps, created=created)

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> "JobRecord | None":
        if not raw:
            return None
        h = {as_text(k): v for k, v in raw.items()}
        return cls(id=as_text(h.get("id", "")), model=as_text(h.get("model", "")), status=as_text(h.get("status", "")),
                   request=JobRequest.parse(h["request"]) if h.get("request") else None,
                   result=JobResult.parse(h["result"]) if h.get("result") else None,
                   step=_int(h.get("step")), steps=_int(h.get("steps")), attempts=_int(h.get("attempts")),
                   error=as_text(h["error"]) or None if h.get("error") else None,
                   worker=as_text(h["worker"]) if h.get("worker") else None,
                   created=_float(h.get("created")), started=_float(h.get("started")),
                   finished=_float(h.get("finished")))
