"""AdaFace IR backbones (IR-18/50/101) with the parameter names of mk-minchul/AdaFace ``net.py``.

Keys: ``input_layer.{0,1,2}`` (conv, BN, PReLU), ``body.N.res_layer.{0..5}`` (BN, conv, BN,
PReLU, conv(stride), BN) with ``body.N.shortcut_layer`` (a parameter-free 1x1 max-pool
subsample when the channel count is unchanged, else ``{0: conv1x1, 1: BN}``), and
``output_layer.{0,3,4}`` (BN2d, Linear, BN1d without affine). This layout is not
interchangeable with insightface's IResNet although the blocks compute the same thing.

Input: NCHW **BGR** in [-1, 1] (the released checkpoints were trained on BGR), 112x112,
ArcFace-aligned; the ModelSpec says so and the runtime swaps channels.

``forward(x)`` returns the L2-normalised embedding; ``forward(x, return_norm=True)`` returns
``(embedding / norm, norm)`` like the official module, for the AdaFace head. Released
checkpoints are Lightning files ``{'state_dict': {'model.*': backbone, 'head.*': head}}``;
the loader takes those (ignoring the head) and plain backbone state_dicts.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from rtkit.engines.checkpoint import load_state_dict_strict, read_checkpoint, unwrap
from rtkit.engines.registry import register_model
from rtkit.engines.spec import ModelSpec

SPEC = ModelSpec(task="embed", input_size=(112, 112), value_range=(-1.0, 1.0), channels="BGR",
                 alignment="arcface112", output_dim=512)

STAGE_WIDTHS = (64, 128, 256, 512)


class BasicBlockIR(nn.Module):
    """Residual unit: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if cin == cout:
            # Kernel-1 max-pool: a strided subsample without parameters.
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                nn.BatchNorm2d(cout))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class AdaFaceIR(nn.Module):
    """AdaFace IR backbone.

    units: residual units per stage ([3, 4, 14, 3] for IR-50); the first unit of each stage
        strides by 2 (112 -> 7).
    widths: channels per stage; the stem has ``widths[0]`` channels.
    embedding_size: output size (512 in every released model).
    """

    def __init__(self, units: Sequence[int] = (3, 4, 14, 3), widths: Sequence[int] = STAGE_WIDTHS,
                 embedding_size: int = 512, dropout: float = 0.4, input_size: int = 112):
        super().__init__()
        if len(units) != 4 or len(widths) != 4:
            raise ValueError(f"AdaFace IR has 4 stages; got units={list(units)} widths={list(widths)}")
        self.units = tuple(int(n) for n in units)
        self.widths = tuple(int(w) for w in widths)
        self.embedding_size = embedding_size
        spatial = input_size // 16
        # Attribute order (input_layer, output_layer, body) fixes the official key order.
        self.input_layer = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
        self.output_layer = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.Dropout(dropout),
                                          nn.Flatten(1),
                                          nn.Linear(widths[-1] * spatial * spatial, embedding_size),
                                          nn.BatchNorm1d(embedding_size, affine=False))
        body, cin = [], widths[0]
        for n, w in zip(units, widths):
            body.append(BasicBlockIR(cin, w, 2))
            body.extend(BasicBlockIR(w, w, 1) for _ in range(n - 1))
            cin = w
        self.body = nn.Sequential(*body)
        self._init_weights()

    def _init_weights(self):
        # The AdaFace initialisation (Kaiming fan-out for conv and linear), for from-scratch runs.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before normalisation."""
        return self.output_layer(self.body(self.input_layer(x)))

    def forward(self, x: torch.Tensor, return_norm: bool = False):
        z = self.embed(x)
        norm = torch.linalg.vector_norm(z, ord=2, dim=1, keepdim=True)
        unit = z / norm
        return (unit, norm) if return_norm else unit


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a released AdaFace Lightning checkpoint (``state_dict`` with ``model.`` backbone and
    ``head.`` head keys; the head is ignored) or a plain backbone state_dict."""
    obj = read_checkpoint(path)
    sd = unwrap(obj, "state_dict", "model.", path=path)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    load_state_dict_strict(model, sd, name=getattr(model, "registry_name", "adaface"), path=path)


def _build(units, spec: ModelSpec, **overrides) -> AdaFaceIR:
    model = AdaFaceIR(units=overrides.pop("units", units), **overrides)
    # An embedding-size override must show in the spec the runtime and exporters read.
    model.spec = dataclasses.replace(spec, output_dim=model.embedding_size)
    return model


@register_model("adaface_ir18", spec=SPEC, loader=load_checkpoint,
                description="AdaFace IR-18 backbone, L2-normalised 512-d embedding, BGR input")
def adaface_ir18(**overrides) -> nn.Module:
    return _build((2, 2, 2, 2), SPEC, **overrides)


@register_model("adaface_ir50", spec=SPEC, loader=load_checkpoint,
                description="AdaFace IR-50 backbone, L2-normalised 512-d embedding, BGR input")
def adaface_ir50(**overrides) -> nn.Module:
    return _build((3, 4, 14, 3), SPEC, **overrides)


@register_model("adaface_ir101", spec=SPEC, loader=load_checkpoint,
                description="AdaFace IR-101 backbone, L2-normalised 512-d embedding, BGR input")
def adaface_ir101(**overrides) -> nn.Module:
    return _build((3, 13, 30, 3), SPEC, **overrides)


TINY_SPEC = dataclasses.replace(SPEC, output_dim=64)


@register_model("adaface_tiny", spec=TINY_SPEC, loader=load_checkpoint, tiny=True,
                description="AdaFace IR with one unit per stage, widths 8-64, 64-d embedding (tests)")
def adaface_tiny(**overrides) -> nn.Module:
    overrides.setdefault("widths", (8, 16, 32, 64))
    overrides.setdefault("embedding_size", 64)
    return _build((1, 1, 1, 1), TINY_SPEC, **overrides)
