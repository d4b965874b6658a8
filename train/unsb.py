"""UNSB (Kim et al., ICLR 2024) training: the method (``UNSBMethod``, registered as "unsb") and its
pieces: Schrödinger-bridge (SB) loss with an energy network, time-conditioned LSGAN
discriminator, PatchNCE with an MLP patch head (shared CUT-family set-up: train/cut_family.py).

One training step (the generator is rtkit.engines.unsb.UNSBGenerator):

- a time index t ~ U{0..T-1} (T = NFE = 5) on the ``bridge_times`` grid; without gradients,
  the bridge is simulated from the source image up to step t, giving x_t, for the source batch,
  for a second independent source batch (x'_t) and for the target batch (identity NCE);
- x_0 = G(x_t, t, z) is predicted for all of them (fresh z);
- D (time-conditioned PatchGAN, LSGAN) separates G(x_t) from target images;
- E (the same network on 12 channels: [x_t, x_0] pairs, concatenated with a second pair) is
  an energy that scores joint pairs against product pairs; its loss is
  -E(p, p) + L + L^2 with L = logsumexp over positions of E(p, p');
- SB loss = -(T - t)/T * tau * (mean E(p, p) - logsumexp E(p, p')) + tau * mean((x_t - x_0)^2):
  the entropy-regularised transport cost of the bridge step (tau = 0.01);
- PatchNCE (temperature 0.07, 256 patches, layers 0,4,8,12,16 of G's encoder, an MLP head
  2 layers wide 256 per layer, L2-normalised) between x and G(x) for the source and (identity)
  between y and G(y) for the target; the two are averaged.

Generator loss = GAN + lambda_SB * SB + lambda_NCE * NCE (the official command line sets
lambda_SB = lambda_NCE = 1; the official code multiplies the NCE term by lambda_NCE twice,
which is the same at 1 and is applied once here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rtkit.engines.cut import BlurDownsample
from rtkit.engines.unsb import timestep_embedding
from rtkit.engines.errors import RtkitError
from rtkit.train.cut_family import CUTFamilyMethod, CUTFamilyOptions, init_xavier, lsgan_loss, sample_patches
from rtkit.train.translator_method import cpu_state, register_method, requires_grad


# -- time-conditioned PatchGAN (discriminator and energy network) ---------------------------------

class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of the step index -> Linear, LeakyReLU, Linear, LeakyReLU (``main``)."""

    def __init__(self, embedding_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.main = nn.Sequential(nn.Linear(embedding_dim, hidden_dim), nn.LeakyReLU(0.2),
                                  nn.Linear(hidden_dim, output_dim), nn.LeakyReLU(0.2))

    def forward(self, t_idx: torch.Tensor) -> torch.Tensor:
        return self.main(timestep_embedding(t_idx, self.embedding_dim))


class ConditionalConvBlock(nn.Module):
    """conv(k4, s1, p1) + Linear(time) bias, [InstanceNorm], LeakyReLU, [blur downsample]."""

    def __init__(self, in_channels: int, out_channels: int, t_dim: int, *, norm: bool = True,
                 downsample: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 4, stride=1, padding=1)
        self.norm = nn.InstanceNorm2d(out_channels) if norm else nn.Identity()
        self.act = nn.LeakyReLU(0.2)
        self.down = BlurDownsample(out_channels)
        self.downsample = downsample
        self.dense = nn.Linear(t_dim, out_channels)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x) + self.dense(t_emb)[..., None, None]
        out = self.act(self.norm(out))
        return self.down(out) if self.downsample else out


