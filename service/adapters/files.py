"""What an adapter file declares, read without loading it: the safetensors header and the PEFT config.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the data. Reading the header alone tells an adapter's layers,
rank and size, and whether the file is whole (every range within it), at the cost of one small
read: the API lists and checks adapters this way, and the worker checks their shapes against its
model before it loads one. The key spelling is the library's (``clusca.lora.load_lora``): keys ending
in ``.lora_A.weight`` / ``.lora_B.weight``, optionally with PEFT's ``.default`` and a model prefix.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Same spelling as clusca.lora (which needs torch to import).
_PREFIXES = ("base_model.model.", "transformer.", "unet.")
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")
# A header bigger than this is not an adapter's (a rank-256 adapter of thousands of layers has < 1 MiB).
MAX_HEADER_BYTES = 16 << 20
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class AdapterFileError(ValueError):
    """An adapter that cannot be used: its file is missing, corrupt, truncated, too big or not a LoRA."""


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter as its files declare it: per layer (model module name) its ``(rank, in, out)``."""

    name: str
    rank: int
    layers: dict[str, tuple[int, int, int]]
    target_modules: list[str]
    size_bytes: int
    alpha: float | None = None
    # Identifies this version of the files (size and modification time): a replaced file is a new adapter.
    fingerprint: str = ""


def _strip(module: str) -> str:
    for p in _PREFIXES:
        if module.startswith(p):
            return module[len(p):]
    return module


def adapter_file(path: Path) -> tuple[Path, Path | None]:
    """The ``.safetensors`` file of an adapter at ``path`` (a PEFT folder or the file) and its config, if any."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and p.is_file())
        if len(files) != 1:
            raise AdapterFileError(f"expected one .safetensors file in the adapter's folder, found {len(files)}")
        config = path / "adapter_config.json"
        return files[0], config if config.is_file() else None
    if path.suffix != ".safetensors" or not path.is_file():
        raise AdapterFileError("an adapter is a PEFT folder or one .safetensors file")
    return path, None


def read_header(file: Path, max_bytes: int) -> tuple[dict[str, Any], int]:
    """The safetensors header of ``file`` and the file's size; :class:`AdapterFileError` says what is wrong."""
    try:
        size = file.stat().st_size
        if size > max_bytes:
            raise AdapterFileError(f"{file.name} is {size} bytes, over the limit of {max_bytes} "
                                   f"(CLUSCA_ADAPTER_MAX_BYTES)")
        with file.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise AdapterFileError(f"{file.name} is truncated: no safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise AdapterFileError(f"{file.name} is not a safetensors file (or is truncated): its header "
                                       f"claims {n} bytes")
            raw = fh.read(n)
    except OSError as exc:
        raise AdapterFileError(f"{file.name} cannot be read ({exc.strerror})") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise AdapterFileError(f"{file.name} is not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{file.name} is not a safetensors file: its header is not an object")
    data = size - 8 - n
    for key, t in header.items():
        if key == "__metadata__":
            continue
        ok = (isinstance(t, dict) and t.get("dtype") in _DTYPE_BYTES and isinstance(t.get("shape"), list)
              and all(isinstance(x, int) and x >= 0 for x in t["shape"]) and isinstance(t.get("data_offsets"), list)
              and len(t["data_offsets"]) == 2 and all(isinstance(x, int) for x in t["data_offsets"]))
        if not ok:
            raise AdapterFileError(f"{file.name}: tensor {key[:80]!r} is not described as safetensors describes one")
        begin, end = t["data_offsets"]
        count = 1
        for x in t["shape"]:
            count *= x
        if not 0 <= begin <= end or end - begin != count * _DTYPE_BYTES[t["dtype"]]:
            raise AdapterFileError(f"{file.name}: tensor {key[:80]!r} has a byte range that does not fit its shape")
        if end > data:
            raise AdapterFileError(f"{file.name} is truncated: tensor {key[:80]!r} ends past the end of the file")
    return header, size


def inspect_adapter(path: Path, name: str, max_bytes: int) -> AdapterInfo:
    """What the adapter at ``path`` declares; :class:`AdapterFileError` when it cannot be used."""
    file, config_file = adapter_file(path)
    config: dict[str, Any] = {}
    if config_file is not None:
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise AdapterFileError(f"adapter_config.json is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise AdapterFileError("adapter_config.json is not a JSON object")
    header, size = read_header(file, max_bytes)
    parts: dict[str, dict[str, list[int]]] = {}
    for key, t in header.items():
        m = _KEY.match(key)
        if m:
            parts.setdefault(_strip(m["module"]), {})[m["part"]] = t["shape"]
    layers: dict[str, tuple[int, int, int]] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterFileError(f"layer {module!r} has only lora_{next(iter(ab))}")
        a, b = ab["A"], ab["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise AdapterFileError(f"layer {module!r}: lora_A {tuple(a)} and lora_B {tuple(b)} do not pair")
        layers[module] = (a[0], a[1], b[0])
    if not layers:
        raise AdapterFileError("the file holds no LoRA layers (keys ending in .lora_A.weight / .lora_B.weight)")
    rank = config.get("r")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
        rank = max(r for r, _, _ in layers.values())
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        targets = sorted({m.rsplit(".", 1)[-1] for m in layers})
    cfg_alpha = config.get("lora_alpha")
    stat = file.stat()
    total = size + (config_file.stat().st_size if config_file is not None else 0)
    return AdapterInfo(name=name, rank=int(rank), layers=layers, target_modules=sorted(targets)[:64],
                       size_bytes=total,
                       alpha=float(cfg_alpha) if isinstance(cfg_alpha, (int, float)) and not isinstance(cfg_alpha, bool)
                       else None,
                       fingerprint=f"{stat.st_size}-{stat.st_mtime_ns}")


def fit_problem(info: AdapterInfo, shapes: dict[str, tuple[int, int]], max_rank: int) -> str | None:
    """Why the adapter ``info`` does not fit a model whose targetable layers have ``shapes``
    (``{module: (in, out)}``) and whose bank holds ranks up to ``max_rank``; None when it fits."""
    if info.rank > max_rank or any(r > max_rank for r, _, _ in info.layers.values()):
        return f"rank {info.rank} is over this model's maximum of {max_rank} (adapters.max_rank)"
    for module, (_r, fan_in, fan_out) in info.layers.items():
        have = shapes.get(module)
        if have is None:
            return f"layer {module!r} is not one this model's adapters may target"
        if have != (fan_in, fan_out):
            return (f"layer {module!r} is {fan_in} in / {fan_out} out in the adapter but {have[0]} in / "
                    f"{have[1]} out in the model")
    return None
