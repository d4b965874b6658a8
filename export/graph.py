"""What an exported graph computes: the module traced, its example inputs and its names.

Shared by the ONNX exporter and the parity check (so neither imports the other's internals).
The protocol (``export_module``, ``export_inputs``) is described in rtkit.export.onnx.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from rtkit.engines.errors import EngineError
from rtkit.engines.spec import ModelSpec, TensorSpec

EXPORT_BATCH = 2          # traced batch; parity runs a different one so a baked-in batch shows
DEFAULT_SIDE = 64         # traced H/W for fully convolutional models
INPUT_NAME = "input"


def output_name_for(spec: ModelSpec) -> str:
    return "embedding" if spec.task == "embed" else "output"


def round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / max(1, multiple)) * max(1, multiple))


def default_image_size(spec: ModelSpec, side: int = DEFAULT_SIDE) -> tuple[int, int]:
    """(H, W) of example images: the spec's size, else ``side`` rounded up to size_multiple."""
    if spec.input_size:
        return tuple(spec.input_size)
    s = round_up(side, spec.size_multiple)
    return s, s


def example_input(tspec: TensorSpec, batch: int) -> torch.Tensor:
    """Example value of one graph input: its default broadcast to its shape, else zeros (ints) or
    standard normal draws (floats, from torch's global generator so parity can seed them)."""
    shape = list(tspec.concrete_shape(batch))
    is_int = tspec.dtype.startswith("int")
    dtype = torch.int64 if is_int else torch.float32
    if tspec.default is not None:
        return torch.full(shape, tspec.default, dtype=dtype)
    return torch.zeros(shape, dtype=dtype) if is_int else torch.randn(shape)


def default_export_inputs(spec: ModelSpec, batch: int, size: tuple[int, int] | None = None
                          ) -> dict[str, torch.Tensor]:
    """An image uniform in the spec's value range plus an example of each graph input."""
    h, w = size or default_image_size(spec)
    lo, hi = spec.value_range
    inputs = {INPUT_NAME: torch.rand(batch, 3, h, w) * (hi - lo) + lo}
    for tspec in spec.inputs:
        inputs[tspec.name] = example_input(tspec, batch)
    return inputs


def export_target(model: nn.Module) -> nn.Module:
    """The module the graph runs: ``model.export_module()`` if defined, else the model."""
    return model.export_module() if hasattr(model, "export_module") else model


def export_spec(model: nn.Module) -> ModelSpec:
    """The engine's spec: the export module's own ``spec`` if it has one, else the model's."""
    spec = getattr(export_target(model), "spec", None)
    return spec if isinstance(spec, ModelSpec) else model.spec


def export_inputs(model: nn.Module, batch: int, size: tuple[int, int] | None = None
                  ) -> dict[str, torch.Tensor]:
    """Example inputs by graph input name: the model's ``export_inputs`` or the defaults."""
    if hasattr(model, "export_inputs"):
        inputs = dict(model.export_inputs(batch))
        if INPUT_NAME not in inputs:
            raise EngineError(f"{type(model).__name__}.export_inputs() must return the image "
                              f"under key {INPUT_NAME!r}, got {sorted(inputs)}")
        # "input" first: the graph's input order is the dict order.
        return {INPUT_NAME: inputs.pop(INPUT_NAME), **inputs}
    return default_export_inputs(export_spec(model), batch, size)


class ExportGraph(nn.Module):
    """Exactly what goes into the graph: the export module called with named inputs in a fixed
    positional order, first output only, and an optional channel flip at the input."""

    def __init__(self, module: nn.Module, extra_names: list[str], flip_channels: bool = False):
        super().__init__()
        self.module = module
        self.extra_names = list(extra_names)
        self.flip_channels = flip_channels

    def forward(self, image, *extras):
        if self.flip_channels:
            image = image.flip(1)
        y = self.module(image, **dict(zip(self.extra_names, extras)))
        if isinstance(y, (tuple, list)):
            y = y[0]
        return y


def export_graph(model: nn.Module, input_names: list[str], flip_channels: bool = False
                 ) -> ExportGraph:
    module = export_target(model)
    return ExportGraph(module, [n for n in input_names if n != INPUT_NAME], flip_channels).eval()


def resolve_model(model_or_name: nn.Module | str | Path, checkpoint: str | Path | None = None,
                  overrides: dict | None = None) -> tuple[nn.Module, str, str | None]:
    """(model in eval mode, registry name, sha256 of its weights file or None).

    model_or_name: a built module, a registered name (built with ``checkpoint`` and builder
    ``overrides``), or a weights file with its card beside it (a training output: the card names
    the model and the builder overrides that rebuild it)."""
    from rtkit.engines import registry
    from rtkit.engines.card import read_card
    from rtkit.engines.checkpoint import file_sha256

    if isinstance(model_or_name, nn.Module):
        model = model_or_name
        if not isinstance(getattr(model, "spec", None), ModelSpec):
            raise EngineError(f"{type(model).__name__} has no .spec (ModelSpec); build it with "
                              f"rtkit.engines.create(name) or set model.spec")
        name = getattr(model, "registry_name", type(model).__name__)
        sha = file_sha256(checkpoint) if checkpoint else None
        return model.eval(), name, sha
    path = Path(model_or_name)
    if path.is_file():
        if checkpoint is not None:
            raise EngineError(f"{path} is a weights file already; --checkpoint applies to a model name")
        card = read_card(path)
        model = registry.create(card.model, checkpoint=path, **{**card.overrides, **(overrides or {})})
        if not overrides:
            model.spec = card.spec  # what it was trained for (e.g. a 64 px recognizer), not the registry default
        return model, card.model, file_sha256(path)
    name = str(model_or_name)
    try:
        entry = registry.get_entry(name)
    except KeyError:
        raise EngineError(f"unknown model {name!r} and no such file; see rt-export --list") from None
    model = registry.create(name, checkpoint=checkpoint, **(overrides or {}))
    ckpt = checkpoint if checkpoint is not None else entry.default_checkpoint
    return model, name, (file_sha256(ckpt) if ckpt else None)


def batch_profile(batch) -> dict[str, int]:
    """(min, opt, max) or a dict of them -> {"min", "opt", "max"}, validated."""
    if isinstance(batch, dict):
        b = (batch["min"], batch["opt"], batch["max"])
    else:
        b = tuple(int(v) for v in batch)
    if len(b) != 3 or not (1 <= b[0] <= b[1] <= b[2]):
        raise EngineError(f"batch profile must be min:opt:max with 1 <= min <= opt <= max, got {b}")
    return {"min": b[0], "opt": b[1], "max": b[2]}
