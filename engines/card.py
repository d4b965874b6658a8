"""The engine card: the one file beside every weights file, so each stage opens the last by path.

Every producer writes it (rt-export for ONNX / TensorRT engines, both trainers, the demo
translator) and every consumer reads it (runners, rt-convert, rt-eval, rt-export, rt-bench):
``X.onnx`` / ``X.plan`` / ``X.pth`` / ``X.safetensors`` has ``X.json`` beside it. ONNX files also
carry the same JSON under metadata_props key ``rtkit``.

What it holds: the registry model name and the builder overrides that rebuild the module, the
ModelSpec (size, range, channel order, alignment), the graph inputs besides the image as
TensorSpecs (CodeFormer ``w``, UNSB ``t``/``z``), the settings of a loop (NFE, steps, seed), the
parts of a pipeline (one engine file each) and the loop that runs them, the source checkpoint's
sha256, what built it, and an optional training block (config, step, data).

Older files keep loading: format 1 engine sidecars (``extra_inputs`` mixing both kinds) and the
recognizer trainer's ``rtkit-recognizer-card`` model cards are read and converted.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtkit.engines.errors import EngineError
from rtkit.engines.spec import ModelSpec, TensorSpec

FORMAT_VERSION = 2
METADATA_KEY = "rtkit"
CARD_NAME = "engine.json"        # the card of a folder (a multi-part pipeline's export)
LEGACY_RECOGNIZER_FORMAT = "rtkit-recognizer-v1"  # train/recognizer.py before the card


@dataclass
class Part:
    """One engine file of a pipeline: its path relative to the card and its I/O."""

    file: str
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[str, ...] = ("output",)
    precision: str = "fp32"

    def to_dict(self) -> dict:
        return {"file": self.file, "inputs": [i.to_dict() for i in self.inputs],
                "outputs": list(self.outputs), "precision": self.precision}

    @classmethod
    def from_dict(cls, d: dict) -> "Part":
        return cls(file=str(d["file"]), inputs=tuple(TensorSpec.from_dict(i) for i in d.get("inputs", [])),
                   outputs=tuple(d.get("outputs", ["output"])), precision=d.get("precision", "fp32"))


@dataclass
class EngineCard:
    model: str                                   # registry name
    spec: ModelSpec
    overrides: dict[str, Any] = field(default_factory=dict)   # builder keyword overrides
    input_name: str = "input"
    output_names: list[str] = field(default_factory=lambda: ["output"])
    dtype: str = "float32"                       # dtype of the image tensor the engine takes
    precision: str = "fp32"                      # arithmetic precision inside the graph
    batch: dict[str, int] = field(default_factory=lambda: {"min": 1, "opt": 8, "max": 64})
    checkpoint_sha256: str | None = None
    built_with: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, Part] = field(default_factory=dict)   # pipelines: part name -> engine file
    loop: str | None = None                      # pipelines: the loop (engines.sampling) that runs the parts
    training: dict[str, Any] | None = None       # trainers: config, step, data
    weights: str | None = None                   # torch checkpoints: file name, beside the card
    layout: str | None = None                    # torch checkpoints: how the weights file is laid out
    format_version: int = FORMAT_VERSION

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.spec.inputs

    @property
    def settings(self) -> dict[str, Any]:
        return self.spec.settings

    def part_card(self, name: str) -> "EngineCard":
        """The card of one part of a pipeline: the image contract with the part's own inputs."""
        part = self.parts[name]
        spec = dataclasses.replace(self.spec, inputs=part.inputs, settings={})
        return dataclasses.replace(self, spec=spec, parts={}, loop=None, output_names=list(part.outputs),
                                   precision=part.precision)

    def engine_card(self) -> "EngineCard":
        """What one engine file computes: the card itself, or the part of a one-part pipeline
        stored in that file (export, parity and TensorRT builds work on engine files)."""
        if len(self.parts) == 1:
            return self.part_card(next(iter(self.parts)))
        return self

    def to_dict(self) -> dict:
        s = self.spec
        d = {
            "format_version": self.format_version,
            "model": self.model,
            "overrides": _jsonable(self.overrides),
            "task": s.task,
            "input": {"name": self.input_name, "size": list(s.input_size) if s.input_size else None,
                      "range": list(s.value_range), "channels": s.channels, "dtype": self.dtype,
                      "size_multiple": s.size_multiple},
            "inputs": [i.to_dict() for i in s.inputs],
            "settings": _jsonable(s.settings),
            "outputs": list(self.output_names),
            "output_dim": s.output_dim,
            "alignment": s.alignment,
            "resize": s.resize,
            "precision": self.precision,
            "batch": dict(self.batch),
            "checkpoint_sha256": self.checkpoint_sha256,
            "built_with": _jsonable(self.built_with),
        }
        if self.parts:
            d["parts"] = {k: p.to_dict() for k, p in self.parts.items()}
            d["loop"] = self.loop
        if self.weights is not None:
            d["weights"] = self.weights
            d["layout"] = self.layout
        if self.training is not None:
            d["training"] = _jsonable(self.training)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "EngineCard":
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        if d.get("format") == LEGACY_RECOGNIZER_FORMAT:
            return _from_recognizer_card(d)
        version = d.get("format_version")
        if version == 1:
            return _from_v1(d)
        if version != FORMAT_VERSION:
            raise ValueError(f"format_version {version!r} is not supported (this rtkit reads "
                             f"versions 1 and {FORMAT_VERSION})")
        inp = d["input"]
        spec = ModelSpec(task=d["task"], input_size=tuple(inp["size"]) if inp.get("size") else None,
                         value_range=tuple(inp["range"]), channels=inp["channels"],
                         alignment=d.get("alignment", "none"), resize=d.get("resize", "resize"),
                         size_multiple=inp.get("size_multiple", 1),
                         inputs=tuple(TensorSpec.from_dict(i) for i in d.get("inputs", [])),
                         settings=dict(d.get("settings", {})), output_dim=d.get("output_dim"))
        return cls(model=d["model"], spec=spec, overrides=dict(d.get("overrides", {})),
                   input_name=inp.get("name", "input"), output_names=list(d.get("outputs", ["output"])),
                   dtype=inp.get("dtype", "float32"), precision=d.get("precision", "fp32"),
                   batch=dict(d.get("batch", {})), checkpoint_sha256=d.get("checkpoint_sha256"),
                   built_with=dict(d.get("built_with", {})),
                   parts={k: Part.from_dict(p) for k, p in (d.get("parts") or {}).items()},
                   loop=d.get("loop"), training=d.get("training"), weights=d.get("weights"),
                   layout=d.get("layout"), format_version=version)

    @classmethod
    def from_json(cls, text: str) -> "EngineCard":
        return cls.from_dict(json.loads(text))


