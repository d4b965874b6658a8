"""IResNet face recognizers with the insightface arcface_torch parameter names.

State_dict keys match arcface_torch ``backbones/iresnet.py`` (conv1, bn1, prelu,
layer1..layer4 of blocks with bn1/conv1/bn2/prelu/conv2/bn3/downsample, then bn2, fc,
features), so its published ``backbone.pth`` files load strictly as they are.

Differences from the official module, on purpose:
- no ``fp16`` flag and no autocast inside ``forward``: the caller chooses precision;
- gradient checkpointing is a per-instance attribute, not a module-level global.

Input: NCHW RGB in [-1, 1] ((x / 255 - 0.5) / 0.5), 112x112, ArcFace-aligned.
Output: the 512-d embedding, not normalised (its norm carries quality information).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rtkit.engines.checkpoint import load_state_dict_strict, read_checkpoint, unwrap
from rtkit.engines.registry import register_model
from rtkit.engines.spec import ModelSpec

SPEC = ModelSpec(task="embed", input_size=(112, 112), value_range=(-1.0, 1.0), channels="RGB",
                 alignment="arcface112", output_dim=512)

STAGE_WIDTHS = (64, 128, 256, 512)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN -> conv -> BN -> PReLU -> conv(stride) -> BN, + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        # Attribute order fixes the state_dict key order of the official files.
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        # The first block of every stage has a projection shortcut (it always strides by 2).
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet backbone: stem, four stride-2 stages (112 -> 7), BN-dropout-FC-BN embedding head.

    layers: blocks per stage ([3, 4, 14, 3] for r50).
    widths: channels per stage; the stem has ``widths[0]`` channels.
    num_features: embedding size.
    dropout: before the FC layer (arcface_torch uses 0).
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 14, 3), widths: Sequence[int] = STAGE_WIDTHS,
                 num_features: int = 512, dropout: float = 0.0, input_size: int = 112,
                 grad_checkpointing: bool = False):
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"IResNet has 4 stages; got layers={list(layers)} widths={list(widths)}")
        self.layers_per_stage = tuple(int(n) for n in layers)
        self.widths = tuple(int(w) for w in widths)
        self.num_features = num_features
        self.grad_checkpointing = grad_checkpointing
        spatial = input_size // 16

        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        cin = widths[0]
        for i, (n, w) in enumerate(zip(layers, widths), start=1):
            blocks = [IBasicBlock(cin, w, stride=2)] + [IBasicBlock(w, w) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = w
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(cin * spatial * spatial, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        self._init_weights()

    def _init_weights(self):
        # The arcface_torch initialisation, so training from scratch follows its recipe.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The embedding BN scale is fixed at 1 (only its shift is learned), as in arcface_torch.
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        for stage in self.stages():
            for block in stage:
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load an arcface_torch backbone file: a plain state_dict (``backbone.pth``, ``model.pt``)
    or the resume file ``checkpoint_gpu_*.pt`` (``state_dict_backbone``); a DDP ``module.``
    prefix is stripped."""
    obj = read_checkpoint(path)
    sd = unwrap(obj, "state_dict_backbone", path=path)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    load_state_dict_strict(model, sd, name=getattr(model, "registry_name", "iresnet"), path=path)


def _build(layers, spec: ModelSpec, **overrides) -> IResNet:
    model = IResNet(layers=overrides.pop("layers", layers), **overrides)
    # An embedding-size override must show in the spec the runtime and exporters read.
    model.spec = dataclasses.replace(spec, output_dim=model.num_features)
    return model


@register_model("iresnet18", spec=SPEC, loader=load_checkpoint,
                description="IResNet-18 (arcface_torch r18), 512-d embedding, RGB input")
def iresnet18(**overrides) -> nn.Module:
    return _build((2, 2, 2, 2), SPEC, **overrides)


@register_model("iresnet34", spec=SPEC, loader=load_checkpoint,
                description="IResNet-34 (arcface_torch r34), 512-d embedding, RGB input")
def iresnet34(**overrides) -> nn.Module:
    return _build((3, 4, 6, 3), SPEC, **overrides)


@register_model("iresnet50", spec=SPEC, loader=load_checkpoint,
                description="IResNet-50 (arcface_torch r50), 512-d embedding, RGB input")
def iresnet50(**overrides) -> nn.Module:
    return _build((3, 4, 14, 3), SPEC, **overrides)


@register_model("iresnet100", spec=SPEC, loader=load_checkpoint,
                description="IResNet-100 (arcface_torch r100), 512-d embedding, RGB input")
def iresnet100(**overrides) -> nn.Module:
    return _build((3, 13, 30, 3), SPEC, **overrides)


TINY_SPEC = dataclasses.replace(SPEC, output_dim=64)


@register_model("iresnet_tiny", spec=TINY_SPEC, loader=load_checkpoint, tiny=True,
                description="IResNet with one block per stage, widths 8-64, 64-d embedding (tests)")
def iresnet_tiny(**overrides) -> nn.Module:
    overrides.setdefault("widths", (8, 16, 32, 64))
    overrides.setdefault("num_features", 64)
    return _build((1, 1, 1, 1), TINY_SPEC, **overrides)
