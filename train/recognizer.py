"""Face recognizer training: an IResNet / AdaFace IR backbone with an AdaFace, ArcFace or CosFace head.

    from rtkit.train.recognizer import RecognizerConfig, train_recognizer
    cfg = RecognizerConfig(data=["DigiFace1M"], val_bins=["lfw.bin"])   # the paper recipe
    summary = train_recognizer(cfg, "runs/digiface_adaface")

The defaults are the AdaFace IR-50 recipe of the source paper (idiap face_synthetics): batch
256 on one GPU, 30 epochs, SGD lr 0.1 momentum 0.9, weight decay 5e-4 (not on normalisation
parameters or biases), learning rate x0.1 at epochs 12, 20 and 26, 16-bit mixed precision,
AdaFace head m 0.4 h 0.333 s 64, crop / low-res / photometric augmentation (p 0.2 each) and
flips. ``precision="auto"`` picks bf16 on GPUs that have it; ``"fp16"`` (with loss scaling)
is the paper's exact setting. ``scheduler="poly"`` with ``warmup_epochs`` and
``clip_grad_norm=5`` give arcface_torch's recipe instead. AdaFace's own code also decays
Linear biases; here no bias is decayed.

One process trains on one device; under torchrun (``WORLD_SIZE > 1``) every process joins a
process group, backbone and head are wrapped together in DistributedDataParallel, and each
rank reads its own shard of every epoch. ``batch_size`` is per process.

Output folder:

- ``config.json``: the run (this config, dataset summary); ``classes.txt``: label -> identity;
- ``checkpoints/step_XXXXXXXXX.pt``: full training state (backbone, head, optimiser,
  scheduler, grad scaler, RNG states of every rank, step) for exact resume, written every
  epoch and every ``save_every_steps``; beside it the backbone in its official format
  (``.pth`` plain state_dict for IResNet, ``.ckpt`` Lightning ``{'state_dict': {'model.*',
  'head.*'}}`` for AdaFace) and its engine card (``.json``);
- ``model.pth|.ckpt`` + ``model.json``: the final backbone and its engine card;
- ``log.csv`` (and ``tensorboard/`` if installed): loss, accuracy (argmax of the margin-free
  cosines: the class the embedding is nearest to), lr, img/s, verification;
- ``skipped_images.txt``: training files that did not decode (never trained on), if any.

The engine card (rtkit.engines.card; ``weights`` names the file, ``layout`` its layout, the spec
has the trained input size, ``training`` holds the config, step, epoch, head and class count)
lets ``rtkit.runtime.open_engine("runs/r/model.ckpt")``, ``rt-eval verify --engine
runs/r/model.ckpt`` and ``rt-export`` open the backbone by its path, and
``load_trained_recognizer(path)`` rebuild it as a torch module (older ``rtkit-recognizer-v1``
model cards load too).

``max_steps`` shortens the run and its schedule with it: milestones, warm-up and the poly decay
fall at the same fractions of the steps trained as they would of ``epochs`` (a 30-epoch schedule
is not left hanging over a 1000-step run).
"""
from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rtkit.engines.errors import RtkitError
from rtkit.engines.spec import ModelSpec
from rtkit.train.checkpointing import (CheckpointDir, atomic_torch_save, capture_rng_state,
                                       load_training_state, resolve_resume, restore_rng_state,
                                       seed_everything, write_json_atomic)
from rtkit.train.data import AugmentConfig, EpochSampler, FaceFolderDataset, index_face_folders, make_loader
from rtkit.train.distributed import DistContext, init_distributed
from rtkit.train.heads import MarginHead, build_head, split_norm
from rtkit.train.images import SKIPPED_NAME, SkipReport, to_model_input
from rtkit.train.logging import MetricLogger, RateMeter
from rtkit.train.optim import StepSchedule, decay_parameter_groups
from rtkit.train.precision import autocast, make_grad_scaler, resolve_precision

STATE_FORMAT = "rtkit-recognizer-train-v1"


# -- configuration --------------------------------------------------------------------------------

