"""Unpaired translator training: VSAIT, and the CUT-family DECENT and UNSB, in one loop.

    from rtkit.train.translator import TranslatorConfig, train_translator
    cfg = TranslatorConfig(method="vsait", source="DigiFace1M", target="FFHQ",
                           feature_weights="vgg19-dcbb9e9d.pth", crop_size=112)
    summary = train_translator(cfg, "runs/vsait")

(or ``rt-train translator --method vsait --source DIR --target DIR --out DIR``).

What varies per method lives in a strategy object (``TranslatorMethod`` subclasses, registered
with ``@register_method``): which networks exist, their optimisers and schedules, one training
step, how to translate for the sample grid and how to write the generator in its official
format. Everything else is shared: unpaired data, precision, checkpoints, logs, samples.

Data: the source and target folders are any image trees (png/jpg/jpeg/webp/bmp). Each domain
is drawn independently, epoch by epoch, in an order seeded by (seed, domain, epoch); image k of
step s on rank r is a function of (seed, s, r, k) only, as are its random crop and flip. Images
smaller than the crop are scaled up first; ``load_size`` resizes every image to a square first
(the CUT-family recipe: 286 then random 256 crops). A file that fails to decode is reported once
and the next image of the order is used.

Randomness inside a step (UNSB noise and time, patch positions) comes from torch's generator,
reseeded from (seed, rank, step) before every step, so a resumed run repeats the uninterrupted
one exactly (same losses, same weights) whatever was drawn before the interruption.

Output folder:

    config.json                  the run's configuration (TranslatorConfig)
    log.csv                      losses, learning rates, img/s (MetricLogger; TensorBoard too if installed)
    samples/step_000001000.png   fixed source crops | their translations, plus style gap lines in log.csv
    checkpoints/step_*.pt/.json  exact-resume state (all networks, optimisers, schedulers,
                                 grad scalers, RNG, step) and the config beside it
    weights/                     the generator in the format rtkit.engines.create and rt-export load,
                                 each with an engine sidecar JSON (rt-convert --engine FILE works):
                                   VSAIT: step=N.ckpt and last.ckpt (Lightning layout: state_dict with
                                          model.g_net.*, model.d_net.*, model.g_net_map.*,
                                          model.lsh_feat.*, model.feature_extractor.*)
                                   DECENT/UNSB: N_net_G.pth and latest_net_G.pth (plain state_dict)

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
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rtkit.engines.errors import RtkitError
from rtkit.train.checkpointing import (CheckpointDir, atomic_torch_save, capture_rng_state,
                                       load_training_state, resolve_resume, restore_rng_state,
                                       write_json_atomic)
from rtkit.train.logging import MetricLogger
from rtkit.train.loop import (DistContext, RateMeter, autocast, init_distributed, make_grad_scaler,
                              resolve_precision, seed_everything)

Log = Callable[[str], None]


# -- configuration ---------------------------------------------------------------------------------

@dataclass
class TranslatorConfig:
    method: str                                   # a registered method: vsait, decent, unsb
    source: str                                   # source-domain image tree (e.g. renders)
    target: str                                   # target-domain image tree (e.g. photos)
    generator: str | None = None                  # registered generator; None: the method's default
    generator_overrides: dict = field(default_factory=dict)
    generator_checkpoint: str | None = None       # start G from these weights (fine-tuning)
    options: dict = field(default_factory=dict)   # method options (see each method's Options)
    steps: int = 200_000
    batch_size: int = 1                           # per process
    crop_size: int = 256
    load_size: int | None = None                  # resize to load_size x load_size before cropping
    flip: bool = True
    # VSAIT feature network: a local VGG19 file with torchvision's key names, or random features
    feature_net: str = "vgg19"
    feature_weights: str | None = None
    random_features: bool = False
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    workers: int = 4                              # decode processes per training process
    save_every: int = 5000
    sample_every: int = 1000
    log_every: int = 100
    keep: int = 3                                 # checkpoints (and step-numbered weights) kept; 0: all
    num_samples: int = 8
    tensorboard: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TranslatorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Fields that must match to resume (data order, networks, losses); others may change.
_RESUME_FIXED = ("method", "generator", "generator_overrides", "options", "batch_size", "crop_size",
                 "load_size", "flip", "feature_net", "seed")


def _coerce_options(options_cls, given: dict, method: str):
    """Build a method's Options dataclass from a dict whose values may be CLI strings."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise RtkitError(f"unknown {method} option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    defaults = options_cls()
    values = {}
    for k, v in given.items():
        ref = getattr(defaults, k)
        try:
            if isinstance(ref, bool):
                v = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
            elif isinstance(ref, tuple):
                items = v.split(",") if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) else [v]
                cast = type(ref[0]) if ref else float
                v = tuple(_number(x, cast) for x in items if str(x).strip() != "")
            elif isinstance(ref, (int, float)):
                v = _number(v, type(ref))
            elif isinstance(ref, str):
                v = str(v)
        except (TypeError, ValueError):
            raise RtkitError(f"{method} option {k}={v!r} is not a valid {type(ref).__name__}") from None
        values[k] = v
    return options_cls(**values)


def _number(v, cast):
    """int/float from a number or CLI string; an int field refuses a fractional value."""
    f = float(v)
    if cast is int:
        if not f.is_integer():
            raise ValueError(v)
        return int(f)
    return f


# -- unpaired data ----------------------------------------------------------------------------------

def _seed_int(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class ImageDomain:
    """The sorted image files of one domain and a per-epoch seeded order over them."""

    def __init__(self, root: str | Path, name: str):
        from rtkit.runtime.sources import walk_files

        self.root = Path(root)
        if not self.root.is_dir():
            raise RtkitError(f"{name} folder not found: {self.root}")
        self.files, _ = walk_files(self.root)
        if not self.files:
            raise RtkitError(f"{name} folder {self.root} has no images (png/jpg/jpeg/webp/bmp)")
        self.name = name
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def index(self, seed: int, stream: int, k: int) -> int:
        """File index of draw ``k``: epoch k // n in the order seeded by (seed, stream, epoch)."""
        n = len(self.files)
        epoch, pos = divmod(int(k), n)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([seed, stream, epoch]).permutation(n))
        return int(self._order[1][pos])


