"""Optimiser pieces both trainers share: parameter groups without decay on norms and biases,
and learning-rate schedules that span the run actually trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from torch import nn

from rtkit.engines.errors import RtkitError

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


@dataclass(frozen=True)
class StepSchedule:
    """Learning-rate factor per optimiser step (use with ``torch.optim.lr_scheduler.LambdaLR``).

    kind "multistep": factor ``gamma ** (milestones passed)`` with milestones in epochs, the
    same values as MultiStepLR stepped once per epoch; "poly": ``(1 - progress) ** power``
    after warm-up (arcface_torch's PolyScheduler). Both take an optional linear warm-up.
    ``steps_per_epoch`` may be fractional: a run cut short (``--max-steps``) compresses its
    schedule so that the milestones fall at the same fractions of the steps it trains.
    """

    kind: str
    steps_per_epoch: float
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


def linear_decay(total_steps: int, decay_start: float) -> Callable[[int], float]:
    """CUT-family schedule per step: constant, then linear towards 0 from ``decay_start`` of the run."""
    n_const = int(total_steps * decay_start)
    n_decay = max(1, total_steps - n_const)
    return lambda s: 1.0 - max(0, s - n_const) / float(n_decay + 1)


__all__ = ["decay_parameter_groups", "StepSchedule", "linear_decay"]
