"""What DECENT and UNSB share (the CUT family): patch sampling, LSGAN, CUT's init, and the set-up of
their optimisers, schedules and discriminator step.

Both train CUT-style generators against PatchGAN discriminators with Adam (lr 2e-4, betas
0.5/0.999) on every network, the learning rate constant for the first half of the run and then
linearly to zero (the published 200 + 200 epochs, here over ``steps``), and save the generator
as ``{step}_net_G.pth`` / ``latest_net_G.pth`` (a plain state_dict, the official layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from rtkit.train.optim import linear_decay
from rtkit.train.translator_method import TranslatorMethod

__all__ = ["sample_patches", "lsgan_loss", "init_xavier", "CUTFamilyOptions", "CUTFamilyMethod"]


def sample_patches(feat: torch.Tensor, num_patches: int, patch_ids: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N*P, C) feature vectors at P positions shared by the batch, and the positions.

    ``num_patches`` <= 0 keeps every position. New positions come from torch's global CPU
    generator (the training loop seeds it per step, so runs and resumes are reproducible).
    """
    n, c, h, w = feat.shape
    flat = feat.permute(0, 2, 3, 1).reshape(n, h * w, c)
    if patch_ids is None:
        if num_patches > 0:
            patch_ids = torch.randperm(h * w)[: min(num_patches, h * w)]
        else:
            patch_ids = torch.arange(h * w)
    patch_ids = patch_ids.to(feat.device)
    return flat[:, patch_ids, :].reshape(-1, c), patch_ids


def lsgan_loss(prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """Least-squares GAN: mean((D(x) - label)^2), label 1 for real, 0 for fake."""
    p = prediction.float()
    return F.mse_loss(p, torch.full_like(p, 1.0 if target_is_real else 0.0))


def init_xavier(module: nn.Module, gain: float = 0.02) -> nn.Module:
    """CUT-family default init: Xavier-normal conv/linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


@dataclass
class CUTFamilyOptions:
    """Options every CUT-family method has (the official defaults)."""

    ndf: int = 64                    # discriminator width
    n_layers_d: int = 3              # discriminator depth (3: 70x70 PatchGAN)
    num_patches: int = 256           # patches per feature layer
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    decay_start: float = 0.5         # fraction of the run before the linear decay (200 + 200 epochs)


class CUTFamilyMethod(TranslatorMethod):
    """Base of DECENT and UNSB: one Adam per network, the linear-decay schedule, the LSGAN D step."""

    def set_optimizers(self, nets: dict[str, Iterable[nn.Parameter]],
                       extra: dict[str, torch.optim.Optimizer] | None = None):
        """Adam (lr, betas from the options) per entry of ``nets``, plus ``extra`` optimisers; every
        one on the linear-decay schedule over ``cfg.steps``. Ends the set-up (scalers, broadcast)."""
        o = self.opts
        self.optimizers = {k: torch.optim.Adam(list(p), lr=o.lr, betas=(o.beta1, o.beta2)) for k, p in nets.items()}
        self.optimizers.update(extra or {})
        rule = linear_decay(self.cfg.steps, o.decay_start)
        self.schedulers = {k: torch.optim.lr_scheduler.LambdaLR(opt, rule) for k, opt in self.optimizers.items()}
        self.finish_setup()

    def discriminator_step(self, D: nn.Module, fake: torch.Tensor, real: torch.Tensor, *cond) -> torch.Tensor:
        """LSGAN update of D (optimiser "D"): fakes towards 0, reals towards 1; returns the loss."""
        with self.autocast():
            loss = 0.5 * (lsgan_loss(D(fake.detach(), *cond), False) + lsgan_loss(D(real, *cond), True))
        self.update("D", loss)
        return loss

    def probe(self, fn):
        """``fn(zeros)`` on one crop-sized image without gradients (to size heads from features)."""
        with torch.no_grad():
            return fn(torch.zeros(1, 3, self.cfg.crop_size, self.cfg.crop_size, device=self.device))
