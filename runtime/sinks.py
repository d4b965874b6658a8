"""Image sinks: CPU encoders and atomic writes (temporary name in the same folder, then rename),
so a run killed at any moment leaves no half-written output."""
from __future__ import annotations

import errno
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np

OUTPUT_FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}


def encode_image(rgb: np.ndarray, fmt: str = "png", quality: int = 95, png_level: int = 1) -> bytes:
    """Encode an HxWx3 uint8 RGB image: PNG by :func:`encode_png`, JPEG and WebP by OpenCV."""
    if fmt == "png":
        return encode_png(rgb, png_level)
    if fmt == "jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif fmt == "webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, int(quality)]
    else:
        raise ValueError(f"unknown output format {fmt!r}; use one of {sorted(OUTPUT_FORMATS)}")
    ok, buf = cv2.imencode(OUTPUT_FORMATS[fmt], cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {fmt} image")
    return buf.tobytes()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> grey, grey+alpha, RGB, RGBA


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def encode_png(img: np.ndarray, level: int = 1) -> bytes:
    """A standard 8-bit PNG of an HxW(xC) uint8 image (RGB for three channels).

    Every row uses PNG's "Up" filter, computed for the whole image in one numpy subtraction
    (uint8 wrap-around is PNG's modulo-256 arithmetic), and the rows are deflated by libdeflate
    when the `deflate` package is present. On face crops this is ~2.5x faster than libpng's
    per-row adaptive filtering with zlib at the same level, and the files are within about 1 % of
    its size (benchmarks/convert_cpu.py prints both); decoders see the same pixels.
    """
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 2, 3, 4)):
        raise ValueError(f"encode_png needs HxW or HxWxC uint8 with C in 1..4, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    c = 1 if img.ndim == 2 else img.shape[2]
    rows = np.ascontiguousarray(img).reshape(h, w * c)
    filtered = np.empty((h, w * c + 1), np.uint8)
    filtered[:, 0] = 2  # filter type Up: each byte minus the byte above it (zero above row 0)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOUR_TYPE[c], 0, 0, 0)
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", _deflate(filtered.data, level)), _png_chunk(b"IEND", b"")))


try:  # libdeflate: same format as zlib, about twice as fast at equal or better ratio
    from deflate import zlib_compress as _libdeflate_zlib

    def _deflate(data, level: int) -> bytes:
        return _libdeflate_zlib(data, max(1, min(12, level))) if level else zlib.compress(data, 0)
except ImportError:  # pragma: no cover - `deflate` is a dependency; stay correct without it
    def _deflate(data, level: int) -> bytes:
        return zlib.compress(data, max(0, min(9, level)))


def temp_path(final: str | Path) -> str:
    """The deterministic temporary name of ``final``: a rerun overwrites, never accumulates."""
    head, name = os.path.split(os.fspath(final))
    return os.path.join(head, f".{name}.part")


def _write_all(fd: int, data: bytes, fsync: bool) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    if fsync:
        os.fsync(fd)


class _UnnamedFiles:
    """Linux O_TMPFILE: the data goes into a file with no name, which is then linked under its
    final name in one step. Atomic like write-then-rename, but one directory operation instead
    of three (measured ~40 % cheaper per file when two processes write into the same folders),
    and a killed writer leaves nothing behind, not even a temporary name."""

    def __init__(self):
        self.proc_fd: int | None = None
        self.usable = hasattr(os, "O_TMPFILE")

    def write(self, final: str, data: bytes, fsync: bool):
        """(size, mtime_ns) when written; None when this system cannot (the caller falls back)."""
        if not self.usable:
            return None
        if self.proc_fd is None:
            try:  # /proc, not /proc/self: "self" must resolve at link time (forked workers)
                self.proc_fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                self.usable = False
                return None
        try:
            fd = os.open(os.path.dirname(final) or ".", os.O_TMPFILE | os.O_WRONLY, 0o666)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                self.usable = False  # a kernel or filesystem without O_TMPFILE
                return None
            raise
        try:
            _write_all(fd, data, fsync)
            st = os.fstat(fd)
            try:
                os.link(f"self/fd/{fd}", final, src_dir_fd=self.proc_fd)  # linkat, follows the fd link
            except FileExistsError:
                return None  # replacing an existing file: rename does that atomically
            return st.st_size, st.st_mtime_ns
        finally:
            os.close(fd)


_unnamed = _UnnamedFiles()


def atomic_write(final: str | Path, data: bytes, fsync: bool = False) -> tuple[int, int]:
    """Write ``data`` to ``final`` so that no reader, and no run killed at any moment, ever
    sees a partial file; returns the written file's (size, mtime_ns). Plain os calls: this runs
    once per output image."""
    final = os.fspath(final)
    written = _unnamed.write(final, data, fsync)
    if written is not None:
        return written
    tmp = temp_path(final)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, data, fsync)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return st.st_size, st.st_mtime_ns

