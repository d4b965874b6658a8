"""ModelSpec: the single source of a model's input contract.

Loaders, exporters and runners read it instead of re-declaring sizes and ranges
(the role timm's PretrainedCfg plays for classifiers).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

TASKS = ("translate", "embed", "generate")
ALIGNMENTS = ("arcface112", "ffhq512", "none")
RESIZE_POLICIES = ("resize", "warp", "native")


@dataclass(frozen=True)
class ModelSpec:
    """What a network expects at its boundary.

    input_size: (height, width), or None for fully convolutional models that take any size
        divisible by ``size_multiple``.
    value_range: (low, high) of input and output pixel values.
    channels: "RGB" or "BGR" channel order of the tensors the network sees.
    alignment: the face template the network was trained on.
    resize: how the runtime brings a source image to ``input_size``: "resize" (plain
        resize), "warp" (similarity warp between alignment templates, e.g. ArcFace-112 ->
        FFHQ-512 for CodeFormer) or "native" (the source must already have the size).
    extra_inputs: runtime inputs besides the image, with their defaults (CodeFormer ``w``,
        UNSB ``t`` and ``z``).
    output_dim: embedding size for ``embed`` models.
    """

    task: str = "translate"
    input_size: tuple[int, int] | None = (112, 112)
    value_range: tuple[float, float] = (-1.0, 1.0)
    channels: str = "RGB"
    alignment: str = "arcface112"
    resize: str = "resize"
    size_multiple: int = 1
    extra_inputs: dict[str, Any] = field(default_factory=dict)
    output_dim: int | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.channels not in ("RGB", "BGR"):
            raise ValueError(f"channels must be RGB or BGR, got {self.channels!r}")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {self.alignment!r}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size) if self.input_size else None
        d["value_range"] = list(self.value_range)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if d.get("input_size") is not None:
            d["input_size"] = tuple(d["input_size"])
        if "value_range" in d:
            d["value_range"] = tuple(float(v) for v in d["value_range"])
        return cls(**d)