def _fit_image(img: np.ndarray, crop: int, load_size: int | None) -> np.ndarray:
    if load_size:
        img = cv2.resize(img, (load_size, load_size), interpolation=cv2.INTER_CUBIC)
    h, w = img.shape[:2]
    if min(h, w) < crop:
        s = crop / min(h, w)
        img = cv2.resize(img, (max(crop, round(w * s)), max(crop, round(h * s))), interpolation=cv2.INTER_CUBIC)
    return img


def _to_tensor(imgs: Sequence[np.ndarray]) -> torch.Tensor:
    arr = np.stack(imgs).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div_(127.5).sub_(1.0)


class UnpairedCrops(torch.utils.data.Dataset):
    """``dataset[step]`` -> {"source": (B,3,c,c), "target": (B,3,c,c)[, "source2": ...]} in [-1, 1].

    Draw k of a step is ((step * world + rank) * B + i); domains use independent orders
    (streams 0, 1, and 2 for UNSB's second source batch).
    """

    STREAMS = {"source": 0, "target": 1, "source2": 2}

    def __init__(self, source: ImageDomain, target: ImageDomain, *, batch_size: int, crop_size: int,
                 load_size: int | None = None, flip: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, second_source: bool = False, steps: int = 0):
        self.domains = {"source": source, "target": target}
        if second_source:
            self.domains["source2"] = source
        self.batch_size, self.crop, self.load_size, self.flip = batch_size, crop_size, load_size, flip
        self.seed, self.rank, self.world_size, self.steps = seed, rank, world_size, steps
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return self.steps

    def _load(self, domain: ImageDomain, stream: int, k: int) -> np.ndarray:
        from rtkit.runtime.sources import DecodeError, decode_image

        for attempt in range(len(domain)):
            rel = domain.files[domain.index(self.seed, stream, k + attempt * 7919)]
            try:
                return decode_image(domain.root / rel)
            except DecodeError as e:
                if rel not in self._warned:
                    self._warned.add(rel)
                    print(f"warning: skipping {domain.name} image {rel}: {e}", flush=True)
        raise RtkitError(f"no decodable image in {domain.root}")

    def crop_one(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        img = _fit_image(img, self.crop, self.load_size)
        h, w = img.shape[:2]
        y = int(rng.integers(0, h - self.crop + 1))
        x = int(rng.integers(0, w - self.crop + 1))
        img = img[y:y + self.crop, x:x + self.crop]
        if self.flip and rng.random() < 0.5:
            img = img[:, ::-1]
        return np.ascontiguousarray(img)

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, domain in self.domains.items():
            stream = self.STREAMS[name]
            imgs = []
            for i in range(self.batch_size):
                k = (int(step) * self.world_size + self.rank) * self.batch_size + i
                rng = np.random.default_rng([self.seed, 100 + stream, k])
                imgs.append(self.crop_one(self._load(domain, stream, k), rng))
            out[name] = _to_tensor(imgs)
        return out


def _decode_worker_init(_worker_id: int):
    cv2.setNumThreads(1)  # one image at a time per worker: inner threads only oversubscribe
    torch.set_num_threads(1)


def center_crops(domain: ImageDomain, count: int, crop: int, seed: int, stream: int = 7) -> torch.Tensor:
    """``count`` fixed images of a domain (a seeded choice), centre-cropped to ``crop``."""
    from rtkit.runtime.sources import DecodeError, decode_image

    order = np.random.default_rng([seed, stream]).permutation(len(domain))
    imgs = []
    for i in order:
        if len(imgs) == count:
            break
        try:
            img = _fit_image(decode_image(domain.root / domain.files[int(i)]), crop, None)
        except DecodeError:
            continue
        h, w = img.shape[:2]
        y, x = (h - crop) // 2, (w - crop) // 2
        imgs.append(np.ascontiguousarray(img[y:y + crop, x:x + crop]))
    if not imgs:
        raise RtkitError(f"no decodable image in {domain.root}")
    return _to_tensor(imgs)


# -- style statistics (the sample-time domain gap) ----------------------------------------------------

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
STYLE_FEATURES = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "saturation", "high_freq")


@torch.no_grad()
def style_statistics(images: torch.Tensor) -> torch.Tensor:
    """(N, 8) per-image colour/frequency statistics on the 0-255 scale (``STYLE_FEATURES``):
    channel means and standard deviations, mean HSV saturation, mean |Laplacian| of luma."""
    x = (images.float().clamp(-1, 1) + 1) * 127.5
    mean = x.mean(dim=(2, 3))
    std = x.std(dim=(2, 3))
    mx, mn = x.max(dim=1).values, x.min(dim=1).values
    sat = torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-6), torch.zeros_like(mx)).mean(dim=(1, 2)) * 255
    luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    hf = F.conv2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), _LAPLACIAN.to(x.device)).abs().mean(dim=(1, 2, 3))
    return torch.cat([mean, std, sat[:, None], hf[:, None]], dim=1)


def style_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Domain gap between two image sets: mean |difference| of their average style statistics
    (0-255 units); 0 when the two sets have the same colour and frequency statistics."""
    return float((style_statistics(a).mean(0) - style_statistics(b).mean(0)).abs().mean())


@torch.no_grad()
def content_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image Pearson correlation of the luma of two aligned image batches, shape (N,)."""
    def luma(x):
        x = x.float()
        y = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).flatten(1)
        return y - y.mean(dim=1, keepdim=True)
    la, lb = luma(a), luma(b)
    return (la * lb).sum(1) / (la.norm(dim=1) * lb.norm(dim=1)).clamp_min(1e-8)


# -- method registry ----------------------------------------------------------------------------------

METHODS: dict[str, type["TranslatorMethod"]] = {}