@dataclass
class RecognizerConfig:
    """Everything that defines a recognizer training run (saved as JSON beside each checkpoint)."""

    # data
    data: list[str] = field(default_factory=list)       # dataset roots, <root>/<identity>/<k>.png
    same_identities: bool = False                       # same folder name = same class in every root
    image_size: int = 112
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    workers: int = 8                                    # DataLoader decode processes per rank
    # model
    backbone: str = "adaface_ir50"                      # a registered embed model
    backbone_overrides: dict = field(default_factory=dict)
    backbone_checkpoint: str | None = None              # start from these weights (fine-tuning)
    head: str = "adaface"                               # adaface, arcface, cosface, combined
    head_kwargs: dict = field(default_factory=dict)     # m, h, s, t_alpha / s, margin
    # optimisation
    epochs: int = 30
    batch_size: int = 256                               # per process
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "multistep"                        # multistep | poly
    milestones: tuple[float, ...] = (12, 20, 26)        # epochs (multistep)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    poly_power: float = 2.0
    clip_grad_norm: float | None = None                 # backbone gradient norm (arcface_torch: 5)
    precision: str = "auto"                             # auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16, fp16
    channels_last: bool = True                          # on CUDA only
    seed: int = 0
    device: str = "auto"
    max_steps: int | None = None                        # stop early; the schedule is scaled to the shorter run
    # checkpoints, logs, verification
    save_every_steps: int = 0                           # 0: at the end of every epoch only
    keep_checkpoints: int = 3                           # 0 keeps all
    log_every_steps: int = 50
    val_bins: list[str] = field(default_factory=list)   # insightface .bin files
    val_every_steps: int = 0                            # 0: at the end of every epoch
    val_batch_size: int = 256
    progress: bool = True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RecognizerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RtkitError(f"unknown recognizer config keys: {', '.join(unknown)}")
        d = dict(d)
        if isinstance(d.get("augment"), dict):
            aug = dict(d["augment"])
            for k in ("crop_scale", "crop_ratio", "low_res_side"):
                if k in aug:
                    aug[k] = tuple(aug[k])
            d["augment"] = AugmentConfig(**aug)
        if "milestones" in d:
            d["milestones"] = tuple(d["milestones"])
        return cls(**d)

    def check(self):
        """One-line errors for settings the backbones cannot take."""
        if self.image_size < 16 or self.image_size % 16:
            raise RtkitError(f"image size must be a multiple of 16 (the IR backbones halve it four times), "
                             f"got {self.image_size}; e.g. {max(16, 16 * round(self.image_size / 16))}")
        if self.batch_size < 1 or self.epochs < 1:
            raise RtkitError(f"batch size and epochs must be >= 1 (got {self.batch_size}, {self.epochs})")

    def model_overrides(self) -> dict:
        """Builder overrides of the backbone, with the input size when it is not 112."""
        ov = dict(self.backbone_overrides)
        if self.image_size != 112:
            ov.setdefault("input_size", self.image_size)
        return ov


# Fields that must match between a checkpoint and the run resuming it.
_RESUME_MUST_MATCH = ("backbone", "head", "head_kwargs", "same_identities", "image_size", "batch_size")


# -- model: backbone + head as one module (one DDP wrapper) ---------------------------------------

