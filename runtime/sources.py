"""Image sources: walking a dataset tree and decoding images on CPU threads.

Decoding validates the container as well as the pixels (``check_container``): OpenCV returns a
grey-filled image for a truncated JPEG and garbage for a corrupt scan, so JPEGs are decoded by
libjpeg-turbo in strict mode (simplejpeg) and every PNG chunk's CRC is checked, the same way in
every executor and source.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_PNG_SIG = b"\x89PNG\r\n\x1a\n"


class DecodeError(Exception):
    """An input file that is not a decodable image; the message is the reason recorded."""


@dataclass
class Scan:
    """What a walk of a source tree found."""

    images: list[tuple[str, tuple[int, int, int]]]   # (relpath, (size, mtime_ns, ctime_ns))
    others: list[str]                                # files without an image extension
    problems: list[tuple[str, str]]                  # (relpath, reason): unreadable folders, loops


def scan_tree(src: str | Path, exclude: Path | None = None) -> Scan:
    """Sorted relative paths (posix) under ``src`` with each image's stat.

    Hidden files and folders (names starting with '.') are not part of a dataset and are
    skipped, as is ``exclude`` (an output folder placed inside the source). Symlinked folders
    are followed once: a folder reached again (a symlink loop) and an unreadable folder or file
    are reported in ``problems`` with the reason, never raised, so one bad folder cannot stop a
    whole run."""
    src = Path(src)
    excl = os.path.realpath(exclude) if exclude is not None else None
    images, others, problems = [], [], []
    root = os.fspath(src)
    try:
        st = os.stat(root)
    except OSError as e:
        raise FileNotFoundError(f"source folder not readable: {src} ({e.strerror or e})") from None
    seen = {(st.st_dev, st.st_ino)}
    stack = [root]
    prefix = len(root.rstrip(os.sep)) + 1
    while stack:
        d = stack.pop()
        rel_d = d[prefix:] if len(d) >= prefix else ""
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            problems.append((rel_d or ".", f"unreadable folder: {e.strerror or e}"))
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            rel = e.path[prefix:].replace(os.sep, "/")
            try:
                if e.is_dir(follow_symlinks=True):
                    if excl is not None and os.path.realpath(e.path) == excl:
                        continue
                    dst = e.stat(follow_symlinks=True)
                    key = (dst.st_dev, dst.st_ino)
                    if key in seen:
                        problems.append((rel, "folder reached twice (a symlink loop or a second link); "
                                              "skipped"))
                        continue
                    seen.add(key)
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=True):
                    if e.name.lower().endswith(IMAGE_EXTENSIONS):
                        fst = e.stat(follow_symlinks=True)
                        images.append((rel, (fst.st_size, fst.st_mtime_ns, fst.st_ctime_ns)))
                    else:
                        others.append(rel)
                elif e.is_symlink():
                    problems.append((rel, "broken or looping symlink"))
            except OSError as err:
                problems.append((rel, f"unreadable: {err.strerror or err}"))
    images.sort()
    others.sort()
    problems.sort()
    return Scan(images, others, problems)


def walk_files(src: str | Path, exclude: Path | None = None) -> tuple[list[str], list[str]]:
    """Sorted relative paths (posix) under ``src``: (images, other files); see ``scan_tree``."""
    scan = scan_tree(src, exclude)
    return [rel for rel, _ in scan.images], scan.others


def file_identity(path: str | Path) -> tuple[int, int, int]:
    """(size, mtime_ns, ctime_ns) of a file: what the job compares to tell a changed source."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def check_container(data: bytes, suffix: str) -> None:
    """Validate a file's container before decoding (one policy for every source and executor):

    - PNG: every chunk's length and CRC (critical and ancillary alike; libpng would skip a bad
      ancillary CRC and libspng does not check), up to IEND; bytes after IEND are allowed.
    - JPEG: well-formed marker segments up to the scan; the scan itself is checked by the strict
      decoder (``decode_bytes``), which refuses truncated or corrupt entropy-coded data. Bytes
      after the end-of-image marker are allowed.
    - WebP / BMP: the declared size is present.
    """
    if data.startswith(_PNG_SIG):
        _check_png_chunks(data)
    elif data[:3] == b"\xff\xd8\xff":
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


def _check_png_chunks(data: bytes) -> None:
    view, pos, n = memoryview(data), 8, len(data)
    while pos + 12 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 12 + length
        tag = bytes(data[pos + 4:pos + 8])
        if end > n:
            raise DecodeError(f"truncated PNG (chunk {tag!r} runs past the end of the file)")
        if zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise DecodeError(f"corrupt image data (bad CRC in the {tag!r} chunk of the PNG)")
        if tag == b"IEND":
            return
        pos = end
    raise DecodeError("truncated PNG (no IEND chunk)")


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


def read_source(path: str) -> bytes:
    """The bytes of a source file, or DecodeError saying why it cannot be read."""
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read()
    except OSError as e:
        raise DecodeError(f"unreadable: {e.strerror or e}") from None


def decode_image(path: str | Path, spng: bool = False) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB, or raise DecodeError with the reason."""
    path = os.fspath(path)
    return decode_bytes(read_source(path), os.path.splitext(path)[1].lower(), spng)


try:
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is a dependency
    _simplejpeg = None

try:
    import pyspng as _pyspng
except ImportError:  # pragma: no cover - pyspng is a dependency; OpenCV decodes everything without it
    _pyspng = None


def _plain_rgb_png(data: bytes) -> bool:
    """8-bit RGB, not interlaced: PNGs that libspng decodes to exactly the pixels OpenCV gives,
    with no conversion (alpha, grey, 16 bit, palette) the two libraries might do differently."""
    return len(data) > 33 and data[12:16] == b"IHDR" and data[24] == 8 and data[25] == 2 and data[28] == 0


def decode_bytes(data: bytes, suffix: str = "", spng: bool = False) -> np.ndarray:
    """``spng``: decode plain RGB PNGs with libspng (pyspng), ~25 % faster than OpenCV's libpng
    but holding the interpreter lock, so only conversion processes (one thread each) ask for it."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    check_container(data, suffix)
    if spng and _pyspng is not None and data.startswith(_PNG_SIG) and _plain_rgb_png(data):
        try:
            return _pyspng.load(data)  # 8-bit RGB in, HxWx3 uint8 RGB out
        except Exception as e:  # libspng checks every CRC and length
            raise DecodeError(f"corrupt image data ({e})") from None
    if data[:3] == b"\xff\xd8\xff" and _simplejpeg is not None:
        try:  # libjpeg-turbo, strict: a corrupt scan is an error, not a warning and garbage pixels
            return _simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except ValueError as e:
            why = str(e).strip() or "decoder failed"
            kind = "truncated" if "premature end" in why.lower() else "corrupt"
            raise DecodeError(f"{kind} JPEG ({why})") from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise DecodeError("corrupt image data (decoder failed)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
