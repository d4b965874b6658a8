"""Image sources: walking a dataset tree and decoding images on CPU threads.

Decoding validates the container as well as the pixels: OpenCV returns a grey-filled image for
a truncated JPEG, so a file is only accepted when its format's end marker is present.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"


class DecodeError(Exception):
    """An input file that is not a decodable image; the message is the reason recorded."""


def walk_files(src: str | Path, exclude: Path | None = None) -> tuple[list[str], list[str]]:
    """Sorted relative paths (posix) under ``src``: (images, other files).

    Hidden files and folders (names starting with '.') are not part of a dataset and are
    skipped, as is ``exclude`` (an output folder placed inside the source).
    """
    src = Path(src)
    excl = os.path.realpath(exclude) if exclude is not None else None
    images, others = [], []
    stack = [src]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir(follow_symlinks=True):
                    if excl is not None and os.path.realpath(e.path) == excl:
                        continue
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=True):
                    rel = Path(e.path).relative_to(src).as_posix()
                    (images if e.name.lower().endswith(IMAGE_EXTENSIONS) else others).append(rel)
    images.sort()
    others.sort()
    return images, others


def check_container(data: bytes, suffix: str) -> None:
    if data.startswith(_PNG_SIG):
        if _PNG_END not in data[-64:]:
            raise DecodeError("truncated PNG (no IEND chunk)")
    elif data[:3] == b"\xff\xd8\xff":
        if b"\xff\xd9" not in data[-1024:]:
            raise DecodeError("truncated JPEG (no end-of-image marker)")
        _check_jpeg_headers(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        declared = int.from_bytes(data[4:8], "little") + 8
        if len(data) < declared:
            raise DecodeError(f"truncated WebP ({len(data)} of {declared} bytes)")
    elif data[:2] == b"BM":
        declared = int.from_bytes(data[2:6], "little")
        if len(data) < declared:
            raise DecodeError(f"truncated BMP ({len(data)} of {declared} bytes)")
    else:
        raise DecodeError(f"not an image (unknown file signature for {suffix or 'no extension'})")


def _check_jpeg_headers(data: bytes) -> None:
    """Walk the marker segments up to start-of-scan: libjpeg 'decodes' garbage headers with a
    warning only, so a frame header (SOF) and well-formed segments are required here."""
    pos, n, has_frame = 2, len(data), False
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise DecodeError("corrupt JPEG (bad marker in header)")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: headers are complete
            if not has_frame:
                raise DecodeError("corrupt JPEG (no frame header before scan)")
            return
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:
            raise DecodeError("corrupt JPEG (unexpected marker in header)")
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > n:
            raise DecodeError("corrupt JPEG (bad segment length)")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            has_frame = True
        pos += 2 + length
    raise DecodeError("corrupt JPEG (no image data)")


def decode_image(path: str | Path, spng: bool = False) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB, or raise DecodeError with the reason."""
    path = os.fspath(path)
    try:
        with open(path, "rb", buffering=0) as f:
            data = f.read()
    except OSError as e:
        raise DecodeError(f"unreadable: {e.strerror or e}") from None
    return decode_bytes(data, os.path.splitext(path)[1].lower(), spng)


try:
    import pyspng as _pyspng
except ImportError:  # pragma: no cover - pyspng is a dependency; OpenCV decodes everything without it
    _pyspng = None


def _plain_rgb_png(data: bytes) -> bool:
    """8-bit RGB, not interlaced: PNGs that libspng decodes to exactly the pixels OpenCV gives,
    with no conversion (alpha, grey, 16 bit, palette) the two libraries might do differently."""
    return len(data) > 33 and data[12:16] == b"IHDR" and data[24] == 8 and data[25] == 2 and data[28] == 0


def _check_png_crcs(data: bytes) -> None:
    """libspng (as pyspng sets it up) decodes past CRC errors; libpng does not. Checking every
    chunk here (a few microseconds per face) keeps corrupt files failing in both decoders."""
    view, pos, n = memoryview(data), 8, len(data)
    while pos + 12 <= n:
        end = pos + 12 + int.from_bytes(data[pos:pos + 4], "big")
        if end > n or zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise DecodeError(f"corrupt image data (bad {bytes(data[pos + 4:pos + 8])!r} chunk in PNG)")
        pos = end


def decode_bytes(data: bytes, suffix: str = "", spng: bool = False) -> np.ndarray:
    """``spng``: decode plain RGB PNGs with libspng (pyspng), ~25 % faster than OpenCV's libpng
    but holding the interpreter lock, so only conversion processes (one thread each) ask for it."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    check_container(data, suffix)
    if spng and _pyspng is not None and data.startswith(_PNG_SIG) and _plain_rgb_png(data):
        _check_png_crcs(data)
        try:
            return _pyspng.load(data)  # 8-bit RGB in, HxWx3 uint8 RGB out
        except Exception as e:  # libspng checks every CRC and length
            raise DecodeError(f"corrupt image data ({e})") from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise DecodeError("corrupt image data (decoder failed)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
