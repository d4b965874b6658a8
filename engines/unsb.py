"""UNSB: the unpaired neural Schrödinger bridge translator (Kim et al., ICLR 2024).

Two pieces:

- ``UNSBGenerator``: one network evaluation ``G(x_t, t_idx, z)``, the official
  ResnetGenerator_ncsn ("resnet_9blocks_cond"): the CUT ResNet trunk (antialiased blur
  down/upsampling, InstanceNorm without affine, reflect padding) whose residual blocks take a
  time embedding and a z-driven AdaIN-style modulation. Its state_dict keys are the official
  ones, so a published ``<epoch>_net_G.pth`` (a plain state_dict) loads strictly. This is the
  module to export: inputs ``x``, ``t`` (int64 step index per sample) and ``z`` (N, 4*ngf).
- ``sample``: the official multi-step test schedule around any step function, with noise drawn
  from per-sample seeded generators, so a result depends only on the image and its seed.
  ``UNSBTranslator`` (registered ``unsb`` / ``unsb_tiny``) runs it in ``forward``.

The official quirk, reproduced on purpose: the conditioned residual block walks its first
sub-block (pad, conv, norm) applying every layer to the block *input* instead of to the
previous layer's output, so only the last layer (the norm) reaches the rest of the block.
Consequences that hold for every official checkpoint:

- the generator's output does not depend on the time index ``t`` at all;
- the time-embedding MLP (``time_embed.*``), each block's ``Dense_time`` and first conv
  (``model_res.N.conv_block.1.*``) have no effect on the output and get no gradient;
- ``model_res.N.style.*`` is never called by the official forward either.

All of them stay in the module so official files load strictly. The discarded first conv is
not evaluated here (the official code computes and throws it away); this changes no output
and saves a third of the work: 84.8 instead of 125.6 GFLOP per evaluation at 256x256.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rtkit.engines.checkpoint import load_state_dict_strict, read_checkpoint, unwrap
from rtkit.engines.registry import Pipeline, register_model
from rtkit.engines.sampling import DEFAULT_NFE, DEFAULT_TAU, sample
from rtkit.engines.spec import ModelSpec, TensorSpec

SPEC = ModelSpec(task="translate", input_size=None, value_range=(-1.0, 1.0), channels="RGB",
                 alignment="arcface112", resize="native", size_multiple=4,
                 settings={"nfe": DEFAULT_NFE, "tau": DEFAULT_TAU, "seed": 0})


def step_spec(z_dim: int = 256) -> ModelSpec:
    """Spec of one exported evaluation G(x, t, z): the runtime loops it with ``sample``."""
    return ModelSpec(task="translate", input_size=None, value_range=(-1.0, 1.0), channels="RGB",
                     alignment="arcface112", resize="native", size_multiple=4,
                     inputs=(TensorSpec("t", "int64", ("batch",), 0),
                             TensorSpec("z", "float32", ("batch", z_dim), None)))


# --------------------------------------------------------------------------- building blocks

def timestep_embedding(t_idx: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [sin | cos] of integer step indices, always in float32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t_idx.device)
                      * -(math.log(max_period) / (half - 1)))
    args = t_idx.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class PixelNorm(nn.Module):
    """Scale each vector to unit root-mean-square over its features."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)


def _binomial_kernel(size: int) -> torch.Tensor:
    row = torch.tensor([math.comb(size - 1, k) for k in range(size)], dtype=torch.float32)
    k = row[:, None] * row[None, :]
    return k / k.sum()


class BlurDownsample(nn.Module):
    """Antialiased stride-2 downsampling: reflect pad 1, fixed depthwise [1,2,1]^2/16 blur."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("filt", _binomial_kernel(3)[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2,
                        groups=x.shape[1])


class BlurUpsample(nn.Module):
    """x2 upsampling by a transposed depthwise [1,3,3,1]^2 filter (gain 4) on a replicate pad."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("filt", (_binomial_kernel(4) * 4)[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.filt, stride=2,
                               padding=2, groups=x.shape[1])
        # (2H + 2) rows come out; the official crop keeps rows 1 .. 2H.
        return y[:, :, 1:-1, 1:-1]


