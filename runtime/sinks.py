"""Image sinks: CPU encoders and atomic writes (temporary name in the same folder, then rename),
so a run killed at any moment leaves no half-written output."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

OUTPUT_FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}


def encode_image(rgb: np.ndarray, fmt: str = "png", quality: int = 95, png_level: int = 3) -> bytes:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if fmt == "png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, png_level]
    elif fmt == "jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif fmt == "webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, int(quality)]
    else:
        raise ValueError(f"unknown output format {fmt!r}; use one of {sorted(OUTPUT_FORMATS)}")
    ok, buf = cv2.imencode(OUTPUT_FORMATS[fmt], bgr, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {fmt} image")
    return buf.tobytes()


def temp_path(final: Path) -> Path:
    """The deterministic temporary name of ``final``: a rerun overwrites, never accumulates."""
    return final.with_name(f".{final.name}.part")


def atomic_write(final: Path, data: bytes, fsync: bool = False) -> None:
    tmp = temp_path(final)
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, final)
