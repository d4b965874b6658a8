"""Unpaired translator training: VSAIT, and the CUT-family DECENT and UNSB, in one loop.

    from rtkit.train.translator import TranslatorConfig, train_translator
    cfg = TranslatorConfig(method="vsait", source="DigiFace1M", target="FFHQ",
                           feature_weights="vgg19-dcbb9e9d.pth", crop_size=112)
    summary = train_translator(cfg, "runs/vsait")
    # or a tiny CPU recipe: TranslatorConfig.from_preset("decent", "renders", "photos", "tiny")

(or ``rt-train translator --method vsait --source DIR --target DIR --out DIR``).

What varies per method lives in a strategy object (rtkit.train.translator_method; the methods
are train/vsait.py, train/decent.py, train/unsb.py, each with its losses). Everything else is
here: unpaired data (train/unpaired.py), precision, checkpoints, logs, samples, the held-out
style gap and the best weights.

Randomness inside a step (UNSB noise and time, patch positions) comes from torch's generator,
reseeded from (seed, rank, step) before every step, so a resumed run repeats the uninterrupted
one exactly (same losses, same weights) whatever was drawn before the interruption.

Output folder:

    config.json                  the run's configuration (TranslatorConfig)
    log.csv                      losses, learning rates, img/s, and every val_every steps the style
                                 gap of the held-out set (val_style_gap; val_style_gap_source is the
                                 untranslated gap, val_content_corr the content kept)
    samples/step_000001000.png   fixed source crops | their translations
    checkpoints/step_*.pt/.json  exact-resume state (all networks, optimisers, schedulers,
                                 grad scalers, RNG, step, best gap) and the config beside it
    weights/                     the generator in the format rtkit.engines.create and rt-export load,
                                 each with its engine card (rt-convert --engine FILE works):
                                   VSAIT: step=N.ckpt, last.ckpt and best.ckpt (Lightning layout:
                                          state_dict with model.g_net.*, model.d_net.*,
                                          model.g_net_map.*, model.lsh_feat.*, model.feature_extractor.*)
                                   DECENT/UNSB: N_net_G.pth, latest_net_G.pth and best_net_G.pth
                                 "best" holds the step with the lowest held-out style gap whose
                                 content correlation is at least best_min_content
    skipped_images.txt           files that failed to decode (never trained on), if any

Precision: bf16 autocast on GPUs that have it, else fp16 with one gradient scaler per
optimiser; fp32 on CPU. Loss pieces that are not fp16-safe (LSH cosines, flow log-densities,
energies) run in float32.

Several GPUs: under torchrun (``WORLD_SIZE > 1``) every process trains on its own slice of the
data and gradients are averaged over processes before each optimiser step. The networks are
not wrapped in DistributedDataParallel: a step runs each network several times (real, fake,
identity and flow passes) before a backward, which DDP's reducer does not follow; averaging
after backward gives the same synchronous update. The batch size is per process.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch

from rtkit.engines.errors import RtkitError
from rtkit.eval.quality import content_correlation, style_distance
from rtkit.train import decent, unsb, vsait  # noqa: F401  (registers the methods)
from rtkit.train.checkpointing import (CheckpointDir, atomic_torch_save, capture_rng_state,
                                       load_training_state, resolve_resume, restore_rng_state,
                                       seed_everything, write_json_atomic)
from rtkit.train.decent import DecentOptions
from rtkit.train.distributed import DistContext, init_distributed
from rtkit.train.images import SKIPPED_NAME, SkipReport, to_model_input
from rtkit.train.logging import MetricLogger, RateMeter
from rtkit.train.precision import resolve_precision
from rtkit.train.translator_config import RESUME_FIXED, TranslatorConfig, coerce_options
from rtkit.train.translator_method import (METHODS, TranslatorMethod, method_names, register_method,
                                           write_card_for)
from rtkit.train.unpaired import (ImageDomain, UnpairedCrops, center_crops, decode_worker_init,
                                  seed_int)
from rtkit.train.unsb import UNSBOptions
from rtkit.train.vsait import VSAITOptions

Log = Callable[[str], None]


class TranslatorTrainer:
    """Builds data and the method from a config; ``fit()`` trains to ``cfg.steps``.

    ``resume``: None (a fresh run; refused if ``out_dir`` already has checkpoints), "latest"
    (the newest checkpoint in ``out_dir``), a checkpoint file, or another run's folder.
    """

    def __init__(self, cfg: TranslatorConfig, out_dir: str | Path, *, resume: str | Path | None = None,
                 ctx: DistContext | None = None, log: Log = print):
        if cfg.method not in METHODS:
            raise RtkitError(f"unknown translator method {cfg.method!r}; choose from {', '.join(method_names())}")
        for name in ("steps", "batch_size", "num_samples", "val_count"):
            if getattr(cfg, name) < 1:
                raise RtkitError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.crop_size < 16 or cfg.crop_size % 4:
            raise RtkitError(f"crop size must be a multiple of 4 and at least 16, got {cfg.crop_size}")
        if cfg.load_size is not None and cfg.load_size < cfg.crop_size:
            raise RtkitError(f"load size {cfg.load_size} is smaller than the crop size {cfg.crop_size}")
        if (cfg.val_source is None) != (cfg.val_target is None):
            raise RtkitError("give both --val-source and --val-target (a held-out set of each domain), or neither")
        self.out_dir = Path(out_dir)
        self.ctx = ctx or init_distributed(cfg.device)
        self._log_fn = log
        method_cls = METHODS[cfg.method]
        self.opts = coerce_options(method_cls.Options, cfg.options, cfg.method)
        # the recorded config lists every option, defaults included (the caller's is left as is)
        cfg = self.cfg = dataclasses.replace(cfg, options=asdict(self.opts))
        self.ckpts = CheckpointDir(self.out_dir / "checkpoints", keep=cfg.keep)
        self.weights_dir = self.out_dir / "weights"
        resume_path = resolve_resume(self.ckpts, self.out_dir, resume)
        resume_state = load_training_state(resume_path) if resume_path is not None else None
        if resume_state is not None:
            self._check_resumable(resume_state, resume_path)

        self.skipped = SkipReport(self.out_dir / SKIPPED_NAME)
        if resume_state is None and self.ctx.is_main:
            self.skipped.reset()
        self.source = ImageDomain(cfg.source, "source")
        self.target = ImageDomain(cfg.target, "target")
        self.dtype = resolve_precision(cfg.precision, self.ctx.device)
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.method: TranslatorMethod = method_cls(cfg, self.opts, self.ctx, self.dtype)
        self.spec = self.method.spec
        if self.ctx.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.step = 0
        self.best: dict[str, float] = {}
        if resume_state is not None:
            self.method.load_state_dict(resume_state["method"])
            restore_rng_state(resume_state["rng"])
            self.step = int(resume_state["step"])
            self.best = dict(resume_state.get("best") or {})
            self._log(f"resumed from {resume_path} at step {self.step}")
        self.logger = MetricLogger(self.out_dir, enabled=self.ctx.is_main, tensorboard=cfg.tensorboard,
                                   resume_step=self.step if resume_state is not None else None)
        self.samples = None
        if self.ctx.is_main:
            write_json_atomic(self.cfg.to_dict(), self.out_dir / "config.json")
            self.samples = center_crops(self.source, cfg.num_samples, cfg.crop_size, cfg.seed, skipped=self.skipped)
            self._load_val_sets()

    # -- setup helpers
    def _log(self, msg: str):
        if self.ctx.is_main and self._log_fn is not None:
            self._log_fn(msg)

    def _load_val_sets(self):
        """The held-out frames (or, without val folders, fixed crops of the training folders)."""
        cfg = self.cfg
        held_out = cfg.val_source is not None
        src = ImageDomain(cfg.val_source, "held-out source") if held_out else self.source
        tgt = ImageDomain(cfg.val_target, "held-out target") if held_out else self.target
        self.val_source = center_crops(src, cfg.val_count, cfg.crop_size, cfg.seed, stream=9, skipped=self.skipped)
        self.val_target = center_crops(tgt, cfg.val_count, cfg.crop_size, cfg.seed, stream=8, skipped=self.skipped)
        self.val_held_out = held_out
        self.val_gap_source = style_distance(self.val_source, self.val_target)

    def _check_resumable(self, state: dict, path: Path):
        saved = TranslatorConfig.from_dict(state.get("config", {}))
        saved_opts = coerce_options(METHODS[saved.method].Options, saved.options, saved.method) \
            if saved.method in METHODS else None
        mine = dict(self.cfg.to_dict(), options=asdict(self.opts))
        theirs = dict(saved.to_dict(), options=asdict(saved_opts) if saved_opts else saved.options)
        diffs = [f"{k}: {theirs[k]!r} -> {mine[k]!r}" for k in RESUME_FIXED if theirs.get(k) != mine.get(k)]
        if diffs:
            raise RtkitError(f"cannot resume {path}: the run differs from the checkpoint ({'; '.join(diffs)})")
        if int(state.get("world_size", 1)) != self.ctx.world_size:
            self._log(f"note: resuming a {state.get('world_size')}-process run on {self.ctx.world_size}; "
                      f"the data order continues differently")

    # -- translation, samples, the held-out gap
    @torch.no_grad()
    def translate_frames(self, frames: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """uint8 NHWC frames -> their translations as uint8 NHWC frames (networks in eval mode)."""
        from rtkit.runtime.gpu_image import to_uint8_nhwc

        nets = list(self.method.nets.values()) + [self.method.model]
        modes = [m.training for m in nets]
        for m in nets:
            m.eval()
        try:
            outs = []
            for i in range(0, len(frames), batch):
                x = to_model_input(frames[i:i + batch], self.spec, self.ctx.device)
                with self.method.autocast():
                    y = self.method.translate(x)
                outs.append(to_uint8_nhwc(y.float(), self.spec).cpu())
            return torch.cat(outs)
        finally:
            for m, mode in zip(nets, modes):
                m.train(mode)

    def write_samples(self) -> Path | None:
        """samples/step_N.png: the fixed source crops beside their translations."""
        if not self.ctx.is_main:
            return None
        path = self.out_dir / "samples" / f"step_{self.step:09d}.png"
        return write_sample_grid(self.samples, self.translate_frames(self.samples), path)

    def evaluate(self) -> dict[str, float]:
        """The style gap of the translated held-out source to the held-out target (main rank)."""
        if not self.ctx.is_main:
            return {}
        out = self.translate_frames(self.val_source)
        return {"val_style_gap": style_distance(out, self.val_target),
                "val_style_gap_source": self.val_gap_source,
                "val_content_corr": float(content_correlation(self.val_source, out).mean())}

    # -- checkpoints, weights
    def training_block(self, metrics: dict | None = None) -> dict:
        """The card's training block: config, step, data, and the held-out figures."""
        return {"method": self.cfg.method, "step": self.step, "config": self.cfg.to_dict(),
                "data": {"source": str(self.cfg.source), "target": str(self.cfg.target),
                         "source_images": len(self.source), "target_images": len(self.target),
                         "val_source": self.cfg.val_source, "val_target": self.cfg.val_target},
                "metrics": {k: v for k, v in (metrics or {}).items() if k.startswith("val_")}}

    def save_checkpoint(self, metrics: dict[str, float]) -> Path | None:
        if not self.ctx.is_main:
            return None
        state = {"step": self.step, "method": self.method.state_dict(), "config": self.cfg.to_dict(),
                 "world_size": self.ctx.world_size, "rng": capture_rng_state(), "best": dict(self.best)}
        companion = {"step": self.step, "config": self.cfg.to_dict(), "metrics": metrics}
        path = self.ckpts.save(self.step, state, companions={".json": companion})
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        self.method.export_weights(self.weights_dir, self.step, self.training_block(metrics))
        self._prune_weights()
        return path

    def keep_if_best(self, val: dict[str, float]) -> bool:
        """Write the best weights when this evaluation has the lowest gap so far (content kept)."""
        if not self.ctx.is_main or not val:
            return False
        gap, corr = val["val_style_gap"], val["val_content_corr"]
        if corr < self.cfg.best_min_content or gap >= self.best.get("val_style_gap", math.inf):
            return False
        self.best = {"step": self.step, "val_style_gap": gap, "val_content_corr": corr}
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        path = atomic_torch_save(self.method.weights_object(self.step), self.weights_dir / self.method.best_file)
        write_card_for(path, self.method.card(path, self.training_block(val)))
        return True

    def _prune_weights(self):
        if self.cfg.keep <= 0:
            return
        found = []
        for p in self.weights_dir.iterdir():
            step = self.method.step_number(p.name)
            if step is not None:
                found.append((step, p))
        for _, p in sorted(found)[: -self.cfg.keep]:
            p.unlink(missing_ok=True)
            p.with_suffix(".json").unlink(missing_ok=True)

    # -- training
    def fit(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        start = self.step
        data = UnpairedCrops(self.source, self.target, batch_size=cfg.batch_size, crop_size=cfg.crop_size,
                             load_size=cfg.load_size, flip=cfg.flip, seed=cfg.seed, rank=ctx.rank,
                             world_size=ctx.world_size, second_source=self.method.uses_second_source,
                             steps=cfg.steps, skipped=self.skipped)
        summary: dict[str, Any] = {"method": cfg.method, "start_step": start, "steps": cfg.steps}
        if start >= cfg.steps:
            self._log(f"nothing to do: already at step {start} of {cfg.steps}")
            summary.update(self._finish({}, time.perf_counter(), 0))
            return summary
        # forkserver: forking the trainer after OpenCV's thread pool ran (the sample crops) can deadlock
        worker_kw = dict(prefetch_factor=4, worker_init_fn=decode_worker_init,
                         multiprocessing_context="forkserver") if cfg.workers > 0 else {}
        loader = torch.utils.data.DataLoader(
            data, batch_size=None, sampler=range(start, cfg.steps), num_workers=cfg.workers,
            pin_memory=ctx.device.type == "cuda", **worker_kw)
        held = "held-out" if ctx.is_main and self.val_held_out else "training-set"
        self._log(f"{cfg.method}: {len(self.source)} source / {len(self.target)} target images, "
                  f"steps {start} -> {cfg.steps}, batch {cfg.batch_size} x {ctx.world_size} process(es), "
                  f"crop {cfg.crop_size}, {self.dtype or 'fp32'} on {ctx.device}; {held} style gap "
                  f"every {cfg.val_every or cfg.steps} steps")
        meter = RateMeter(ctx.device)
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        first: dict[str, float] | None = None
        saved_at = -1
        for batch in loader:
            torch.manual_seed(seed_int(cfg.seed, ctx.rank, self.step))
            batch = {k: to_model_input(v, self.spec, ctx.device) for k, v in batch.items()}
            out = self.method.train_step(batch)
            self.method.step_schedulers()
            self.step += 1
            meter.add(cfg.batch_size * ctx.world_size)
            last = self.step == cfg.steps
            log_due = self.step % cfg.log_every == 0 or last
            sample_due = bool(cfg.sample_every) and (self.step % cfg.sample_every == 0 or last)
            val_due = (bool(cfg.val_every) and self.step % cfg.val_every == 0) or last
            if log_due or sample_due or val_due or first is None:
                metrics = {k: float(v) for k, v in out.items()}
                if not all(math.isfinite(v) for v in metrics.values()):
                    raise RtkitError(f"non-finite loss at step {self.step}: {metrics}; lower the learning "
                                     f"rates or use --precision fp32")
                first = first or dict(metrics)
            if sample_due:
                self.write_samples()
            val = self.evaluate() if val_due else {}
            if val:
                best = self.keep_if_best(val)
                self._log(f"step {self.step}/{cfg.steps}  style gap {val['val_style_gap']:.2f} (untranslated "
                          f"{val['val_style_gap_source']:.2f}), content {val['val_content_corr']:.3f}"
                          + ("  best" if best else ""))
            if log_due or val:
                row = dict(metrics, **self.method.learning_rates(), img_per_s=meter.rate(), **val)
                self.logger.log(self.step, **row)
                if log_due:
                    self._log(f"step {self.step}/{cfg.steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                              + f"  ({row['img_per_s']:.1f} img/s)")
            metrics.update(val)
            if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                self.save_checkpoint(metrics)
                saved_at = self.step
        if saved_at != self.step:
            self.save_checkpoint(metrics)
        summary.update(self._finish(metrics, t0, self.step - start))
        summary["first"] = first or {}
        return summary

    def _finish(self, metrics: dict, t0: float, steps_run: int) -> dict:
        seconds = time.perf_counter() - t0
        weights = sorted(p.name for p in self.weights_dir.glob("*")) if self.weights_dir.is_dir() else []
        best = self.weights_dir / self.method.best_file
        skipped = self.skipped.skipped() if self.ctx.is_main else {}
        summary = {"final_step": self.step, "seconds": seconds,
                   "img_per_s": steps_run * self.cfg.batch_size * self.ctx.world_size / seconds if seconds else 0.0,
                   "last": metrics, "weights": str(self.weights_dir / self.method.latest_file),
                   "best_weights": str(best) if best.is_file() else None, "best": dict(self.best),
                   "weight_files": weights, "skipped_images": sorted(skipped)}
        if skipped:
            self._log(f"skipped {len(skipped)} unreadable image(s), never trained on: listed in "
                      f"{self.out_dir / SKIPPED_NAME}")
        if self.ctx.is_main:
            write_json_atomic(summary, self.out_dir / "summary.json")
        self.logger.close()
        return summary


def write_sample_grid(sources: torch.Tensor, outputs: torch.Tensor, path: Path, pairs_per_row: int = 4) -> Path:
    """PNG grid of (source | translation) pairs of uint8 NHWC RGB frames, ``pairs_per_row`` a row."""
    a, b = np.asarray(sources), np.asarray(outputs)
    if b.shape[1:3] != a.shape[1:3]:
        b = np.stack([cv2.resize(x, (a.shape[2], a.shape[1])) for x in b])
    pairs = [np.concatenate([x, y], axis=1) for x, y in zip(a, b)]
    blank = np.zeros_like(pairs[0])
    rows = []
    for i in range(0, len(pairs), pairs_per_row):
        row = pairs[i:i + pairs_per_row]
        row += [blank] * (pairs_per_row - len(row)) if len(pairs) > pairs_per_row else []
        rows.append(np.concatenate(row, axis=1))
    grid = np.concatenate(rows, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", grid[..., ::-1])
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)
    return path


def train_translator(cfg: TranslatorConfig, out_dir: str | Path, *, resume: str | Path | None = None,
                     log: Log = print) -> dict:
    """Train (or resume) a translator; returns the summary (also in ``out_dir/summary.json``)."""
    ctx = init_distributed(cfg.device)
    try:
        trainer = TranslatorTrainer(cfg, out_dir, resume=resume, ctx=ctx, log=log)
        summary = trainer.fit()
        ctx.barrier()  # all ranks out of their last collective before the group is torn down
        return summary
    finally:
        ctx.close()


__all__ = ["TranslatorConfig", "TranslatorMethod", "register_method", "method_names", "METHODS",
           "VSAITOptions", "DecentOptions", "UNSBOptions", "ImageDomain", "UnpairedCrops", "center_crops",
           "TranslatorTrainer", "write_sample_grid", "train_translator", "init_distributed"]