def register_method(name: str):
    """Class decorator registering a TranslatorMethod under ``name``."""

    def wrap(cls):
        if name in METHODS:
            raise ValueError(f"translator method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def method_names() -> list[str]:
    return sorted(METHODS)


def linear_decay(total_steps: int, decay_start: float) -> Callable[[int], float]:
    """CUT-family schedule per step: constant, then linear towards 0 from ``decay_start`` of the run."""
    n_const = int(total_steps * decay_start)
    n_decay = max(1, total_steps - n_const)
    return lambda s: 1.0 - max(0, s - n_const) / float(n_decay + 1)


class TranslatorMethod:
    """One translation method: its networks, optimisers, schedules and training step.

    Subclasses set ``Options`` (a dataclass of hyper-parameters with the official defaults),
    ``default_generator`` (a registered model) and ``uses_second_source`` (the batch then also
    has "source2", an independent source batch); build ``self.generator``, ``self.nets`` (every
    trained network, by checkpoint name), ``self.optimizers`` and ``self.schedulers`` in
    ``__init__``; and implement ``train_step`` (all updates of one step; returns detached loss
    tensors by name), ``translate`` (for the sample grid) and ``export_weights`` (the
    generator in its official file format).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = object
    default_generator: ClassVar[str] = ""
    uses_second_source: ClassVar[bool] = False

    def __init__(self, cfg: TranslatorConfig, opts, ctx: DistContext, dtype: torch.dtype | None):
        self.cfg, self.opts, self.ctx, self.dtype = cfg, opts, ctx, dtype
        self.device = ctx.device
        self.nets: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        self.scalers: dict[str, torch.amp.GradScaler] = {}

    # -- building
    def build_generator(self) -> nn.Module:
        """The registered model being trained (what the exported weights load into)."""
        from rtkit.engines import create

        name = self.cfg.generator or self.default_generator
        model = create(name, checkpoint=self.cfg.generator_checkpoint, pretrained=False,
                       **self.cfg.generator_overrides)
        if model.spec.task != "translate":
            raise RtkitError(f"{name} is a '{model.spec.task}' model, not an image translator")
        return model.to(self.device).train()

    def finish_setup(self):
        """Scalers per optimiser; same initial weights on every rank."""
        self.scalers = {k: make_grad_scaler(self.device, self.dtype) for k in self.optimizers}
        if self.ctx.distributed:
            for net in self.nets.values():
                for t in list(net.parameters()) + list(net.buffers()):
                    dist.broadcast(t.data, src=0)

    # -- steps
    def autocast(self):
        return autocast(self.device, self.dtype)

    def update(self, names: str | Sequence[str], loss: torch.Tensor,
               clip: Sequence[tuple[Sequence[nn.Parameter], float]] = ()):
        """One backward for ``loss`` and a step of each named optimiser: zero_grad, (scaled)
        backward, average over ranks, optional norm clipping, step. Several optimisers share
        the first one's gradient scaler (PyTorch's pattern for one loss, several optimisers)."""
        names = [names] if isinstance(names, str) else list(names)
        opts = [self.optimizers[n] for n in names]
        scaler = self.scalers[names[0]]
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        for opt in opts:
            if self.ctx.distributed:
                _average_gradients(opt, self.ctx.world_size)
            if clip:
                scaler.unscale_(opt)
        for params, max_norm in clip:
            torch.nn.utils.clip_grad_norm_(list(params), max_norm=max_norm)
        for opt in opts:
            scaler.step(opt)
        scaler.update()

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def translate(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step_schedulers(self):
        for s in self.schedulers.values():
            s.step()

    def learning_rates(self) -> dict[str, float]:
        return {f"lr_{k}": o.param_groups[0]["lr"] for k, o in self.optimizers.items()}

    # -- state
    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict):
        pass

    def state_dict(self) -> dict:
        return {"nets": {k: v.state_dict() for k, v in self.nets.items()},
                "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
                "schedulers": {k: v.state_dict() for k, v in self.schedulers.items()},
                "scalers": {k: v.state_dict() for k, v in self.scalers.items()},
                "extra": self.extra_state()}

    def load_state_dict(self, state: dict):
        for group in ("nets", "optimizers", "schedulers", "scalers"):
            have, saved = getattr(self, group), state.get(group, {})
            if set(have) != set(saved):
                raise RtkitError(f"checkpoint {group} {sorted(saved)} do not match this run's {sorted(have)}")
            for k, obj in have.items():
                if saved[k]:
                    obj.load_state_dict(saved[k])
        self.load_extra_state(state.get("extra", {}))

    # -- export
    def export_weights(self, folder: Path, step: int) -> list[Path]:
        """Write the generator's official file for ``step`` (plus the 'latest' name); returns paths."""
        raise NotImplementedError


def _average_gradients(opt: torch.optim.Optimizer, world: int):
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(world)
    for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(avg)


def _requires_grad(modules: Sequence[nn.Module], flag: bool):
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(flag)


def _cpu_state(state: dict) -> dict:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _net_g_file(model: nn.Module, state: dict, folder: Path, step: int, latest: str, name: str,
                method: str) -> list[Path]:
    path = atomic_torch_save(_cpu_state(state), folder / name.format(step=step))
    return _with_sidecar_and_latest(model, path, folder / latest, step, method)


def _with_sidecar_and_latest(model: nn.Module, path: Path, latest: Path, step: int, method: str) -> list[Path]:
    """Engine sidecar JSON beside ``path`` and a 'latest' hard link (copy where links fail)."""
    from rtkit.engines.card import card_for_module, write_card
    from rtkit.engines.checkpoint import file_sha256

    meta = card_for_module(model, checkpoint_sha256=file_sha256(path), weights=path.name,
                           training={"method": method, "step": step},
                           trainer=f"rtkit.train.translator ({method})", step=step)
    write_card(path, meta)
    tmp = latest.with_name(f".{latest.name}.{os.getpid()}.tmp")
    try:
        os.link(path, tmp)
    except OSError:
        import shutil
        shutil.copyfile(path, tmp)
    os.replace(tmp, latest)
    meta.weights = latest.name
    write_card(latest, meta)
    return [path, latest]


