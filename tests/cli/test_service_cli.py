"""`clusca serve` (private Redis + worker + API in one command) and the `clusca generate` client."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from tests.support import ROOT, TEST_MODEL_LIST, clusca_serve, is_ready, models_yaml, wait_until
from service.broker.embedded import free_port
from service.worker.runners.noop_pipeline import noop_color


def test_serve_then_generate_client(tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text(models_yaml(*(m for m in TEST_MODEL_LIST if m["kind"] == "noop")))
    with clusca_serve(tmp_path, {"CLUSCA_MODELS": str(models), "CLUSCA_DEFAULT_MODEL": "noop",
                                 "CLUSCA_LOG_LEVEL": "INFO"}) as served:
        url, env = served.url, served.env
        out = tmp_path / "img.png"
        res = subprocess.run([sys.executable, "-m", "service.cli", "generate", "a blue square", "--url", url,
                              "--model", "slow", "--seed", "21", "--steps", "4", "--out", str(out),
                              "--cache", "off,interval=2,kmeans_fit_per_cluster=8"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert f"saved {out}" in res.stderr
        # stderr is a pipe here: no progress frames (carriage-return redraws) in it.
        assert "\r" not in res.stderr and "4/4" not in res.stderr, res.stderr
        assert Image.open(out).convert("RGB").getpixel((0, 0)) == noop_color("a blue square", 21)
        # On a terminal the bar is drawn, step by step.
        shown = _stderr_on_a_terminal([sys.executable, "-m", "service.cli", "generate", "a blue square", "--url",
                                       url, "--model", "legacy", "--steps", "4", "--out", str(tmp_path / "tty.png")],
                                      env)
        assert "\r[" in shown and "4/4" in shown and "saved" in shown, shown
        clip = tmp_path / "clip.gif"
        res = subprocess.run([sys.executable, "-m", "service.cli", "generate", "a ramp", "--url", url,
                              "--model", "noopvideo", "--frames", "9", "--format", "gif", "--out", str(clip)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert Image.open(clip).n_frames == 9
        # The API aggregates the worker's metrics (shared multi-process directory).
        text = httpx.get(url + "/metrics").text
        assert re.search(r'clusca_images_generated_total\{cache_mode="off",model="slow"\} 1\.0', text), text[-3000:]
        bad = subprocess.run([sys.executable, "-m", "service.cli", "generate", "x", "--url", url, "--steps", "999"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "error 422: steps" in bad.stderr
    assert served.proc.returncode == 0
    text = (tmp_path / "serve.log").read_text()
    assert "started a private Redis at redis://127.0.0.1:" in text
    # Nothing is left behind: the worker and the private Redis stopped with serve.
    redis_port = int(re.search(r"private Redis at redis://127.0.0.1:(\d+)", text).group(1))
    import socket

    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", redis_port), timeout=1).close()
    assert "stopped after" in text  # the worker's clean exit
    assert f"send requests to http://127.0.0.1:{served.port}/generate" in text


def _stderr_on_a_terminal(cmd: list[str], env: dict) -> str:
    """What ``cmd`` writes to stderr when stderr is a terminal (a pseudo-terminal)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    data = b""
    try:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            data += chunk
    finally:
        os.close(master)
        proc.wait(60)
    assert proc.returncode == 0, data
    return data.decode(errors="replace")


def test_every_flag_of_every_command_has_a_help_text():
    import argparse

    from service.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"serve", "api", "worker", "generate", "tune"} <= set(sub.choices)
    silent = [f"clusca {name} {'/'.join(a.option_strings) or a.dest}" for name, parser in sub.choices.items()
              for a in parser._actions if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not silent, silent


def test_generate_cache_takes_a_preset_and_knobs_checked_by_the_knob_table(capsys):
    from clusca.config import KNOBS
    from service.cli.main import build_parser

    parse = build_parser().parse_args
    assert parse(["generate", "x", "--cache", "fast"]).cache == {"preset": "fast"}
    assert parse(["generate", "x", "--cache", "interval=4,clusters=8"]).cache == {"interval": 4, "clusters": 8}
    assert parse(["generate", "x", "--cache", "quality,gamma=0.01,guidance_pairs=false,predictor=hermite"]).cache \
        == {"preset": "quality", "gamma": 0.01, "guidance_pairs": False, "predictor": "hermite"}
    for bad, fragment in (("interval=0", "cache.interval: must be between 1 and 1000"),
                          ("clusters=many", "cache.clusters: must be an integer"),
                          ("capture=always", "cache.capture: must be one of"),
                          ("turbo", "cache.preset: unknown preset"), ("intervall=4", "cache.intervall: unknown")):
        with pytest.raises(SystemExit):
            parse(["generate", "x", "--cache", bad])
        assert fragment in capsys.readouterr().err, bad
    with pytest.raises(SystemExit):
        parse(["generate", "--help"])
    help_text = capsys.readouterr().out
    for knob in KNOBS:
        assert re.search(rf"^  {knob.name} ", help_text, re.M), knob.name
    assert "1..1000" in help_text and "(0..1]" in help_text and "auto|off" in help_text


def test_worker_and_api_need_redis_url():
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PYTHONPATH"] = str(ROOT)
    for cmd in (["worker"], ["api"]):
        res = subprocess.run([sys.executable, "-m", "service.cli", *cmd], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode != 0 and "REDIS_URL" in res.stderr and "Traceback" not in res.stderr


def test_bad_configuration_is_a_clear_error(tmp_path):
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  - name: ../etc\n    kind: noop\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": "redis://127.0.0.1:1/0", "CLUSCA_MODELS": str(bad)}
    res = subprocess.run([sys.executable, "-m", "service.cli", "api"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0 and "models[0].name" in res.stderr and "Traceback" not in res.stderr
    env.update(CLUSCA_MODELS="", CLUSCA_MAX_BATCH="zero")
    res = subprocess.run([sys.executable, "-m", "service.cli", "api"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0 and "CLUSCA_MAX_BATCH" in res.stderr and "Traceback" not in res.stderr


def test_api_with_several_processes_reports_every_request(service):
    env_extra = {k: v for k, v in service.env.items() if k.startswith("CLUSCA_") or k in ("REDIS_URL", "PYTHONPATH")}
    env = {**{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}, **env_extra}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "api", "--port", str(port), "--workers", "2"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is not None or is_ready(url), timeout=60, what="API with 2 processes")
        # A new connection per request, so both processes get some of them.
        for _ in range(12):
            assert httpx.post(url + "/generate", json={"prompt": "count me"}, timeout=30).status_code == 200
        texts = [httpx.get(url + "/metrics", timeout=30).text for _ in range(4)]
        # Whichever process answers the scrape, it reports the requests of both.
        for text in texts:
            assert 'clusca_requests_total{endpoint="/generate",status="200"} 12.0' in text
    finally:
        proc.terminate()
        proc.wait(30)
