"""Training precision: which autocast dtype a device gets, the autocast context and loss scaling.

    dtype = resolve_precision("auto", ctx.device)      # None: plain fp32
    scaler = make_grad_scaler(ctx.device, dtype)
    with autocast(ctx.device, dtype):
        loss = ...
"""
from __future__ import annotations

import contextlib

import torch

from rtkit.engines.errors import RtkitError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device``; None means plain fp32.

    "auto": bf16 on GPUs that support it, else fp16 on CUDA, fp32 on CPU (CPU autocast is
    slower than fp32 for convolutions on most machines).
    """
    if precision not in PRECISIONS:
        raise RtkitError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise RtkitError("fp16 training needs a GPU; use bf16 or fp32 on CPU")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for ``dtype`` on ``device``, or a null context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


__all__ = ["PRECISIONS", "resolve_precision", "autocast", "make_grad_scaler"]
