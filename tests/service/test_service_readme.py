"""The README's commands work as typed after the set-up command (`make serve` / `make install`)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import httpx
import pytest
from PIL import Image

from tests.support import ROOT, Service

README = (ROOT / "README.md").read_text()
QUICK_START = README[README.index("## Quick start"):README.index("\n## ", README.index("## Quick start") + 5)]


def _commands(text: str) -> list[str]:
    """Shell commands: lines of ```bash blocks (continuations joined) and inline code spans
    that start with a command name."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        out += [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    out += [span for span in re.findall(r"`([^`\n]+)`", text) if " " in span]
    return out


def _make_bin() -> str:
    makefile = (ROOT / "Makefile").read_text()
    venv = re.search(r"^VENV := (\S+)", makefile, re.M).group(1)
    assert re.search(r"^BIN := \$\(VENV\)/bin", makefile, re.M)
    assert re.search(r"^install: \$\(BIN\)/clusca", makefile, re.M) and re.search(r"^serve: install", makefile, re.M)
    return f"{venv}/bin"


def test_readme_names_only_commands_the_set_up_provides():
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    scripts = set(re.findall(r"^([\w-]+)\s*=", section, re.M))
    assert "clusca" in scripts
    bin_dir = _make_bin()
    for cmd in _commands(README):
        word = cmd.split()[0]
        # A console script of this package is not on a fresh machine's PATH; its venv path is.
        assert word not in scripts, f"README command {cmd!r} needs the virtualenv on PATH; write {bin_dir}/{word}"
        if word.startswith(".venv/"):
            assert word.startswith(bin_dir + "/") and word.rsplit("/", 1)[1] in scripts | {"pytest", "python"}, cmd
    make_targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.M))
    for cmd in _commands(README):
        if cmd.startswith("make "):
            assert cmd.split()[1] in make_targets, cmd


@pytest.fixture
def typed_dir(tmp_path):
    """A directory where `.venv/bin/...` resolves as in the checkout, so outputs land in tmp."""
    venv = ROOT / ".venv"
    if not (venv / "bin" / "clusca").exists():
        pytest.skip("no .venv with the clusca command (run `make install`)")
    (tmp_path / ".venv").symlink_to(venv)
    return tmp_path


def test_quick_start_client_commands_work_as_typed(service, typed_dir):
    host = service.base_url.removeprefix("http://")
    env = {**service.env, "CLUSCA_URL": service.base_url}
    generate = next(c for c in _commands(QUICK_START) if " generate " in c)
    res = subprocess.run(shlex.split(generate), cwd=typed_dir, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = typed_dir / shlex.split(generate)[-1]
    assert Image.open(out).format == "PNG"
    # The curl one-liner, with only the address changed to the test service's.
    curl = re.findall(r"```bash\n(curl .*?)```", QUICK_START, re.S)[0].replace("127.0.0.1:8000", host)
    res = subprocess.run(["bash", "-o", "pipefail", "-c", curl], cwd=typed_dir, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert Image.open(typed_dir / "out.png").format == "PNG" and "inference_s" in res.stdout
    assert os.path.exists(typed_dir / "square.png")


def test_quick_start_curl_handles_the_202_of_a_slow_request(service, typed_dir):
    # An API whose synchronous wait (0.2 s) is shorter than the job (10 steps of 0.1 s): it answers 202.
    api, url = service.start_api({"CLUSCA_SYNC_TIMEOUT_S": "0.2", "CLUSCA_DEFAULT_MODEL": "slow"})
    try:
        assert httpx.post(url + "/generate", json={"prompt": "p"}, timeout=30).status_code == 202
        curl = re.findall(r"```bash\n(curl .*?)```", QUICK_START, re.S)[0].replace("127.0.0.1:8000",
                                                                                 url.removeprefix("http://"))
        res = subprocess.run(["bash", "-o", "pipefail", "-c", curl], cwd=typed_dir, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        assert Image.open(typed_dir / "out.png").format == "PNG" and "inference_s" in res.stdout
    finally:
        Service.stop(api)


def test_the_edit_example_works_as_typed(service, typed_dir):
    # The example edits the Quick start's out.png with the built-in model, the README's default one.
    block = README[README.index("To edit an image"):]
    edit = re.findall(r"```bash\n(curl .*?)```", block, re.S)[0]
    worker = service.start_worker("shapes", timeout=180)
    try:
        with service.api({"CLUSCA_DEFAULT_MODEL": "shapes", "CLUSCA_SYNC_TIMEOUT_S": "0.2"}) as url:
            first = httpx.post(url + "/generate", json={"prompt": "a red circle on the left", "seed": 7}, timeout=60)
            job = first.json()
            while job["status"] in ("queued", "running"):
                job = httpx.get(url + job["links"]["self"], timeout=10).json()
            (typed_dir / "out.png").write_bytes(httpx.get(url + job["links"]["images"][0], timeout=10).content)
            # A 0.2 s synchronous wait: the edit is answered 202 and the example follows it.
            res = subprocess.run(["bash", "-o", "pipefail", "-c", edit.replace("127.0.0.1:8000", url.removeprefix("http://"))],
                                 cwd=typed_dir, capture_output=True, text=True, timeout=180)
    finally:
        Service.stop(worker, timeout=60)
    assert res.returncode == 0, res.stderr
    assert Image.open(typed_dir / "edit.png").size == (32, 32)
