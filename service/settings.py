"""All runtime configuration, read from environment variables.

The variable names and defaults are a contract (see docs/architecture.md); every
process (API, worker, CLI) builds one :class:`Settings` from the environment and
passes it down instead of reading ``os.environ`` itself.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class Settings(BaseModel):
    """Service settings; field ``x`` comes from the environment variable in ``ENV_NAMES``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    models_file: str | None = None
    default_model: str = "shapes"
    device: str = "auto"
    api_keys: tuple[str, ...] = ()
    max_queue: int = Field(1000, ge=1)
    sync_timeout_s: float = Field(120.0, gt=0)
    # Longest a job may take from submission to its end (a request's timeout_s may only lower it);
    # a job past it fails with a named error and its worker is free again.
    max_job_s: float = Field(1800.0, gt=0, le=7 * 86400)
    result_ttl_s: int = Field(86400, ge=1)
    max_batch: int = Field(4, ge=1, le=256)
    batch_wait_ms: float = Field(10.0, ge=0)
    visibility_timeout_s: float = Field(30.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    webhook_secret: str | None = None
    webhook_allow_private: bool = False
    prometheus_multiproc_dir: str | None = None
    worker_metrics_port: int = Field(9101, ge=0, le=65535)
    # torch threads per worker; 0 keeps torch's default (a thread per core). One by default: on
    # a CPU shared with other work, several threads per worker spin-wait for each other
    # (OpenMP) and the built-in model measured 14-17x slower on two threads than on one
    # (benchmarks/thread_default.py); on an idle 2-core CPU two threads are 1.5x faster, so
    # set it to the cores a worker has to itself. On a GPU it hardly matters.
    torch_threads: int = Field(1, ge=0, le=1024)
    # Request limits: generous defaults for GPU hosts; operators tighten them per deployment.
    max_prompt_chars: int = Field(2000, ge=1)
    max_pixels: int = Field(2048 * 2048, ge=1)
    max_side: int = Field(4096, ge=8)
    max_steps: int = Field(200, ge=1)
    max_images: int = Field(8, ge=1)
    max_frames: int = Field(257, ge=1)
    # Largest encoded output (a video, usually) one job may store in Redis; a bigger one fails the job.
    max_output_bytes: int = Field(64 << 20, ge=1024)
    # Where videos are kept: "redis" (beside the job, bounded by max_output_bytes) or
    # "dir:///path", a folder every worker and API process shares (service/outputs/store.py).
    video_store: str = "redis"
    max_body_bytes: int = Field(1 << 20, ge=1024)
    # Largest input image (or mask) of an edit, in bytes as sent (after base64 decoding); 413 above.
    max_input_bytes: int = Field(4 << 20, ge=1024)
    # Seconds a client has to send a request's whole body; a slower one is answered 408 and cut off.
    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    # Connections (and requests in progress) one API process holds at most; more are answered 503.
    max_connections: int = Field(2048, ge=1)
    # Replicas that must hold a new job before the API confirms it (Redis WAIT); 0 = asynchronous.
    redis_wait_replicas: int = Field(0, ge=0, le=16)
    redis_wait_timeout_ms: int = Field(1000, ge=1, le=60_000)
    # Age at which the API checks that a job it confirmed is still in Redis (service/broker/reconcile.py).
    reconcile_settle_s: float = Field(5.0, gt=0, le=3600)
    # Directory where each API process keeps that journal on disk too (service/broker/ack_log.py); unset: memory only.
    reconcile_journal: str | None = None
    # Which of each model's lanes a worker reads (service/broker/lanes.py): "all" (short first, then
    # long) or "short" (never a job above the model's long_cost: capacity long jobs cannot take).
    worker_lanes: Literal["all", "short"] = "all"
    # A parallel group over several hosts (service/worker/group.py): how many hosts hold its ranks,
    # which of them this worker is (0 holds rank 0, the group's queue consumer), and the
    # host:port of node 0's rendezvous. One host (the default) needs none of them.
    parallel_nodes: int = Field(1, ge=1, le=1024)
    parallel_node_rank: int = Field(0, ge=0)
    parallel_master: str | None = None
    # LoRA adapters (service/adapters/): a folder per model under this one, shared by the API
    # (which lists and checks them, and adds or removes them on the admin routes) and the workers
    # (which load them); unset: only the adapters the built-in model ships.
    adapters_dir: str | None = None
    # Largest adapter file accepted (listing, upload and loading alike), in bytes.
    adapter_max_bytes: int = Field(256 << 20, ge=1024)
    # Device memory a model's adapter slots may take, in MiB, unless its registry entry says otherwise.
    adapter_budget_mb: float = Field(1024.0, gt=0, allow_inf_nan=False)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")

    @field_validator("video_store")
    @classmethod
    def _video_store(cls, v: str) -> str:
        from service.outputs.store import parse_spec

        parse_spec(v)
        return v

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from ``env`` (default ``os.environ``); a bad value names its variable."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for field, var in ENV_NAMES.items():
            raw = env.get(var)
            if raw is None or (raw == "" and field not in ("webhook_allow_private",)):
                continue
            if field == "api_keys":
                values[field] = tuple(k.strip() for k in raw.split(",") if k.strip())
            elif field == "webhook_allow_private":
                low = raw.strip().lower()
                if low not in _TRUE | _FALSE:
                    raise SettingsError(f"{var}: expected 0 or 1, got {raw!r}")
                values[field] = low in _TRUE
            else:
                values[field] = raw
        try:
            return cls(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else "?"
            raise SettingsError(f"{ENV_NAMES.get(field, field)}: {err['msg']}") from None


class SettingsError(ValueError):
    """A configuration variable has a bad value."""


ENV_NAMES: dict[str, str] = {
    "redis_url": "REDIS_URL",
    "host": "CLUSCA_HOST",
    "port": "CLUSCA_PORT",
    "models_file": "CLUSCA_MODELS",
    "default_model": "CLUSCA_DEFAULT_MODEL",
    "device": "CLUSCA_DEVICE",
    "api_keys": "CLUSCA_API_KEYS",
    "max_queue": "CLUSCA_MAX_QUEUE",
    "sync_timeout_s": "CLUSCA_SYNC_TIMEOUT_S",
    "max_job_s": "CLUSCA_MAX_JOB_S",
    "result_ttl_s": "CLUSCA_RESULT_TTL_S",
    "max_batch": "CLUSCA_MAX_BATCH",
    "batch_wait_ms": "CLUSCA_BATCH_WAIT_MS",
    "visibility_timeout_s": "CLUSCA_VISIBILITY_TIMEOUT_S",
    "max_attempts": "CLUSCA_MAX_ATTEMPTS",
    "webhook_secret": "CLUSCA_WEBHOOK_SECRET",
    "webhook_allow_private": "CLUSCA_WEBHOOK_ALLOW_PRIVATE",
    "prometheus_multiproc_dir": "PROMETHEUS_MULTIPROC_DIR",
    "worker_metrics_port": "CLUSCA_WORKER_METRICS_PORT",
    "torch_threads": "CLUSCA_TORCH_THREADS",
    "max_prompt_chars": "CLUSCA_MAX_PROMPT_CHARS",
    "max_pixels": "CLUSCA_MAX_PIXELS",
    "max_side": "CLUSCA_MAX_SIDE",
    "max_steps": "CLUSCA_MAX_STEPS",
    "max_images": "CLUSCA_MAX_IMAGES",
    "max_frames": "CLUSCA_MAX_FRAMES",
    "max_output_bytes": "CLUSCA_MAX_OUTPUT_BYTES",
    "video_store": "CLUSCA_VIDEO_STORE",
    "max_body_bytes": "CLUSCA_MAX_BODY_BYTES",
    "max_input_bytes": "CLUSCA_MAX_INPUT_BYTES",
    "body_timeout_s": "CLUSCA_BODY_TIMEOUT_S",
    "max_connections": "CLUSCA_MAX_CONNECTIONS",
    "redis_wait_replicas": "CLUSCA_REDIS_WAIT_REPLICAS",
    "redis_wait_timeout_ms": "CLUSCA_REDIS_WAIT_TIMEOUT_MS",
    "reconcile_settle_s": "CLUSCA_RECONCILE_SETTLE_S",
    "reconcile_journal": "CLUSCA_RECONCILE_JOURNAL",
    "worker_lanes": "CLUSCA_WORKER_LANES",
    "parallel_nodes": "CLUSCA_PARALLEL_NODES",
    "parallel_node_rank": "CLUSCA_PARALLEL_NODE_RANK",
    "parallel_master": "CLUSCA_PARALLEL_MASTER",
    "adapters_dir": "CLUSCA_ADAPTERS_DIR",
    "adapter_max_bytes": "CLUSCA_ADAPTER_MAX_BYTES",
    "adapter_budget_mb": "CLUSCA_ADAPTER_BUDGET_MB",
}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (a FastAPI dependency; tests override it)."""
    return Settings.from_env()
