"""Encoding of output images in the contract's output formats."""

from __future__ import annotations

import io
from typing import Any

from .contract import OUTPUT_FORMATS

# PIL format name and options per output format. PNG at the lowest compression level: the
# bytes go once through Redis to one client, and level 1 costs a fraction of the default's time.
_PIL_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    "png": ("PNG", {"compress_level": 1}), "jpeg": ("JPEG", {"quality": 95}), "webp": ("WEBP", {"quality": 95})}
assert set(_PIL_FORMATS) == set(OUTPUT_FORMATS), "every output format needs an encoder"


def encode_image(image: Any, fmt: str) -> bytes:
    name, opts = _PIL_FORMATS[fmt]
    if fmt == "jpeg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format=name, **opts)
    return buf.getvalue()
