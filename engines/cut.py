"""The CUT ResnetGenerator (Park et al., ECCV 2020), used unchanged as DECENT's generator.

``resnet_9blocks`` at ngf 64 with anti-aliased resampling, as the official ``{epoch}_net_G.pth``
files store it (one flat ``nn.Sequential`` named ``model``; indices are part of the key names):

    0 reflect pad 3 | 1 conv 7x7 3->64 | 2 IN | 3 ReLU
    4 conv 3x3 64->128 | 5 IN | 6 ReLU | 7 blur downsample (buffer ``filt`` 128x1x3x3)
    8 conv 3x3 128->256 | 9 IN | 10 ReLU | 11 blur downsample (``filt`` 256x1x3x3)
    12..20 residual blocks (``conv_block.1`` and ``conv_block.5`` convs)
    21 blur upsample (``filt`` 256x1x4x4) | 22 conv 256->128 | 23 IN | 24 ReLU
    25 blur upsample (``filt`` 128x1x4x4) | 26 conv 128->64 | 27 IN | 28 ReLU
    29 reflect pad 3 | 30 conv 7x7 64->3 | 31 tanh

InstanceNorm has no affine parameters; every conv has a bias. The ``filt`` buffers are in the
state_dict and the official loader is strict, so ours is too. 11.38 M parameters.

``forward(x, layers=[...])`` also returns the outputs of the listed ``model`` indices: DECENT's
density loss taps layers 0, 4, 8, 12, 16 and CUT's PatchNCE uses the same list with
``encode_only=True`` (features only, stopping after the deepest listed layer).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rtkit.engines.checkpoint import load_state_dict_strict, read_checkpoint, unwrap
from rtkit.engines.registry import register_model
from rtkit.engines.spec import ModelSpec

SPEC = ModelSpec(task="translate", input_size=None, value_range=(-1.0, 1.0), channels="RGB",
                 alignment="arcface112", resize="native", size_multiple=4)

# The layers DECENT's density loss (and CUT's PatchNCE) read features from.
FEATURE_LAYERS = (0, 4, 8, 12, 16)


def binomial_filter(taps: Sequence[float]) -> torch.Tensor:
    """Outer product of a 1-D binomial row with itself, normalised to sum 1."""
    row = torch.tensor(taps, dtype=torch.float64)
    f = row[:, None] * row[None, :]
    return (f / f.sum()).float()


class BlurDownsample(nn.Module):
    """Anti-aliased stride-2 downsample: reflect pad 1, depthwise [1,2,1]x[1,2,1]/16 blur."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("filt", binomial_filter([1.0, 2.0, 1.0]).repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