# -- VSAIT ----------------------------------------------------------------------------------------------

@dataclass
class VSAITOptions:
    hv_dim: int = 4096                               # LSH hypervector size
    lsh_kernels: tuple = (16, 8, 4, 2, 1)            # kernel = stride per feature tap
    taps: tuple = (2, 7, 12, 21, 30)                 # VGG19 features.N
    lsh_seed: int = 0                                # the random projections are drawn from this
    feature_normalize: str = "none"                  # "none" (official) or "imagenet"
    d_channels: tuple = (1024, 1024, 1)
    map_hidden: int = 0                              # mapping-net hidden width; 0: hv_dim
    vsa_weight: float = 10.0
    gan_weight: float = 1.0
    lr_g: float = 1e-4
    lr_d: float = 4e-4
    beta1: float = 0.0
    beta2: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 100_000                           # StepLR period in steps
    lr_gamma: float = 0.5


@register_method("vsait")
class VSAITMethod(TranslatorMethod):
    """VSAIT: G then D each step (Lightning's order), hinge GAN on hypervectors, VSA loss.

    The G optimiser holds the generator and the mapping net (the official prefix
    ``model.g_net`` matches both); D's step sees the translation of the updated generator.
    """

    Options = VSAITOptions
    default_generator = "vsait"

    def __init__(self, cfg, opts: VSAITOptions, ctx, dtype):
        super().__init__(cfg, opts, ctx, dtype)
        from rtkit.train.vsait_losses import HypervectorDiscriminator, Hyperspace, MappingNet, build_feature_extractor

        self.generator = self.build_generator()
        features = build_feature_extractor(cfg.feature_net, weights=cfg.feature_weights,
                                           random_features=cfg.random_features, taps=opts.taps,
                                           normalize=opts.feature_normalize)
        self.hyperspace = Hyperspace(features, opts.hv_dim, opts.lsh_kernels, seed=opts.lsh_seed).to(self.device)
        # Frozen and rebuilt on resume (LSH from lsh_seed, VGG from its file): check it is the same file.
        from rtkit.engines.checkpoint import file_sha256
        self.features_id = file_sha256(cfg.feature_weights) if cfg.feature_weights else "random"
        self.map_net = MappingNet(opts.hv_dim, opts.map_hidden or None).to(self.device)
        self.discriminator = HypervectorDiscriminator(opts.hv_dim, opts.d_channels).to(self.device)
        self.nets = {"g_net": self.generator, "g_net_map": self.map_net, "d_net": self.discriminator}
        betas = (opts.beta1, opts.beta2)
        self.optimizers = {
            "G": torch.optim.Adam(list(self.generator.parameters()) + list(self.map_net.parameters()),
                                  lr=opts.lr_g, betas=betas, weight_decay=opts.weight_decay),
            "D": torch.optim.Adam(self.discriminator.parameters(), lr=opts.lr_d, betas=betas,
                                  weight_decay=opts.weight_decay),
        }
        self.schedulers = {k: torch.optim.lr_scheduler.StepLR(o, step_size=opts.lr_step, gamma=opts.lr_gamma)
                           for k, o in self.optimizers.items()}
        self.finish_setup()

    def train_step(self, batch):
        from rtkit.train.vsait_losses import hinge_discriminator_loss, hinge_generator_loss, vsa_loss

        src, tgt = batch["source"], batch["target"]
        G, D, M, hv = self.generator, self.discriminator, self.map_net, self.hyperspace
        o = self.opts
        with torch.no_grad(), self.autocast():
            hv_src = hv(src)
        # generator + mapping net
        _requires_grad([D], False)
        with self.autocast():
            fake = G(src)
            hv_fake = hv(fake)
            src_to_tgt = M(hv_src)
            loss_vsa = vsa_loss(hv_fake, hv_src, src_to_tgt)
            loss_adv = hinge_generator_loss([D(hv_fake), D(hv_src * src_to_tgt)])
            loss_g = o.vsa_weight * loss_vsa + o.gan_weight * loss_adv
        self.update("G", loss_g)
        _requires_grad([D], True)
        # discriminator: translation of the updated G and the bound source are fakes
        with torch.no_grad(), self.autocast():
            hv_fake = hv(G(src))
            bound = hv_src * M(hv_src)
            hv_tgt = hv(tgt)
        with self.autocast():
            loss_d = hinge_discriminator_loss([D(hv_tgt)], [D(hv_fake), D(bound)])
        self.update("D", loss_d)
        return {"loss_G": loss_g.detach(), "vsa": loss_vsa.detach(), "adv": loss_adv.detach(),
                "loss_D": loss_d.detach()}

    @torch.no_grad()
    def translate(self, x):
        return self.generator(x)

    def extra_state(self) -> dict:
        return {"features_sha256": self.features_id}

    def load_extra_state(self, state: dict):
        saved = state.get("features_sha256")
        if saved is not None and saved != self.features_id:
            raise RtkitError(f"the checkpoint was trained with other VGG features (sha256 {saved[:12]}, now "
                             f"{self.features_id[:12]}); resume with the same --features file")

    def export_weights(self, folder: Path, step: int) -> list[Path]:
        from rtkit.engines.vsait import lightning_checkpoint

        ckpt = lightning_checkpoint(self.generator, global_step=int(step),
                                    hyper_parameters={"rtkit_translator": json.loads(json.dumps(
                                        self.cfg.to_dict(), default=str))})
        sd = ckpt["state_dict"]
        for prefix, module in (("model.d_net.", self.discriminator), ("model.g_net_map.", self.map_net),
                               ("model.lsh_feat.", self.hyperspace.lsh_feat),
                               ("model.feature_extractor.", self.hyperspace.feature_extractor)):
            sd.update({prefix + k: v for k, v in module.state_dict().items()})
        ckpt["state_dict"] = _cpu_state(sd)
        path = atomic_torch_save(ckpt, folder / f"step={int(step)}.ckpt")
        return _with_sidecar_and_latest(self.generator, path, folder / "last.ckpt", step, self.name)


