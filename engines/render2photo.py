"""render2photo: the small bundled translator of the demo (sample render style -> photo style).

A residual network at 1/4 resolution that predicts a correction added to its input: a 4x4
stride-4 stem (each 4x4 patch -> one feature vector), residual blocks at 28x28, and a 1x1 head
whose 48 channels are the 4x4x3 correction of each patch (depth-to-space). 40 K parameters and
32 M multiply-adds at 112x112: about 0.5 ms per image on one CPU core, so decoding and encoding
weigh as much as the network in a CPU conversion. The weights ship in the package;
`rt-train demo-translator` reproduces them from the sample dataset.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rtkit.engines.registry import register_model
from rtkit.engines.spec import ModelSpec

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_WEIGHTS = BUNDLED_DIR / "render2photo.safetensors"
BUNDLED_ONNX = BUNDLED_DIR / "render2photo.onnx"

SPEC = ModelSpec(task="translate", input_size=(112, 112), value_range=(-1.0, 1.0), channels="RGB",
                 alignment="arcface112", resize="resize", size_multiple=4)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


class Render2Photo(nn.Module):
    """Patch features at 1/``patch`` resolution -> residual blocks -> per-patch correction.

    Every pixel reaches the features through the stem (a strided convolution over whole patches
    drops nothing), and the 3x3 blocks give each patch the context of its neighbours. Compared
    with the earlier U-Net-like design at 1/2 and 1/4 resolution (51 K parameters, 1.2 ms),
    this one is 2.5x cheaper and, trained 6000 steps instead of 2000, slightly closer to the
    photo style on held-out identities (mean abs gap 12.31 vs 12.37)."""

    def __init__(self, width: int = 32, blocks: int = 2, patch: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, patch, stride=patch), nn.LeakyReLU(0.2))
        self.body = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.head = nn.Sequential(nn.Conv2d(width, 3 * patch * patch, 1), nn.PixelShuffle(patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A correction on top of the input keeps geometry (identity) and learns the style.
        return torch.clamp(x + self.head(self.body(self.stem(x))), -1.0, 1.0)


@register_model("render2photo", spec=SPEC,
                default_checkpoint=str(BUNDLED_WEIGHTS) if BUNDLED_WEIGHTS.exists() else None,
                description="bundled demo translator: sample render style -> sample photo style")
def render2photo(width: int = 32, blocks: int = 2) -> nn.Module:
    return Render2Photo(width, blocks)


@register_model("render2photo_tiny", spec=SPEC, tiny=True,
                description="render2photo at width 8 for tests")
def render2photo_tiny(width: int = 8, blocks: int = 1) -> nn.Module:
    return Render2Photo(width, blocks)
