"""VSAIT generator (Theiss et al., ECCV 2022): a ResNet encoder-decoder with fixed Gaussian resampling.

Layout of ``ResNetGenerator(3, 3, 64, 9)`` as the official checkpoints store it:

    encoder.net.0   7x7 conv -> InstanceNorm -> ReLU            (conv.weight/bias)
    encoder.net.1   3x3 conv 64->128 -> IN -> ReLU
    encoder.net.2   Gaussian 3x3 blur, stride 2 (buffer ``weight``, 128x1x3x3)
    encoder.net.3   3x3 conv 128->256 -> IN -> ReLU
    encoder.net.4   Gaussian 3x3 blur, stride 2 (buffer, 256x1x3x3)
    encoder.net.5-9 residual blocks (net.0 conv-IN-ReLU, net.1 conv-IN)
    decoder.net.0-3 residual blocks
    decoder.net.4   Gaussian 4x4 transposed blur, x2 (buffer, 256x1x4x4)
    decoder.net.5   3x3 conv 256->128 -> IN -> ReLU
    decoder.net.6   Gaussian 4x4 transposed blur, x2 (buffer, 128x1x4x4)
    decoder.net.7   3x3 conv 128->64 -> IN -> ReLU
    decoder.net.8   7x7 conv 64->3 -> tanh

All convolutions use reflect padding; InstanceNorm has no affine parameters and no running
statistics, so norms contribute no keys. The Gaussian filters are buffers and ARE saved in the
checkpoint (VSAIT's own loader is non-strict; ours is strict, so they must be present).
11.38 M parameters. Fully convolutional: any H, W divisible by 4 round-trips exactly.

Checkpoints: the PyTorch Lightning ``.ckpt`` written by VSAIT training (``['state_dict']``,
generator keys under ``model.g_net.``; the discriminator, mapping net, VGG feature extractor and
LSH projections in the same file are ignored) or a plain generator state_dict.
No trained weights are published; users train VSAIT themselves (rtkit.train).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rtkit.engines.checkpoint import load_state_dict_strict, read_checkpoint, unwrap
from rtkit.engines.registry import register_model
from rtkit.engines.spec import ModelSpec

SPEC = ModelSpec(task="translate", input_size=None, value_range=(-1.0, 1.0), channels="RGB",
                 alignment="arcface112", resize="native", size_multiple=4)

LIGHTNING_KEY = "state_dict"
GENERATOR_PREFIX = "model.g_net."


def gaussian_kernel(kernel_size: int) -> torch.Tensor:
    """Normalised 2-D Gaussian, sigma 1, centred between the middle taps for even sizes."""
    # float32 throughout, in the official order of operations, so the buffers are bit-identical.
    centre = (kernel_size - 1) / 2.0
    taps = torch.arange(kernel_size, dtype=torch.float32) - centre
    dist2 = taps[:, None] ** 2 + taps[None, :] ** 2
    g = torch.exp(-dist2 / 2.0)
    return g / g.sum()


class ConvNormAct(nn.Module):
    """Reflect pad -> conv -> InstanceNorm (no affine) -> activation; keys ``conv.*``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 norm: bool = True, act: nn.Module | None = None):
        super().__init__()
        self.padding = kernel_size // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size)
        self.norm = nn.InstanceNorm2d(out_channels) if norm else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.padding,) * 4, mode="reflect")
        return self.act(self.norm(self.conv(x)))


class ResidualBlock(nn.Module):
    """x + (conv-IN-ReLU, conv-IN)(x); keys ``net.0.conv.*`` and ``net.1.conv.*``."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(ConvNormAct(channels, channels, 3, act=nn.ReLU()),
                                 ConvNormAct(channels, channels, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class GaussianDownsample(nn.Module):
    """Fixed depthwise 3x3 Gaussian blur with stride 2 on a zero-padded input (H -> ceil(H/2))."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.register_buffer("weight", gaussian_kernel(kernel_size).repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.weight.shape[-1] // 2
        return F.conv2d(F.pad(x, (pad,) * 4), self.weight, stride=2, groups=x.shape[1])