# -- DECENT --------------------------------------------------------------------------------------------

@dataclass
class DecentOptions:
    lambda_gan: float = 1.0
    lambda_idt: float = 10.0
    lambda_var: float = 0.01
    var_layers: tuple = (0, 4, 8, 12, 16)
    num_patches: int = 256
    var_all: bool = False            # one variance over the batch instead of per image
    flow_blocks: int = 1
    bnaf_layers: int = 0
    bnaf_dim: int = 10
    flow_lr: float = 1e-3
    flow_ema: float = 0.998
    flow_clip: float = 0.1
    ndf: int = 64
    n_layers_d: int = 3
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    decay_start: float = 0.5         # fraction of the run before the linear decay (200 + 200 epochs)


@register_method("decent")
class DecentMethod(TranslatorMethod):
    """DECENT: per step, flows (ML), then D (LSGAN), then G with the averaged flows."""

    Options = DecentOptions
    default_generator = "decent"

    def __init__(self, cfg, opts: DecentOptions, ctx, dtype):
        super().__init__(cfg, opts, ctx, dtype)
        from rtkit.train.decent_losses import PatchDensityEstimator, PatchGANDiscriminator, PolyakAverage

        self.generator = self.build_generator()
        self.layers = list(opts.var_layers)
        with torch.no_grad():
            probe = torch.zeros(1, 3, cfg.crop_size, cfg.crop_size, device=self.device)
            _, feats = self.generator(probe, layers=self.layers)
        widths = [f.shape[1] for f in feats]
        self.flow_a = PatchDensityEstimator(widths, opts.flow_blocks, opts.bnaf_layers, opts.bnaf_dim).to(self.device)
        self.flow_b = PatchDensityEstimator(widths, opts.flow_blocks, opts.bnaf_layers, opts.bnaf_dim).to(self.device)
        self.discriminator = PatchGANDiscriminator(3, opts.ndf, opts.n_layers_d).to(self.device)
        self.nets = {"G": self.generator, "D": self.discriminator, "F_A": self.flow_a, "F_B": self.flow_b}
        betas = (opts.beta1, opts.beta2)
        flow_params = list(self.flow_a.parameters()) + list(self.flow_b.parameters())
        self.optimizers = {
            "G": torch.optim.Adam(self.generator.parameters(), lr=opts.lr, betas=betas),
            "D": torch.optim.Adam(self.discriminator.parameters(), lr=opts.lr, betas=betas),
            "F": torch.optim.Adam(flow_params, lr=opts.flow_lr, amsgrad=True),
        }
        self.flow_average = PolyakAverage(flow_params, opts.flow_ema)
        rule = linear_decay(cfg.steps, opts.decay_start)
        self.schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, rule) for k, o in self.optimizers.items()}
        self.finish_setup()

    def train_step(self, batch):
        from rtkit.train.decent_losses import (density_change_loss, flow_nll, identity_loss, lsgan_loss)

        real_a, real_b = batch["source"], batch["target"]
        G, D, o = self.generator, self.discriminator, self.opts
        n = real_a.shape[0]
        with self.autocast():
            fake_b, feats_a = G(real_a, layers=self.layers)
            idt_b, feats_b = G(real_b, layers=self.layers)
        # flows: maximum likelihood on detached patches of each domain
        lp_a, _, _ = self.flow_a(feats_a, o.num_patches, detach=True)
        lp_b, _, _ = self.flow_b(feats_b, o.num_patches, detach=True)
        loss_f = flow_nll(lp_a, lp_b)
        self.update("F", loss_f, clip=[(self.flow_a.parameters(), o.flow_clip),
                                       (self.flow_b.parameters(), o.flow_clip)])
        self.flow_average.update()
        # discriminator
        with self.autocast():
            loss_d = 0.5 * (lsgan_loss(D(fake_b.detach()), False) + lsgan_loss(D(real_b), True))
        self.update("D", loss_d)
        # generator, reading the averaged flows
        self.flow_average.swap()
        _requires_grad([D, self.flow_a, self.flow_b], False)
        try:
            with self.autocast():
                loss_gan = lsgan_loss(D(fake_b), True)
                loss_idt = identity_loss(idt_b, real_b)
                feats_fake = G(fake_b, layers=self.layers, encode_only=True)
            with torch.no_grad():
                lp_src, widths, ids = self.flow_a(feats_a, o.num_patches, detach=True)
            lp_fake, _, _ = self.flow_b(feats_fake, o.num_patches, ids)
            loss_var = density_change_loss(lp_src, lp_fake, widths, n, across_batch=o.var_all)
            loss_g = o.lambda_gan * loss_gan + o.lambda_idt * loss_idt + o.lambda_var * loss_var
            self.update("G", loss_g)
        finally:
            _requires_grad([D, self.flow_a, self.flow_b], True)
            self.flow_average.swap()
        return {"loss_G": loss_g.detach(), "G_GAN": loss_gan.detach(), "idt": loss_idt.detach(),
                "var": loss_var.detach(), "loss_D": loss_d.detach(), "nll_F": loss_f.detach()}

    @torch.no_grad()
    def translate(self, x):
        return self.generator(x)

    def extra_state(self) -> dict:
        return {"flow_average": self.flow_average.state_dict()}

    def load_extra_state(self, state: dict):
        self.flow_average.load_state_dict(state["flow_average"])

    def export_weights(self, folder: Path, step: int) -> list[Path]:
        return _net_g_file(self.generator, self.generator.state_dict(), folder, step, "latest_net_G.pth",
                           "{step}_net_G.pth", self.name)


# -- UNSB ------------------------------------------------------------------------------------------

