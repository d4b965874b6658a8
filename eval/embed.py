"""Embedding images with a recognizer through the runtime's runners, with an on-disk cache.

``Embedder`` wraps any recognizer the runtime can open (a registered model name with an
optional checkpoint, an exported .onnx/.plan with its metadata, or a plain insightface-style
.onnx without rtkit metadata) and turns images into embeddings:

- worker threads decode/align images and bring them to the model's input contract (size,
  channel order, value range from the spec) while the runner works on the previous batch;
- each image and its horizontal flip are embedded (the views are kept apart; the benchmark
  decides how to fuse them, as insightface sums them in float64 for .bin files and in float32
  for IJB-C);
- results are cached per (engine identity, dataset key, flip) as .npy files, so evaluating or
  reporting again costs nothing. The dataset key is built by the caller from a hash of the
  benchmark file and a pipeline version string.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from rtkit.engines.errors import EngineError, RtkitError
from rtkit.engines.spec import ModelSpec
from rtkit.engines.card import METADATA_KEY, EngineCard, card_path
from rtkit.runtime.image import preprocess
from rtkit.runtime.runners import OnnxRunner, Runner, open_engine

CACHE_ENV = "RTKIT_EMBED_CACHE"


def default_cache_dir() -> Path:
    """$RTKIT_EMBED_CACHE, else ~/.cache/rtkit/embeddings."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rtkit" / "embeddings"


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# -- input contract ----------------------------------------------------------------------------