class GaussianUpsample(nn.Module):
    """Fixed depthwise 4x4 Gaussian transposed conv, x2 (H -> 2H).

    The kernel is scaled by stride**2 = 4 so a constant image keeps its value. The official
    module zero-pads by 1, transposes with padding 2 and crops one pixel per side; zeros add
    nothing to a transposed conv, so that equals a transposed conv with padding 1.
    """

    def __init__(self, channels: int, kernel_size: int = 4):
        super().__init__()
        self.register_buffer("weight", gaussian_kernel(kernel_size).mul(4.0).repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.weight, stride=2, padding=1, groups=x.shape[1])


class ResNetEncoder(nn.Module):
    def __init__(self, in_channels: int, ngf: int, res_blocks: int, n_downsample: int = 2):
        super().__init__()
        layers: list[nn.Module] = [ConvNormAct(in_channels, ngf, 7, act=nn.ReLU())]
        for i in range(n_downsample):
            ch = ngf * 2 ** i
            layers += [ConvNormAct(ch, 2 * ch, 3, act=nn.ReLU()), GaussianDownsample(2 * ch)]
        self.out_channels = ngf * 2 ** n_downsample
        layers += [ResidualBlock(self.out_channels) for _ in range(res_blocks)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResNetDecoder(nn.Module):
    def __init__(self, out_channels: int, ngf: int, res_blocks: int, n_upsample: int = 2):
        super().__init__()
        ch = ngf * 2 ** n_upsample
        layers: list[nn.Module] = [ResidualBlock(ch) for _ in range(res_blocks)]
        for _ in range(n_upsample):
            layers += [GaussianUpsample(ch), ConvNormAct(ch, ch // 2, 3, act=nn.ReLU())]
            ch //= 2
        layers.append(ConvNormAct(ngf, out_channels, 7, norm=False, act=nn.Tanh()))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VSAITGenerator(nn.Module):
    """VSAIT ResNetGenerator: image in [-1, 1] -> translated image in [-1, 1].

    ``res_blocks`` are split as VSAIT does: ceil(n/2) in the encoder, floor(n/2) in the decoder.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, res_blocks: int = 9,
                 n_downsample: int = 2):
        super().__init__()
        enc_blocks = res_blocks - res_blocks // 2
        self.encoder = ResNetEncoder(in_channels, ngf, enc_blocks, n_downsample)
        self.decoder = ResNetDecoder(out_channels, ngf, res_blocks - enc_blocks, n_downsample)
        self.size_multiple = 2 ** n_downsample
        init_weights(self)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def init_weights(model: nn.Module, gain: float = 0.2) -> None:
    """VSAIT's training initialisation: Xavier-normal conv weights (gain 0.2), zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight, gain=gain)
            nn.init.zeros_(m.bias)


def load_vsait_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a VSAIT Lightning ``.ckpt`` (generator under ``model.g_net.``) or a plain state_dict.

    Strict on the generator keys, Gaussian buffers included. The file is read with
    ``weights_only=True``: a checkpoint made of dicts, lists, numbers, strings and tensors (what
    Lightning writes) loads; one that pickles custom classes is refused with a CheckpointError.
    """
    state = unwrap(read_checkpoint(path), LIGHTNING_KEY, GENERATOR_PREFIX, path=path)
    load_state_dict_strict(model, state, name=getattr(model, "registry_name", "vsait"), path=path)


def lightning_checkpoint(model: nn.Module, **extra) -> dict:
    """The container VSAIT training writes, holding ``model``'s generator keys (for saving/tests)."""
    state = {GENERATOR_PREFIX + k: v for k, v in model.state_dict().items()}
    return {"epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.0.0",
            LIGHTNING_KEY: state, **extra}


@register_model("vsait", spec=SPEC, loader=load_vsait_checkpoint,
                description="VSAIT generator (ResNetGenerator 3,3,64,9); Lightning .ckpt or plain state_dict")
def vsait(in_channels: int = 3, out_channels: int = 3, ngf: int = 64, res_blocks: int = 9) -> nn.Module:
    return VSAITGenerator(in_channels, out_channels, ngf, res_blocks)


@register_model("vsait_tiny", spec=SPEC, loader=load_vsait_checkpoint, tiny=True,
                description="VSAIT generator at ngf 8 with 2 residual blocks, for tests")
def vsait_tiny(in_channels: int = 3, out_channels: int = 3, ngf: int = 8, res_blocks: int = 2) -> nn.Module:
    return VSAITGenerator(in_channels, out_channels, ngf, res_blocks)
