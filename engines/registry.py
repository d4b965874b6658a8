"""One registry, one factory: every network is built through ``create(name, ...)``.

Models register a builder with ``@register_model(name, spec=..., default_checkpoint=...)``.
The builder takes keyword overrides and returns an ``nn.Module``; ``create`` builds it,
attaches its ``spec`` and, given a checkpoint, loads it through the model's own
``load_checkpoint`` filter (official file layouts accepted as published).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from rtkit.engines.spec import ModelSpec


@dataclass(frozen=True)
class Pipeline:
    """A model that runs as parts plus a loop (UNSB's step, DDIM's UNet step, Arc2Face's encoder,
    UNet and VAE): export writes one engine per part, and the runtime's PipelineRunner calls the
    loop (registered in rtkit.engines.sampling) over the part runners on any backend.

    parts: part name -> function of the built model returning that part's module (a module with
        its own ``spec`` whose ``inputs`` are the part's graph inputs besides its first tensor).
    loop: the registered loop's name.
    settings: function of the built model returning loop settings it implies (e.g. DDIM's
        scheduler config), added to the spec's settings in the card.
    """

    parts: Mapping[str, Callable[[nn.Module], nn.Module]]
    loop: str
    settings: Callable[[nn.Module], dict] | None = None

    def part_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {name: get(model) for name, get in self.parts.items()}

    def model_settings(self, model: nn.Module) -> dict:
        return dict(self.settings(model)) if self.settings is not None else {}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    spec: ModelSpec
    loader: Callable[[nn.Module, str | Path], None] | None
    default_checkpoint: str | None
    description: str
    tiny: bool
    pipeline: Pipeline | None = None


_REGISTRY: dict[str, ModelEntry] = {}

# Modules that register models on import. Importing them lazily keeps `import rtkit.engines`
# cheap and lets a module with an optional dependency fail only when its model is used.
_MODEL_MODULES = (
    "rtkit.engines.render2photo",
    "rtkit.engines.codeformer",
    "rtkit.engines.vsait",
    "rtkit.engines.cut",
    "rtkit.engines.unsb",
    "rtkit.engines.ddim",
    "rtkit.engines.iresnet",
    "rtkit.engines.adaface",
    "rtkit.engines.arc2face",
)
_loaded = False


def register_model(name: str, *, spec: ModelSpec, loader=None, default_checkpoint=None,
                   description: str = "", tiny: bool = False, pipeline: Pipeline | None = None):
    """Decorator registering ``builder(**overrides) -> nn.Module`` under ``name``.

    ``loader(model, path)`` loads an official checkpoint file into the built module.
    ``tiny`` marks small variants that exist for fast tests and CPU CI.
    """

    def wrap(builder):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, builder, spec, loader, default_checkpoint,
                                     description or (builder.__doc__ or "").strip().split("\n")[0],
                                     tiny, pipeline)
        return builder

    return wrap


def _load_all():
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _MODEL_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            # A model module not written yet, or one whose optional dependency is absent.
            if e.name and (e.name == mod or not e.name.startswith("rtkit")):
                continue
            raise


def list_models(tiny: bool | None = None, task: str | None = None) -> list[str]:
    """Registered model names; ``tiny`` filters tiny/full variants, ``task`` by spec.task."""
    _load_all()
    names = []
    for n, e in sorted(_REGISTRY.items()):
        if tiny is not None and e.tiny != tiny:
            continue
        if task is not None and e.spec.task != task:
            continue
        names.append(n)
    return names


def get_entry(name: str) -> ModelEntry:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create(name: str, checkpoint: str | Path | None = None, *, pretrained: bool = True,
           **overrides) -> nn.Module:
    """Build model ``name`` in eval mode; load ``checkpoint`` (or the bundled default).

    ``pretrained=False`` skips the bundled default checkpoint (random init).
    """
    entry = get_entry(name)
    model = entry.builder(**overrides)
    model.spec = getattr(model, "spec", None) or entry.spec
    model.registry_name = name
    model.registry_overrides = dict(overrides)  # the card records them, so the file rebuilds its module
    ckpt = checkpoint if checkpoint is not None else (entry.default_checkpoint if pretrained else None)
    if ckpt is not None:
        path = Path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if entry.loader is not None:
            entry.loader(model, path)
        else:
            from rtkit.engines.checkpoint import load_state_dict_strict, read_checkpoint
            load_state_dict_strict(model, read_checkpoint(path), name=name, path=path)
    return model.eval()


def model_spec(name: str) -> ModelSpec:
    return get_entry(name).spec


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["Pipeline", "register_model", "create", "list_models", "get_entry", "model_spec", "num_params",
           "ModelEntry", "torch"]
