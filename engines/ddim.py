"""DDIM inversion translator: invert an image into a diffusion latent, then regenerate it.

An unconditional diffusers ``UNet2DModel`` trained on the target domain (e.g. real faces)
predicts the noise. ``invert`` runs diffusers' ``DDIMInverseScheduler`` up to a depth (all
steps: pure-noise level; fewer: an intermediate level), ``regenerate`` runs ``DDIMScheduler``
back down over the same timesteps. With eta 0 both are deterministic and, given enough steps,
regenerating the full inversion approximately reconstructs the input; what changes the image
is the target-domain prior that steers the predicted noise (stronger with fewer steps, a
larger depth, or eta > 0, which adds seeded noise on the way down). Cost: 2 * depth * steps
network evaluations per image.

diffusers is optional (extras ``gen`` and ``test``) and imported only when a model is built.

Weights: a diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``
or ``.bin``), loaded strictly through rtkit's safe reader, legacy attention key names
(query/key/value/proj_attn) remapped. ``create("ddim", checkpoint=<folder>/config.json)``
(or the weights file), or ``create("ddim", unet_dir=<folder>)``. A scheduler config found
beside it (``scheduler_config.json`` in the folder, or ``../scheduler/`` of a pipeline folder)
gives the training noise schedule; otherwise the DDPM linear schedule (1e-4 .. 0.02, 1000
steps) is assumed. Guided-diffusion checkpoints are not converted here.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rtkit.engines.checkpoint import load_state_dict_strict, read_checkpoint
from rtkit.engines.errors import CheckpointError, RtkitError, optional_import
from rtkit.engines.registry import Pipeline, register_model
from rtkit.engines.spec import ModelSpec
from rtkit.engines.sampling import (DEFAULT_DDIM_STEPS, DEFAULT_SCHEDULER_CONFIG, ddim_invert, ddim_regenerate,
                                    inversion_count)
from rtkit.engines.spec import TensorSpec

DEFAULT_STEPS = DEFAULT_DDIM_STEPS
SPEC = ModelSpec(task="translate", input_size=(256, 256), value_range=(-1.0, 1.0), channels="RGB",
                 alignment="none", resize="resize",
                 settings={"steps": DEFAULT_STEPS, "depth": 1.0, "eta": 0.0, "seed": 0})

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Attention projections of older diffusers checkpoints -> current names.
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.",
                     ".proj_attn.": ".to_out.0."}


def _diffusers():
    return optional_import("diffusers", extra="gen", purpose="DDIM inversion")


def _rename_legacy_keys(sd: dict, own_keys: set[str]) -> dict:
    out = {}
    for k, v in sd.items():
        new = k
        if k not in own_keys:
            for old, cur in _LEGACY_ATTENTION.items():
                if old in k and k.replace(old, cur) in own_keys:
                    new = k.replace(old, cur)
                    break
        out[new] = v
    return out


def _find_weights(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    variants = sorted(folder.glob("diffusion_pytorch_model.*.safetensors")) + sorted(
        folder.glob("diffusion_pytorch_model.*.bin"))
    if variants:
        return variants[0]
    raise CheckpointError(f"no UNet weights in {folder} (expected {' or '.join(WEIGHT_NAMES)})")


def _find_scheduler_config(folder: Path) -> dict | None:
    for p in (folder / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json"):
        if p.is_file():
            return json.loads(p.read_text())
    return None


def load_unet(path: str | Path):
    """(UNet2DModel, scheduler config or None) from a diffusers UNet folder, or from its
    config.json / weights file. Strict: every weight must fit the config."""
    d = _diffusers()
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: not a diffusers UNet folder (no config.json beside it)")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable config ({e})") from None
    cls_name = config.get("_class_name", "UNet2DModel")
    if cls_name != "UNet2DModel":
        raise CheckpointError(f"{cfg_path}: a {cls_name}, but DDIM inversion needs an "
                              f"unconditional UNet2DModel")
    try:
        unet = d.UNet2DModel.from_config(config)
    except Exception as e:  # diffusers raises plain ValueError/TypeError for bad configs
        raise CheckpointError(f"{cfg_path}: cannot build a UNet2DModel ({e})") from None
    weights = path if path.is_file() and path.name != "config.json" else _find_weights(folder)
    sd = _rename_legacy_keys(read_checkpoint(weights), set(unet.state_dict()))
    load_state_dict_strict(unet, sd, name="ddim UNet2DModel", path=weights)
    return unet.eval(), _find_scheduler_config(folder)


class DDIMInversionTranslator(nn.Module):
    """x -> DDIM-invert ``depth`` of the way -> DDIM-regenerate (batched).

    ``unet`` is an unconditional diffusers UNet2DModel (None until weights are loaded).
    A UNet with twice the image channels out (learned variance) has its first half read as
    the noise prediction.
    """

    def __init__(self, unet=None, scheduler_config: dict | None = None):
        super().__init__()
        self.unet = unet
        self.scheduler_config = dict(scheduler_config or DEFAULT_SCHEDULER_CONFIG)
        if unet is not None:
            self.spec = spec_for(unet)

    def set_unet(self, unet, scheduler_config: dict | None = None) -> None:
        self.unet = unet
        self.scheduler_config = dict(scheduler_config or DEFAULT_SCHEDULER_CONFIG)
        self.spec = spec_for(unet)

    def _eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.unet(x, t).sample
        c = x.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out

    def export_module(self) -> "DDIMUNetStep":
        """What an engine runs (rtkit.export protocol): one UNet evaluation eps(x, t); the
        runtime runs inversion and regeneration around it (``translate_with_step``)."""
        self._check(DEFAULT_STEPS, 1.0, None)
        return DDIMUNetStep(self)

    def export_inputs(self, batch: int) -> dict:
        h, w = self.spec.input_size
        return {"input": torch.rand(batch, 3, h, w) * 2 - 1,
                "t": torch.randint(0, 1000, (batch,), dtype=torch.long)}

    def _check(self, steps: int, depth: float, inversion_steps: int | None) -> int:
        if self.unet is None:
            raise RtkitError("ddim has no UNet loaded: create('ddim', checkpoint=<diffusers UNet "
                             "folder>/config.json) or create('ddim', unet_dir=<folder>)")
        return inversion_count(steps, depth, inversion_steps)

    def invert(self, x: torch.Tensor, *, steps: int = DEFAULT_STEPS, depth: float = 1.0,
               inversion_steps: int | None = None) -> torch.Tensor:
        """Deterministic DDIM inversion of images x (in [-1, 1]) to the latent at that depth."""
        n_inv = self._check(steps, depth, inversion_steps)
        return ddim_invert(self._eps, x, steps, n_inv, self.scheduler_config)

    def regenerate(self, latent: torch.Tensor, *, steps: int = DEFAULT_STEPS, depth: float = 1.0,
                   inversion_steps: int | None = None, eta: float = 0.0,
                   seed: int | Sequence[int] | torch.Tensor = 0) -> torch.Tensor:
        """DDIM sampling from a latent at that depth back to an image. eta > 0 adds noise
        drawn per sample (seed s gives sample i the seed s + i, as in UNSB)."""
        n_inv = self._check(steps, depth, inversion_steps)
        return ddim_regenerate(self._eps, latent, steps, n_inv, self.scheduler_config, eta=eta, seed=seed)

    def forward(self, x: torch.Tensor, steps: int = DEFAULT_STEPS, depth: float = 1.0,
                eta: float = 0.0, seed: int | Sequence[int] | torch.Tensor = 0,
                inversion_steps: int | None = None) -> torch.Tensor:
        steps = int(steps)
        inversion_steps = None if inversion_steps is None else int(inversion_steps)
        latent = self.invert(x, steps=steps, depth=float(depth), inversion_steps=inversion_steps)
        return self.regenerate(latent, steps=steps, depth=float(depth),
                               inversion_steps=inversion_steps, eta=float(eta), seed=seed)


class DDIMUNetStep(nn.Module):
    """One noise prediction eps(x, t) with t (int64, one per image) as a graph input."""

    def __init__(self, translator: DDIMInversionTranslator):
        super().__init__()
        self.translator = translator
        base = translator.spec
        self.spec = ModelSpec(task=base.task, input_size=base.input_size, value_range=base.value_range,
                              channels=base.channels, alignment=base.alignment, resize=base.resize,
                              inputs=(TensorSpec("t", "int64", ("batch",), 0),))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.translator._eps(x, t)


def spec_for(unet) -> ModelSpec:
    """SPEC with the input size the UNet was trained at (config sample_size)."""
    size = unet.config.sample_size
    if size is None:
        return SPEC
    hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    return dataclasses.replace(SPEC, input_size=hw)


def load_checkpoint(model: DDIMInversionTranslator, path: str | Path) -> None:
    """Registry loader: ``path`` is a UNet folder's config.json or weights file."""
    unet, scheduler_config = load_unet(path)
    model.set_unet(unet, scheduler_config)


