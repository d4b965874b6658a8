"""The work of a conversion, batch by batch: decode + preprocess, infer, postprocess + encode + write.

Every executor (threads, conversion processes, device workers, Ray) runs these same functions,
so every guarantee of the job (what counts as a failure, how outputs are written) is the same
whichever schedules them. The Source seam: ``CpuSource.batches(todo, spec, size)`` yields
``(items, images, failures)``; a DALI or CUDA source plugs in with the same signature.
"""
from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from rtkit.engines.errors import RtkitError
from rtkit.engines.spec import ModelSpec
from rtkit.runtime.image import preprocess, restore_geometry, to_uint8_hwc
from rtkit.runtime.manifest import Done
from rtkit.runtime.runners import Runner
from rtkit.runtime.sinks import atomic_write, encode_image
from rtkit.runtime.sources import DecodeError, decode_bytes, read_source


@dataclass
class WorkItem:
    relpath: str                    # posix, relative to SRC; also the key that seeds stochastic engines
    out: str                        # output path (a str: pathlib costs show at thousands of img/s)
    out_hw: tuple[int, int] | None = None
    x: np.ndarray | None = None     # the model input once decoded
    src_sha256: str | None = None


class OutputFolderError(RtkitError):
    """The output folder cannot take more files (full, read-only, quota): the run stops."""


# errno values that say the output folder, not the file, is the problem
_FOLDER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


class CpuSource:
    """Read and decode on the calling thread (conversion processes run one per core)."""

    name = "cpu"

    def __init__(self, src_root: str, spng: bool = False):
        self.src_root = src_root
        self.spng = spng

    def decode(self, items: list[WorkItem]) -> tuple[list[WorkItem], list[np.ndarray], list[tuple[str, str]]]:
        ok, images, failed = [], [], []
        for it in items:
            try:
                data = read_source(os.path.join(self.src_root, it.relpath))
                it.src_sha256 = hashlib.sha256(data).hexdigest()
                images.append(decode_bytes(data, os.path.splitext(it.relpath)[1].lower(), self.spng))
                ok.append(it)
            except DecodeError as e:
                failed.append((it.relpath, str(e)))
            except Exception as e:  # an image library error on one file must not stop the run
                failed.append((it.relpath, f"{type(e).__name__}: {e}"))
        return ok, images, failed

    def batches(self, todo: list[WorkItem], spec: ModelSpec, size: tuple[int, int] | None,
                batch_size: int = 64) -> Iterator[tuple[list[WorkItem], list[np.ndarray], list[tuple[str, str]]]]:
        for i in range(0, len(todo), batch_size):
            yield self.decode(todo[i:i + batch_size])


class TorchImageOps:
    """The image contract in batched torch (runtime/gpu_image) on the runner's device: uint8 frames
    are copied to the device, resized / warped / scaled there, and only uint8 comes back (4x less
    than float32 each way). The same code runs on the CPU, where it matches OpenCV within one
    8-bit level (tests/test_gpu_image.py)."""

    name = "torch"

    def __init__(self, device: str = "cpu"):
        self.device = device

    def prepare(self, items, images, spec, size):
        from rtkit.runtime import gpu_image

        ok, failed = [], []
        groups: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(tuple(img.shape), []).append(i)
        for shape, idx in groups.items():
            try:
                frames = gpu_image.as_frames(np.stack([images[i] for i in idx]), self.device)
                x = gpu_image.preprocess_batch(frames, spec)
            except DecodeError as e:
                failed += [(items[i].relpath, str(e)) for i in idx]
                continue
            for k, i in enumerate(idx):
                items[i].out_hw = size or shape[:2]
                items[i].x = x[k]
                ok.append(items[i])
        return ok, failed

    def to_images(self, items, y, spec) -> list[np.ndarray]:
        """Model output -> uint8 HxWx3 per item at its output size (post-processed on the device)."""
        from rtkit.runtime import gpu_image

        out: list = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(tuple(it.out_hw), []).append(i)
        for hw, idx in groups.items():
            frames = gpu_image.postprocess_batch(y[idx], spec, hw).cpu().numpy()
            for k, i in enumerate(idx):
                out[i] = frames[k]
        return out


def prepare_batch(items: list[WorkItem], images: list[np.ndarray], spec: ModelSpec,
                  size: tuple[int, int] | None, ops: TorchImageOps | None = None
                  ) -> tuple[list[WorkItem], list[tuple[str, str]]]:
    """Decoded images -> model inputs on the items (``.x``), by the image contract (OpenCV on the
    CPU, or ``ops`` in batched torch)."""
    if ops is not None:
        return ops.prepare(items, images, spec, size)
    ok, failed = [], []
    for it, rgb in zip(items, images):
        try:
            it.out_hw = size or rgb.shape[:2]
            it.x = preprocess(rgb, spec)
            ok.append(it)
        except DecodeError as e:
            failed.append((it.relpath, str(e)))
        except Exception as e:
            failed.append((it.relpath, f"{type(e).__name__}: {e}"))
    return ok, failed