@dataclass
class UNSBOptions:
    lambda_gan: float = 1.0
    lambda_sb: float = 1.0
    lambda_nce: float = 1.0
    nce_idt: bool = True
    nce_layers: tuple = (0, 4, 8, 12, 16)
    num_patches: int = 256
    nce_t: float = 0.07
    netf_nc: int = 256
    tau: float = 0.01
    num_timesteps: int = 5
    ndf: int = 64
    n_layers_d: int = 3
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    decay_start: float = 0.5


@register_method("unsb")
class UNSBMethod(TranslatorMethod):
    """UNSB: simulate the bridge to a random step, then D, E, and G (+ the NCE head)."""

    Options = UNSBOptions
    default_generator = "unsb"
    uses_second_source = True

    def __init__(self, cfg, opts: UNSBOptions, ctx, dtype):
        super().__init__(cfg, opts, ctx, dtype)
        from rtkit.engines.unsb import UNSBTranslator, init_official_
        from rtkit.train.unsb_losses import ConditionalPatchDiscriminator, PatchSampleMLP

        self.translator = self.build_generator()
        if not isinstance(self.translator, UNSBTranslator):
            raise RtkitError(f"UNSB training needs a UNSB generator (unsb, unsb_tiny), got "
                             f"{getattr(self.translator, 'registry_name', type(self.translator).__name__)}")
        self.generator = self.translator.generator
        if cfg.generator_checkpoint is None:
            init_official_(self.generator)
        # NCE layers are numbered over the encoder and the residual blocks; a smaller generator
        # (unsb_tiny: 12 + 2) lacks the deepest default ones, and the NCE mean is over those it has.
        depth = len(self.generator.model) + len(self.generator.model_res)
        self.layers = [int(i) for i in opts.nce_layers if 0 <= int(i) < depth]
        if not self.layers:
            raise RtkitError(f"none of the NCE layers {tuple(opts.nce_layers)} exists in this generator "
                             f"(layers 0..{depth - 1})")
        self.z_dim = self.generator.z_dim
        with torch.no_grad():
            probe = torch.zeros(1, 3, cfg.crop_size, cfg.crop_size, device=self.device)
            t0 = torch.zeros(1, dtype=torch.long, device=self.device)
            feats = self.generator.encode(probe, t0, torch.zeros(1, self.z_dim, device=self.device), self.layers)
        self.patch_head = PatchSampleMLP([f.shape[1] for f in feats], opts.netf_nc).to(self.device)
        self.discriminator = ConditionalPatchDiscriminator(3, opts.ndf, opts.n_layers_d).to(self.device)
        self.energy = ConditionalPatchDiscriminator(12, opts.ndf, opts.n_layers_d).to(self.device)
        self.nets = {"G": self.generator, "D": self.discriminator, "E": self.energy, "F": self.patch_head}
        betas = (opts.beta1, opts.beta2)
        self.optimizers = {k: torch.optim.Adam(v.parameters(), lr=opts.lr, betas=betas) for k, v in self.nets.items()}
        rule = linear_decay(cfg.steps, opts.decay_start)
        self.schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, rule) for k, o in self.optimizers.items()}
        self.finish_setup()

    def _bridge_state(self, x: torch.Tensor, t: int, times: torch.Tensor) -> torch.Tensor:
        """x_t: the bridge simulated (no gradients) from ``x`` through evaluations 0..t-1."""
        G, tau = self.generator, self.opts.tau
        xt, pred = x, None
        for s in range(t + 1):
            if s > 0:
                delta = times[s] - times[s - 1]
                inter = delta / (times[-1] - times[s - 1])
                scale = delta * (1 - inter)
                xt = (1 - inter) * xt + inter * pred + (scale * tau).sqrt() * torch.randn_like(xt)
            z = torch.randn(x.shape[0], self.z_dim, device=x.device)
            pred = G(xt, torch.full((x.shape[0],), s, dtype=torch.long, device=x.device), z)
        return xt

    def _nce(self, src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        from rtkit.train.unsb_losses import patch_nce_loss

        G, o, n = self.generator, self.opts, src.shape[0]
        t0 = torch.zeros(n, dtype=torch.long, device=src.device)
        z = torch.randn(n, self.z_dim, device=src.device)
        feat_q = G.encode(out, t0, z, self.layers)
        feat_k = G.encode(src, t0, z, self.layers)
        pool_k, ids = self.patch_head(feat_k, o.num_patches)
        pool_q, _ = self.patch_head(feat_q, o.num_patches, ids)
        total = sum(patch_nce_loss(q, k, n, o.nce_t).mean() for q, k in zip(pool_q, pool_k))
        return total / len(self.layers)

    def train_step(self, batch):
        from rtkit.engines.unsb import bridge_times
        from rtkit.train.decent_losses import lsgan_loss
        from rtkit.train.unsb_losses import energy_loss, energy_terms, sb_loss

        real_a, real_a2, real_b = batch["source"], batch["source2"], batch["target"]
        G, D, E, o = self.generator, self.discriminator, self.energy, self.opts
        n, T = real_a.shape[0], o.num_timesteps
        times = bridge_times(T).to(self.device)
        t = int(torch.randint(T, (1,)))
        t_idx = torch.full((1,), t, dtype=torch.long, device=self.device)
        with torch.no_grad(), self.autocast():
            xt = self._bridge_state(real_a, t, times)
            xt2 = self._bridge_state(real_a2, t, times)
            xtb = self._bridge_state(real_b, t, times) if o.nce_idt else None
        with self.autocast():
            inputs = torch.cat([xt, xtb]) if o.nce_idt else xt
            fake = G(inputs, torch.full((inputs.shape[0],), t, dtype=torch.long, device=self.device),
                     torch.randn(inputs.shape[0], self.z_dim, device=self.device))
            fake_b2 = G(xt2, torch.full((n,), t, dtype=torch.long, device=self.device),
                        torch.randn(n, self.z_dim, device=self.device))
        fake_b, idt_b = fake[:n], (fake[n:] if o.nce_idt else None)
        # discriminator
        with self.autocast():
            loss_d = 0.5 * (lsgan_loss(D(fake_b.detach(), t_idx), False) + lsgan_loss(D(real_b, t_idx), True))
        self.update("D", loss_d)
        # energy network
        with self.autocast():
            e_joint, e_product = energy_terms(E, xt, fake_b.detach(), xt2, fake_b2.detach(), t_idx)
            loss_e = energy_loss(e_joint, e_product)
        self.update("E", loss_e)
        # generator and NCE head
        _requires_grad([D, E], False)
        try:
            with self.autocast():
                loss_gan = lsgan_loss(D(fake_b, t_idx), True)
                e_joint, e_product = energy_terms(E, xt, fake_b, xt2, fake_b2, t_idx)
                loss_sb = sb_loss(e_joint, e_product, xt, fake_b, t, T, o.tau)
                loss_nce = self._nce(real_a, fake_b)
                if o.nce_idt:
                    loss_nce = 0.5 * (loss_nce + self._nce(real_b, idt_b))
                loss_g = o.lambda_gan * loss_gan + o.lambda_sb * loss_sb + o.lambda_nce * loss_nce
            self.update(("G", "F"), loss_g)   # the NCE head learns from the same backward
        finally:
            _requires_grad([D, E], True)
        return {"loss_G": loss_g.detach(), "G_GAN": loss_gan.detach(), "SB": loss_sb.detach(),
                "NCE": loss_nce.detach(), "loss_D": loss_d.detach(), "loss_E": loss_e.detach(),
                "t": torch.tensor(float(t))}

    @torch.no_grad()
    def translate(self, x):
        from rtkit.engines.unsb import sample

        return sample(self.generator, x, nfe=self.opts.num_timesteps, tau=self.opts.tau, seed=0, z_dim=self.z_dim)

    def export_weights(self, folder: Path, step: int) -> list[Path]:
        return _net_g_file(self.translator, self.generator.state_dict(), folder, step, "latest_net_G.pth",
                           "{step}_net_G.pth", self.name)


# -- the loop ------------------------------------------------------------------------------------------

class TranslatorTrainer:
    """Builds data and the method from a config; ``fit()`` trains to ``cfg.steps``.

    ``resume``: None (a fresh run; refused if ``out_dir`` already has checkpoints), "latest"
    (the newest checkpoint in ``out_dir``), a checkpoint file, or another run's folder.
    """

    def __init__(self, cfg: TranslatorConfig, out_dir: str | Path, *, resume: str | Path | None = None,
                 ctx: DistContext | None = None, log: Log = print):
        if cfg.method not in METHODS:
            raise RtkitError(f"unknown translator method {cfg.method!r}; choose from {', '.join(method_names())}")
        for name in ("steps", "batch_size", "num_samples"):
            if getattr(cfg, name) < 1:
                raise RtkitError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.crop_size < 16 or cfg.crop_size % 4:
            raise RtkitError(f"crop size must be a multiple of 4 and at least 16, got {cfg.crop_size}")
        if cfg.load_size is not None and cfg.load_size < cfg.crop_size:
            raise RtkitError(f"load size {cfg.load_size} is smaller than the crop size {cfg.crop_size}")
        self.out_dir = Path(out_dir)
        self.ctx = ctx or init_distributed(cfg.device)
        self._log_fn = log
        method_cls = METHODS[cfg.method]
        self.opts = _coerce_options(method_cls.Options, cfg.options, cfg.method)
        # the recorded config lists every option, defaults included (the caller's is left as is)
        cfg = self.cfg = dataclasses.replace(cfg, options=asdict(self.opts))
        self.ckpts = CheckpointDir(self.out_dir / "checkpoints", keep=cfg.keep)
        self.weights_dir = self.out_dir / "weights"
        resume_path = self._resume_path(resume)
        resume_state = load_training_state(resume_path) if resume_path is not None else None
        if resume_state is not None:
            self._check_resumable(resume_state, resume_path)

        self.source = ImageDomain(cfg.source, "source")
        self.target = ImageDomain(cfg.target, "target")
        self.dtype = resolve_precision(cfg.precision, self.ctx.device)
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.method = method_cls(cfg, self.opts, self.ctx, self.dtype)
        if self.ctx.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.step = 0
        if resume_state is not None:
            self.method.load_state_dict(resume_state["method"])
            restore_rng_state(resume_state["rng"])
            self.step = int(resume_state["step"])
            self._log(f"resumed from {resume_path} at step {self.step}")
        self.logger = MetricLogger(self.out_dir, enabled=self.ctx.is_main, tensorboard=cfg.tensorboard,
                                   resume_step=self.step if resume_state is not None else None)
        self.samples = None
        if self.ctx.is_main:
            write_json_atomic(self.cfg.to_dict(), self.out_dir / "config.json")
            self.samples = center_crops(self.source, cfg.num_samples, cfg.crop_size, cfg.seed)
            self.target_samples = center_crops(self.target, 2 * cfg.num_samples, cfg.crop_size, cfg.seed, stream=8)

    # -- setup helpers
    def _log(self, msg: str):
        if self.ctx.is_main and self._log_fn is not None:
            self._log_fn(msg)

    def _resume_path(self, resume) -> Path | None:
        return resolve_resume(self.ckpts, self.out_dir, resume)

    def _check_resumable(self, state: dict, path: Path):
        saved = TranslatorConfig.from_dict(state.get("config", {}))
        saved_opts = _coerce_options(METHODS[saved.method].Options, saved.options, saved.method) \
            if saved.method in METHODS else None
        mine = dict(self.cfg.to_dict(), options=asdict(self.opts))
        theirs = dict(saved.to_dict(), options=asdict(saved_opts) if saved_opts else saved.options)
        diffs = [f"{k}: {theirs[k]!r} -> {mine[k]!r}" for k in _RESUME_FIXED if theirs.get(k) != mine.get(k)]
        if diffs:
            raise RtkitError(f"cannot resume {path}: the run differs from the checkpoint ({'; '.join(diffs)})")
        if int(state.get("world_size", 1)) != self.ctx.world_size:
            self._log(f"note: resuming a {state.get('world_size')}-process run on {self.ctx.world_size}; "
                      f"the data order continues differently")

    # -- checkpoints, samples
    def save_checkpoint(self, metrics: dict[str, float]) -> Path | None:
        if not self.ctx.is_main:
            return None
        state = {"step": self.step, "method": self.method.state_dict(), "config": self.cfg.to_dict(),
                 "world_size": self.ctx.world_size, "rng": capture_rng_state()}
        companion = {"step": self.step, "config": self.cfg.to_dict(), "metrics": metrics}
        path = self.ckpts.save(self.step, state, companions={".json": companion})
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        self.method.export_weights(self.weights_dir, self.step)
        self._prune_weights()
        return path

    def _prune_weights(self):
        if self.cfg.keep <= 0:
            return
        import re

        pattern = re.compile(r"^(?:step=(\d+)\.ckpt|(\d+)_net_G\.pth)$")
        found = []
        for p in self.weights_dir.iterdir():
            m = pattern.match(p.name)
            if m:
                found.append((int(m.group(1) or m.group(2)), p))
        for _, p in sorted(found)[: -self.cfg.keep]:
            p.unlink(missing_ok=True)
            p.with_suffix(".json").unlink(missing_ok=True)

    @torch.no_grad()
    def write_samples(self) -> dict[str, float]:
        """samples/step_N.png (source | translation pairs) and the style gap of the translations."""
        if not self.ctx.is_main:
            return {}
        gens = [m for m in self.method.nets.values()]
        modes = [m.training for m in gens]
        for m in gens:
            m.eval()
        try:
            src = self.samples.to(self.ctx.device)
            with self.method.autocast():
                out = torch.cat([self.method.translate(src[i:i + 4]) for i in range(0, len(src), 4)])
            out = out.float().clamp(-1, 1).cpu()
        finally:
            for m, mode in zip(gens, modes):
                m.train(mode)
        path = self.out_dir / "samples" / f"step_{self.step:09d}.png"
        write_sample_grid(self.samples, out, path)
        return {"style_gap_source": style_distance(self.samples, self.target_samples),
                "style_gap_translated": style_distance(out, self.target_samples),
                "content_corr": float(content_correlation(self.samples, out).mean())}

    # -- training
    def fit(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        start = self.step
        data = UnpairedCrops(self.source, self.target, batch_size=cfg.batch_size, crop_size=cfg.crop_size,
                             load_size=cfg.load_size, flip=cfg.flip, seed=cfg.seed, rank=ctx.rank,
                             world_size=ctx.world_size, second_source=self.method.uses_second_source,
                             steps=cfg.steps)
        summary: dict[str, Any] = {"method": cfg.method, "start_step": start, "steps": cfg.steps}
        if start >= cfg.steps:
            self._log(f"nothing to do: already at step {start} of {cfg.steps}")
            summary.update(self._finish({}, time.perf_counter(), 0))
            return summary
        # forkserver: forking the trainer after OpenCV's thread pool ran (the sample crops) can deadlock
        worker_kw = dict(prefetch_factor=4, worker_init_fn=_decode_worker_init,
                         multiprocessing_context="forkserver") if cfg.workers > 0 else {}
        loader = torch.utils.data.DataLoader(
            data, batch_size=None, sampler=range(start, cfg.steps), num_workers=cfg.workers,
            pin_memory=ctx.device.type == "cuda", **worker_kw)
        self._log(f"{cfg.method}: {len(self.source)} source / {len(self.target)} target images, "
                  f"steps {start} -> {cfg.steps}, batch {cfg.batch_size} x {ctx.world_size} process(es), "
                  f"crop {cfg.crop_size}, {self.dtype or 'fp32'} on {ctx.device}")
        meter = RateMeter(ctx.device)
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        first: dict[str, float] | None = None
        saved_at = -1
        for batch in loader:
            torch.manual_seed(_seed_int(cfg.seed, ctx.rank, self.step))
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
            out = self.method.train_step(batch)
            self.method.step_schedulers()
            self.step += 1
            meter.add(cfg.batch_size * ctx.world_size)
            last = self.step == cfg.steps
            log_due = self.step % cfg.log_every == 0 or last
            sample_due = bool(cfg.sample_every) and (self.step % cfg.sample_every == 0 or last)
            if log_due or sample_due or first is None:
                metrics = {k: float(v) for k, v in out.items()}
                if not all(math.isfinite(v) for v in metrics.values()):
                    raise RtkitError(f"non-finite loss at step {self.step}: {metrics}; lower the learning "
                                     f"rates or use --precision fp32")
                first = first or dict(metrics)
            gap = self.write_samples() if sample_due else {}
            if log_due or sample_due:
                row = dict(metrics, **self.method.learning_rates(), img_per_s=meter.rate(), **gap)
                self.logger.log(self.step, **row)
                if log_due:
                    self._log(f"step {self.step}/{cfg.steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                              + f"  ({row['img_per_s']:.1f} img/s)")
            metrics.update(gap)
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
        latest = "last.ckpt" if (self.weights_dir / "last.ckpt").exists() else "latest_net_G.pth"
        summary = {"final_step": self.step, "seconds": seconds,
                   "img_per_s": steps_run * self.cfg.batch_size * self.ctx.world_size / seconds if seconds else 0.0,
                   "last": metrics, "weights": str(self.weights_dir / latest), "weight_files": weights}
        if self.ctx.is_main:
            write_json_atomic(summary, self.out_dir / "summary.json")
        self.logger.close()
        return summary


def write_sample_grid(sources: torch.Tensor, outputs: torch.Tensor, path: Path, pairs_per_row: int = 4) -> Path:
    """PNG grid of (source | translation) pairs, ``pairs_per_row`` pairs per row."""
    def u8(t):
        return ((t.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    a, b = u8(sources), u8(outputs)
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
           "style_statistics", "style_distance", "content_correlation", "TranslatorTrainer",
           "write_sample_grid", "train_translator", "STYLE_FEATURES", "linear_decay"]
