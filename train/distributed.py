"""Where a training process sits: its rank, world size and device, and the collectives it needs.

Nothing here has side effects at import. ``init_distributed()`` starts a process group only
when torchrun (or the caller) put ``WORLD_SIZE > 1`` in the environment; otherwise training is
a plain single process on the chosen device, with the same code path minus the collectives.

    ctx = init_distributed(device="cuda")       # reads RANK/LOCAL_RANK/WORLD_SIZE if set
    ...
    ctx.close()
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from rtkit.engines.errors import RtkitError


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

    def broadcast_module(self, module: nn.Module, src: int = 0):
        """Rank ``src``'s parameters and buffers into every rank's copy of ``module``."""
        if self.distributed:
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=src)

    def average_gradients(self, opt: torch.optim.Optimizer):
        """Mean of each parameter's gradient over ranks (one flat all-reduce); a no-op alone."""
        if not self.distributed:
            return
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

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


__all__ = ["DistContext", "init_distributed", "resolve_device"]