class AdaptiveLayer(nn.Module):
    """Per-channel affine modulation gamma * x + beta, (gamma, beta) = Linear(z embedding)."""

    def __init__(self, channels: int, style_dim: int):
        super().__init__()
        self.style_net = nn.Linear(style_dim, 2 * channels)
        with torch.no_grad():
            self.style_net.bias[:channels] = 1.0
            self.style_net.bias[channels:] = 0.0

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.style_net(style)[:, :, None, None].chunk(2, dim=1)
        return gamma * x + beta


def _instance_norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ConditionedResBlock(nn.Module):
    """Residual block conditioned on time and z, with the official key names.

    Layout as published: conv_block = [reflect pad, conv3x3, norm], adaptive (z modulation),
    conv_fin = [ReLU, reflect pad, conv3x3, norm], Dense_time (time -> channel bias) and
    ``style`` (built but never called). See the module docstring for the quirk in ``forward``.
    """

    def __init__(self, dim: int, temb_dim: int, z_dim: int):
        super().__init__()
        self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3),
                                        _instance_norm(dim))
        self.adaptive = AdaptiveLayer(dim, z_dim)
        self.conv_fin = nn.Sequential(nn.ReLU(), nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3),
                                      _instance_norm(dim))
        self.Dense_time = nn.Linear(temb_dim, dim)
        nn.init.zeros_(self.Dense_time.bias)
        self.style = nn.Linear(z_dim, 2 * dim)
        with torch.no_grad():
            self.style.bias[:dim] = 1.0
            self.style.bias[dim:] = 0.0

    def forward(self, x: torch.Tensor, z_embed: torch.Tensor) -> torch.Tensor:
        # Official quirk: every conv_block layer is applied to x and the results overwrite each
        # other, so only the norm of the block input survives (no pad/conv/time bias).
        h = self.conv_block[2](x)
        h = self.adaptive(h, z_embed)
        return x + self.conv_fin(h)


# --------------------------------------------------------------------------- generator

class UNSBGenerator(nn.Module):
    """ResnetGenerator_ncsn: one evaluation G(x_t, t_idx, z) -> prediction of the target image.

    ngf: width of the first layer; the residual trunk runs at 4*ngf channels and 1/4 resolution.
    z has 4*ngf features; the time embedding is sinusoidal of size ngf, then an MLP to 4*ngf.
    """

    def __init__(self, ngf: int = 64, n_blocks: int = 9, n_mlp: int = 3, in_channels: int = 3,
                 out_channels: int = 3):
        super().__init__()
        self.ngf = ngf
        self.z_dim = 4 * ngf
        self.model = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7), _instance_norm(ngf), nn.ReLU(),
            nn.Conv2d(ngf, 2 * ngf, 3, padding=1), _instance_norm(2 * ngf), nn.ReLU(),
            BlurDownsample(2 * ngf),
            nn.Conv2d(2 * ngf, 4 * ngf, 3, padding=1), _instance_norm(4 * ngf), nn.ReLU(),
            BlurDownsample(4 * ngf),
        )
        self.model_res = nn.ModuleList(
            ConditionedResBlock(4 * ngf, temb_dim=4 * ngf, z_dim=4 * ngf) for _ in range(n_blocks))
        self.model_upsample = nn.Sequential(
            BlurUpsample(4 * ngf), nn.Conv2d(4 * ngf, 2 * ngf, 3, padding=1), _instance_norm(2 * ngf),
            nn.ReLU(),
            BlurUpsample(2 * ngf), nn.Conv2d(2 * ngf, ngf, 3, padding=1), _instance_norm(ngf), nn.ReLU(),
            nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh(),
        )
        mapping: list[nn.Module] = [PixelNorm(), nn.Linear(4 * ngf, 4 * ngf), nn.LeakyReLU(0.2)]
        for _ in range(n_mlp):
            mapping += [nn.Linear(4 * ngf, 4 * ngf), nn.LeakyReLU(0.2)]
        self.z_transform = nn.Sequential(*mapping)
        self.time_embed = nn.Sequential(nn.Linear(ngf, 4 * ngf), nn.LeakyReLU(0.2),
                                        nn.Linear(4 * ngf, 4 * ngf), nn.LeakyReLU(0.2))
        nn.init.zeros_(self.time_embed[0].bias)
        nn.init.zeros_(self.time_embed[2].bias)
        self.spec = step_spec(self.z_dim)

    def embed_time(self, t_idx: torch.Tensor) -> torch.Tensor:
        """Time embedding as the official code builds it (unused by the output; see module doc)."""
        return self.time_embed(timestep_embedding(t_idx, self.ngf))

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # t is accepted for the official signature; by the quirk it cannot change the output.
        z_embed = self.z_transform(z)
        h = self.model(x)
        for block in self.model_res:
            h = block(h, z_embed)
        return self.model_upsample(h)

    def encode(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor,
               layers: Sequence[int]) -> list[torch.Tensor]:
        """Features after the listed layers, numbered as the official NCE layers: 0..11 the
        encoder (``model``), 12.. the residual blocks. Stops after the last one requested."""
        wanted = set(layers)
        last = max(wanted)
        feats = []
        h = x
        for i, layer in enumerate(self.model):
            h = layer(h)
            if i in wanted:
                feats.append(h)
            if i == last:
                return feats
        z_embed = self.z_transform(z)
        for j, block in enumerate(self.model_res):
            h = block(h, z_embed)
            if j + len(self.model) in wanted:
                feats.append(h)
            if j + len(self.model) == last:
                return feats
        return feats