def tiny_unet_config(sample_size: int = 32) -> dict:
    """A 2-level UNet2DModel (16/32 channels, one attention level) for tests."""
    return dict(sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1,
                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                attention_head_dim=8)


PIPELINE = Pipeline(parts={"step": lambda model: model.export_module()}, loop="ddim",
                    settings=lambda model: {"scheduler_config": dict(model.scheduler_config)})


@register_model("ddim", spec=SPEC, loader=load_checkpoint, pipeline=PIPELINE,
                description="DDIM inversion + regeneration with a diffusers UNet2DModel (needs weights)")
def ddim(unet_dir: str | Path | None = None) -> nn.Module:
    if unet_dir is None:
        return DDIMInversionTranslator()  # weights come through the checkpoint loader
    unet, scheduler_config = load_unet(unet_dir)
    return DDIMInversionTranslator(unet, scheduler_config)


@register_model("ddim_tiny", spec=dataclasses.replace(SPEC, input_size=(32, 32)),
                loader=load_checkpoint, tiny=True, pipeline=PIPELINE,
                description="DDIM inversion with a tiny random UNet2DModel (32x32), for tests")
def ddim_tiny(sample_size: int = 32) -> nn.Module:
    unet = _diffusers().UNet2DModel(**tiny_unet_config(sample_size))
    return DDIMInversionTranslator(unet)
