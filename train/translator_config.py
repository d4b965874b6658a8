"""The configuration of a translator training run, method options from CLI strings, and presets.

``TranslatorConfig`` is saved as config.json in the run folder and inside every checkpoint; a
resumed run must match it on ``RESUME_FIXED``. Each method's hyper-parameters are a dataclass
of its own (``VSAITOptions``, ``DecentOptions``, ``UNSBOptions``); ``cfg.options`` holds
overrides of them as a dict (CLI strings are accepted: ``coerce_options``).

Presets (``PRESETS``, ``preset_config``): named starting points per method. "tiny" scales every
width of the method down so that a run at 64 px trains in minutes on two CPU cores and still
measurably closes the style gap (see train/presets.py for each width and the measured figures).
This module does not import torch (the CLI's --help lists the presets).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from rtkit.engines.errors import RtkitError
from rtkit.train.presets import PRESETS, preset_names

FEATURE_NETS = ("vgg19", "vgg19_tiny", "vgg19_tiny_fixed")


@dataclass
class TranslatorConfig:
    method: str                                   # a registered method: vsait, decent, unsb
    source: str                                   # source-domain image tree (e.g. renders)
    target: str                                   # target-domain image tree (e.g. photos)
    generator: str | None = None                  # registered generator; None: the method's default
    generator_overrides: dict = field(default_factory=dict)
    generator_checkpoint: str | None = None       # start G from these weights (fine-tuning)
    options: dict = field(default_factory=dict)   # method options (see each method's Options)
    steps: int = 200_000
    batch_size: int = 1                           # per process
    crop_size: int = 256
    load_size: int | None = None                  # resize to load_size x load_size before cropping
    flip: bool = True
    # VSAIT feature network: a local VGG19 file with torchvision's key names, random features,
    # or "vgg19_tiny_fixed" (deterministic built-in filters, no file; not the published recipe)
    feature_net: str = "vgg19"
    feature_weights: str | None = None
    random_features: bool = False
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    workers: int = 4                              # decode processes per training process
    save_every: int = 5000
    sample_every: int = 1000
    log_every: int = 100
    keep: int = 3                                 # checkpoints (and step-numbered weights) kept; 0: all
    num_samples: int = 8
    tensorboard: bool = True
    # held-out style gap: translations of val_source against val_target (or, without them, the
    # fixed sample crops of the training folders) every val_every steps and at the end; the
    # weights with the lowest gap so far (content correlation at least best_min_content) are
    # kept as the "best" weights
    val_source: str | None = None
    val_target: str | None = None
    val_every: int = 500
    val_count: int = 64                           # images per held-out domain
    best_min_content: float = 0.5
    preset: str | None = None                     # the preset the run started from (a record)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TranslatorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_preset(cls, method: str, source: str, target: str, preset: str = "tiny",
                    **changes) -> "TranslatorConfig":
        """A config from ``PRESETS[preset][method]``; ``changes`` override it (``options`` merge)."""
        base = preset_config(method, preset)
        opts = dict(base.pop("options", {}), **changes.pop("options", {}))
        base.update(changes)
        return cls(method=method, source=source, target=target, options=opts, preset=preset, **base)


def preset_config(method: str, preset: str = "tiny") -> dict:
    """The fields ``preset`` sets for ``method`` (a copy)."""
    if preset not in PRESETS:
        raise RtkitError(f"unknown preset {preset!r}; choose from {', '.join(preset_names())}")
    if method not in PRESETS[preset]:
        raise RtkitError(f"preset {preset!r} has no {method!r} recipe; it has {', '.join(sorted(PRESETS[preset]))}")
    d = dict(PRESETS[preset][method])
    d["options"] = dict(d.get("options", {}))
    return d


# Fields that must match to resume (data order, networks, losses); others may change.
RESUME_FIXED = ("method", "generator", "generator_overrides", "options", "batch_size", "crop_size",
                "load_size", "flip", "feature_net", "seed")


def coerce_options(options_cls, given: dict, method: str):
    """Build a method's Options dataclass from a dict whose values may be CLI strings."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise RtkitError(f"unknown {method} option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    defaults = options_cls()
    values = {}
    for k, v in given.items():
        ref = getattr(defaults, k)
        try:
            if isinstance(ref, bool):
                v = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
            elif isinstance(ref, tuple):
                items = v.split(",") if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) else [v]
                cast = type(ref[0]) if ref else float
                v = tuple(_number(x, cast) for x in items if str(x).strip() != "")
            elif isinstance(ref, (int, float)):
                v = _number(v, type(ref))
            elif isinstance(ref, str):
                v = str(v)
        except (TypeError, ValueError):
            raise RtkitError(f"{method} option {k}={v!r} is not a valid {type(ref).__name__}") from None
        values[k] = v
    return options_cls(**values)


def _number(v, cast):
    """int/float from a number or CLI string; an int field refuses a fractional value."""
    f = float(v)
    if cast is int:
        if not f.is_integer():
            raise ValueError(v)
        return int(f)
    return f


__all__ = ["TranslatorConfig", "RESUME_FIXED", "FEATURE_NETS", "coerce_options", "preset_config", "PRESETS",
           "preset_names"]