class ConditionalPatchDiscriminator(nn.Module):
    """UNSB's ``basic_cond`` discriminator: PatchGAN whose blocks add a time-embedding bias.

    ``forward(x, t_idx, x2=None)``; with ``x2`` the two inputs are concatenated on channels (the
    energy network sees [x_t, x_0] pairs so it is built with 4x the image channels).
    Keys: ``model_main.N.{conv1,dense,down}``, ``final_conv``, ``t_embed.main``.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        t_dim = 4 * ndf
        blocks = [ConditionalConvBlock(in_channels, ndf, t_dim, norm=False)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            blocks.append(ConditionalConvBlock(ndf * prev, ndf * mult, t_dim))
        prev, mult = mult, min(2 ** n_layers, 8)
        blocks.append(ConditionalConvBlock(ndf * prev, ndf * mult, t_dim, downsample=False))
        self.model_main = nn.ModuleList(blocks)
        self.final_conv = nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)
        self.t_embed = TimeEmbedding(t_dim, t_dim, t_dim)
        init_xavier(self)

    def forward(self, x: torch.Tensor, t_idx: torch.Tensor, x2: torch.Tensor | None = None) -> torch.Tensor:
        t_emb = self.t_embed(t_idx)
        out = x if x2 is None else torch.cat([x, x2], dim=1)
        for block in self.model_main:
            out = block(out, t_emb)
        return self.final_conv(out)


# -- PatchNCE ---------------------------------------------------------------------------------------

class PatchSampleMLP(nn.Module):
    """Per-layer MLP head (``mlp_N``: Linear(C, nc), ReLU, Linear(nc, nc)) on sampled patches,
    L2-normalised. Built eagerly from the layer widths; Xavier-normal init gain 0.02."""

    def __init__(self, channels: Sequence[int], nc: int = 256):
        super().__init__()
        for i, c in enumerate(channels):
            setattr(self, f"mlp_{i}", nn.Sequential(nn.Linear(int(c), nc), nn.ReLU(), nn.Linear(nc, nc)))
        self.n_layers = len(channels)
        init_xavier(self)

    def forward(self, feats: Sequence[torch.Tensor], num_patches: int = 256,
                patch_ids: Sequence[torch.Tensor] | None = None):
        out, ids = [], []
        for i, feat in enumerate(feats):
            x, pid = sample_patches(feat, num_patches, None if patch_ids is None else patch_ids[i])
            x = getattr(self, f"mlp_{i}")(x)
            x = x.float()
            out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-7))
            ids.append(pid)
        return out, ids


def patch_nce_loss(feat_q: torch.Tensor, feat_k: torch.Tensor, batch_size: int,
                   temperature: float = 0.07) -> torch.Tensor:
    """Per-patch InfoNCE: each query patch against its own key (positive) and the other patches
    of the same image (negatives); keys are detached. Returns one loss per patch."""
    n, dim = feat_q.shape
    feat_k = feat_k.detach()
    l_pos = (feat_q * feat_k).sum(dim=1, keepdim=True)
    q = feat_q.view(batch_size, -1, dim)
    k = feat_k.view(batch_size, -1, dim)
    p = q.shape[1]
    l_neg = torch.bmm(q, k.transpose(2, 1))
    diagonal = torch.eye(p, device=feat_q.device, dtype=torch.bool)[None]
    l_neg = l_neg.masked_fill(diagonal, -10.0).view(-1, p)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=feat_q.device), reduction="none")


# -- Schrödinger bridge ----------------------------------------------------------------------------

def energy_terms(energy: nn.Module, xt: torch.Tensor, x0: torch.Tensor, xt2: torch.Tensor, x02: torch.Tensor,
                 t_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean E(p, p), logsumexp over every output of E(p, p')) for p = [x_t, x_0], p' = [x'_t, x'_0]."""
    joint = torch.cat([xt, x0], dim=1)
    other = torch.cat([xt2, x02], dim=1)
    e_joint = energy(joint, t_idx, joint).float().mean()
    e_product = torch.logsumexp(energy(joint, t_idx, other).float().reshape(-1), dim=0)
    return e_joint, e_product


def energy_loss(e_joint: torch.Tensor, e_product: torch.Tensor) -> torch.Tensor:
    """Energy-network objective: -E(p, p) + L + L^2 (the square keeps L near zero)."""
    return -e_joint + e_product + e_product ** 2