def _jsonable(value):
    """JSON-ready copy (tuples -> lists, paths -> str); other objects by repr."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _split_legacy_extra(model: str, extra: dict) -> tuple[tuple[TensorSpec, ...], dict]:
    """Format 1 mixed graph inputs and settings in ``extra_inputs``: descriptor dicts and the
    names the registered model declares as inputs are graph inputs, the rest settings."""
    declared: set[str] = set()
    if not extra:
        return (), {}
    try:
        from rtkit.engines.registry import get_entry

        declared = {i.name for i in get_entry(model).spec.inputs}
    except (KeyError, ImportError):
        pass
    inputs, settings = [], {}
    for name, value in extra.items():
        if isinstance(value, dict):
            inputs.append(TensorSpec(name=name, dtype=value.get("dtype", "float32"),
                                     shape=tuple(value.get("shape", [1])), default=value.get("default")))
        elif name in declared:
            inputs.append(TensorSpec(name=name, dtype="float32", shape=(1,), default=value))
        else:
            settings[name] = value
    return tuple(inputs), settings


def _from_v1(d: dict) -> EngineCard:
    inp = d["input"]
    inputs, settings = _split_legacy_extra(d["model"], dict(d.get("extra_inputs", {})))
    spec = ModelSpec(task=d["task"], input_size=tuple(inp["size"]) if inp.get("size") else None,
                     value_range=tuple(inp["range"]), channels=inp["channels"],
                     alignment=d.get("alignment", "none"), resize=d.get("resize", "resize"),
                     size_multiple=inp.get("size_multiple", 1), inputs=inputs, settings=settings,
                     output_dim=d.get("output_dim"))
    return EngineCard(model=d["model"], spec=spec, input_name=inp.get("name", "input"),
                      output_names=list(d.get("outputs", ["output"])), dtype=inp.get("dtype", "float32"),
                      precision=d.get("precision", "fp32"), batch=dict(d.get("batch", {})),
                      checkpoint_sha256=d.get("checkpoint_sha256"), built_with=dict(d.get("built_with", {})),
                      format_version=1)


def _from_recognizer_card(d: dict) -> EngineCard:
    """The recognizer trainer's model.json before the card existed."""
    raw = dict(d.get("spec") or {})
    extra = raw.pop("extra_inputs", None) or {}
    spec = ModelSpec.from_dict(raw) if raw else _registry_spec(d["model"])
    if extra:
        inputs, settings = _split_legacy_extra(d["model"], extra)
        spec = dataclasses.replace(spec, inputs=inputs, settings=settings)
    training = {"config": d.get("train_config"), "step": d.get("step"), "epoch": d.get("epoch"),
                "head": d.get("head"), "num_classes": d.get("num_classes")}
    return EngineCard(model=d["model"], spec=spec, overrides=dict(d.get("overrides") or {}),
                      output_names=["embedding"], built_with=dict(d.get("built_with") or {}),
                      training=training, weights=d.get("checkpoint"), layout=d.get("layout"),
                      format_version=1)


