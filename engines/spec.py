"""ModelSpec: the single source of a model's input contract.

Loaders, exporters and runners read it instead of re-declaring sizes and ranges
(the role timm's PretrainedCfg plays for classifiers).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

TASKS = ("translate", "embed", "generate")
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32")
ALIGNMENTS = ("arcface112", "ffhq512", "none")
RESIZE_POLICIES = ("resize", "warp", "native")


@dataclass(frozen=True)
class TensorSpec:
    """A graph input besides the image: name, dtype, shape and default.

    shape: dims as ints, or "batch" for the batch axis (e.g. UNSB ``z``: ("batch", 256)).
    default: a number broadcast to the shape, or None when the caller must supply it per call
    (UNSB's noise ``z``). One decoder, :meth:`feed`, turns a value into the array to feed.
    """

    name: str
    dtype: str = "float32"
    shape: tuple = (1,)
    default: Any = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"input {self.name!r}: dtype must be one of {DTYPES}, got {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(d if d == "batch" else int(d) for d in self.shape))

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "default": self.default}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(name=d["name"], dtype=d.get("dtype", "float32"), shape=tuple(d.get("shape", [1])),
                   default=d.get("default"))

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "batch" else d for d in self.shape)

    def feed(self, value=None, batch: int = 1, dtype=None):
        """The numpy array to feed for ``value`` (None: the default) at batch size ``batch``.

        Scalars broadcast to the shape; arrays with fewer dims get leading ones. Returns None when
        there is neither a value nor a default."""
        import numpy as np

        if value is None:
            value = self.default
        if value is None:
            return None
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        np_dtype = dtype or {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32,
                             "int64": np.int64, "int32": np.int32}[self.dtype]
        arr = np.asarray(value, dtype=np_dtype)
        shape = self.concrete_shape(batch)
        if arr.ndim == 0 and "batch" in self.shape:
            return np.full(shape, arr, dtype=np_dtype)
        if arr.ndim < len(shape):
            arr = arr.reshape((1,) * (len(shape) - arr.ndim) + arr.shape)
        return arr


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
    inputs: graph inputs besides the image (CodeFormer ``w``, UNSB step ``t`` and ``z``).
    settings: keyword settings of the model's loop or forward that are not tensors (UNSB
        ``nfe``/``tau``/``seed``, DDIM ``steps``/``depth``/``eta``/``seed``).
    output_dim: embedding size for ``embed`` models.
    """

    task: str = "translate"
    input_size: tuple[int, int] | None = (112, 112)
    value_range: tuple[float, float] = (-1.0, 1.0)
    channels: str = "RGB"
    alignment: str = "arcface112"
    resize: str = "resize"
    size_multiple: int = 1
    inputs: tuple[TensorSpec, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    output_dim: int | None = None

    @property
    def extra_inputs(self) -> dict[str, Any]:
        """Every runtime value besides the image by name, with its default (inputs and settings):
        what a caller may override with ``--set``."""
        return {**{i.name: i.default for i in self.inputs}, **self.settings}

    def input(self, name: str) -> TensorSpec | None:
        return next((i for i in self.inputs if i.name == name), None)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.channels not in ("RGB", "BGR"):
            raise ValueError(f"channels must be RGB or BGR, got {self.channels!r}")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {self.alignment!r}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        object.__setattr__(self, "inputs", tuple(
            i if isinstance(i, TensorSpec) else TensorSpec.from_dict(i) for i in self.inputs))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size) if self.input_size else None
        d["value_range"] = list(self.value_range)
        d["inputs"] = [i.to_dict() for i in self.inputs]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "inputs" in d:
            d["inputs"] = tuple(TensorSpec.from_dict(i) if isinstance(i, dict) else i for i in d["inputs"])
        if d.get("input_size") is not None:
            d["input_size"] = tuple(d["input_size"])
        if "value_range" in d:
            d["value_range"] = tuple(float(v) for v in d["value_range"])
        return cls(**d)
