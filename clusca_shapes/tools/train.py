"""Train the built-in shapes model with rectified-flow matching.

    python -m clusca_shapes.tools.train --out DIR --minutes 80 --seed 0

Data are generated on the fly (see :mod:`clusca_shapes.tools.data`), so the only inputs are
the seed and the budget. Batch ``k`` is drawn from its own generator seeded ``(seed, k)``,
so the data do not depend on how many ``--data-workers`` processes draw them. ``--steps``
fixes the number of optimiser steps and makes a run exactly repeatable on one machine;
``--minutes`` stops at a wall-clock budget instead. On a GPU, drawing the scenes is the
bottleneck: give ``--data-workers`` (CPU processes) and a larger ``--batch``.
``--init DIR`` continues from an earlier checkpoint of the same architecture; words the
data now use but that checkpoint's vocabulary lacks start from its ``<unk>`` embedding.
A checkpoint of the EMA weights (safetensors + configs) is written to ``--out`` every
``--save-every`` minutes and at the end, so the run can be stopped at any time.

``--style`` draws the same scenes in one of the adapter styles (:mod:`clusca_shapes.tools.styles`).
``--lora-rank R`` trains a LoRA adapter instead of the model: the checkpoint of ``--init``
(default: the shipped weights) is frozen, rank-``R`` matrices on the ``--lora-targets``
linears learn the style, and ``--out`` receives a PEFT folder (``adapter_config.json`` +
``adapter_model.safetensors``, the EMA of the matrices) that :func:`clusca.lora.load_lora` reads::

    python -m clusca_shapes.tools.train --lora-rank 16 --style outline --out clusca_shapes/adapters/outline \
        --minutes 18 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch

from . import data, styles
from .lora_train import FLUX_TARGETS, LoraTrainer
from .. import WEIGHTS_DIR
from ..model import build_transformer, image_ids, pack, text_ids
from ..pipeline import ShapesFluxPipeline
from ..text import UNK, ShapesTextEncoder, WordTokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--minutes", type=float, default=80.0, help="wall-clock budget")
    p.add_argument("--steps", type=int, default=0, help="optimiser steps (overrides --minutes when > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--word-dropout", type=float, default=0.05, help="words replaced by <unk>")
    p.add_argument("--heads", type=int, default=6, help="attention heads of 32 channels")
    p.add_argument("--layers", type=int, default=2, help="dual-stream blocks")
    p.add_argument("--single-layers", type=int, default=2, help="single-stream blocks")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads; 0 = up to 2, dropping to 1 while other processes load the CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-workers", type=int, default=0, help="processes drawing batches (0 = in this process)")
    p.add_argument("--pair-fraction", type=float, default=0.3, help="share of two-object scenes in a relation")
    p.add_argument("--count-fraction", type=float, default=0.2, help="share of counts (two or three alike)")
    p.add_argument("--unplaced-fraction", type=float, default=0.3,
                   help="share of one-object captions without a position")
    p.add_argument("--t-mean", type=float, default=0.0,
                   help="location of the logit-normal timesteps; > 0 trains more at high noise, where layout is decided")
    p.add_argument("--init", default=None, help="checkpoint folder to continue from (same architecture)")
    p.add_argument("--style", default=None, choices=styles.STYLES, help="draw the scenes in this adapter style")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train a LoRA adapter of this rank on the frozen --init checkpoint (0: train the model)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank, a scale of 1)")
    p.add_argument("--lora-init", default=None, help="adapter folder (PEFT) the LoRA matrices start from")
    p.add_argument("--lora-targets", nargs="+", default=list(FLUX_TARGETS),
                   help="regular expressions naming the linears the adapter trains (full match)")
    a = p.parse_args(argv)
    if a.lora_rank < 0:
        p.error("--lora-rank must be >= 0")
    if a.lora_rank and not a.init:
        a.init = str(WEIGHTS_DIR)  # an adapter adapts a model: by default the shipped one
    if a.minutes <= 0 and a.steps <= 0:
        p.error("give a positive --minutes or --steps")
    fractions = (a.pair_fraction, a.count_fraction, a.unplaced_fraction)
    if min(fractions) < 0 or a.unplaced_fraction > 1 or a.pair_fraction + a.count_fraction > 1:
        p.error("--pair-fraction and --count-fraction must be >= 0 with a sum <= 1, "
                "--unplaced-fraction between 0 and 1")
    return a


def _drop_words(captions: list[str], rng: np.random.Generator, caption_p: float, word_p: float) -> list[str]:
    """Empty some captions (for classifier-free guidance) and blank out some words."""
    out = []
    for c in captions:
        if rng.random() < caption_p:
            out.append("")
            continue
        words = c.split()
        out.append(" ".join("qqunk" if rng.random() < word_p else w for w in words))
    return out


def draw_batch(seed: int, index: int, n: int, caption_p: float, word_p: float,
               mix: tuple[float, float, float], style: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Batch ``index`` of the run seeded ``seed``: the same in any process.

    ``mix`` is (pair, count, unplaced) fractions, as :func:`data.sample_scene` takes them;
    ``style`` draws the scenes in an adapter style (None: as the base model learnt them).
    """
    rng = np.random.default_rng([seed, index])
    pair, count, unplaced = mix
    images, captions, _ = styles.make_batch(rng, n, style, pair_fraction=pair, count_fraction=count,
                                            unplaced_fraction=unplaced)
    return images, _drop_words(captions, rng, caption_p, word_p)


