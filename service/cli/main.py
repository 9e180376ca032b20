"""The ``clusca`` command: ``serve``, ``api``, ``worker``, the ``generate`` client and ``tune``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from typing import Any, Sequence

log = logging.getLogger("clusca")


def _logging() -> None:
    logging.basicConfig(level=os.environ.get("CLUSCA_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _settings() -> Any:
    from service.settings import Settings, SettingsError

    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise SystemExit(f"configuration error: {exc}") from None


def _check_registry(s: Any) -> None:
    from service.registry import Registry, RegistryError

    try:
        reg = Registry.load(s.models_file)
    except RegistryError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    if s.default_model not in reg:
        raise SystemExit(f"configuration error: CLUSCA_DEFAULT_MODEL {s.default_model!r} is not in the registry "
                         f"({', '.join(reg.names)})")


def _run_api(host: str, port: int, workers: int = 1) -> None:
    import uvicorn

    uvicorn.run("service.api:create_app", factory=True, host=host, port=port, workers=workers,
                log_level="warning", access_log=False, timeout_graceful_shutdown=10,
                **connection_limits(_settings()))


def connection_limits(s: Any) -> dict[str, Any]:
    """uvicorn's caps on what clients may hold: a slow body is cut off by the API itself
    (CLUSCA_BODY_TIMEOUT_S); these bound how many connections, and for how long idle ones, stay open."""
    return {"limit_concurrency": s.max_connections, "timeout_keep_alive": 5,
            "h11_max_incomplete_event_size": 16 * 1024}


def cmd_api(args: argparse.Namespace) -> None:
    s = _settings()
    if not s.redis_url:
        raise SystemExit("clusca api: set REDIS_URL (or use `clusca serve`, which starts a private Redis)")
    from service.broker.connect import RedisUrlError, parse

    try:
        parse(s.redis_url)
    except RedisUrlError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    _check_registry(s)
    host, port = args.host or s.host, args.port if args.port is not None else s.port
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each uvicorn process counts on its own; a shared directory lets /metrics add them up.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="clusca-metrics-")
    log.info("API on http://%s:%d (docs at /docs)", host, port)
    _run_api(host, port, args.workers)


def cmd_worker(args: argparse.Namespace) -> None:
    from service.worker.loop import run_worker

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    try:
        run_worker(_settings(), models, args.id)
    except ValueError as exc:
        raise SystemExit(f"clusca worker: {exc}") from None
    # Stopped cleanly: its jobs are handed back or stored, its threads done. The interpreter's own
    # teardown of torch and diffusers would take seconds more on a busy CPU (3 s measured), so skip it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_serve(args: argparse.Namespace) -> None:
    from service.cli.serve import serve

    serve(args)


# ---------------------------------------------------------------------------- client
def _request(method: str, url: str, body: dict | None, key: str | None, headers: dict | None = None) -> Any:
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    return urllib.request.urlopen(urllib.request.Request(url, data=data, headers=h, method=method), timeout=60)


def _bar(step: int, steps: int, width: int = 30) -> str:
    filled = int(width * step / max(steps, 1))
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{steps}"


def cmd_generate(args: argparse.Namespace) -> None:
    base = args.url.rstrip("/")
    body: dict[str, Any] = {"prompt": args.prompt}
    for k in ("model", "width", "height", "steps", "seed", "guidance", "negative_prompt", "num_frames", "fps",
              "output_format"):
        v = getattr(args, k)
        if v is not None:
            body[k] = v
    if args.cache:
        body["cache"] = args.cache
    try:
        with _request("POST", f"{base}/generate", body, args.api_key, {"Prefer": "respond-async"}) as r:
            job = json.load(r)
        print(f"job {job['id']} (seed {job['seed']})", file=sys.stderr)
        # The bar redraws itself with carriage returns: only a terminal shows that as one line.
        show_bar = sys.stderr.isatty()
        with _request("GET", f"{base}/jobs/{job['id']}/events", None, args.api_key) as r:
            kind = ""
            for raw in r:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    ev = json.loads(line[6:])
                    if kind == "progress" and show_bar:
                        print(_bar(ev["step"], ev["steps"]), end="", file=sys.stderr, flush=True)
                    elif kind in ("finished", "failed", "cancelled"):
                        if show_bar:
                            print(file=sys.stderr)
                        break
        with _request("GET", f"{base}/jobs/{job['id']}", None, args.api_key) as r:
            job = json.load(r)
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['status']}: {job.get('error')}")
        with _request("GET", f"{base}/jobs/{job['id']}/images/0", None, args.api_key) as r:
            data = r.read()
    except urllib.error.HTTPError as exc:
        try:
            msg = json.load(exc)["error"]["message"]
        except Exception:  # noqa: BLE001
            msg = exc.reason
        raise SystemExit(f"error {exc.code}: {msg}") from None
    except urllib.error.URLError as exc:
        raise SystemExit(f"cannot reach {base}: {exc.reason}") from None
    out = args.out or f"clusca-{job['id'][:8]}.{job['output_format']}"
    with open(out, "wb") as f:
        f.write(data)
    t, stats = job["timings"], job.get("cache_stats") or {}
    cache = (f"; {stats.get('token_fraction', 1.0):.0%} of tokens computed, "
             f"{stats.get('flops_speedup', 1.0):.2f}x fewer FLOPs") if stats else ""
    print(f"saved {out}  (queue {t['queue_wait_s']:.3f}s, inference {t['inference_s']:.3f}s, "
          f"total {t['total_s']:.3f}s{cache})", file=sys.stderr)


def _cache_arg(text: str) -> dict[str, Any]:
    from clusca.config import ClusCaConfigError, parse_settings

    try:
        return parse_settings(text)
    except ClusCaConfigError as exc:
        raise argparse.ArgumentTypeError(f"cache.{exc.field}: {exc.reason}") from None


def _cache_help() -> str:
    from clusca.config import KNOBS, PRESETS, knob_range

    lines = [f"cache presets: {', '.join(PRESETS)}", "cache knobs (unset ones come from the preset):"]
    lines += [f"  {k.name:<24} {knob_range(k):<28} {k.doc}" for k in KNOBS]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clusca", description="ClusCa Serve: diffusion transformers over HTTP.")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("serve", help="Redis (private unless REDIS_URL) + worker + API, in one command")
    sp.add_argument("--host", help="address the API listens on (default: CLUSCA_HOST, else 127.0.0.1)")
    sp.add_argument("--port", type=int, help="port the API listens on (default: CLUSCA_PORT, else 8000)")
    sp.add_argument("--workers", type=int, default=1,
                    help="worker processes to start (default 1; with 2 or more, the last one runs short jobs only)")
    sp.set_defaults(fn=cmd_serve)
    ap = sub.add_parser("api", help="the HTTP API only (needs REDIS_URL)")
    ap.add_argument("--host", help="address to listen on (default: CLUSCA_HOST, else 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port to listen on (default: CLUSCA_PORT, else 8000)")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    ap.set_defaults(fn=cmd_api)
    wp = sub.add_parser("worker", help="a worker process (needs REDIS_URL)")
    wp.add_argument("--models", help="comma-separated registry names (default: all)")
    wp.add_argument("--id", help="worker id (default: host-pid-random)")
    wp.set_defaults(fn=cmd_worker)
    gp = sub.add_parser("generate", help="generate one image (or video) through a running service",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_cache_help())
    gp.add_argument("prompt", help="what to draw")
    gp.add_argument("--out", "-o", help="file to write (default: clusca-<job id>.<format>)")
    gp.add_argument("--url", default=os.environ.get("CLUSCA_URL", "http://127.0.0.1:8000"),
                    help="the service (default: CLUSCA_URL, else http://127.0.0.1:8000)")
    gp.add_argument("--api-key", default=os.environ.get("CLUSCA_API_KEY"),
                    help="sent as a bearer token (default: CLUSCA_API_KEY; only where the service has keys)")
    gp.add_argument("--model", help="registry name (default: the service's CLUSCA_DEFAULT_MODEL)")
    gp.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    gp.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    gp.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    gp.add_argument("--seed", type=int, help="random seed; the same seed and settings give the same image "
                                              "(default: a random one, printed)")
    gp.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    gp.add_argument("--negative-prompt", dest="negative_prompt",
                    help="what the image should not show (models that support it)")
    gp.add_argument("--cache", type=_cache_arg, metavar="PRESET|KNOB=VALUE,...",
                    help="ClusCa settings: a preset, knob=value pairs, or both (e.g. fast, "
                         "interval=4,clusters=8 or quality,gamma=0.01); knobs below")
    gp.add_argument("--format", dest="output_format", choices=["png", "jpeg", "webp", "mp4", "gif"],
                    help="default: png for image models, mp4 for video models")
    gp.add_argument("--frames", dest="num_frames", type=int, help="video models: frames (default: the model's)")
    gp.add_argument("--fps", type=int, help="video models: frame rate (default: the model's)")
    gp.set_defaults(fn=cmd_generate)
    from service.cli.tune import add_parser as add_tune_parser

    add_tune_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    _logging()
    args = build_parser().parse_args(argv)
    args.fn(args)
