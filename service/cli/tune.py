"""``clusca tune MODEL``: measure which cache settings a registry model tolerates, and write a
models file that serves them.

Tune once per model and device, then ``CLUSCA_MODELS=FILE clusca serve``. Three files are
written side by side, each whole or not at all:

* ``FILE`` (YAML, or JSON for ``.json``): the model's registry entry with the tuned
  ``defaults.cache_presets`` and ``defaults.cache_presets_source`` (date, device, prompts,
  the measured quality and speed of each preset); ``GET /models`` shows both;
* ``FILE``'s stem + ``.measurements.json``: every measurement (also the partial results that
  ``--resume`` continues from);
* ``FILE``'s stem + ``.pareto.png``: PSNR against measured speedup, the front and the picks.

Nothing is written before the input has been checked and the model loaded.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from service.registry import Registry, RegistryError

# Prompts for models without a prompt set of their own: varied subjects, layouts and textures.
DEFAULT_PROMPTS = [
    "a red vintage car parked on a cobblestone street at sunset",
    "a bowl of fresh fruit on a wooden kitchen table, soft window light",
    "a snowy mountain range under a clear blue sky, wide landscape",
    "portrait of an old fisherman with a grey beard, dramatic lighting",
    "a cat sleeping on a stack of books in a cozy library",
    "a futuristic city skyline at night with neon signs and rain",
    "a watercolor painting of a lighthouse on a rocky coast",
    "a close-up of a sunflower with a bee, shallow depth of field",
]
BUILTIN_PROMPTS = 48  # the built-in model's fixed evaluation prompts used by default (with its checker)


class TuneInputError(ValueError):
    """Bad input to ``clusca tune``: the message names the option and the problem."""


def side_files(out: Path) -> tuple[Path, Path]:
    """The measurements JSON and the plot PNG written beside ``out``."""
    return out.with_name(out.stem + ".measurements.json"), out.with_name(out.stem + ".pareto.png")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: a JSON list of strings (``.json``), else one prompt per line
    (blank lines and lines starting with ``#`` are skipped)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TuneInputError(f"--prompts: cannot read {p}: {why}") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TuneInputError(f"--prompts: {p} is not valid JSON: {exc}") from None
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise TuneInputError(f"--prompts: {p} must hold a JSON list of strings")
        prompts = [x.strip() for x in data if x.strip()]
    else:
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise TuneInputError(f"--prompts: {p} holds no prompts")
    return prompts


def _check_out(out: Path) -> None:
    if out.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise TuneInputError(f"--out: {out} must end in .yaml, .yml or .json (the registry's formats)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise TuneInputError(f"--out: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise TuneInputError(f"--out: cannot write in {parent}")
    if out.is_dir():
        raise TuneInputError(f"--out: {out} is a folder")


def _load_pipeline(entry: Any, device: str | None) -> tuple[Any, str]:
    import torch

    from service.worker.runners import RUNNERS
    from service.worker.runners.diffusers import resolve_device

    if device and device != "auto":
        dev = device
    else:
        dev = resolve_device(entry, os.environ.get("CLUSCA_DEVICE") or "auto")
    runner = RUNNERS.get(entry.kind)
    if runner is None or not hasattr(runner, "from_pretrained"):
        raise TuneInputError(f"model {entry.name!r} (kind {entry.kind}) runs no transformer: nothing to tune")
    try:
        pipe = runner.from_pretrained(entry, getattr(torch, entry.dtype)).to(dev)
    except Exception as exc:  # noqa: BLE001 - any loader failure is the operator's to fix
        raise TuneInputError(f"model {entry.name!r}: cannot load it: {exc}") from None
    if getattr(pipe, "transformer", None) is None:
        raise TuneInputError(f"model {entry.name!r} has no transformer: there is nothing to cache")
    return pipe, dev


def parse_adapters(specs: Sequence[str]) -> list[tuple[str, float]]:
    """``--adapter NAME[:SCALE]`` values as ``(name, scale)``; :class:`TuneInputError` names a bad one."""
    from service.contract import ADAPTER_NAME, ADAPTER_SCALE_RANGE

    out: list[tuple[str, float]] = []
    for spec in specs:
        name, _, scale_text = spec.partition(":")
        try:
            scale = float(scale_text) if scale_text else 1.0
        except ValueError:
            scale = math.nan
        lo, hi = ADAPTER_SCALE_RANGE
        if not ADAPTER_NAME.match(name) or not (math.isfinite(scale) and lo <= scale <= hi):
            raise TuneInputError(f"--adapter: {spec!r} is not NAME[:SCALE] (an adapter name, a scale in [{lo:g}, {hi:g}])")
        if name in {n for n, _ in out}:
            raise TuneInputError(f"--adapter: {name!r} is named twice")
        out.append((name, scale))
    return out


def _apply_adapters(pipe: Any, entry: Any, adapters: list[tuple[str, float]]) -> None:
    """Every image of every call the tuner makes runs with ``adapters`` (from the model's adapter store)."""
    from service.adapters.store import AdapterStore
    from service.adapters.files import fit_problem
    from service.settings import Settings
    from service.worker.runners.lora_slots import LoraBankSlots

    if len(adapters) > entry.adapters.max_per_request or not entry.serves_adapters:
        raise TuneInputError(f"--adapter: model {entry.name!r} takes at most "
                             f"{entry.adapters.max_per_request if entry.serves_adapters else 0} adapters")
    settings = Settings.from_env()
    store = AdapterStore(settings.adapters_dir, settings.adapter_max_bytes)
    try:
        bank = LoraBankSlots(pipe.transformer, entry, budget_mb=1e9)  # a tuning run: no serving budget
    except ValueError as exc:
        raise TuneInputError(f"--adapter: model {entry.name!r} serves no adapters ({exc})") from None
    known = [a.name for a in store.list(entry) if a.usable]
    for slot, (name, _) in enumerate(adapters, start=1):
        stored = store.get(entry, name)
        if stored is None:
            raise TuneInputError(f"--adapter: model {entry.name!r} has no adapter {name!r}; its adapters: "
                                 f"{', '.join(known) or 'none'} (CLUSCA_ADAPTERS_DIR)")
        problem = stored.problem or fit_problem(stored.info, bank.shapes, entry.adapters.max_rank)
        if problem is None:
            try:
                bank.load(slot, stored.path, name, store.max_bytes)
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            raise TuneInputError(f"--adapter: adapter {name!r} cannot be used: {problem}")
    # One image's adapters select them for every row of every call (rows map to images modulo 1).
    bank.select([[(slot, scale) for slot, (_, scale) in enumerate(adapters, start=1)]])


def tune_model(model: str = "shapes", *, minutes: float, out: str | os.PathLike, prompts: str | os.PathLike | None = None,
               seeds: int = 1, device: str | None = None, resume: bool = False, models_file: str | None = None,
               max_cache_mb: float | None = None, batch: int | None = None, adapters: Sequence[str] = (),
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Tune ``model`` (a registry name) for ``minutes`` and write ``out`` and its side files.

    ``models_file`` is the registry (default: ``CLUSCA_MODELS``, else only the built-in model).
    ``adapters`` (``NAME[:SCALE]``, from the model's adapter store) run on every image: the presets
    are then tuned for the model with them, and the models file says so.
    Returns the paths written, the tuned presets and their measured numbers.
    """
    from clusca.tune import TuneError

    # ---- every check that needs no model first: a bad call writes nothing
    if not isinstance(minutes, (int, float)) or not minutes > 0 or math.isinf(minutes):
        raise TuneInputError(f"--minutes: must be more than 0, got {minutes!r}")
    if not isinstance(seeds, int) or seeds < 1:
        raise TuneInputError(f"--seeds: must be at least 1, got {seeds!r}")
    if max_cache_mb is not None and not max_cache_mb > 0:
        raise TuneInputError(f"--max-cache-mb: must be more than 0, got {max_cache_mb!r}")
    if batch is not None and batch < 1:
        raise TuneInputError(f"--batch: must be at least 1, got {batch!r}")
    out = Path(out)
    _check_out(out)
    adapter_list = parse_adapters(adapters)
    measurements, plot = side_files(out)
    prompt_list = read_prompts(prompts) if prompts is not None else None
    if models_file is None:
        models_file = os.environ.get("CLUSCA_MODELS") or None
    try:
        reg = Registry.load(models_file)
    except RegistryError as exc:
        raise TuneInputError(str(exc)) from None
    entry = reg.get(model)
    if entry is None:
        raise TuneInputError(f"unknown model {model!r}; the registry has {', '.join(reg.names)}")
    if entry.kind == "noop":
        raise TuneInputError(f"model {model!r} (kind noop) computes nothing: there is nothing to tune")
    if measurements.exists() and not resume:
        try:
            earlier = json.loads(measurements.read_text())
        except (OSError, ValueError):
            earlier = {}
        if not earlier.get("complete", True):
            raise TuneInputError(f"--out: {measurements} holds partial results of an earlier run; "
                                 "pass --resume to continue them, or remove the file")

    # ---- the model and its prompts
    checker = None
    if prompt_list is None and entry.kind == "builtin":
        from clusca_shapes.evaluation import evaluation_prompts

        prompt_list, follows = evaluation_prompts(BUILTIN_PROMPTS)
        source = f"the built-in evaluation set ({len(prompt_list)} prompts)"

        def checker(images: Any, idx: Sequence[int]) -> list[bool]:
            return [follows(img, i // seeds) for img, i in zip(images, idx)]
    elif prompt_list is None:
        prompt_list = list(DEFAULT_PROMPTS)
        source = f"the default prompts ({len(prompt_list)})"
    else:
        source = f"{Path(prompts).name} ({len(prompt_list)} prompts)"
    digest = hashlib.sha256("\n".join(prompt_list).encode()).hexdigest()
    pipe, dev = _load_pipeline(entry, device)
    if adapter_list:
        _apply_adapters(pipe, entry, adapter_list)

    import clusca.tune as ct
    import diffusers
    import torch

    d = entry.defaults
    frames = d.num_frames if entry.output == "video" else None
    meta = {"model": entry.name, "prompts_source": source, "prompts_sha256": digest, "seeds": seeds,
            "steps": d.steps, "width": d.width, "height": d.height, "guidance": d.guidance,
            "device": ct.describe_device(dev), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "minutes": minutes,
            **({"adapters": [{"name": n, "scale": sc} for n, sc in adapter_list]} if adapter_list else {})}
    try:
        res = ct.tune(pipe, prompt_list, minutes=minutes, seeds=seeds, steps=d.steps, guidance=d.guidance,
                      height=d.height, width=d.width, call_kwargs=entry.options.get("call_kwargs") or {},
                      journal=measurements, resume=resume, checker=checker, baseline=d.cache_presets,
                      memory_cap_bytes=int(max_cache_mb * 2**20) if max_cache_mb else None, meta=meta,
                      batch=batch or (16 if entry.kind == "builtin" else 1), progress=progress, num_frames=frames)
    except TuneError as exc:
        raise TuneInputError(str(exc)) from None
    if not res.picks:
        raise TuneInputError("no setting met the conditions (is --max-cache-mb below every setting's cache?)")

    # ---- the models file: this entry with the tuned presets and where they came from
    summary = res.summary()
    finished = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    source_info = {
        "tool": "clusca tune", "date": finished, "device": meta["device"], "prompts": source,
        "prompts_sha256": digest, "seeds": seeds, "images": res.meta.get("final_prompts"),
        "steps": d.steps, "size": f"{d.width}x{d.height}", "minutes": minutes,
        **({"num_frames": frames, "quality": "PSNR and SSIM per frame, averaged"} if frames else {}),
        "rule": "per preset, the highest PSNR at least as fast as the library's preset of that name "
                "and 1.1x the tuned preset before it",
        "clock": res.meta.get("clock", "wall"),
        "measurements": measurements.name,
        "measured": {n: {k: v for k, v in row.items() if k != "label"} for n, row in summary["picks"].items()},
    }
    if max_cache_mb:
        source_info["max_cache_mb"] = max_cache_mb
    if adapter_list:
        source_info["adapters"] = meta["adapters"]
    item = entry.model_dump(mode="json", exclude_none=True)
    item["defaults"]["cache_presets"] = res.presets
    item["defaults"]["cache_presets_source"] = source_info
    doc = {"models": [item]}
    if out.suffix.lower() == ".json":
        text = json.dumps(doc, indent=2) + "\n"
    else:
        import yaml

        text = ("# Written by `clusca tune` on " + finished + "; serve with CLUSCA_MODELS=" + out.name
                + " clusca serve\n" + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))

    def accepted(tmp: Path) -> None:  # the registry must take the file as it is written
        Registry.load(tmp)

    what = f"videos of {frames} frames" if frames else "images"
    res.plot(plot, title=f"clusca tune {entry.name} on {meta['device']}: PSNR vs speedup "
                         f"({res.meta.get('final_prompts')} {what})")
    from clusca.tune.journal import write_whole

    write_whole(out, text.encode(), check=accepted)
    return {"out": str(out), "measurements": str(measurements), "plot": str(plot), "presets": res.presets,
            "summary": summary, "device": dev, "complete": res.meta.get("all_rungs"),
            "clock": res.meta.get("clock", "wall")}


def cmd_tune(args: Any) -> None:
    """The ``clusca tune`` command (see :func:`tune_model`)."""
    try:
        result = tune_model(args.model, minutes=args.minutes, out=args.out or f"{args.model}-tuned.yaml",
                            prompts=args.prompts, seeds=args.seeds, device=args.device, resume=args.resume,
                            max_cache_mb=args.max_cache_mb, batch=args.batch, adapters=args.adapter or ())
    except TuneInputError as exc:
        raise SystemExit(f"clusca tune: {exc}") from None
    except KeyboardInterrupt:
        out = Path(args.out or f"{args.model}-tuned.yaml")
        raise SystemExit(f"clusca tune: interrupted; the measurements so far are in {side_files(out)[0]}; "
                         "run the same command with --resume to continue") from None
    clock = result.get("clock", "wall")
    lines = [f"wrote {result['out']} (serve it: CLUSCA_MODELS={result['out']} clusca serve)",
             f"      {result['measurements']}", f"      {result['plot']}"]
    for name, row in result["summary"]["picks"].items():
        lib = result["summary"]["library"].get(name, {})
        lines.append(f"{name:<9} {row['label']:<36} {row['psnr']:6.2f} dB  {row['wall_speedup']:.2f}x {clock}"
                     f"   (library {name}: {lib.get('psnr', float('nan')):6.2f} dB  "
                     f"{lib.get('wall_speedup') or float('nan'):.2f}x)")
    print("\n".join(lines))


def add_parser(sub: Any) -> None:
    """Register ``clusca tune`` on the CLI's subcommand parsers."""
    tp = sub.add_parser("tune", help="find the cache settings a model tolerates on this device; writes a models file")
    tp.add_argument("model", nargs="?", default="shapes", help="registry name (default: shapes; see CLUSCA_MODELS)")
    tp.add_argument("--minutes", type=float, default=10.0, help="time budget of the search (default 10)")
    tp.add_argument("--out", help="models file to write, .yaml or .json (default: MODEL-tuned.yaml)")
    tp.add_argument("--prompts", help="prompts file: one per line, or a JSON list (default: the model's own set)")
    tp.add_argument("--seeds", type=int, default=1, help="seeds per prompt (default 1)")
    tp.add_argument("--device", help="cpu, cuda, cuda:N (default: the entry's device, else CLUSCA_DEVICE, else auto)")
    tp.add_argument("--resume", action="store_true", help="continue from the measurements file of an earlier run")
    tp.add_argument("--max-cache-mb", type=float, dest="max_cache_mb", help="only settings whose cache fits")
    tp.add_argument("--batch", type=int, help="images per call in the quality runs (default: 16 built-in, else 1)")
    tp.add_argument("--adapter", action="append", metavar="NAME[:SCALE]",
                    help="tune with this LoRA adapter of the model on every image (repeatable; CLUSCA_ADAPTERS_DIR)")
    tp.set_defaults(fn=cmd_tune)