def init_official_(module: nn.Module, gain: float = 0.02) -> nn.Module:
    """The official training initialisation: xavier-normal(gain) conv/linear weights, zero biases
    (this overwrites the AdaIN bias of 1, as the official init_net does)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


# --------------------------------------------------------------------------- sampling

class UNSBStep(nn.Module):
    """One evaluation G(x, t, z) for export, with ``t`` kept as a real graph input.

    By the official quirk the output ignores t, and an ONNX export of the bare generator drops
    the unused input, so engines would differ in signature from the documented (x, t, z). The
    output gets ``0 * t`` added: exact (t is a small integer, never inf) and cheap.
    """

    def __init__(self, generator: UNSBGenerator):
        super().__init__()
        self.generator = generator
        self.spec = generator.spec

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = self.generator(x, t, z)
        return y + 0 * t.to(y.dtype).view(-1, 1, 1, 1)


class UNSBTranslator(nn.Module):
    """Image -> translated image: ``sample`` around a UNSBGenerator.

    ``generator`` holds the official weights; ``step`` wraps it for export (inputs x, t, z).
    """

    def __init__(self, generator: UNSBGenerator):
        super().__init__()
        self.generator = generator

    @property
    def step(self) -> UNSBStep:
        return UNSBStep(self.generator)

    def export_module(self) -> UNSBStep:
        """What an engine runs (rtkit.export protocol): one step; the runtime loops ``sample``."""
        return self.step

    def forward(self, x: torch.Tensor, nfe: int = DEFAULT_NFE, tau: float = DEFAULT_TAU,
                seed: int | Sequence[int] | torch.Tensor = 0) -> torch.Tensor:
        return sample(self.generator, x, nfe=int(nfe), tau=float(tau), seed=seed,
                      z_dim=self.generator.z_dim)


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load an official ``<epoch>_net_G.pth`` (plain state_dict) strictly into the generator.

    A state_dict saved from the whole UNSBTranslator (keys ``generator.*``) loads too.
    """
    sd = unwrap(read_checkpoint(path), prefix="generator.", path=path)
    target = model.generator if isinstance(model, UNSBTranslator) else model
    load_state_dict_strict(target, sd, name=getattr(model, "registry_name", "unsb"), path=path)


PIPELINE = Pipeline(parts={"step": lambda model: model.step}, loop="unsb")


@register_model("unsb", spec=SPEC, loader=load_checkpoint, pipeline=PIPELINE,
                description="UNSB (ICLR 2024) Schrödinger-bridge translator, 5 NFE, 14.68 M params")
def unsb(ngf: int = 64, n_blocks: int = 9, n_mlp: int = 3) -> nn.Module:
    return UNSBTranslator(UNSBGenerator(ngf=ngf, n_blocks=n_blocks, n_mlp=n_mlp))


@register_model("unsb_tiny", spec=SPEC, loader=load_checkpoint, tiny=True, pipeline=PIPELINE,
                description="UNSB at ngf 8 with 2 residual blocks, for tests")
def unsb_tiny(ngf: int = 8, n_blocks: int = 2, n_mlp: int = 3) -> nn.Module:
    return UNSBTranslator(UNSBGenerator(ngf=ngf, n_blocks=n_blocks, n_mlp=n_mlp))
