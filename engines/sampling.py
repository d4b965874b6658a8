"""Loops that run a model's parts: seeded per-sample noise and the step loops of UNSB and DDIM.

A pipeline engine (``register_model(..., pipeline=Pipeline(parts, loop))``) exports one engine file
per part; the runtime's PipelineRunner opens each part on any backend and calls the loop named in
the card with the parts as callables, so ONNX Runtime / TensorRT engines give the torch model's
images. A loop is ``loop(parts, x, **settings) -> y`` where ``parts[name](*tensors)`` evaluates a
part; noise is drawn from one CPU generator per sample, so an output depends only on its image
and its seed, never on batching, sharding or resume.
"""
from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from rtkit.engines.errors import RtkitError, optional_import

DEFAULT_NFE = 5
DEFAULT_TAU = 0.01
DEFAULT_DDIM_STEPS = 50

_LOOPS: dict[str, Callable] = {}
_SEEDED: set[str] = set()


def register_loop(name: str, *, seeded: bool = False):
    """Decorator registering ``loop(parts, x, **settings)``; ``seeded`` loops take ``seed``
    (an int, or one per sample) and draw their noise from it."""

    def wrap(fn):
        _LOOPS[name] = fn
        if seeded:
            _SEEDED.add(name)
        return fn

    return wrap


def get_loop(name: str) -> Callable:
    if name not in _LOOPS:
        from rtkit.engines.registry import list_models

        list_models()  # model modules may register loops of their own
    if name not in _LOOPS:
        raise RtkitError(f"unknown loop {name!r} in the engine card; known: {', '.join(sorted(_LOOPS))}")
    return _LOOPS[name]


def is_seeded(name: str) -> bool:
    get_loop(name)
    return name in _SEEDED


def path_seed(key: str, base: int = 0) -> int:
    """A stable 31-bit seed for one file (its relative path): the same on every run, machine and
    shard, so a stochastic engine's output for a file never depends on how the job was split."""
    h = hashlib.sha256(f"{base}:{key}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


# --------------------------------------------------------------------------- UNSB

def bridge_times(nfe: int) -> torch.Tensor:
    """The official test-time grid: nfe + 1 float32 times from 0 to 1.

    Increments 1, 1/2, ..., 1/(nfe-1) are accumulated, normalised to [0, 1] and squeezed into
    [0.5, 1], then 0 is prepended: nfe=5 gives [0, .5, .74, .86, .94, 1]. With nfe=1 only the
    first evaluation runs and the grid is never read.
    """
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if nfe == 1:
        return torch.tensor([0.0, 1.0])
    cum = np.cumsum([0.0] + [1.0 / (i + 1) for i in range(nfe - 1)])
    cum = cum / cum[-1]
    return torch.from_numpy(np.concatenate([[0.0], 0.5 + 0.5 * cum])).float()


def per_sample_seeds(seed: int | Sequence[int] | torch.Tensor, n: int) -> list[int]:
    """Seeding rule: an int seed s gives sample i the seed s + i; a sequence gives one per sample.

    So a batch of N with seed s equals N single-image runs with seeds s, s+1, ..., s+N-1, and a
    caller that wants noise tied to each image (e.g. a hash of its path) passes a list.
    """
    if isinstance(seed, torch.Tensor):
        seed = seed.flatten().tolist() if seed.numel() != 1 else int(seed.item())
    if isinstance(seed, (int, float, str, np.number)):  # a CLI or JSON value may arrive as "3"
        return [int(seed) + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {n}")
    return seeds


class SeededNoise:
    """Gaussian draws from one CPU generator per sample, stacked into a batch.

    Drawing on the CPU makes the numbers independent of device, batch size and batch position.
    """

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def normal(self, shape: Sequence[int], *, device=None, dtype=None) -> torch.Tensor:
        """One (len(seeds), *shape) float tensor, row i from generator i."""
        draws = [torch.randn(tuple(shape), generator=g) for g in self.generators]
        return torch.stack(draws).to(device=device, dtype=dtype)


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sample(step: StepFn, x: torch.Tensor, *, nfe: int = DEFAULT_NFE, tau: float = DEFAULT_TAU,
           seed: int | Sequence[int] | torch.Tensor = 0, z_dim: int = 256,
           noise: SeededNoise | None = None) -> torch.Tensor:
    """Run the official UNSB test loop and return the last prediction.

    step(x_t, t_idx, z) is one network evaluation: a UNSBGenerator, or an exported step engine
    (e.g. ``lambda x, t, z: runner.infer(x, t=t, z=z)`` over an rtkit Runner). Evaluation k (k = 0..nfe-1) sees
        x_0 = x,  x_k = (1 - a_k) x_{k-1} + a_k pred_{k-1} + sqrt(tau * s_k) * eps_k
    with a_k = d_k / (T_end - T_{k-1}), s_k = d_k (1 - a_k), d_k = T_k - T_{k-1} on the
    ``bridge_times`` grid, and a fresh z ~ N(0, I) each evaluation. Per sample, its generator
    draws z_0, then eps_k before z_k, in that order (see ``per_sample_seeds``).
    """
    n = x.shape[0]
    noise = noise or SeededNoise(per_sample_seeds(seed, n))
    times = bridge_times(nfe).to(x.device)
    xt, pred = x, None
    for k in range(nfe):
        if k > 0:
            delta = times[k] - times[k - 1]
            inter = delta / (times[-1] - times[k - 1])
            scale = delta * (1 - inter)
            eps = noise.normal(x.shape[1:], device=x.device, dtype=x.dtype)
            xt = (1 - inter) * xt + inter * pred + (scale * tau).sqrt() * eps
        z = noise.normal((z_dim,), device=x.device, dtype=x.dtype)
        t_idx = torch.full((n,), k, dtype=torch.long, device=x.device)
        pred = step(xt, t_idx, z)
    return pred




# --------------------------------------------------------------------------- DDIM inversion

def _diffusers():
    return optional_import("diffusers", extra="gen", purpose="DDIM inversion")


# The DDPM training schedule most unconditional UNets (google/ddpm-*, guided-diffusion
# "linear") were trained with; used when no scheduler config comes with the UNet.
DEFAULT_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                            "beta_schedule": "linear", "prediction_type": "epsilon"}

def _accepted(cls, config: dict) -> dict:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in params}


