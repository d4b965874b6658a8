"""rtkit.engines: the networks (translators, generator, recognizers) behind one registry.

Errors and ModelSpec are imported here directly; the registry and checkpoint helpers import
torch, so their names resolve on first use (PEP 562) and code that only runs an ONNX engine,
or a CLI's ``--help``, never pays for importing torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from rtkit.engines.errors import CheckpointError, EngineError, MissingDependency, RtkitError, optional_import
from rtkit.engines.spec import ModelSpec

if TYPE_CHECKING:
    from rtkit.engines.checkpoint import load_state_dict_strict, read_checkpoint, unwrap
    from rtkit.engines.registry import create, get_entry, list_models, model_spec, num_params, register_model

_LAZY = {
    "create": "rtkit.engines.registry", "list_models": "rtkit.engines.registry",
    "get_entry": "rtkit.engines.registry", "model_spec": "rtkit.engines.registry",
    "num_params": "rtkit.engines.registry", "register_model": "rtkit.engines.registry",
    "read_checkpoint": "rtkit.engines.checkpoint", "unwrap": "rtkit.engines.checkpoint",
    "load_state_dict_strict": "rtkit.engines.checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # resolve once
        return value
    raise AttributeError(f"module 'rtkit.engines' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["create", "list_models", "get_entry", "model_spec", "num_params", "register_model",
           "ModelSpec", "CheckpointError", "EngineError", "MissingDependency", "RtkitError",
           "optional_import", "read_checkpoint", "unwrap", "load_state_dict_strict"]
