"""A DALI image source: encoded bytes through ``fn.external_source`` into ``fn.decoders.image``.

On a GPU the decoder runs "mixed" (JPEG on the GPU; PNG and the rest on DALI's CPU threads, as
DALI always does); without one the same pipeline runs CPU-only (``device_id=None``), which is how
the tests check it gives the CPU source's pixels.

One undecodable file invalidates a DALI pipeline and DALI cannot skip it, so no bad file may
reach a batch: every file is read and its container validated first (empty, truncated PNG, bad
CRC, not an image: ``rtkit.runtime.sources.check_container``, the policy every source shares).
A file that passes and still makes a batch fail (a truncated JPEG, say) costs a rebuild of the
pipeline, and that batch is decoded file by file on the CPU path (``decode_bytes``), so each
culprit is recorded with its reason and no good file is lost.

JPEG is the exception DALI cannot cover alone: it decodes a JPEG with corrupt entropy-coded data
(e.g. "bad Huffman code") without an error, where the CPU source's strict decoder refuses it. With
``strict_jpeg`` (the default) JPEGs are therefore decoded by that strict decoder on the reading
threads, exactly as the CPU source does, and only the other formats go through DALI; with
``strict_jpeg=False`` JPEGs go to DALI (nvJPEG on a GPU), faster, and such a file is converted
from whatever pixels DALI makes of it.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from rtkit.engines.errors import optional_import
from rtkit.runtime.sources import DecodeError, check_container, decode_bytes, read_source

__all__ = ["DaliSource"]

_JPEG_SOI = b"\xff\xd8\xff"


def _read(root: str, relpath: str, strict_jpeg: bool):
    """(bytes, sha256, CPU-decoded frame or None, None) for a file DALI may decode or that was
    decoded here, else (None, None, None, reason)."""
    suffix = os.path.splitext(relpath)[1].lower()
    try:
        data = read_source(os.path.join(root, relpath))
        digest = hashlib.sha256(data).hexdigest()
        if not data:
            raise DecodeError("empty file (0 bytes)")
        if strict_jpeg and data.startswith(_JPEG_SOI):
            return data, digest, decode_bytes(data, suffix), None
        check_container(data, suffix)
    except DecodeError as e:
        return None, None, None, str(e)
    except Exception as e:  # an image library error on one file must not stop the run
        return None, None, None, f"{type(e).__name__}: {e}"
    return data, digest, None, None


def _device_id(device: str) -> int | None:
    d = str(device)
    if d == "cpu":
        return None
    if d.startswith("cuda"):
        return int(d.split(":", 1)[1]) if ":" in d else 0
    raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")


class DaliSource:
    """Decode work items' ``relpath``s under ``src_root`` with DALI, in batches.

    ``device``: "cpu" (CPU-only pipeline) or "cuda[:N]" (the "mixed" decoder on that GPU).
    ``batch_size`` files go into one DALI run (the ``batches`` call may ask for another);
    ``num_threads`` are DALI's CPU threads (PNG decoding runs there even on a GPU, so give it the
    cores); ``read_workers`` threads read and validate the next batch while DALI decodes this one.
    ``strict_jpeg``: see the module docstring.

    ``rebuilds`` counts failed DALI batches that were redone file by file on the CPU path.
    """

    name = "dali"

    def __init__(self, src_root: str | os.PathLike, *, device: str = "cpu", batch_size: int = 64,
                 num_threads: int | None = None, read_workers: int = 4, strict_jpeg: bool = True):
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
        self.strict_jpeg = strict_jpeg
        self.rebuilds = 0
        self._pipe = None
        self._pipe_batch = 0

    # -- the pipeline --------------------------------------------------------------------------

    def _build(self, max_batch: int):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        # Synchronous (not pipelined) so a failure belongs to exactly the batch just fed;
        # the overlap comes from reading the next batch meanwhile and DALI's own threads.
        pipe = Pipeline(batch_size=max_batch, num_threads=self.num_threads, device_id=self.device_id,
                        prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            decoder = "cpu" if self.device_id is None else "mixed"
            pipe.set_outputs(fn.decoders.image(encoded, device=decoder, output_type=types.RGB))
        pipe.build()
        return pipe

    def _decode(self, blobs: Sequence[bytes]) -> list[Any]:
        if self._pipe is None or len(blobs) > self._pipe_batch:
            self._pipe_batch = max(self.batch_size, len(blobs))
            self._pipe = self._build(self._pipe_batch)
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

    def batches(self, todo: Sequence[Any], spec=None, size=None, batch_size: int | None = None
                ) -> Iterator[tuple[list[Any], Any, list[tuple[str, str]]]]:
        """Yield ``(items, images, failures)`` per batch of ``todo`` (objects with ``.relpath``).

        ``images`` holds one decoded HxWx3 uint8 RGB frame per item, in order: one NHWC array
        when all share a size, else a list (numpy on CPU; torch CUDA tensors on a GPU). Each
        yielded item gets ``src_sha256``, the digest of the bytes decoded (the manifest's source
        identity). ``failures`` are ``(relpath, reason)``. ``spec`` and ``size`` are accepted for
        the Source seam; geometry and value range are the caller's (runtime/gpu_image.py).
        """
        bs = batch_size or self.batch_size
        chunks = [todo[i:i + bs] for i in range(0, len(todo), bs)]
        with ThreadPoolExecutor(self.read_workers, thread_name_prefix="dali-read") as pool:
            def read(chunk):
                return list(pool.map(lambda it: _read(self.src_root, it.relpath, self.strict_jpeg),
                                     chunk))

            ahead = pool.submit(read, chunks[0]) if chunks else None
            for k, chunk in enumerate(chunks):
                read_results = ahead.result()
                ahead = pool.submit(read, chunks[k + 1]) if k + 1 < len(chunks) else None
                yield self._batch(chunk, read_results)

    def _batch(self, chunk: Sequence[Any], read_results):
        items, frames, failures = [], [], []
        to_dali = []  # positions in items / frames that DALI decodes
        for it, (data, digest, frame, reason) in zip(chunk, read_results):
            if reason is not None:
                failures.append((it.relpath, reason))
                continue
            it.src_sha256 = digest
            if frame is None:
                to_dali.append((len(items), data))
            items.append(it)
            frames.append(None if frame is None else self._to_device(frame))
        if to_dali:
            try:
                for (pos, _), frame in zip(to_dali, self._decode([d for _, d in to_dali])):
                    frames[pos] = frame
            except RuntimeError:  # DALI's "Critical error in pipeline": this pipeline is dead
                self._pipe = None
                self.rebuilds += 1
                for pos, data in to_dali:
                    it = items[pos]
                    try:
                        rgb = decode_bytes(data, os.path.splitext(it.relpath)[1].lower())
                        frames[pos] = self._to_device(rgb)
                    except DecodeError as e:
                        failures.append((it.relpath, str(e)))
                    except Exception as e:  # an image library error on one file must not stop the run
                        failures.append((it.relpath, f"{type(e).__name__}: {e}"))
        kept = [(it, f) for it, f in zip(items, frames) if f is not None]
        return [it for it, _ in kept], _stack_if_uniform([f for _, f in kept]), failures

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