def make_schedulers(config: dict | None = None):
    """(DDIMScheduler, DDIMInverseScheduler) over one training schedule.

    Both use "leading" spacing (the only one both support identically, so the inverse walk
    visits exactly the timesteps the forward walk comes back through) and no x0 clipping,
    which would make the inversion lossy.
    """
    d = _diffusers()
    cfg = {**DEFAULT_SCHEDULER_CONFIG, **(config or {})}
    cfg.update(clip_sample=False, timestep_spacing="leading")
    return (d.DDIMScheduler(**_accepted(d.DDIMScheduler, cfg)),
            d.DDIMInverseScheduler(**_accepted(d.DDIMInverseScheduler, cfg)))


def inversion_count(steps: int, depth: float, inversion_steps: int | None) -> int:
    """How many of ``steps`` DDIM steps to invert: ``inversion_steps`` or ``depth`` of them."""
    if steps < 1:
        raise RtkitError(f"steps must be >= 1, got {steps}")
    if inversion_steps is not None:
        if not 1 <= inversion_steps <= steps:
            raise RtkitError(f"inversion_steps must be in 1..{steps}, got {inversion_steps}")
        return int(inversion_steps)
    if not 0.0 < depth <= 1.0:
        raise RtkitError(f"depth must be a fraction in (0, 1], got {depth}")
    return max(1, round(depth * steps))


def ddim_invert(eps, x: torch.Tensor, steps: int, n_inv: int, scheduler_config: dict) -> torch.Tensor:
    """``n_inv`` deterministic inverse-DDIM steps from x; eps(x, t) predicts the noise."""
    _, inverse = make_schedulers(scheduler_config)
    inverse.set_timesteps(steps)
    latent = x
    for t in inverse.timesteps[:n_inv]:
        latent = inverse.step(eps(latent, t.to(x.device)), int(t), latent).prev_sample
    return latent


def ddim_regenerate(eps, latent: torch.Tensor, steps: int, n_inv: int, scheduler_config: dict, *,
                    eta: float = 0.0, seed=0) -> torch.Tensor:
    """The last ``n_inv`` of ``steps`` DDIM sampling steps from ``latent``, clamped to [-1, 1]."""
    scheduler, _ = make_schedulers(scheduler_config)
    scheduler.set_timesteps(steps)
    noise = SeededNoise(per_sample_seeds(seed, latent.shape[0])) if eta > 0 else None
    x = latent
    for t in scheduler.timesteps[steps - n_inv:]:
        variance_noise = (noise.normal(x.shape[1:], device=x.device, dtype=x.dtype)
                          if noise is not None else None)
        x = scheduler.step(eps(x, t.to(x.device)), int(t), x, eta=float(eta),
                           variance_noise=variance_noise).prev_sample
    return x.clamp(-1.0, 1.0)


def translate_with_step(step, x: torch.Tensor, *, steps: int = DEFAULT_DDIM_STEPS, depth: float = 1.0,
                        eta: float = 0.0, seed=0, inversion_steps: int | None = None,
                        scheduler_config: dict | None = None) -> torch.Tensor:
    """Inversion + regeneration around an exported UNet step ``step(x, t) -> eps`` (e.g. an ONNX
    engine through a runner): the arithmetic of ``DDIMInversionTranslator.forward``."""
    steps = int(steps)
    n_inv = inversion_count(steps, float(depth), None if inversion_steps is None else int(inversion_steps))
    config = dict(scheduler_config or DEFAULT_SCHEDULER_CONFIG)

    def eps(xt, t):
        return step(xt, t.reshape(1).expand(xt.shape[0]).to(torch.long))

    latent = ddim_invert(eps, x, steps, n_inv, config)
    return ddim_regenerate(eps, latent, steps, n_inv, config, eta=float(eta), seed=seed)




# --------------------------------------------------------------------------- registered loops

@register_loop("unsb", seeded=True)
def unsb_loop(parts: Mapping[str, Callable], x: torch.Tensor, *, nfe: int = DEFAULT_NFE,
              tau: float = DEFAULT_TAU, seed=0, z_dim: int | None = None) -> torch.Tensor:
    """UNSB over its one part ``step(x_t, t, z)``; z's width comes from the part's input spec."""
    step = parts["step"]
    if z_dim is None:
        z = getattr(step, "inputs", {}).get("z")
        z_dim = int(z.shape[1]) if z is not None else 256
    return sample(step, x, nfe=int(nfe), tau=float(tau), seed=seed, z_dim=int(z_dim))


@register_loop("ddim", seeded=True)
def ddim_loop(parts: Mapping[str, Callable], x: torch.Tensor, *, steps: int = DEFAULT_DDIM_STEPS,
              depth: float = 1.0, eta: float = 0.0, seed=0, inversion_steps: int | None = None,
              scheduler_config: dict | None = None) -> torch.Tensor:
    """DDIM inversion + regeneration over its one part ``step(x, t) -> eps``."""
    return translate_with_step(parts["step"], x, steps=steps, depth=depth, eta=eta, seed=seed,
                               inversion_steps=inversion_steps, scheduler_config=scheduler_config)
