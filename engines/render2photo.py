"""render2photo: the small bundled translator of the demo (sample render style -> photo style).

A residual encoder-decoder (two stride-2 stages, residual blocks at 1/4 resolution) that
predicts a correction added to its input. About 0.3 M parameters, so the weights ship in the
package; `rt-train demo-translator` reproduces them from the sample dataset.
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
    def __init__(self, width: int = 32, blocks: int = 4):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.LeakyReLU(0.2))
        self.down1 = nn.Sequential(nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.LeakyReLU(0.2))
        self.down2 = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 4, stride=2, padding=1), nn.LeakyReLU(0.2))
        self.body = nn.Sequential(*[ResBlock(2 * w) for _ in range(blocks)])
        self.up2 = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                 nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.LeakyReLU(0.2))
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                 nn.Conv2d(4 * w, w, 3, padding=1), nn.LeakyReLU(0.2))
        self.head = nn.Conv2d(2 * w, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        d1 = self.down1(s)
        d2 = self.body(self.down2(d1))
        u1 = self.up1(torch.cat([self.up2(d2), d1], 1))
        # A correction on top of the input keeps geometry (identity) and learns the style.
        return torch.clamp(x + self.head(torch.cat([u1, s], 1)), -1.0, 1.0)


@register_model("render2photo", spec=SPEC,
                default_checkpoint=str(BUNDLED_WEIGHTS) if BUNDLED_WEIGHTS.exists() else None,
                description="bundled demo translator: sample render style -> sample photo style")
def render2photo(width: int = 32, blocks: int = 4) -> nn.Module:
    return Render2Photo(width, blocks)


@register_model("render2photo_tiny", spec=SPEC, tiny=True,
                description="render2photo at width 8 for tests")
def render2photo_tiny(width: int = 8, blocks: int = 1) -> nn.Module:
    return Render2Photo(width, blocks)
