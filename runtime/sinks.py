"""Image sinks: CPU encoders and atomic writes (temporary name in the same folder, then rename),
so a run killed at any moment leaves no half-written output."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

OUTPUT_FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}


def encode_image(rgb: np.ndarray, fmt: str = "png", quality: int = 95, png_level: int = 3) -> bytes:
    return encode_bgr(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), fmt, quality, png_level)


def encode_bgr(bgr: np.ndarray, fmt: str = "png", quality: int = 95, png_level: int = 3) -> bytes:
    """Encode an HxWx3 uint8 BGR image (OpenCV's order, so no colour conversion is needed)."""
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


def temp_path(final: str | Path) -> str:
    """The deterministic temporary name of ``final``: a rerun overwrites, never accumulates."""
    head, name = os.path.split(os.fspath(final))
    return os.path.join(head, f".{name}.part")


def atomic_write(final: str | Path, data: bytes, fsync: bool = False) -> None:
    # Plain os calls: this runs once per output image, where pathlib's overhead shows.
    tmp = temp_path(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
