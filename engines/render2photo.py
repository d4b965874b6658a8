"""render2photo: the small bundled translator of the demo (sample render style -> photo style).

Two branches, both ending at full resolution so nothing is drawn per patch:

- context: a 4x4 stride-4 stem, residual blocks at 1/4 resolution (28x28 at 112) and a 1x1
  head, upsampled bilinearly to full size: colour, soft shading across the render's hard
  light bands, the highlight. Bilinear upsampling is smooth, so no patch mosaic.
- detail: a 3x3 convolution at full resolution over the image, two noise channels scaled by
  context gains, and three more context channels, predicting a correction added to the input
  (geometry, hence identity, is kept).

The noise is deterministic and derived from the input: a triangle wave of a fixed uniform
field (one value per pixel position, drawn once from a Philox stream) shifted by a fixed
linear function of the pixel's colour. It is uniform on [-1, 1] wherever the colour is flat
(what the render is), differs between images whose colours differ, and is continuous in the
input, so small input differences (fp16, another runtime, OpenCV vs torch pre-processing)
stay small in the output. The network learns where to spend it (pores on skin, strands in
hair, grain everywhere). 10 K parameters; about 1.7x the earlier engine's CPU time (measured
~0.8 ms per 112x112 image on one core in ONNX Runtime, batch 4): the full-resolution 3x3
convolution is most of it, which is why there is one and why its inputs are 8 channels (one
SIMD block). The weights ship in the package; `rt-train demo-translator` reproduces them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rtkit.engines.registry import register_model
from rtkit.engines.spec import ModelSpec

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_WEIGHTS = BUNDLED_DIR / "render2photo.safetensors"
BUNDLED_ONNX = BUNDLED_DIR / "render2photo.onnx"

SPEC = ModelSpec(task="translate", input_size=(112, 112), value_range=(-1.0, 1.0), channels="RGB",
                 alignment="arcface112", resize="resize", size_multiple=4)

NOISE_FIELD_SIZE = 128   # the field tiles beyond this (sizes are multiples of 4)
NOISE_SEED = 20240611


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


def noise_field(channels: int, size: int = NOISE_FIELD_SIZE, seed: int = NOISE_SEED) -> torch.Tensor:
    """(1, channels, size, size) uniform [0, 1) field from numpy's Philox (same bits everywhere)."""
    rng = np.random.Generator(np.random.Philox(seed))
    return torch.from_numpy(rng.random((1, channels, size, size), dtype=np.float32))


class InputNoise(nn.Module):
    """``channels`` maps of deterministic noise in [-1, 1] derived from the input (no parameters).

    n = 2 * |frac(U[pos] + k * (w . rgb)) - 0.5| * 2 - 1 with a fixed field U and fixed colour
    weights w per channel: a triangle wave, so n is continuous in the input (Lipschitz 4k)."""

    def __init__(self, channels: int = 2, gain: float = 4.0):
        super().__init__()
        self.channels = channels
        rng = np.random.Generator(np.random.Philox(NOISE_SEED + 1))
        w = rng.normal(size=(channels, 3, 1, 1)).astype(np.float32)
        w /= np.abs(w).sum(axis=1, keepdims=True)
        self.register_buffer("weight", torch.from_numpy(w * np.float32(gain)), persistent=False)
        self.register_buffer("field", noise_field(channels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        field = self.field
        if h > field.shape[-2] or w > field.shape[-1]:
            field = field.repeat(1, 1, -(-h // field.shape[-2]), -(-w // field.shape[-1]))
        v = field[:, :, :h, :w] + F.conv2d(x, self.weight)
        return 4.0 * (v - torch.floor(v) - 0.5).abs() - 1.0


class Render2Photo(nn.Module):
    """Context at 1/``patch`` resolution, upsampled bilinearly, + full-resolution detail convs.

    The earlier design (a 4x4-patch correction through depth-to-space, L1-trained) only
    shifted colours and left a visible 4x4 mosaic; this one is trained adversarially with a
    texture-statistics loss (rtkit.train.demo_translator) and has no per-patch output."""

    def __init__(self, width: int = 24, blocks: int = 2, patch: int = 4, context: int = 8, detail: int = 12,
                 noise: int = 2):
        super().__init__()
        self.patch = patch
        self.stem = nn.Sequential(nn.Conv2d(3, width, patch, stride=patch), nn.LeakyReLU(0.2))
        self.body = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        # The first ``noise`` context channels are the local gains of the noise channels (skin,
        # hair and background take different amounts), the rest feed the detail convs.
        self.noise_channels = noise
        self.context = nn.Conv2d(width, noise + context, 1)
        self.noise = InputNoise(noise) if noise else None
        inputs = 3 + noise + context
        self.detail = (nn.Conv2d(inputs, 3, 3, padding=1) if not detail else
                       nn.Sequential(nn.Conv2d(inputs, detail, 3, padding=1), nn.LeakyReLU(0.2),
                                     nn.Conv2d(detail, 3, 3, padding=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.context(self.body(self.stem(x)))
        c = F.interpolate(c, scale_factor=float(self.patch), mode="bilinear", align_corners=False)
        k = self.noise_channels
        parts = [x, c] if self.noise is None else [x, self.noise(x) * c[:, :k], c[:, k:]]
        # A correction on top of the input keeps geometry (identity) and learns the style.
        return torch.clamp(x + self.detail(torch.cat(parts, 1)), -1.0, 1.0)


@register_model("render2photo", spec=SPEC,
                default_checkpoint=str(BUNDLED_WEIGHTS) if BUNDLED_WEIGHTS.exists() else None,
                description="bundled demo translator: sample render style -> sample photo style")
def render2photo(width: int = 16, blocks: int = 2, context: int = 3, detail: int = 0, noise: int = 2
                 ) -> nn.Module:
    return Render2Photo(width, blocks, context=context, detail=detail, noise=noise)


@register_model("render2photo_tiny", spec=SPEC, tiny=True,
                description="render2photo at width 8 for tests")
def render2photo_tiny(width: int = 8, blocks: int = 1, context: int = 3, detail: int = 0, noise: int = 2
                      ) -> nn.Module:
    return Render2Photo(width, blocks, context=context, detail=detail, noise=noise)
