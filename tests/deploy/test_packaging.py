"""The package's metadata: built by current setuptools without deprecation warnings, the
license as an SPDX expression with its text shipped, in the images too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_metadata_builds_without_warnings_and_names_the_license(tmp_path):
    res = subprocess.run([sys.executable, "-W", "always", "-c", "import setuptools; setuptools.setup()",
                          "egg_info", "-e", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    assert "Deprecat" not in out and "Warning" not in out, out
    info = next(tmp_path.glob("*.egg-info")) / "PKG-INFO"
    text = info.read_text()
    assert "License-Expression: Apache-2.0" in text and "License-File: LICENSE" in text, text
    assert "Apache License" in (ROOT / "LICENSE").read_text()


def test_the_images_copy_the_license_file_the_metadata_names():
    # pip refuses to build the package when a file of license-files is missing.
    copies = [line for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY pyproject.toml")]
    assert copies and all("LICENSE" in line.split() for line in copies), copies
