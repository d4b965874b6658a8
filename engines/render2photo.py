"""render2photo: the small bundled translator of the demo (sample render style -> photo style).

A residual encoder-decoder that works at 1/2 and 1/4 resolution and predicts a correction
added to its input. 51 K parameters and 0.13 GFLOP at 112x112: about 1.2 ms per image on one
CPU core, so decode and encode weigh as much as the network in a CPU conversion. The weights ship in the package; `rt-train demo-translator`
reproduces them from the sample dataset.
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
    """Width w at 1/2 and 2w at 1/4 resolution with residual blocks, a U-Net skip, and a
    depth-to-space head back to full size.

    The stem is a 6x6 stride-2 convolution: the same function as space-to-depth by 2 followed
    by a 3x3 convolution (no pixel is dropped), without the 6-D transpose that space-to-depth
    costs in ONNX Runtime (~10% of the network's CPU time)."""

    def __init__(self, width: int = 16, blocks: int = 2):
        super().__init__()
        w = width
        act = nn.LeakyReLU(0.2)
        self.stem = nn.Sequential(nn.Conv2d(3, w, 6, stride=2, padding=2), act)
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), act)
        self.body = nn.Sequential(*[ResBlock(2 * w) for _ in range(blocks)])
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                nn.Conv2d(2 * w, w, 3, padding=1), act)
        self.head = nn.Sequential(nn.Conv2d(2 * w, 12, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        u = self.up(self.body(self.down(s)))
        # A correction on top of the input keeps geometry (identity) and learns the style.
        return torch.clamp(x + self.head(torch.cat([u, s], 1)), -1.0, 1.0)


@register_model("render2photo", spec=SPEC,
                default_checkpoint=str(BUNDLED_WEIGHTS) if BUNDLED_WEIGHTS.exists() else None,
                description="bundled demo translator: sample render style -> sample photo style")
def render2photo(width: int = 16, blocks: int = 2) -> nn.Module:
    return Render2Photo(width, blocks)


@register_model("render2photo_tiny", spec=SPEC, tiny=True,
                description="render2photo at width 4 for tests")
def render2photo_tiny(width: int = 4, blocks: int = 1) -> nn.Module:
    return Render2Photo(width, blocks)