def _registry_spec(model: str) -> ModelSpec:
    from rtkit.engines.registry import get_entry

    return get_entry(model).spec


def card_path(weights_path: str | Path) -> Path:
    """Where the card of ``weights_path`` lives: the same name with ``.json``."""
    p = Path(weights_path)
    if p.is_dir():
        return p / CARD_NAME
    return p.with_suffix(".json")


def write_card(weights_path: str | Path, card: EngineCard) -> Path:
    """Write ``card`` beside ``weights_path`` atomically (never a half-written card)."""
    return write_card_file(card_path(weights_path), card)


def write_card_file(p: str | Path, card: EngineCard) -> Path:
    """Write ``card`` to the card file ``p`` itself (a pipeline's card) atomically."""
    p = Path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.part")
    tmp.write_text(card.to_json() + "\n")
    os.replace(tmp, p)
    return p


def _parse(text: str, where: Path) -> EngineCard:
    try:
        return EngineCard.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
        raise EngineError(f"engine card {where} is invalid ({e}); re-export the engine with rt-export, "
                          f"or retrain") from None


def is_card_file(path: str | Path) -> bool:
    """True when ``path`` is itself a card (a .json naming a model), not a weights file."""
    p = Path(path)
    if p.suffix != ".json" or not p.is_file():
        return False
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "model" in d and ("format_version" in d or "format" in d)


def read_card(path: str | Path) -> EngineCard:
    """The card of an engine: ``path`` itself (a card .json or a folder holding engine.json), the
    ``.json`` beside a weights file, else (ONNX) the JSON embedded in metadata_props."""
    path = Path(path)
    if path.is_dir():
        side = path / CARD_NAME
        if not side.is_file():
            raise FileNotFoundError(f"{path} is a folder without {CARD_NAME} (an exported pipeline "
                                    f"folder holds it)")
        return _parse(side.read_text(), side)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"engine card not found: {path}")
        return _parse(path.read_text(), path)
    side = card_path(path)
    if side.is_file():
        return _parse(side.read_text(), side)
    if path.suffix == ".onnx" and path.is_file():
        import onnx

        try:
            m = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf DecodeError and friends: a truncated or foreign file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EngineError(f"{path} is not a readable ONNX file ({first}); re-export it with "
                              f"rt-export") from None
        for p in m.metadata_props:
            if p.key == METADATA_KEY:
                return _parse(p.value, path)
    raise FileNotFoundError(f"no engine card for {path}: expected {side} beside it (rt-export and "
                            f"rt-train write it)")


def build_info(**extra) -> dict:
    """What built a file: rtkit, torch and python versions plus caller extras."""
    import sys

    info: dict[str, Any] = {"rtkit": _rtkit_version(), "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
    info.update({k: v for k, v in extra.items() if v is not None})
    return info


def _rtkit_version() -> str:
    try:
        from importlib.metadata import version

        return version("rtkit")
    except Exception:  # a source checkout that is not installed
        return "unknown"


def card_for_module(model, *, checkpoint_sha256: str | None = None, weights: str | None = None,
                    layout: str | None = None, training: dict | None = None, **build) -> EngineCard:
    """The card of a module built by ``rtkit.engines.create`` (its name, overrides and spec)."""
    return EngineCard(model=getattr(model, "registry_name", type(model).__name__), spec=model.spec,
                      overrides=dict(getattr(model, "registry_overrides", {}) or {}),
                      output_names=["embedding" if model.spec.task == "embed" else "output"],
                      checkpoint_sha256=checkpoint_sha256, built_with=build_info(**build),
                      weights=weights, layout=layout, training=training)


__all__ = ["EngineCard", "Part", "TensorSpec", "FORMAT_VERSION", "METADATA_KEY", "CARD_NAME",
           "card_path", "write_card", "write_card_file", "read_card", "is_card_file", "build_info", "card_for_module"]