def to_model_input(rgb: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3xHxW float32 by the runtime's image contract (rtkit.runtime.image);
    for [-1, 1] bit-identical to insightface's ``(x / 255 - 0.5) / 0.5``."""
    return preprocess(rgb, spec)


# -- opening a recognizer ----------------------------------------------------------------------

def _onnx_has_rtkit_metadata(path: Path) -> bool:
    if card_path(path).is_file():
        return True
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    return any(p.key == METADATA_KEY for p in m.metadata_props)


def insightface_onnx_spec(model) -> tuple[ModelSpec, str]:
    """Input contract of an insightface recognition .onnx (no rtkit metadata): RGB, 112x112
    (from the graph), and [0, 255] when the graph normalises itself (a Sub and a Mul among its
    first nodes, as insightface's model zoo checks), else [-1, 1]."""
    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise EngineError(f"expected one image input in the recognition ONNX, found "
                          f"{[i.name for i in inputs]}")
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3:
        raise EngineError(f"recognition ONNX input must be Nx3xHxW, found {dims}")
    size = (dims[2], dims[3]) if dims[2] and dims[3] else (112, 112)
    first = [n.name for n in model.graph.node[:8]]
    self_normalising = (any(n.startswith(("Sub", "_minus")) for n in first)
                        and any(n.startswith(("Mul", "_mul")) for n in first))
    out_dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    spec = ModelSpec(task="embed", input_size=size,
                     value_range=(0.0, 255.0) if self_normalising else (-1.0, 1.0),
                     channels="RGB", alignment="arcface112", resize="resize",
                     output_dim=out_dims[-1] if out_dims and out_dims[-1] else None)
    return spec, inputs[0].name


class InsightfaceOnnxRunner(OnnxRunner):
    """ONNX Runtime over a recognition .onnx that carries no rtkit metadata (insightface model
    zoo files such as w600k_r50.onnx); its contract is read from the graph."""

    def __init__(self, path: str | Path, *, device: str = "cpu", threads: int | None = None):
        import onnx

        path = Path(path)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf DecodeError and friends
            raise EngineError(f"{path} is not a readable ONNX file ({str(e).splitlines()[0]})") from None
        spec, input_name = insightface_onnx_spec(model)
        card = EngineCard(model=path.stem, spec=spec, input_name=input_name,
                          output_names=[model.graph.output[0].name])
        super().__init__(path, device=device, threads=threads, card=card)


def open_recognizer(engine, *, checkpoint=None, device: str = "cpu", backend: str | None = None,
                    precision: str = "fp32", random_weights: bool = False) -> Runner:
    """A runner for a recognizer (spec.task == "embed"); see ``Embedder``."""
    if isinstance(engine, Runner):
        runner = engine
    else:
        p = Path(str(engine))
        plain_onnx = (p.suffix == ".onnx" and backend in (None, "onnxruntime", "onnx", "ort")
                      and p.is_file() and p.stat().st_size > 0 and not _onnx_has_rtkit_metadata(p))
        if plain_onnx:
            runner = InsightfaceOnnxRunner(p, device=device)
        else:
            runner = open_engine(engine, device=device, backend=backend, checkpoint=checkpoint,
                                 precision=precision, random_weights=random_weights)
    if runner.spec.task != "embed":
        name = runner.meta.model
        runner.close()
        raise EngineError(f"{engine} ({name}) is a {runner.spec.task} model, not a recognizer "
                          f"(spec.task 'embed')")
    return runner


# -- the embedder ------------------------------------------------------------------------------

class Embedder:
    """A recognizer opened lazily, embedding images in batches with worker threads.

    engine: registered model name, engine/checkpoint file, or an open Runner.
    cache_dir: where embeddings are cached (None: the default folder; False: no cache).
    Counters ``images_embedded`` and ``cache_hits`` tell what the last calls did.
    """

    def __init__(self, engine, *, checkpoint=None, device: str = "cpu", backend: str | None = None,
                 precision: str = "fp32", batch_size: int = 64, workers: int | None = None,
                 cache_dir: str | Path | None | bool = None, progress: bool = True,
                 random_weights: bool = False):
        if batch_size < 1:
            raise RtkitError(f"batch size must be at least 1, got {batch_size}")
        self.engine = engine
        self.checkpoint = checkpoint
        self.device = device
        self.backend = backend
        self.precision = precision
        self.batch_size = batch_size
        self.workers = workers or default_workers()
        self.cache_dir = None if cache_dir is False else Path(cache_dir or default_cache_dir())
        self.progress = progress
        self.random_weights = random_weights
        self._runner: Runner | None = engine if isinstance(engine, Runner) else None
        self.images_embedded = 0
        self.cache_hits = 0

    # The runner opens on first use, so a fully cached evaluation never builds the model
    # unless it needs the engine identity (which for files is a hash, for models the weights).
    @property
    def runner(self) -> Runner:
        if self._runner is None:
            self._runner = open_recognizer(self.engine, checkpoint=self.checkpoint,
                                           device=self.device, backend=self.backend,
                                           precision=self.precision, random_weights=self.random_weights)
        elif self._runner.spec.task != "embed":
            raise EngineError(f"{self._runner.meta.model} is a {self._runner.spec.task} model, "
                              f"not a recognizer")
        return self._runner

    @property
    def spec(self) -> ModelSpec:
        return self.runner.spec

    @property
    def identity(self) -> str:
        return self.runner.identity

    def describe(self) -> dict:
        """What computed the embeddings, for result files."""
        r = self.runner
        return {"engine": str(self.engine) if not isinstance(self.engine, Runner) else r.meta.model,
                "model": r.meta.model, "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "backend": r.backend, "precision": getattr(r.meta, "precision", None),
                "device": str(self.device), "engine_identity": r.identity,
                "input": {"size": list(r.spec.input_size) if r.spec.input_size else None,
                          "range": list(r.spec.value_range), "channels": r.spec.channels}}

    def close(self):
        if self._runner is not None and not isinstance(self.engine, Runner):
            self._runner.close()
            self._runner = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- computing -----------------------------------------------------------------------------

    def _batch_limit(self) -> int:
        r = self.runner
        if r.backend == "tensorrt" and r.meta.batch.get("max"):
            return max(1, min(self.batch_size, int(r.meta.batch["max"])))
        return self.batch_size

    def _infer(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray(self.runner.infer(x))
        return y.reshape(y.shape[0], -1).astype(np.float32, copy=False)

    def embed(self, n: int, load: Callable[[int], np.ndarray], *, flip: bool = True,
              desc: str | None = None) -> np.ndarray:
        """Embeddings of images ``load(0) .. load(n - 1)`` (HxWx3 uint8 RGB, aligned).

        Returns float32 (V, n, D): V = 2 (image, horizontal flip) with ``flip``, else 1.
        ``load`` runs on worker threads; an exception there stops the run and is re-raised.
        """
        spec = self.spec
        bs = self._batch_limit()
        views = 2 if flip else 1
        out: np.ndarray | None = None
        starts = iter(range(0, n, bs))
        pending: deque = deque()
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=n, unit="img", desc=desc or "embedding", leave=False)

        def prepare(i: int) -> np.ndarray:
            return to_model_input(load(i), spec)

        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="rt-eval-load") as pool:
            def submit_next() -> None:
                s = next(starts, None)
                if s is not None:
                    pending.append((s, [pool.submit(prepare, i) for i in range(s, min(n, s + bs))]))

            try:
                for _ in range(2):  # keep one batch decoding while the runner works
                    submit_next()
                while pending:
                    s, futures = pending.popleft()
                    x = np.stack([f.result() for f in futures])
                    submit_next()
                    emb = [self._infer(x)]
                    if flip:
                        emb.append(self._infer(np.ascontiguousarray(x[..., ::-1])))
                    if out is None:
                        out = np.empty((views, n, emb[0].shape[1]), dtype=np.float32)
                    for v, e in enumerate(emb):
                        out[v, s:s + len(futures)] = e
                    self.images_embedded += len(futures)
                    if bar is not None:
                        bar.update(len(futures))
            finally:
                for _, futures in pending:
                    for f in futures:
                        f.cancel()
                if bar is not None:
                    bar.close()
        if out is None:
            dim = spec.output_dim or 0
            out = np.empty((views, 0, dim), dtype=np.float32)
        return out

    # -- caching -------------------------------------------------------------------------------

    def cache_path(self, dataset_key: str, flip: bool) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(f"{self.identity}\0{dataset_key}\0flip={flip}".encode()).hexdigest()
        return self.cache_dir / f"{key[:40]}.npy"

    def embed_cached(self, dataset_key: str, n: int, load: Callable[[int], np.ndarray], *,
                     flip: bool = True, desc: str | None = None) -> np.ndarray:
        """``embed`` through the cache keyed by (engine identity, ``dataset_key``, flip)."""
        path = self.cache_path(dataset_key, flip)
        if path is not None and path.is_file():
            try:
                arr = np.load(path, allow_pickle=False)
                if arr.ndim == 3 and arr.shape[:2] == (2 if flip else 1, n):
                    self.cache_hits += 1
                    return arr
            except (OSError, ValueError):
                pass  # unreadable cache entry: recompute and overwrite it
        arr = self.embed(n, load, flip=flip, desc=desc)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
                np.save(tmp, arr)
                os.replace(tmp, path)  # atomic: a reader never sees half a file
                info = {"engine": self.describe(), "dataset_key": dataset_key, "flip": flip,
                        "shape": list(arr.shape), "dtype": str(arr.dtype)}
                path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
            except OSError as e:  # a cache that cannot be written costs time, not results
                warnings.warn(f"embedding cache not written ({e}); use --cache-dir or --no-cache")
        return arr


__all__ = ["Embedder", "open_recognizer", "InsightfaceOnnxRunner", "insightface_onnx_spec",
           "to_model_input", "default_cache_dir", "default_workers", "CACHE_ENV"]