class MarginModel(nn.Module):
    """``forward(images, labels) -> scaled logits``: backbone embedding into a margin head.

    AdaFace backbones return ``(unit embedding, norm)`` themselves (``return_norm=True``);
    for the others the raw embedding is split into direction and norm here.
    """

    def __init__(self, backbone: nn.Module, head: MarginHead):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.returns_norm = "return_norm" in inspect.signature(backbone.forward).parameters

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.returns_norm:
            return self.backbone(images, return_norm=True)
        return split_norm(self.backbone(images))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled margin logits for the loss, the nearest class centre of each embedding)."""
        unit, norms = self.embed(images)
        cosine = self.head.cosine(unit)
        nearest = cosine.detach().argmax(1)   # before the margin: combined heads edit cosines in place
        logits = self.head.margin_logits(cosine, norms if self.head.uses_norms else None, labels)
        return logits, nearest


# -- official-format export and model cards -------------------------------------------------------

def official_backbone_file(backbone: nn.Module, head: nn.Module, *, epoch: int = 0,
                           step: int = 0) -> tuple[dict, str, str]:
    """(object to torch.save, file suffix, layout name) in the backbone's published format.

    AdaFace IR: Lightning-style ``{'state_dict': {'model.*': backbone, 'head.*': head}}``
    (what AdaFace's own inference code and ``rtkit.engines.create`` read); every other
    backbone (IResNet): its plain state_dict, as arcface_torch's ``backbone.pth``.
    """
    from rtkit.engines.adaface import AdaFaceIR

    cpu = lambda sd: {k: v.detach().cpu().clone() for k, v in sd.items()}
    if isinstance(backbone, AdaFaceIR):
        sd = {f"model.{k}": v for k, v in cpu(backbone.state_dict()).items()}
        sd.update({f"head.{k}": v for k, v in cpu(head.state_dict()).items()})
        return {"state_dict": sd, "epoch": int(epoch), "global_step": int(step)}, ".ckpt", "lightning"
    return cpu(backbone.state_dict()), ".pth", "state_dict"


def trained_spec(backbone: nn.Module, image_size: int) -> ModelSpec:
    """The backbone's spec at the size it is trained at (what the runtime must feed it)."""
    return dataclasses.replace(backbone.spec, input_size=(int(image_size), int(image_size)))


def recognizer_card(cfg: RecognizerConfig, backbone: nn.Module, head: MarginHead, weights: Path | None,
                    layout: str | None, *, step: int, epoch: float, num_classes: int):
    """The engine card of a trained backbone: registry name, overrides, spec at the trained size,
    the weights file and layout, and the training block (config, step, epoch, head, classes)."""
    from rtkit.engines.card import card_for_module
    from rtkit.engines.checkpoint import file_sha256

    card = card_for_module(backbone, checkpoint_sha256=file_sha256(weights) if weights is not None else None,
                           weights=weights.name if weights is not None else None, layout=layout,
                           training={"config": cfg.to_dict(), "step": step, "epoch": epoch,
                                     "head": head.config(), "num_classes": num_classes},
                           trainer="rtkit.train.recognizer")
    card.spec = trained_spec(backbone, cfg.image_size)
    return card


def load_trained_recognizer(path: str | Path) -> nn.Module:
    """Rebuild a trained backbone from its card or weights file (``model.json``/``model.ckpt``,
    ``checkpoints/step_*.json``); reads the engine card and older recognizer model cards."""
    from rtkit.engines import create
    from rtkit.engines.card import card_path, read_card

    path = Path(path)
    if not path.is_file():
        raise RtkitError(f"trained recognizer not found: {path}")
    card = read_card(path)
    if card.task != "embed":
        raise RtkitError(f"{path} is a {card.task} model ({card.model}), not a recognizer")
    weights = path if path.suffix != ".json" else card_path(path).parent / (card.weights or "")
    if path.suffix == ".json" and not card.weights:
        raise RtkitError(f"{path} names no weights file")
    model = create(card.model, checkpoint=weights, **card.overrides)
    model.spec = card.spec   # the spec at the trained input size
    return model


# -- verification ---------------------------------------------------------------------------------

class BinVerifier:
    """Verification on insightface .bin files with the model being trained (main rank only),
    through rtkit.eval's embedding (image + flip, the model's input contract) and accuracy."""

    def __init__(self, paths: Sequence[str | Path], image_size: int):
        from rtkit.eval.verification import load_bin

        self.sets = [load_bin(p) for p in paths]
        self.image_size = image_size

    def __call__(self, backbone: nn.Module, device: torch.device, dtype, batch_size: int) -> dict[str, float]:
        """Accuracy (and std over folds) per benchmark. Runs in fp32: the runner casts the module
        to its precision, which must not touch the weights being trained."""
        from rtkit.engines.card import card_for_module
        from rtkit.eval.embed import Embedder
        from rtkit.eval.verification import embed_bin, fold_accuracy, fuse_flip
        from rtkit.runtime.runners import TorchRunner

        card = card_for_module(backbone)
        card.spec = trained_spec(backbone, self.image_size)
        was_training = backbone.training
        results = {}
        try:
            runner = TorchRunner(backbone, device=str(device), card=card, checkpoint_sha256="training")
            embedder = Embedder(runner, batch_size=batch_size, cache_dir=False, progress=False)
            for vset in self.sets:
                res = fold_accuracy(fuse_flip(embed_bin(embedder, vset)), vset.issame)
                results[f"val_{vset.name}"] = res.accuracy
                results[f"val_{vset.name}_std"] = res.std
        finally:
            backbone.train(was_training)
        return results


# -- training ----------------------------------------------------------------------------------

StepCallback = Callable[[int, dict], None]


class RecognizerTrainer:
    """Builds data, model, optimiser and schedule from a config; ``fit()`` trains.

    ``resume`` continues from a training checkpoint (a path, or "latest" in ``out_dir``).
    ``on_step(step, metrics)`` is called after every optimiser step with tensors (loss,
    accuracy) still on the device.
    """

    def __init__(self, cfg: RecognizerConfig, out_dir: str | Path, *, resume: str | Path | None = None,
                 ctx: DistContext | None = None, on_step: StepCallback | None = None, log=print):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.ctx = ctx or init_distributed(cfg.device)
        self.on_step = on_step
        self._log_fn = log
        dev = self.ctx.device
        cfg.check()

        self.ckpts = CheckpointDir(self.out_dir / "checkpoints", keep=cfg.keep_checkpoints)
        resume_path = self._resume_path(resume)

        # Same initial weights in every rank (DDP also broadcasts rank 0's at wrap time).
        seed_everything(cfg.seed)
        from rtkit.engines import create

        backbone = create(cfg.backbone, checkpoint=cfg.backbone_checkpoint, pretrained=False,
                          **cfg.model_overrides()).train()
        spec = backbone.spec
        if spec.task != "embed":
            raise RtkitError(f"{cfg.backbone} is a {spec.task} model, not a recognizer backbone")
        self.spec = trained_spec(backbone, cfg.image_size)

        self.skipped = SkipReport(self.out_dir / SKIPPED_NAME)
        if resume_path is None and self.ctx.is_main:
            self.skipped.reset()
        self.index = index_face_folders(cfg.data, cfg.same_identities)
        self.dataset = FaceFolderDataset(self.index, input_size=(cfg.image_size, cfg.image_size),
                                         augment=cfg.augment, seed=cfg.seed, skipped=self.skipped)
        self.sampler = EpochSampler(self.dataset, num_replicas=self.ctx.world_size, rank=self.ctx.rank,
                                    seed=cfg.seed)
        self.steps_per_epoch = self.sampler.num_samples // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise RtkitError(f"batch size {cfg.batch_size} is larger than the {self.sampler.num_samples} "
                             f"images each of {self.ctx.world_size} process(es) gets per epoch")
        self.loader = make_loader(self.dataset, self.sampler, cfg.batch_size, workers=cfg.workers,
                                  pin_memory=dev.type == "cuda")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps
        # the schedule spans the steps trained: a shortened run compresses its epochs
        self.schedule_epoch = self.stop_step / cfg.epochs

        head = build_head(cfg.head, spec.output_dim, self.index.num_classes, **cfg.head_kwargs)
        self.model = MarginModel(backbone, head).to(dev)
        self.memory_format = (torch.channels_last if cfg.channels_last and dev.type == "cuda"
                              else torch.contiguous_format)
        self.model.to(memory_format=self.memory_format)
        self.ddp = self.ctx.wrap(self.model)

        self.optimizer = torch.optim.SGD(decay_parameter_groups([backbone, head], cfg.weight_decay),
                                         lr=cfg.lr, momentum=cfg.momentum)
        self.schedule = StepSchedule(cfg.scheduler, self.schedule_epoch, self.stop_step,
                                     milestones=tuple(cfg.milestones), gamma=cfg.gamma,
                                     warmup_steps=int(round(cfg.warmup_epochs * self.schedule_epoch)),
                                     power=cfg.poly_power)
        # A closure, not the schedule object: LambdaLR would save the object's fields and a
        # resumed run would then ignore a changed config.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: self.schedule(s))
        self.dtype = resolve_precision(cfg.precision, dev)
        self.scaler = make_grad_scaler(dev, self.dtype)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.step = 0
        self.verifier = None
        if cfg.val_bins and self.ctx.is_main:
            self.verifier = BinVerifier(cfg.val_bins, cfg.image_size)

        if resume_path is not None:
            self.load_state(resume_path)
        else:
            # Per-rank streams (dropout) from here on; restored from the checkpoint on resume.
            seed_everything(cfg.seed + 1_000_003 * self.ctx.rank)
        self.logger = MetricLogger(self.out_dir, enabled=self.ctx.is_main,
                                   resume_step=self.step if resume_path is not None else None)
        if self.ctx.is_main:
            self._write_run_files()

    # -- setup helpers
    def _resume_path(self, resume) -> Path | None:
        return resolve_resume(self.ckpts, self.out_dir, resume)

    def _write_run_files(self):
        summary = {"images": len(self.index), "classes": self.index.num_classes, "roots": self.index.roots,
                   "steps_per_epoch": self.steps_per_epoch, "world_size": self.ctx.world_size,
                   "global_batch": self.cfg.batch_size * self.ctx.world_size}
        from rtkit.engines.card import build_info

        write_json_atomic({"config": self.cfg.to_dict(), "dataset": summary, "built_with": build_info()},
                          self.out_dir / "config.json")
        lines = [f"{label}\t{name}" for label, name in enumerate(self.index.class_names)]
        (self.out_dir / "classes.txt").write_text("\n".join(lines) + "\n")

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    @property
    def head(self) -> MarginHead:
        return self.model.head

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    def _log(self, msg: str):
        if self.ctx.is_main and self._log_fn is not None:
            self._log_fn(msg)

    # -- one step
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimiser step on a uint8 NCHW batch; returns device tensors (no sync)."""
        dev = self.ctx.device
        x = to_model_input(images, self.spec, dev, channels_last=self.memory_format == torch.channels_last)
        y = labels.to(dev, non_blocking=True)
        with autocast(dev, self.dtype):
            logits, nearest = self.ddp(x, y)
        loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.last_lr = self.optimizer.param_groups[0]["lr"]     # the rate this step uses
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.backbone.parameters(), self.cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        # accuracy of the nearest class centre: the margin lowers the target logit on purpose,
        # so an argmax of the margin logits stays near 0 while the network learns
        correct = (nearest == y).sum()
        return {"loss": loss.detach(), "correct": correct, "count": torch.tensor(y.numel(), device=dev)}

    # -- checkpoints
    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "world_size": self.ctx.world_size,
            "num_classes": self.index.num_classes,
            "config": self.cfg.to_dict(),
            "backbone": self.backbone.state_dict(),
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def save_checkpoint(self) -> Path | None:
        """Every rank must call this (RNG states are gathered); rank 0 writes."""
        rng = self.ctx.all_gather_object(capture_rng_state())
        path = None
        if self.ctx.is_main:
            state = self.state_dict()
            state["rng"] = rng
            # the official-format backbone and its card first, the state last: a state file is
            # present only when its companions are complete
            self.write_weights(self.ckpts.path(self.step, ""))
            path = self.ckpts.save(self.step, state)
        self.ctx.barrier()
        return path

    def load_state(self, path: str | Path):
        state = load_training_state(path)
        if state.get("format") != STATE_FORMAT:
            raise RtkitError(f"{path} is not a recognizer training checkpoint (format {state.get('format')!r})")
        saved = state["config"]
        now = self.cfg.to_dict()
        diffs = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in _RESUME_MUST_MATCH if saved.get(k) != now[k]]
        if saved.get("backbone") == now["backbone"] and saved.get("backbone_overrides") != now["backbone_overrides"]:
            diffs.append(f"backbone_overrides: {saved.get('backbone_overrides')!r} -> {now['backbone_overrides']!r}")
        if int(state["num_classes"]) != self.index.num_classes:
            diffs.append(f"classes: {state['num_classes']} -> {self.index.num_classes}")
        if diffs:
            raise RtkitError(f"cannot resume {path}: the run differs from the checkpoint ({'; '.join(diffs)})")
        self.backbone.load_state_dict(state["backbone"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        rng = state.get("rng") or []
        if len(rng) == self.ctx.world_size:
            restore_rng_state(rng[self.ctx.rank])
        else:  # another world size: data order is still exact, dropout streams are new
            self._log(f"note: checkpoint was written by {len(rng)} process(es), resuming with "
                      f"{self.ctx.world_size}; RNG streams re-seeded")
            seed_everything(self.cfg.seed + 1_000_003 * self.ctx.rank + self.step)
        self._log(f"resumed from {path} at step {self.step} (epoch {self.epoch:.2f})")

    def write_weights(self, stem: Path) -> Path:
        """The backbone in its official format at ``stem`` + suffix, and its engine card beside it."""
        from rtkit.engines.card import write_card

        obj, suffix, layout = official_backbone_file(self.backbone, self.head, epoch=int(self.epoch), step=self.step)
        weights = atomic_torch_save(obj, stem.with_name(stem.name + suffix))
        write_card(weights, recognizer_card(self.cfg, self.backbone, self.head, weights, layout, step=self.step,
                                            epoch=self.epoch, num_classes=self.index.num_classes))
        return weights

    def export_final(self) -> Path | None:
        """Write ``model.pth|.ckpt`` (official format) and its card ``model.json`` into the output folder."""
        if not self.ctx.is_main:
            return None
        return self.write_weights(self.out_dir / "model")

    # -- verification
    def validate(self) -> dict[str, float]:
        """Verification accuracy on the configured .bin files (computed on rank 0, shared)."""
        results = {}
        if self.verifier is not None:
            t0 = time.perf_counter()
            results = self.verifier(self.backbone, self.ctx.device, self.dtype, self.cfg.val_batch_size)
            shown = ", ".join(f"{k[4:]} {100 * v:.2f}%" for k, v in results.items() if not k.endswith("_std"))
            self._log(f"step {self.step}: verification {shown} ({time.perf_counter() - t0:.1f} s)")
        return self.ctx.broadcast_object(results)

    def replicas_in_sync(self) -> bool:
        """Whether every rank holds bit-identical backbone and head parameters."""
        with torch.no_grad():
            total = torch.stack([p.double().sum() for p in self.model.parameters()]).sum().item()
        sums = self.ctx.all_gather_object(total)
        return all(s == sums[0] for s in sums)

    # -- the loop
    def fit(self, until: int | None = None) -> dict:
        """Train to the end of the run, or to step ``until`` (its schedule unchanged; a checkpoint
        is written there and the final model only at the end of the run)."""
        cfg, ctx = self.cfg, self.ctx
        dev = ctx.device
        stop = min(self.stop_step, until) if until is not None else self.stop_step
        self._log(f"training {cfg.backbone} + {cfg.head} head on {len(self.index)} images of "
                  f"{self.index.num_classes} identities; {self.steps_per_epoch} steps/epoch x "
                  f"{cfg.epochs} epochs, batch {cfg.batch_size} x {ctx.world_size} process(es) on {dev}, "
                  f"precision {self.dtype or 'fp32'}; stop at step {self.stop_step}")
        bar = None
        if cfg.progress and ctx.is_main:
            from tqdm import tqdm
            bar = tqdm(total=self.stop_step, initial=self.step, unit="step", dynamic_ncols=True)
        meter = RateMeter(dev)
        run_meter = RateMeter(dev)
        sums = torch.zeros(3, dtype=torch.float64, device=dev)    # loss x n, correct, n
        first_loss = last_loss = None
        val_results: dict[str, float] = {}
        last_saved = self.step
        global_batch = cfg.batch_size * ctx.world_size
        wait_s = 0.0
        try:
            while self.step < stop:
                epoch, within = divmod(self.step, self.steps_per_epoch)
                self.sampler.set_epoch(epoch)
                self.sampler.set_start(within * cfg.batch_size)
                t_wait = time.perf_counter()
                for images, labels in self.loader:
                    wait_s += time.perf_counter() - t_wait
                    m = self.train_step(images, labels)
                    self.step += 1
                    n = m["count"].double()
                    sums += torch.stack([m["loss"].double() * n, m["correct"].double(), n])
                    meter.add(global_batch)
                    run_meter.add(global_batch)
                    if self.on_step is not None:
                        self.on_step(self.step, m)
                    end_of_epoch = self.step % self.steps_per_epoch == 0
                    finished = self.step >= stop
                    if self.step % cfg.log_every_steps == 0 or end_of_epoch or finished:
                        totals = ctx.all_reduce_sum(sums.clone()).tolist()
                        loss = totals[0] / max(totals[2], 1)
                        acc = totals[1] / max(totals[2], 1)
                        first_loss = loss if first_loss is None else first_loss
                        last_loss = loss
                        elapsed = meter.rate(reset=False)
                        row = {"epoch": round(self.epoch, 4), "loss": loss, "accuracy": acc,
                               "lr": self.last_lr, "img_per_s": elapsed,
                               "data_wait": wait_s / max(1e-9, time.perf_counter() - meter.t0)}
                        if self.head.name == "adaface":
                            row["norm_mean"] = float(self.head.batch_mean)
                        self.logger.log(self.step, **row)
                        meter.reset()
                        wait_s = 0.0
                        sums.zero_()
                        if bar is not None:
                            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", lr=f"{row['lr']:.3g}",
                                            img_s=f"{elapsed:.0f}")
                    if bar is not None:
                        bar.update(1)
                    if cfg.val_bins and ((cfg.val_every_steps and self.step % cfg.val_every_steps == 0)
                                         or (not cfg.val_every_steps and end_of_epoch) or finished):
                        val_results = self.validate()
                        self.logger.log(self.step, epoch=round(self.epoch, 4), **val_results)
                    if (cfg.save_every_steps and self.step % cfg.save_every_steps == 0) or end_of_epoch or finished:
                        self.save_checkpoint()
                        last_saved = self.step
                    if finished:
                        break
                    t_wait = time.perf_counter()
        finally:
            if bar is not None:
                bar.close()
            self.logger.close()
        if last_saved != self.step:
            self.save_checkpoint()
        weights = self.export_final() if self.step >= self.stop_step else None
        in_sync = self.replicas_in_sync() if ctx.distributed else True
        if not in_sync:
            raise RuntimeError("DDP replicas diverged: parameters differ between ranks")
        summary = {"steps": self.step, "epochs": self.epoch, "first_loss": first_loss, "last_loss": last_loss,
                   "img_per_s": run_meter.rate(), "world_size": ctx.world_size, "replicas_in_sync": in_sync,
                   "checkpoint": str(self.ckpts.latest()), "model_card": str(self.out_dir / "model.json"),
                   "weights": str(weights) if weights is not None else None, **val_results}
        if ctx.is_main:
            skipped = self.skipped.skipped()
            summary["skipped_images"] = sorted(skipped)
            if skipped:
                self._log(f"skipped {len(skipped)} unreadable image(s), never trained on: listed in "
                          f"{self.out_dir / SKIPPED_NAME}")
            write_json_atomic(summary, self.out_dir / "summary.json")
        return summary


def train_recognizer(cfg: RecognizerConfig, out_dir: str | Path, *, resume: str | Path | None = None,
                     on_step: StepCallback | None = None, log=print) -> dict:
    """Train (or resume) a recognizer; returns the summary (also in ``out_dir/summary.json``).

    Under torchrun the process group is started here and ended on return.
    """
    ctx = init_distributed(cfg.device)
    try:
        trainer = RecognizerTrainer(cfg, out_dir, resume=resume, ctx=ctx, on_step=on_step, log=log)
        summary = trainer.fit()
        # Every rank leaves its last collective before any rank tears the group down; without
        # this a gloo rank could abort at exit ("terminate called without an active exception").
        ctx.barrier()
        return summary
    finally:
        ctx.close()


__all__ = ["RecognizerConfig", "MarginModel", "RecognizerTrainer", "train_recognizer", "official_backbone_file",
           "trained_spec", "recognizer_card", "load_trained_recognizer", "BinVerifier"]