def sb_loss(e_joint: torch.Tensor, e_product: torch.Tensor, xt: torch.Tensor, x0: torch.Tensor, t: int,
            num_timesteps: int, tau: float) -> torch.Tensor:
    """SB generator term: -(T - t)/T * tau * (E(p, p) - L) + tau * mean((x_t - x_0)^2)."""
    weight = (num_timesteps - int(t)) / num_timesteps
    return -weight * tau * (e_joint - e_product) + tau * (xt.float() - x0.float()).pow(2).mean()


# -- the method -----------------------------------------------------------------------------------

@dataclass
class UNSBOptions(CUTFamilyOptions):
    lambda_gan: float = 1.0
    lambda_sb: float = 1.0
    lambda_nce: float = 1.0
    nce_idt: bool = True
    nce_layers: tuple = (0, 4, 8, 12, 16)
    nce_t: float = 0.07
    netf_nc: int = 256
    tau: float = 0.01
    num_timesteps: int = 5


@register_method("unsb")
class UNSBMethod(CUTFamilyMethod):
    """UNSB: simulate the bridge to a random step, then D, E, and G (+ the NCE head)."""

    Options = UNSBOptions
    default_generator = "unsb"
    uses_second_source = True

    def __init__(self, cfg, opts: UNSBOptions, ctx, dtype):
        super().__init__(cfg, opts, ctx, dtype)
        from rtkit.engines.unsb import UNSBTranslator, init_official_

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
        t0 = torch.zeros(1, dtype=torch.long, device=self.device)
        z0 = torch.zeros(1, self.z_dim, device=self.device)
        feats = self.probe(lambda x: self.generator.encode(x, t0, z0, self.layers))
        self.patch_head = PatchSampleMLP([f.shape[1] for f in feats], opts.netf_nc).to(self.device)
        self.discriminator = ConditionalPatchDiscriminator(3, opts.ndf, opts.n_layers_d).to(self.device)
        self.energy = ConditionalPatchDiscriminator(12, opts.ndf, opts.n_layers_d).to(self.device)
        self.nets = {"G": self.generator, "D": self.discriminator, "E": self.energy, "F": self.patch_head}
        self.set_optimizers({k: v.parameters() for k, v in self.nets.items()})

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
        from rtkit.engines.sampling import bridge_times

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
        loss_d = self.discriminator_step(D, fake_b, real_b, t_idx)
        # energy network
        with self.autocast():
            e_joint, e_product = energy_terms(E, xt, fake_b.detach(), xt2, fake_b2.detach(), t_idx)
            loss_e = energy_loss(e_joint, e_product)
        self.update("E", loss_e)
        # generator and NCE head
        requires_grad([D, E], False)
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
            requires_grad([D, E], True)
        return {"loss_G": loss_g.detach(), "G_GAN": loss_gan.detach(), "SB": loss_sb.detach(),
                "NCE": loss_nce.detach(), "loss_D": loss_d.detach(), "loss_E": loss_e.detach(),
                "t": torch.tensor(float(t))}

    @torch.no_grad()
    def translate(self, x):
        return self.translator(x, nfe=self.opts.num_timesteps, tau=self.opts.tau, seed=0)

    def weights_object(self, step: int):
        return cpu_state(self.generator.state_dict())   # the official {step}_net_G.pth keys

    def card(self, path, training):
        """The card records the sampler settings the generator was trained for (NFE, tau)."""
        import dataclasses

        card = super().card(path, training)
        settings = dict(card.spec.settings, nfe=int(self.opts.num_timesteps), tau=float(self.opts.tau))
        card.spec = dataclasses.replace(card.spec, settings=settings)
        return card


__all__ = ["TimeEmbedding", "ConditionalConvBlock", "ConditionalPatchDiscriminator", "PatchSampleMLP",
           "patch_nce_loss", "energy_terms", "energy_loss", "sb_loss", "UNSBOptions", "UNSBMethod"]
