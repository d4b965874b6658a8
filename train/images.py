"""Training images: decoded by the runtime's validating decoder, and what could not be decoded.

Both trainers read files through ``rtkit.runtime.sources.decode_image``, which refuses truncated
and corrupt files (a truncated JPEG raises DecodeError instead of becoming a grey-filled
image). A file that fails is never trained on: the dataset takes the next image of its order
in its place, and ``SkipReport`` reports it once per process on stderr and appends it to
``skipped_images.txt`` in the run folder, which the trainer summarises at the end.

Batches go to the device as uint8 NHWC RGB frames (4x less to move than float32); the trainer
maps them to the model's input with ``to_model_input``, the runtime's batched image contract
(``rtkit.runtime.gpu_image.preprocess_batch``: the spec's value range and channel order).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from rtkit.engines.spec import ModelSpec
from rtkit.runtime.sources import DecodeError, decode_image

SKIPPED_NAME = "skipped_images.txt"

__all__ = ["SKIPPED_NAME", "SkipReport", "read_image", "to_model_input", "DecodeError"]


class SkipReport:
    """Unreadable training images: one warning line per file and process, and one line each
    (path TAB reason) appended to ``path``. Picklable, so DataLoader workers report too."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self._seen: set[str] = set()

    def reset(self):
        """A fresh run: forget what an earlier run in the same folder skipped."""
        self._seen.clear()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def record(self, file: str | Path, reason: str):
        file = os.fspath(file)
        if file in self._seen:
            return
        self._seen.add(file)
        print(f"warning: skipping unreadable training image {file}: {reason}", file=sys.stderr, flush=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # one short line per write: appends from several worker processes do not interleave
            with open(self.path, "a") as f:
                f.write(f"{file}\t{reason}\n")

    def skipped(self) -> dict[str, str]:
        """Every file recorded so far by any process: path -> reason."""
        out: dict[str, str] = {}
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                file, _, reason = line.partition("\t")
                out.setdefault(file, reason)
        for file in self._seen:
            out.setdefault(file, "")
        return out


def read_image(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 RGB; DecodeError (with the reason) for a file that is not a whole image."""
    return decode_image(path)


def to_model_input(frames: torch.Tensor, spec: ModelSpec, device: torch.device | None = None,
                   channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC RGB frames -> float32 NCHW in the spec's range and channel order, on ``device``."""
    from rtkit.runtime.gpu_image import preprocess_batch

    if device is not None:
        frames = frames.to(device, non_blocking=True)
    return preprocess_batch(frames, spec, channels_last=channels_last)
