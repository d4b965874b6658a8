"""Pieces every training loop shares: process group, precision, parameter groups, seeding, rate.

Nothing here has side effects at import. ``init_distributed()`` starts a process group only
when torchrun (or the caller) put ``WORLD_SIZE > 1`` in the environment; otherwise training is
a plain single process on the chosen device, with the same code path minus the collectives.

    ctx = init_distributed(device="cuda")       # reads RANK/LOCAL_RANK/WORLD_SIZE if set
    dtype = resolve_precision("auto", ctx.device)
    scaler = make_grad_scaler(ctx.device, dtype)
    with autocast(ctx.device, dtype):
        loss = ...
    ...
    ctx.close()
"""
from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rtkit.engines.errors import RtkitError


# -- process group ----------------------------------------------------------------------------

@dataclass
class DistContext:
    """Where this process sits: rank, world size and its device. World size 1 needs no group."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False      # we started the group, so we end it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; a no-op for one process."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def wrap(self, module: nn.Module, **ddp_kwargs) -> nn.Module:
        """DistributedDataParallel around ``module`` when distributed, else ``module`` itself."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, **ddp_kwargs)

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise RtkitError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto": cuda when available, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RtkitError(f"device {device} requested but CUDA is not available")
    return device


def init_distributed(device: str | torch.device | None = None, *, backend: str | None = None,
                     timeout_s: float = 1800.0) -> DistContext:
    """Read torchrun's environment; start a process group only when ``WORLD_SIZE > 1``.

    On CUDA each process takes ``cuda:LOCAL_RANK`` and NCCL; on CPU, gloo. A group that
    already exists (started by the caller) is used as it is and not destroyed by ``close``.
    """
    world = _env_int("WORLD_SIZE", 1)
    base = resolve_device(device)
    if world <= 1:
        return DistContext(device=base)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if base.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RtkitError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs visible")
        base = torch.device("cuda", local_rank)
        torch.cuda.set_device(base)
    backend = backend or ("nccl" if base.type == "cuda" else "gloo")
    owns = False
    if not dist.is_initialized():
        import datetime
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    return DistContext(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(),
                       device=base, backend=dist.get_backend(), owns_group=owns)


# -- precision --------------------------------------------------------------------------------

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device``; None means plain fp32.

    "auto": bf16 on GPUs that support it, else fp16 on CUDA, fp32 on CPU (CPU autocast is
    slower than fp32 for convolutions on most machines).
    """
    if precision not in PRECISIONS:
        raise RtkitError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise RtkitError("fp16 training needs a GPU; use bf16 or fp32 on CPU")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for ``dtype`` on ``device``, or a null context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


# -- optimiser parameter groups -----------------------------------------------------------------

_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                nn.modules.instancenorm._InstanceNorm)


def decay_parameter_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Two optimiser groups: weight decay on weights, none on normalisation parameters and biases.

    Frozen parameters (``requires_grad=False``) are left out. Each parameter appears once even
    if modules share it.
    """
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for sub in module.modules():
            for pname, p in sub.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                if isinstance(sub, _NORM_LAYERS) or pname == "bias":
                    no_decay.append(p)
                else:
                    decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "group": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "group": "no_decay"})
    return groups


# -- learning-rate schedules --------------------------------------------------------------------

@dataclass(frozen=True)
class StepSchedule:
    """Learning-rate factor per optimiser step (use with ``torch.optim.lr_scheduler.LambdaLR``).

    kind "multistep": factor ``gamma ** (milestones passed)`` with milestones in epochs, the
    same values as MultiStepLR stepped once per epoch; "poly": ``(1 - progress) ** power``
    after warm-up (arcface_torch's PolyScheduler). Both take an optional linear warm-up.
    """

    kind: str
    steps_per_epoch: int
    total_steps: int
    milestones: Sequence[float] = ()
    gamma: float = 0.1
    warmup_steps: int = 0
    power: float = 2.0

    def __post_init__(self):
        if self.kind not in ("multistep", "poly"):
            raise RtkitError(f"scheduler must be 'multistep' or 'poly', got {self.kind!r}")

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "multistep":
            epoch = step / self.steps_per_epoch
            passed = sum(1 for m in self.milestones if epoch >= m)
            return self.gamma ** passed
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return (1.0 - progress) ** self.power


# -- seeding and rates --------------------------------------------------------------------------

def seed_everything(seed: int):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RateMeter:
    """Images per second between calls to ``rate()`` (synchronising CUDA for honest numbers)."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.reset()

    def reset(self):
        self._sync()
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, images: int):
        self.images += images

    def _sync(self):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def rate(self, reset: bool = True) -> float:
        self._sync()
        dt = time.perf_counter() - self.t0
        value = self.images / dt if dt > 0 else 0.0
        if reset:
            self.t0 = time.perf_counter()
            self.images = 0
        return value


__all__ = ["DistContext", "init_distributed", "resolve_device", "PRECISIONS", "resolve_precision",
           "autocast", "make_grad_scaler", "decay_parameter_groups", "StepSchedule",
           "seed_everything", "RateMeter"]
