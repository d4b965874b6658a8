"""Reading checkpoint files safely and loading them strictly with readable errors.

Official files come in several containers (plain state_dict, {'params_ema': ...},
Lightning {'state_dict': {'model.g_net.*': ...}}). Each model's loader unwraps its container
with ``unwrap`` and loads with ``load_state_dict_strict``; a wrong or truncated file ends in a
``CheckpointError`` that names the missing/unexpected keys instead of a stack trace.
"""
from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from rtkit.engines.errors import CheckpointError

if TYPE_CHECKING:  # torch is imported where a checkpoint is read, so file_sha256 stays light
    import torch
    from torch import nn


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without unpickling arbitrary objects (weights_only / safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (truncated, corrupt, or not a "
                              f"weights file): {first}") from None


def unwrap(obj: Mapping, key: str | None = None, prefix: str = "", *, path=None) -> dict:
    """Select ``obj[key]`` (if the container has it) and keep keys under ``prefix``, stripped.

    A file that is already the bare state_dict passes through, so both the official container
    and a plain state_dict load.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path or 'checkpoint'}: expected a dict of tensors, got {type(obj).__name__}")
    import torch

    sd = obj
    if key is not None and key in obj and isinstance(obj[key], Mapping):
        sd = obj[key]
    if prefix:
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if sub:
            sd = sub
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _short(keys, n=6) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                           name: str = "model", path=None) -> None:
    """``model.load_state_dict(strict=True)`` with a one-line error naming what does not fit."""
    own = model.state_dict()
    missing = set(own) - set(state_dict)
    unexpected = set(state_dict) - set(own)
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state_dict)) if own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_short(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (file vs model): {'; '.join(shapes[:4])}")
        where = f" from {path}" if path else ""
        raise CheckpointError(f"cannot load {name}{where}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