class BatchStream:
    """Batches 0, 1, 2, ... in order, drawn here or by a pool of worker processes.

    A bounded number of batches is in flight, so a slow consumer never piles them up.
    Batch ``i`` depends on the seed and ``i`` only, so if a worker dies or stalls the
    stream draws the rest itself and the run sees exactly the same data.
    """

    def __init__(self, a: argparse.Namespace, timeout_s: float = 120.0) -> None:
        self._args = (a.seed, a.batch, a.caption_dropout, a.word_dropout,
                      (a.pair_fraction, a.count_fraction, a.unplaced_fraction), a.style)
        self._next = 0  # next batch index handed out
        self._timeout_s = timeout_s
        self._pool = None
        self._pending: collections.deque = collections.deque()  # futures of batches _next, _next + 1, ...
        if a.data_workers > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: the workers need numpy only, never the parent's CUDA context. An
            # executor, unlike multiprocessing.Pool, reports a dead worker instead of
            # leaving its task waiting forever.
            self._pool = ProcessPoolExecutor(a.data_workers, mp_context=multiprocessing.get_context("spawn"))
            for _ in range(3 * a.data_workers):
                self._submit()

    def _draw(self, index: int) -> tuple[np.ndarray, list[str]]:
        return draw_batch(self._args[0], index, *self._args[1:])

    def _submit(self) -> None:
        index = self._next + len(self._pending)
        self._pending.append(self._pool.submit(draw_batch, self._args[0], index, *self._args[1:]))

    def __next__(self) -> tuple[np.ndarray, list[str]]:
        index = self._next
        self._next += 1
        if self._pool is None:
            return self._draw(index)
        try:
            result = self._pending.popleft().result(timeout=self._timeout_s)
            self._submit()
        except Exception as exc:  # noqa: BLE001 - a dead, stalled or failing worker: same remedy
            print(f"data workers failed at batch {index} ({type(exc).__name__}: {exc}); "
                  "drawing batches in the trainer from now on", file=sys.stderr, flush=True)
            self.close()
            return self._draw(index)
        return result

    def close(self) -> None:
        if self._pool is not None:
            # Let the workers finish the batch in hand and exit; only one still alive after a
            # grace period (a stalled one) is terminated. Terminating a worker while it writes
            # a result would leave the executor's reader waiting for the rest of the message,
            # and the interpreter would then hang at exit joining that reader.
            workers = list((getattr(self._pool, "_processes", None) or {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            deadline = time.monotonic() + 5.0
            for w in workers:
                w.join(max(0.0, deadline - time.monotonic()))
            for w in workers:
                if w.is_alive():
                    w.terminate()
            self._pool = None
            self._pending.clear()


@torch.no_grad()
def _load_text_encoder(encoder, tokenizer, old_encoder, old_tokenizer) -> list[str]:
    """Copy ``old_encoder`` into ``encoder`` whose vocabulary may have grown.

    Word embeddings are matched by word, so a checkpoint trained on fewer words keeps what
    it learnt; words it never saw start from its ``<unk>`` embedding, which is what the
    old checkpoint made of them. Returns those new words.
    """
    old = old_encoder.state_dict()
    table = old.pop("embed.weight")
    missing, unexpected = encoder.load_state_dict(old, strict=False)
    if unexpected or set(missing) != {"embed.weight"}:
        raise ValueError(f"--init: text encoder of another architecture (missing {missing}, unexpected {unexpected})")
    new = []
    for i, word in enumerate(tokenizer.itos):
        j = old_tokenizer.stoi.get(word)
        if j is None:
            new.append(word)
            j = old_tokenizer.stoi[UNK]
        encoder.embed.weight[i] = table[j]
    return new


def sample_timesteps(n: int, mean: float, device=None) -> torch.Tensor:
    """Logit-normal timesteps in (0, 1), their median at ``sigmoid(mean)``.

    At ``mean`` 0 they concentrate training on the middle of the path. A positive mean
    moves the weight towards the noisy end, where which object goes where is decided: a
    model that has learnt to draw shapes but not to bind a colour to a place errs there.
    """
    return torch.sigmoid(torch.randn(n, device=device) + mean)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def _adapt_threads(current: int) -> int:
    """Use one thread while other processes keep a core busy.

    Two threads time-sliced on one free core wait for each other at every parallel
    region; measured here that made a step more than ten times slower, while one thread
    loses only about a third of the uncontended speed.
    """
    cores = os.cpu_count() or 1
    others = os.getloadavg()[0] - current
    wanted = 1 if others > cores - 1.25 else min(2, cores)
    if wanted != current:
        torch.set_num_threads(wanted)
        print(f"threads {current} -> {wanted} (load from other processes ~{others:.1f})", flush=True)
    return wanted


def _save(out: str, transformer, text_encoder, tokenizer, patch: int, cache_presets: dict | None = None) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = ShapesFluxPipeline(
        transformer, text_encoder, tokenizer,
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0), patch_size=patch,
    )
    if cache_presets:
        pipe.cache_presets = dict(cache_presets)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    # Swap in the finished folder so a reader never sees a half-written checkpoint.
    old = out.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out):
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    threads = a.threads or min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    torch.manual_seed(a.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    tokenizer = WordTokenizer(data.vocabulary(), max_length=16)
    text_encoder = ShapesTextEncoder(len(tokenizer), max_length=16)
    transformer = build_transformer(patch=a.patch, width_heads=a.heads, num_layers=a.layers,
                                    num_single_layers=a.single_layers)
    presets = None
    if a.init:
        start_from = ShapesFluxPipeline.from_pretrained(a.init)
        # The cache tuning of the starting point stays until `clusca tune` measures anew;
        # without it the service would fall back to the library's presets.
        presets = getattr(start_from, "cache_presets", None)
        transformer.load_state_dict(start_from.transformer.state_dict())
        new_words = _load_text_encoder(text_encoder, tokenizer, start_from.text_encoder, start_from.tokenizer)
        print(f"continuing from {a.init}" + (f"; words new to it: {' '.join(new_words)}" if new_words else ""),
              flush=True)
    transformer.to(device)
    text_encoder.to(device)
    lora, steps_before = None, 0
    if a.lora_rank:
        # The base stays frozen; only the adapter's matrices (and their EMA) train.
        for m in (transformer, text_encoder):
            m.requires_grad_(False).eval()
        lora = LoraTrainer(transformer, a.lora_rank, a.lora_alpha, a.lora_targets, seed=a.seed)
        if a.lora_init:
            lora.load(a.lora_init)
            with open(os.path.join(a.lora_init, "adapter_config.json")) as f:
                steps_before = int(json.load(f).get("steps", 0))
        params = lora.parameters()
        ema_lora = [p.detach().clone() for p in params]
        print(f"LoRA rank {a.lora_rank} on {len(lora.layers)} linears ({', '.join(lora.targets)}), "
              f"style {a.style or 'none'}", flush=True)
    else:
        ema_tr, ema_te = copy.deepcopy(transformer).eval(), copy.deepcopy(text_encoder).eval()
        params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.01,
                            fused=device.type == "cuda")
    batches = BatchStream(a)
    n_params = sum(p.numel() for p in params)
    print(f"device={device} params={n_params / 1e6:.2f}M batch={a.batch} seed={a.seed}", flush=True)

    def save() -> None:
        if lora is not None:
            lora.save(a.out, dict(zip(lora.state(), (t.float().cpu() for t in ema_lora))),
                      extra={"style": a.style, "steps": steps_before + step, "batch": a.batch})
        else:
            _save(a.out, ema_tr, ema_te, tokenizer, a.patch, presets)

    size = data.IMAGE_SIZE
    iid = image_ids(size, size, a.patch, device=device)
    tid = text_ids(tokenizer.max_length, device=device)
    start = last_save = time.time()
    budget = a.minutes * 60 if a.steps <= 0 else float("inf")
    step, loss_sum, loss_n = 0, torch.zeros((), device=device), 0
    while (a.steps > 0 and step < a.steps) or (a.steps <= 0 and time.time() - start < budget):
        images, captions = next(batches)
        x0 = pack(torch.from_numpy(images).permute(0, 3, 1, 2).to(device) * 2 - 1, a.patch)
        ids, mask = tokenizer(captions)
        with torch.set_grad_enabled(lora is None):
            seq, pooled = text_encoder(ids.to(device), mask.to(device))
        t = sample_timesteps(a.batch, a.t_mean, device)
        noise = torch.randn_like(x0)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        v = transformer(hidden_states=xt, encoder_hidden_states=seq, pooled_projections=pooled,
                        timestep=t, img_ids=iid, txt_ids=tid, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, noise - x0)
        frac = step / a.steps if a.steps > 0 else (time.time() - start) / budget
        # Linear warm-up, then cosine decay to 10% of the peak over the budget.
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # EMA ramps up so early checkpoints are not dominated by the random init.
        decay = min(a.ema, (1 + step) / (10 + step))
        if lora is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema_lora, params, 1.0 - decay)
        else:
            _ema_update(ema_tr, transformer, decay)
            _ema_update(ema_te, text_encoder, decay)
        step += 1
        if a.threads == 0 and device.type == "cpu" and step % 10 == 0:
            threads = _adapt_threads(threads)
        loss_sum += loss.detach()  # no .item() here: it would wait for the GPU every step
        loss_n += 1
        if step % a.log_every == 0:
            el = time.time() - start
            print(f"step {step} loss {loss_sum.item() / loss_n:.4f} lr {lr:.2e} "
                  f"{step * a.batch / el:.0f} img/s elapsed {el / 60:.1f} min", flush=True)
            loss_sum.zero_()
            loss_n = 0
        if time.time() - last_save > a.save_every * 60:
            save()
            last_save = time.time()
            print(f"saved {a.out} at step {step}", flush=True)
    batches.close()
    save()
    print(f"done: {step} steps in {(time.time() - start) / 60:.1f} min, saved {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
