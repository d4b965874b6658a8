"""DECENT (Xie, Ho & Zhang, NeurIPS 2022) training: the method (``DecentMethod``, registered as
"decent") and its pieces: density-changing regularisation with block neural autoregressive flows
(BNAF) on encoder patches, identity loss, PatchGAN (LSGAN and patch sampling: train/cut_family.py).

The generator is CUT's ResnetGenerator (rtkit.engines.cut). Per step:

- patches: ``G(x, layers=[0, 4, 8, 12, 16])`` gives encoder features; ``num_patches`` (256)
  positions are drawn per layer, shared by every image of the batch.
- flows: one density estimator per domain (``F_A`` on source patches, ``F_B`` on target
  patches), one BNAF per layer, trained by maximum likelihood on detached patches
  (Adam, amsgrad, lr 1e-3, gradient norm clipped to 0.1 per estimator). The generator
  update reads a Polyak average of the flow parameters (decay 0.998).
- density-changing loss (weight 0.01): for source patch p and the patch at the same position
  of the translation, the change d = log p_A(p) - log p_B(G(x)_p) in bits per dimension
  (divided by C ln 2); the loss is its variance over the patches of each image, averaged over
  images and layers. A constant change keeps every patch's relative density: the translation
  preserves the source's structure without a contrastive or cycle term.
- LSGAN (weight 1) with a 70x70 PatchGAN, and identity L1 ||G(y) - y|| (weight 10).

Quirks of the official code kept here: the Polyak average starts from zero (no bias
correction), so early generator updates see shrunken flows; the patch count per layer is
min(256, H*W).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rtkit.engines.cut import BlurDownsample
from rtkit.engines.errors import RtkitError
from rtkit.train.cut_family import CUTFamilyMethod, CUTFamilyOptions, init_xavier, lsgan_loss, sample_patches
from rtkit.train.translator_method import register_method, requires_grad


# -- BNAF ------------------------------------------------------------------------------------------

class MaskedWeight(nn.Module):
    """Block lower-triangular linear map with positive (exp) diagonal blocks and weight
    normalisation; returns the output and the log diagonal blocks of the Jacobian.

    ``in_features`` and ``out_features`` are multiples of ``dim`` (the flow's input size);
    block i of the output sees blocks 0..i of the input.
    """

    def __init__(self, in_features: int, out_features: int, dim: int):
        super().__init__()
        self.in_features, self.out_features, self.dim = in_features, out_features, dim
        bi, bo = in_features // dim, out_features // dim
        weight = torch.zeros(out_features, in_features)
        for i in range(dim):
            block = torch.empty(bo, (i + 1) * bi)
            nn.init.xavier_uniform_(block)
            weight[i * bo:(i + 1) * bo, : (i + 1) * bi] = block
        self._weight = nn.Parameter(weight)
        self._diag_weight = nn.Parameter(torch.rand(out_features, 1).log())
        bound = 1.0 / math.sqrt(out_features)
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        mask_d = torch.zeros_like(weight)
        mask_o = torch.ones_like(weight)
        for i in range(dim):
            mask_d[i * bo:(i + 1) * bo, i * bi:(i + 1) * bi] = 1
            mask_o[i * bo:(i + 1) * bo, i * bi:] = 0
        self.register_buffer("mask_d", mask_d)
        self.register_buffer("mask_o", mask_o)

    def get_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.exp(self._weight) * self.mask_d + self._weight * self.mask_o
        w_sq = (w ** 2).sum(-1, keepdim=True)
        w = self._diag_weight.exp() * w / w_sq.sqrt()
        log_diag = self._diag_weight + self._weight - 0.5 * torch.log(w_sq)
        blocks = log_diag.t()[self.mask_d.bool().t()].view(
            self.dim, self.in_features // self.dim, self.out_features // self.dim)
        return w.t(), blocks

    def forward(self, x: torch.Tensor, grad: torch.Tensor | None = None):
        w, blocks = self.get_weights()
        g = blocks.transpose(-2, -1).unsqueeze(0).expand(x.shape[0], -1, -1, -1)
        if grad is not None:
            g = torch.logsumexp(g.unsqueeze(-2) + grad.transpose(-2, -1).unsqueeze(-3), -1)
        return x.matmul(w) + self.bias, g


class TanhLogJacobian(nn.Tanh):
    """tanh with the log-derivative log(1 - tanh(x)^2) added to the running Jacobian blocks."""

    def forward(self, x: torch.Tensor, grad: torch.Tensor | None = None):
        g = -2 * (x - math.log(2) + F.softplus(-2 * x))
        return torch.tanh(x), (g.view(grad.shape) + grad) if grad is not None else g


class BNAFBlock(nn.Sequential):
    """MaskedWeight / tanh stack; optional gated residual. Returns (y, log|det J|)."""

    def __init__(self, *layers: nn.Module, res: str | None = None):
        super().__init__(*layers)
        self.res = res
        if res == "gated":
            self.gate = nn.Parameter(torch.randn(1))

    def forward(self, x: torch.Tensor):
        y, grad = x, None
        for layer in self:
            y, grad = layer(y, grad)
            grad = grad if grad.dim() == 4 else grad.view(grad.shape + (1, 1))
        g = grad.reshape(grad.shape[0], grad.shape[1])  # (N, dim): the diagonal log-derivatives
        if self.res == "gated":
            gate = self.gate.sigmoid()
            return gate * y + (1 - gate) * x, (F.softplus(g + self.gate) - F.softplus(self.gate)).sum(-1)
        return y, g.sum(-1)


class _Flip(nn.Module):
    def forward(self, x: torch.Tensor):
        return x.flip(-1), 0.0


class _FlowChain(nn.Sequential):
    def forward(self, x: torch.Tensor):
        log_det = 0.0
        for m in self:
            x, ld = m(x)
            log_det = log_det + ld
        return x, log_det


class BNAF(nn.Module):
    """Block neural autoregressive flow density on R^num_inputs (DECENT defaults: one flow,
    one hidden block of ``hidden_dim`` units per input dimension)."""

    def __init__(self, num_inputs: int, n_flows: int = 1, n_layers: int = 0, hidden_dim: int = 10,
                 residual: str = "gated"):
        super().__init__()
        d, h = num_inputs, num_inputs * hidden_dim
        flows: list[nn.Module] = []
        for f in range(n_flows):
            hidden: list[nn.Module] = []
            for _ in range(n_layers - 1):
                hidden += [MaskedWeight(h, h, dim=d), TanhLogJacobian()]
            layers = [MaskedWeight(d, h, dim=d), TanhLogJacobian(), *hidden, MaskedWeight(h, d, dim=d)]
            flows.append(BNAFBlock(*layers, res=residual if f < n_flows - 1 else None))
            if f < n_flows - 1:
                flows.append(_Flip())
        self.model = _FlowChain(*flows)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        y, log_det = self.model(x)
        return (-0.5 * y.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1) + log_det


class PatchDensityEstimator(nn.Module):
    """One BNAF per feature layer (``flow_0``, ``flow_1``, ...), built from the layer widths."""

    def __init__(self, channels: Sequence[int], n_flows: int = 1, n_layers: int = 0, hidden_dim: int = 10):
        super().__init__()
        self.n_layers = len(channels)
        for i, c in enumerate(channels):
            setattr(self, f"flow_{i}", BNAF(int(c), n_flows=n_flows, n_layers=n_layers, hidden_dim=hidden_dim))

    def forward(self, feats: Sequence[torch.Tensor], num_patches: int = 256,
                patch_ids: Sequence[torch.Tensor] | None = None, detach: bool = False):
        """(log-probabilities per sampled patch, feature widths, patch positions) per layer.

        Computed in float32 (the Jacobian log-sum-exps are not fp16-safe)."""
        log_probs, widths, ids = [], [], []
        with torch.autocast(feats[0].device.type, enabled=False):
            for i, feat in enumerate(feats):
                x, pid = sample_patches(feat, num_patches, None if patch_ids is None else patch_ids[i])
                if detach:
                    x = x.detach()
                log_probs.append(getattr(self, f"flow_{i}").log_probs(x.float()))
                widths.append(feat.shape[1])
                ids.append(pid)
        return log_probs, widths, ids


def flow_nll(log_probs_a: Sequence[torch.Tensor], log_probs_b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Maximum-likelihood loss of both estimators: sum over layers of the mean NLLs / layers."""
    total = sum(-a.mean() - b.mean() for a, b in zip(log_probs_a, log_probs_b))
    return total / len(log_probs_a)


def density_change_loss(log_probs_src: Sequence[torch.Tensor], log_probs_fake: Sequence[torch.Tensor],
                        widths: Sequence[int], batch_size: int, *, across_batch: bool = False) -> torch.Tensor:
    """Variance of the per-patch log-density change (bits per dimension), averaged over layers.

    ``across_batch``: one variance over all patches of the batch (official ``--var_all``);
    default, per image then averaged (the official default).
    """
    total = 0.0
    for lp_src, lp_fake, width in zip(log_probs_src, log_probs_fake, widths):
        change = (lp_src.detach() - lp_fake).reshape(-1) / (width * math.log(2))
        if across_batch:
            total = total + change.var()
        else:
            total = total + change.view(batch_size, -1).var(dim=-1).mean()
    return total / len(log_probs_src)


class PolyakAverage:
    """Exponential moving average of parameters, swapped in for the generator update.

    Matches the official optimiser wrapper: the average starts at zero and is updated after
    every flow step as ``avg = decay * avg + (1 - decay) * param``.
    """

    def __init__(self, params: Sequence[nn.Parameter], decay: float = 0.998):
        self.params = list(params)
        self.decay = float(decay)
        self.average = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    @torch.no_grad()
    def update(self):
        for avg, p in zip(self.average, self.params):
            avg.mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def swap(self):
        """Exchange parameters and their averages (call twice to restore)."""
        for i, p in enumerate(self.params):
            current = p.detach().clone()
            p.copy_(self.average[i])
            self.average[i] = current

    def state_dict(self) -> dict:
        return {"decay": self.decay, "average": [a.detach().clone() for a in self.average]}

    def load_state_dict(self, state: dict):
        if len(state["average"]) != len(self.average):
            raise ValueError(f"Polyak state has {len(state['average'])} tensors, expected {len(self.average)}")
        self.decay = float(state["decay"])
        for a, s in zip(self.average, state["average"]):
            a.copy_(s)


# -- GAN pieces -------------------------------------------------------------------------------------------

def identity_loss(idt: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between G(target) and target."""
    return F.l1_loss(idt.float(), target.float())


class PatchGANDiscriminator(nn.Module):
    """CUT's anti-aliased PatchGAN (``basic``: n_layers 3, 70x70 receptive field at ndf 64).

    conv(k4, s1) + LeakyReLU + blur-downsample, then (conv, InstanceNorm, LeakyReLU,
    blur-downsample) x (n_layers - 1), conv + IN + LeakyReLU, conv to one channel; keys
    ``model.N.*`` (blur filters are ``filt`` buffers). Xavier-normal init, gain 0.02.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=1, padding=1), nn.LeakyReLU(0.2, True),
                                BlurDownsample(ndf)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1), nn.InstanceNorm2d(ndf * mult),
                    nn.LeakyReLU(0.2, True), BlurDownsample(ndf * mult)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1), nn.InstanceNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*seq)
        init_xavier(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# -- the method -----------------------------------------------------------------------------------

@dataclass
class DecentOptions(CUTFamilyOptions):
    lambda_gan: float = 1.0
    lambda_idt: float = 10.0
    lambda_var: float = 0.01
    var_layers: tuple = (0, 4, 8, 12, 16)
    var_all: bool = False            # one variance over the batch instead of per image
    flow_blocks: int = 1
    bnaf_layers: int = 0
    bnaf_dim: int = 10
    flow_lr: float = 1e-3
    flow_ema: float = 0.998
    flow_clip: float = 0.1


@register_method("decent")
class DecentMethod(CUTFamilyMethod):
    """DECENT: per step, flows (ML), then D (LSGAN), then G with the averaged flows."""

    Options = DecentOptions
    default_generator = "decent"

    def __init__(self, cfg, opts: DecentOptions, ctx, dtype):
        super().__init__(cfg, opts, ctx, dtype)
        self.generator = self.build_generator()
        self.layers = list(opts.var_layers)
        _, feats = self.probe(lambda x: self.generator(x, layers=self.layers))
        widths = [f.shape[1] for f in feats]
        if not widths:
            raise RtkitError(f"DECENT needs at least one var layer, got {tuple(opts.var_layers)}")
        self.flow_a = PatchDensityEstimator(widths, opts.flow_blocks, opts.bnaf_layers, opts.bnaf_dim).to(self.device)
        self.flow_b = PatchDensityEstimator(widths, opts.flow_blocks, opts.bnaf_layers, opts.bnaf_dim).to(self.device)
        self.discriminator = PatchGANDiscriminator(3, opts.ndf, opts.n_layers_d).to(self.device)
        self.nets = {"G": self.generator, "D": self.discriminator, "F_A": self.flow_a, "F_B": self.flow_b}
        flow_params = list(self.flow_a.parameters()) + list(self.flow_b.parameters())
        self.flow_average = PolyakAverage(flow_params, opts.flow_ema)
        self.set_optimizers({"G": self.generator.parameters(), "D": self.discriminator.parameters()},
                            extra={"F": torch.optim.Adam(flow_params, lr=opts.flow_lr, amsgrad=True)})

    def train_step(self, batch):
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
        loss_d = self.discriminator_step(D, fake_b, real_b)
        # generator, reading the averaged flows
        self.flow_average.swap()
        requires_grad([D, self.flow_a, self.flow_b], False)
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
            requires_grad([D, self.flow_a, self.flow_b], True)
            self.flow_average.swap()
        return {"loss_G": loss_g.detach(), "G_GAN": loss_gan.detach(), "idt": loss_idt.detach(),
                "var": loss_var.detach(), "loss_D": loss_d.detach(), "nll_F": loss_f.detach()}

    def extra_state(self) -> dict:
        return {"flow_average": self.flow_average.state_dict()}

    def load_extra_state(self, state: dict):
        self.flow_average.load_state_dict(state["flow_average"])


__all__ = ["MaskedWeight", "BNAF", "PatchDensityEstimator", "flow_nll", "density_change_loss", "PolyakAverage",
           "identity_loss", "PatchGANDiscriminator", "DecentOptions", "DecentMethod"]
