"""A DALI image source: encoded bytes through ``fn.external_source`` into ``fn.decoders.image``.

On a GPU the decoder runs "mixed" (JPEG on the GPU; PNG and the rest on DALI's CPU threads, as
DALI always does); without one the same pipeline runs CPU-only (``device_id=None``), which is how
the tests check it gives the CPU source's pixels.

One undecodable file invalidates a DALI pipeline and DALI cannot skip it, so no bad file may
reach a batch: every file is read and its container validated first (empty, truncated, not an
image: ``rtkit.runtime.sources.check_container``). A file that passes and still makes a batch
fail (e.g. corrupt compressed data) costs a rebuild of the pipeline, and that batch is decoded
file by file on the CPU path (``decode_bytes``), so each culprit is recorded with its reason and
no good file is lost.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from rtkit.engines.errors import optional_import
from rtkit.runtime.sources import DecodeError, check_container, decode_bytes

__all__ = ["DaliSource"]


def _read(root: str, relpath: str) -> tuple[bytes | None, str | None]:
    """(bytes, None) for a file whose container is sound, else (None, reason)."""
    try:
        with open(os.path.join(root, relpath), "rb", buffering=0) as f:
            data = f.read()
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    if not data:
        return None, "empty file (0 bytes)"
    try:
        check_container(data, os.path.splitext(relpath)[1].lower())
    except DecodeError as e:
        return None, str(e)
    return data, None


def _device_id(device: str) -> int | None:
    d = str(device)
    if d == "cpu":
        return None
    if d.startswith("cuda"):
        return int(d.split(":", 1)[1]) if ":" in d else 0
    raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")


class DaliSource:
    """Decode work items ``relpath``s under ``src_root`` with DALI, in batches.

    ``device``: "cpu" (CPU-only pipeline) or "cuda[:N]" (the "mixed" decoder on that GPU).
    ``batch_size`` files go into one DALI run; ``num_threads`` are DALI's CPU threads (PNG
    decoding runs there even on a GPU, so give it the cores); ``read_workers`` threads read and
    validate the next batch's files while DALI decodes the current one.

    ``rebuilds`` counts failed DALI batches that were redone file by file on the CPU path.
    """

    name = "dali"

    def __init__(self, src_root: str | os.PathLike, *, device: str = "cpu", batch_size: int = 64,
                 num_threads: int | None = None, read_workers: int = 4):
        optional_import("nvidia.dali", extra="dali", purpose="the DALI image source",
                        package="nvidia-dali-cuda120")  # fail here, in one line, not mid-run
        self.src_root = os.fspath(src_root)
        self.device = str(device)
        self.device_id = _device_id(self.device)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.num_threads = num_threads or max(1, min(16, len(os.sched_getaffinity(0))))
        self.read_workers = max(1, read_workers)
        self.rebuilds = 0
        self._pipe = None

    # -- the pipeline --------------------------------------------------------------------------

    def _build(self):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        # Synchronous (not pipelined) so a failure belongs to exactly the batch just fed;
        # the overlap comes from reading the next batch meanwhile and DALI's own threads.
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                        device_id=self.device_id, prefetch_queue_depth=1, exec_async=False,
                        exec_pipelined=False)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            decoder = "cpu" if self.device_id is None else "mixed"
            pipe.set_outputs(fn.decoders.image(encoded, device=decoder, output_type=types.RGB))
        pipe.build()
        return pipe

    def _decode(self, blobs: Sequence[bytes]) -> list[Any]:
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("encoded", [np.frombuffer(b, np.uint8) for b in blobs])
        (out,) = self._pipe.run()
        if self.device_id is None:
            if out.is_dense_tensor():
                return list(out.as_array())  # a copy: DALI reuses its buffers on the next run
            return [np.array(out.at(i)) for i in range(len(out))]
        import torch

        # Zero-copy views of DALI's GPU buffers, cloned because the next run overwrites them.
        return [torch.from_dlpack(out[i]).clone() for i in range(len(out))]

    def close(self) -> None:
        self._pipe = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- the Source seam -----------------------------------------------------------------------

    def batches(self, todo: Sequence[Any], spec=None, size=None
                ) -> Iterator[tuple[list[Any], Any, list[tuple[str, str]]]]:
        """Yield ``(items, images, failures)`` per batch of ``todo`` (objects with ``.relpath``).

        ``images`` holds one decoded HxWx3 uint8 RGB frame per item, in order: one NHWC array
        when all share a size, else a list (numpy on CPU; torch CUDA tensors on a GPU).
        ``failures`` are ``(relpath, reason)``. ``spec`` and ``size`` are accepted for the
        Source seam; geometry and value range are applied by the caller (runtime/gpu_image.py).
        """
        chunks = [todo[i:i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        with ThreadPoolExecutor(self.read_workers, thread_name_prefix="dali-read") as pool:
            def read(chunk):
                return list(pool.map(lambda it: _read(self.src_root, it.relpath), chunk))

            ahead = pool.submit(read, chunks[0]) if chunks else None
            for k, chunk in enumerate(chunks):
                read_results = ahead.result()
                ahead = pool.submit(read, chunks[k + 1]) if k + 1 < len(chunks) else None
                yield self._batch(chunk, read_results)

    def _batch(self, chunk: Sequence[Any], read_results: Iterable[tuple[bytes | None, str | None]]):
        items, blobs, failures = [], [], []
        for it, (data, reason) in zip(chunk, read_results):
            if data is None:
                failures.append((it.relpath, reason))
            else:
                items.append(it)
                blobs.append(data)
        if not items:
            return [], [], failures
        try:
            frames = self._decode(blobs)
        except RuntimeError:  # DALI's "Critical error in pipeline": this pipeline is dead
            self._pipe = None
            self.rebuilds += 1
            frames, kept = [], []
            for it, data in zip(items, blobs):
                try:
                    rgb = decode_bytes(data, os.path.splitext(it.relpath)[1].lower())
                    frames.append(self._to_device(rgb))
                    kept.append(it)
                except DecodeError as e:
                    failures.append((it.relpath, str(e)))
                except Exception as e:  # an image library error on one file must not stop the run
                    failures.append((it.relpath, f"{type(e).__name__}: {e}"))
            items = kept
        return items, _stack_if_uniform(frames), failures

    def _to_device(self, rgb: np.ndarray):
        if self.device_id is None:
            return rgb
        import torch

        return torch.from_numpy(rgb).to(self.device)


def _stack_if_uniform(frames: list[Any]):
    if not frames or any(f.shape != frames[0].shape for f in frames):
        return frames
    if isinstance(frames[0], np.ndarray):
        return np.stack(frames)
    import torch

    return torch.stack(frames)
