"""The engine metadata file: everything the runtime needs to run an exported engine.

Every engine ``X.onnx`` / ``X.plan`` has ``X.json`` beside it; ONNX files also carry the same
JSON under metadata_props key ``rtkit``. ``rt-convert --engine X.plan`` needs nothing else.
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtkit.engines.errors import EngineError
from rtkit.engines.spec import ModelSpec

FORMAT_VERSION = 1
METADATA_KEY = "rtkit"


@dataclass
class EngineMeta:
    model: str                       # registry name
    spec: ModelSpec
    input_name: str = "input"
    output_names: list[str] = field(default_factory=lambda: ["output"])
    dtype: str = "float32"           # dtype of the input tensor the engine takes
    precision: str = "fp32"          # arithmetic precision inside the graph
    batch: dict[str, int] = field(default_factory=lambda: {"min": 1, "opt": 8, "max": 64})
    checkpoint_sha256: str | None = None
    built_with: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def task(self) -> str:
        return self.spec.task

    def to_dict(self) -> dict:
        s = self.spec
        return {
            "format_version": self.format_version,
            "model": self.model,
            "task": s.task,
            "input": {"name": self.input_name, "size": list(s.input_size) if s.input_size else None,
                      "range": list(s.value_range), "channels": s.channels, "dtype": self.dtype,
                      "size_multiple": s.size_multiple},
            "extra_inputs": dict(s.extra_inputs),
            "outputs": list(self.output_names),
            "output_dim": s.output_dim,
            "alignment": s.alignment,
            "resize": s.resize,
            "precision": self.precision,
            "batch": dict(self.batch),
            "checkpoint_sha256": self.checkpoint_sha256,
            "built_with": dict(self.built_with),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> "EngineMeta":
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"engine metadata format_version {version!r} is not supported "
                             f"(this rtkit reads version {FORMAT_VERSION}); re-export the engine")
        inp = d["input"]
        spec = ModelSpec(task=d["task"], input_size=tuple(inp["size"]) if inp.get("size") else None,
                         value_range=tuple(inp["range"]), channels=inp["channels"],
                         alignment=d.get("alignment", "none"), resize=d.get("resize", "resize"),
                         size_multiple=inp.get("size_multiple", 1),
                         extra_inputs=dict(d.get("extra_inputs", {})), output_dim=d.get("output_dim"))
        return cls(model=d["model"], spec=spec, input_name=inp.get("name", "input"),
                   output_names=list(d.get("outputs", ["output"])), dtype=inp.get("dtype", "float32"),
                   precision=d.get("precision", "fp32"), batch=dict(d.get("batch", {})),
                   checkpoint_sha256=d.get("checkpoint_sha256"),
                   built_with=dict(d.get("built_with", {})), format_version=version)

    @classmethod
    def from_json(cls, text: str) -> "EngineMeta":
        return cls.from_dict(json.loads(text))


def sidecar_path(engine_path: str | Path) -> Path:
    return Path(engine_path).with_suffix(".json")


def write_sidecar(engine_path: str | Path, meta: EngineMeta) -> Path:
    p = sidecar_path(engine_path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.part")
    tmp.write_text(meta.to_json() + "\n")
    os.replace(tmp, p)  # never a half-written sidecar beside an engine
    return p


def read_metadata(engine_path: str | Path) -> EngineMeta:
    """Metadata of an engine: the sidecar JSON, else (ONNX) the embedded metadata_props."""
    engine_path = Path(engine_path)
    side = sidecar_path(engine_path)
    if side.is_file():
        try:
            return EngineMeta.from_json(side.read_text())
        except (ValueError, KeyError, TypeError) as e:
            raise EngineError(f"engine metadata {side} is invalid ({e}); re-export the engine "
                              f"with rt-export") from None
    if engine_path.suffix == ".onnx" and engine_path.is_file():
        import onnx
        try:
            m = onnx.load(str(engine_path), load_external_data=False)
        except Exception as e:  # protobuf DecodeError and friends: a truncated or foreign file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EngineError(f"{engine_path} is not a readable ONNX file ({first}); re-export "
                              f"it with rt-export") from None
        for p in m.metadata_props:
            if p.key == METADATA_KEY:
                try:
                    return EngineMeta.from_json(p.value)
                except (ValueError, KeyError, TypeError) as e:
                    raise EngineError(f"{engine_path}: embedded engine metadata is invalid ({e}); "
                                      f"re-export the engine with rt-export") from None
    raise FileNotFoundError(f"no engine metadata for {engine_path}: expected {side} beside it "
                            f"(rt-export writes it)")


def current_build_info(**extra) -> dict:
    """What built an engine: rtkit, torch and python versions plus caller extras."""
    import torch
    try:
        from importlib.metadata import version
        rt = version("rtkit")
    except Exception:
        rt = "unknown"
    info = {"rtkit": rt, "torch": torch.__version__, "python": platform.python_version()}
    info.update({k: v for k, v in extra.items() if v is not None})
    return info
