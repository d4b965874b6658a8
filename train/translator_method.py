"""What a translator training method is: the strategy interface, the registry, and its weights files.

A method (``TranslatorMethod`` subclass, registered with ``@register_method("name")``) owns
which networks exist, their optimisers and schedules, one training step, how to translate for
samples and the held-out gap, and the generator's official file format. The trainer
(rtkit.train.translator) owns everything else: data, precision, checkpoints, logs, samples.

Every weights file a method writes carries the engine card beside it (``X.json``: registry
name, builder overrides, spec, and a training block with the config, step and data), so
``rt-convert --engine X``, ``rt-export X`` and ``rtkit.runtime.open_engine(X)`` reopen it by
its path alone.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import ClassVar, Sequence

import torch
from torch import nn

from rtkit.engines.errors import RtkitError
from rtkit.train.checkpointing import atomic_torch_save
from rtkit.train.distributed import DistContext
from rtkit.train.precision import autocast, make_grad_scaler

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


def requires_grad(modules: Sequence[nn.Module], flag: bool):
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(flag)


def cpu_state(state: dict) -> dict:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


class TranslatorMethod:
    """One translation method: its networks, optimisers, schedules and training step.

    Subclasses set ``Options`` (a dataclass of hyper-parameters with the official defaults),
    ``default_generator`` (a registered model), ``uses_second_source`` (the batch then also
    has "source2", an independent source batch) and the weights file names; build
    ``self.model`` (the registered module the weights load into), ``self.generator`` (the
    network trained as G), ``self.nets`` (every trained network, by checkpoint name),
    ``self.optimizers`` and ``self.schedulers`` in ``__init__``; and implement ``train_step``
    (all updates of one step; returns detached loss tensors by name), ``translate`` and
    ``weights_object`` (the generator in its official file format).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = object
    default_generator: ClassVar[str] = ""
    uses_second_source: ClassVar[bool] = False
    step_file: ClassVar[str] = "{step}_net_G.pth"       # weights of one step
    latest_file: ClassVar[str] = "latest_net_G.pth"     # the newest weights
    best_file: ClassVar[str] = "best_net_G.pth"         # the lowest held-out style gap so far
    layout: ClassVar[str] = "state_dict"

    def __init__(self, cfg, opts, ctx: DistContext, dtype: torch.dtype | None):
        self.cfg, self.opts, self.ctx, self.dtype = cfg, opts, ctx, dtype
        self.device = ctx.device
        self.model: nn.Module | None = None
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
        self.model = model
        return model.to(self.device).train()

    @property
    def spec(self):
        return self.model.spec

    def finish_setup(self):
        """Scalers per optimiser; same initial weights on every rank."""
        self.scalers = {k: make_grad_scaler(self.device, self.dtype) for k in self.optimizers}
        for net in self.nets.values():
            self.ctx.broadcast_module(net)

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
            self.ctx.average_gradients(opt)
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
        """Translations of model-range inputs, as the exported weights compute them."""
        return self.model(x)

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

    # -- weights files
    def weights_object(self, step: int):
        """What ``torch.save`` writes for the generator of ``step``, in its official format."""
        return cpu_state(self.model.state_dict())

    @classmethod
    def step_number(cls, file_name: str) -> int | None:
        """The step of a step-numbered weights file name, else None."""
        pattern = re.escape(cls.step_file).replace(re.escape("{step}"), r"(\d+)")
        m = re.fullmatch(pattern, file_name)
        return int(m.group(1)) if m else None

    def export_weights(self, folder: Path, step: int, training: dict) -> list[Path]:
        """The generator of ``step`` under its step name and the latest name, each with its card."""
        path = atomic_torch_save(self.weights_object(step), Path(folder) / self.step_file.format(step=int(step)))
        card = self.card(path, training)
        write_card_for(path, card)
        return [path, link_weights(path, Path(folder) / self.latest_file, card)]

    def card(self, path: Path, training: dict):
        from rtkit.engines.card import card_for_module
        from rtkit.engines.checkpoint import file_sha256

        return card_for_module(self.model, checkpoint_sha256=file_sha256(path), weights=path.name,
                               layout=self.layout, training=training,
                               trainer=f"rtkit.train.translator ({self.name})")


def write_card_for(path: Path, card) -> Path:
    from rtkit.engines.card import write_card

    return write_card(path, card)


def link_weights(path: Path, dst: Path, card) -> Path:
    """``dst`` as a hard link to ``path`` (a copy where links fail), with ``card`` naming it."""
    import dataclasses

    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, dst)
    write_card_for(dst, dataclasses.replace(card, weights=dst.name))
    return dst


__all__ = ["METHODS", "register_method", "method_names", "TranslatorMethod", "requires_grad", "cpu_state",
           "link_weights", "write_card_for"]