class BlurUpsample(nn.Module):
    """Anti-aliased x2 upsample: replicate pad 1, depthwise transposed [1,3,3,1]-outer blur
    (scaled by 4 so a constant image keeps its value), then crop back to exactly 2H x 2W."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("filt", binomial_filter([1.0, 3.0, 3.0, 1.0]).mul(4.0).repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.filt, stride=2, padding=2,
                               groups=x.shape[1])
        return y[:, :, 1:-1, 1:-1]


class ResnetBlock(nn.Module):
    """x + [pad, conv, IN, ReLU, pad, conv, IN](x); convs at ``conv_block.1`` and ``conv_block.5``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class CUTGenerator(nn.Module):
    """CUT/DECENT ResnetGenerator: image in [-1, 1] -> translated image in [-1, 1].

    ReLUs are in-place as in the official network: besides saving memory, this means a tapped
    InstanceNorm output (layer 2, 5, ...) is seen after its ReLU, exactly as the official
    ``layers=`` output returns it.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, n_blocks: int = 9):
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7),
                                   nn.InstanceNorm2d(ngf), nn.ReLU(True)]
        ch = ngf
        for _ in range(2):
            layers += [nn.Conv2d(ch, 2 * ch, 3, padding=1), nn.InstanceNorm2d(2 * ch), nn.ReLU(True),
                       BlurDownsample(2 * ch)]
            ch *= 2
        layers += [ResnetBlock(ch) for _ in range(n_blocks)]
        for _ in range(2):
            layers += [BlurUpsample(ch), nn.Conv2d(ch, ch // 2, 3, padding=1), nn.InstanceNorm2d(ch // 2),
                       nn.ReLU(True)]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self.size_multiple = 4
        init_weights(self)

    def forward(self, x: torch.Tensor, layers: Sequence[int] | None = None, encode_only: bool = False):
        """``G(x)``; with ``layers``, ``(G(x), [features of the listed model indices])``.

        Features come in increasing layer order. ``encode_only=True`` returns only the features
        and stops after the deepest listed layer (CUT's PatchNCE path). Differences from the
        official forward, which never matter for the sorted lists CUT and DECENT use: the
        official code stops at the last listed layer rather than the deepest, treats -1 as
        "never stop early", silently ignores out-of-range indices, and appends to the caller's
        list; here an index outside 0..len(model)-1 raises ValueError and the list is not touched.
        """
        if not layers:
            return self.model(x)
        wanted = sorted(set(int(i) for i in layers))
        if wanted[0] < 0 or wanted[-1] >= len(self.model):
            raise ValueError(f"layers must be in 0..{len(self.model) - 1}, got {list(layers)}")
        feats = []
        for idx, layer in enumerate(self.model):
            x = layer(x)
            if idx in wanted:
                feats.append(x)
                if encode_only and idx == wanted[-1]:
                    return feats
        return x, feats

    def encode(self, x: torch.Tensor, end_layer: int) -> torch.Tensor:
        """Run ``model[0..end_layer]`` (DECENT's encode)."""
        for layer in self.model[: end_layer + 1]:
            x = layer(x)
        return x

    def decode(self, feat: torch.Tensor, start_layer: int) -> torch.Tensor:
        """Run ``model[start_layer+1..]`` on a feature from ``encode(x, start_layer)``."""
        for layer in self.model[start_layer + 1:]:
            feat = layer(feat)
        return feat


def init_weights(model: nn.Module, gain: float = 0.02) -> None:
    """CUT/DECENT's default training initialisation: Xavier-normal conv weights (gain 0.02), zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight, gain=gain)
            nn.init.zeros_(m.bias)


def load_net_g(model: nn.Module, path: str | Path) -> None:
    """Load an official ``{epoch}_net_G.pth`` (plain state_dict, ``filt`` buffers included), strictly.

    A ``module.`` prefix (a DataParallel-wrapped save) is stripped, and a ``{'state_dict': ...}``
    container is opened, so a wrong file is reported by its keys rather than as empty.
    """
    state = unwrap(read_checkpoint(path), "state_dict", "module.", path=path)
    load_state_dict_strict(model, state, name=getattr(model, "registry_name", "cut"), path=path)


@register_model("decent", spec=SPEC, loader=load_net_g,
                description="DECENT generator (CUT ResnetGenerator resnet_9blocks); {epoch}_net_G.pth")
def decent(in_channels: int = 3, out_channels: int = 3, ngf: int = 64, n_blocks: int = 9) -> nn.Module:
    return CUTGenerator(in_channels, out_channels, ngf, n_blocks)


@register_model("cut", spec=SPEC, loader=load_net_g,
                description="CUT ResnetGenerator resnet_9blocks; {epoch}_net_G.pth")
def cut(in_channels: int = 3, out_channels: int = 3, ngf: int = 64, n_blocks: int = 9) -> nn.Module:
    return CUTGenerator(in_channels, out_channels, ngf, n_blocks)


@register_model("cut_tiny", spec=SPEC, loader=load_net_g, tiny=True,
                description="CUT/DECENT generator at ngf 8 with 2 residual blocks, for tests")
def cut_tiny(in_channels: int = 3, out_channels: int = 3, ngf: int = 8, n_blocks: int = 2) -> nn.Module:
    return CUTGenerator(in_channels, out_channels, ngf, n_blocks)