def decode_batch(items: list[WorkItem], source: CpuSource, spec: ModelSpec,
                 size: tuple[int, int] | None) -> tuple[list[WorkItem], list[tuple[str, str]]]:
    """Read, decode and preprocess a batch: (items with .x set, [(relpath, reason)] failures)."""
    ok, images, failed = source.decode(items)
    ready, bad = prepare_batch(ok, images, spec, size)
    return ready, failed + bad


def infer_batch(runner: Runner, items: list[WorkItem]) -> np.ndarray:
    """Run one batch of preprocessed items (all of one input shape) and free their inputs.

    The keys name the samples: a stochastic engine (UNSB, DDIM) seeds each image's noise from
    its path, so an output does not depend on batching, sharding or resume."""
    xs = [it.x for it in items]
    if isinstance(xs[0], np.ndarray):
        batch = np.stack(xs)
    else:  # device tensors from TorchImageOps: the batch stays on the device
        import torch

        batch = torch.stack(xs)
    y = runner.infer(batch, keys=[it.relpath for it in items])
    for it in items:
        it.x = None
    return y if not isinstance(xs[0], np.ndarray) else np.asarray(y)


def output_images(items: list[WorkItem], y, spec: ModelSpec, ops: TorchImageOps | None = None) -> list[np.ndarray]:
    """Model output -> uint8 HxWx3 RGB per item, at its output size (OpenCV, or ``ops`` on the device)."""
    if ops is not None:
        return ops.to_images(items, y, spec)  # already at each item's output size
    return [restore_geometry(img, spec, it.out_hw) for it, img in zip(items, to_uint8_hwc(y, spec))]


def write_batch(items, imgs: list[np.ndarray], fmt: str, quality: int, made_dirs: set[str]
                ) -> tuple[list[Done], list[tuple[str, str]], str | None]:
    """Encode and atomically write images: (done, failures, folder error). ``items`` need
    ``relpath``, ``out`` and ``src_sha256`` (WorkItems, or the tuples encoder processes get).

    A folder error (disk full, read-only, quota) stops at the file that met it: that file and
    the rest of the batch are neither done nor failed, so a rerun tries them again."""
    done, failed = [], []
    for it, img in zip(items, imgs):
        relpath, out, src_sha256 = (it.relpath, it.out, it.src_sha256) if isinstance(it, WorkItem) else it
        try:
            data = encode_image(img, fmt, quality)
        except Exception as e:
            failed.append((relpath, f"cannot encode output: {type(e).__name__}: {e}"))
            continue
        try:
            folder = os.path.dirname(out)
            if folder not in made_dirs:
                os.makedirs(folder, exist_ok=True)
                made_dirs.add(folder)
            size, mtime_ns = atomic_write(out, data)
        except OSError as e:
            if e.errno in _FOLDER_ERRNOS:
                return done, failed, f"cannot write {out}: {e.strerror or e}"
            failed.append((relpath, f"cannot write output: {e.strerror or e}"))
            continue
        done.append(Done(relpath, hashlib.sha256(data).hexdigest(), size, mtime_ns, src_sha256))
    return done, failed, None


def encode_batch(items: list[WorkItem], y, spec: ModelSpec, fmt: str, quality: int,
                 made_dirs: set[str], ops: TorchImageOps | None = None
                 ) -> tuple[list[Done], list[tuple[str, str]], str | None]:
    """Postprocess, encode and atomically write a batch: (done, failures, folder error)."""
    return write_batch(items, output_images(items, y, spec, ops), fmt, quality, made_dirs)


def group_by_shape(items: list[WorkItem]) -> list[list[WorkItem]]:
    """A batch may only hold one input shape (fully convolutional engines take any size)."""
    groups: dict[tuple, list[WorkItem]] = {}
    for it in items:
        groups.setdefault(it.x.shape, []).append(it)
    return list(groups.values())


def convert_batch(runner: Runner, items: list[WorkItem], source: CpuSource, spec: ModelSpec, opts,
                  made_dirs: set[str]) -> tuple[list[Done], list[tuple[str, str]], str | None, tuple]:
    """decode -> infer -> encode for one batch in the calling thread (conversion processes, device
    workers, Ray tasks): (done, failures, folder error, (decode_s, infer_s, encode_s))."""
    import time

    t0 = time.perf_counter()
    ok, failed = decode_batch(items, source, spec, opts.size)
    t1 = time.perf_counter()
    done, infer_s, encode_s = [], 0.0, 0.0
    for group in group_by_shape(ok):
        t = time.perf_counter()
        y = infer_batch(runner, group)
        t2 = time.perf_counter()
        d, f, fatal = encode_batch(group, y, spec, opts.fmt, opts.quality, made_dirs)
        infer_s, encode_s = infer_s + t2 - t, encode_s + time.perf_counter() - t2
        done += d
        failed += f
        if fatal:
            return done, failed, fatal, (t1 - t0, infer_s, encode_s)
    return done, failed, None, (t1 - t0, infer_s, encode_s)
