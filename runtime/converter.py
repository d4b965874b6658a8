"""The streaming whole-dataset converter behind ``rt-convert``.

decode workers -> batcher -> runner -> encode workers, joined by bounded queues so every
stage overlaps with the others and memory stays flat whatever the dataset size. The job
manifest (SQLite, in OUT/.rtkit/) makes the run resumable and records every failure.
"""
from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from rtkit.engines.errors import RtkitError
from rtkit.engines.spec import ModelSpec
from rtkit.runtime.manifest import Manifest, manifest_path
from rtkit.runtime.runners import Runner, open_engine
from rtkit.runtime.sinks import OUTPUT_FORMATS, atomic_write, encode_image, temp_path
from rtkit.runtime.sources import DecodeError, decode_image, walk_files

EXIT_OK, EXIT_USER_ERROR, EXIT_SOME_FAILED, EXIT_ABORTED = 0, 1, 2, 3
_DONE = object()  # queue sentinel


@dataclass
class ConvertOptions:
    fmt: str = "png"
    quality: int = 95
    size: tuple[int, int] | None = None      # output (height, width); None keeps the source size
    batch_size: int | None = None            # None: 4 on CPU (cache-friendly), 64 on GPU
    decode_workers: int = 2
    encode_workers: int = 2
    infer_workers: int = 1                   # threads calling runner.infer concurrently
    shard: tuple[int, int] | None = None     # (index, count)
    max_failures: int | None = None
    restart: bool = False
    retry_failed: bool = False
    progress: bool = True
    queue_batches: int = 4                   # bound of each queue, in batches

    def validate(self):
        if self.fmt not in OUTPUT_FORMATS:
            raise RtkitError(f"unknown output format {self.fmt!r}; use one of {', '.join(OUTPUT_FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise RtkitError(f"--quality must be in 1..100, got {self.quality}")
        if min(self.batch_size, self.decode_workers, self.encode_workers, self.infer_workers) < 1:
            raise RtkitError("--batch-size and worker counts must be at least 1")
        if self.shard is not None:
            i, n = self.shard
            if not (n >= 1 and 0 <= i < n):
                raise RtkitError(f"--shard must be i/n with 0 <= i < n, got {i}/{n}")


@dataclass
class Summary:
    engine: str
    src: str
    out: str
    manifest: str
    total: int = 0                  # image files in this shard
    converted: int = 0              # converted by this run
    adopted: int = 0                # written by a killed run, taken over
    already_done: int = 0           # done before this run
    failed: int = 0                 # failed in this run
    failed_before: int = 0          # failures recorded earlier and not retried
    skipped: int = 0                # non-image files
    wall_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    aborted: bool = False

    @property
    def img_per_s(self) -> float:
        return self.converted / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def s_per_img(self) -> float:
        return self.wall_s / self.converted if self.converted else 0.0

    @property
    def exit_code(self) -> int:
        if self.aborted:
            return EXIT_ABORTED
        return EXIT_SOME_FAILED if (self.failed or self.failed_before) else EXIT_OK

    def table(self, max_failures_listed: int = 20) -> str:
        w = self.workers
        lines = [
            "rt-convert summary",
            f"  engine       {self.engine}",
            f"  source       {self.src}",
            f"  output       {self.out}",
            f"  manifest     {self.manifest}",
            f"  images       {self.total}   converted {self.converted}   already done "
            f"{self.already_done}   adopted {self.adopted}",
            f"  failed       {self.failed + self.failed_before}"
            + (f" ({self.failed_before} from earlier runs; --retry-failed to retry)" if self.failed_before else ""),
            f"  skipped      {self.skipped} (not image files)",
            f"  wall time    {self.wall_s:.2f} s",
            f"  throughput   {self.img_per_s:.1f} img/s   {self.s_per_img * 1e3:.2f} ms/img",
            "  stage time   " + "   ".join(
                f"{k} {v:.2f} s" + (f" ({w[k]} threads)" if w.get(k, 1) > 1 else "")
                for k, v in self.stage_s.items())
            + (f"   (busy seconds summed over {w['processes']} processes)" if "processes" in w else ""),
        ]
        if self.aborted:
            lines.append("  ABORTED      more failures than --max-failures; fix the inputs and rerun "
                         "(finished files are kept)")
        if self.failures:
            lines.append("  problems:")
            for rel, why in self.failures[:max_failures_listed]:
                lines.append(f"    {rel}: {why}")
            if len(self.failures) > max_failures_listed:
                lines.append(f"    ... {len(self.failures) - max_failures_listed} more in the manifest")
        return "\n".join(lines)


# -- pre/post processing --------------------------------------------------------------------

def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def model_input_size(spec: ModelSpec, h: int, w: int) -> tuple[int, int]:
    """The (H, W) the network sees for a source of (h, w), by the spec's resize policy."""
    if spec.input_size is not None:
        if spec.resize == "native" and (h, w) != tuple(spec.input_size):
            raise DecodeError(f"image is {w}x{h} but the engine takes {spec.input_size[1]}x"
                              f"{spec.input_size[0]} only (resize policy 'native')")
        return tuple(spec.input_size)
    m = max(1, spec.size_multiple)
    return _round_up(h, m), _round_up(w, m)


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if img.shape[:2] == tuple(hw):
        return img
    shrink = hw[0] < img.shape[0] or hw[1] < img.shape[1]
    return cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


SOURCE_ALIGNMENT = "arcface112"  # DigiFace and the sample set are ArcFace-aligned crops


def _template_warp(img: np.ndarray, src_alignment: str, dst_alignment: str,
                   out_hw: tuple[int, int]) -> np.ndarray:
    """Similarity warp between two alignment templates (e.g. ArcFace-112 -> FFHQ-512)."""
    from rtkit.engines.align import template_transform

    m = template_transform(src_alignment, img.shape[0], dst_alignment, out_hw[0])
    shrink = out_hw[0] < img.shape[0]
    return cv2.warpAffine(img, m.astype(np.float64), (out_hw[1], out_hw[0]),
                          flags=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)


def preprocess(rgb: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3xHxW float32 in the spec's range, channel order and size.

    Resize policy "warp" re-aligns the (ArcFace-aligned) source to the model's template, e.g.
    to FFHQ-512 for CodeFormer, where a plain resize would give a face ~28% too large.
    """
    hw = model_input_size(spec, *rgb.shape[:2])
    if spec.resize == "warp" and spec.alignment != SOURCE_ALIGNMENT:
        img = _template_warp(rgb, SOURCE_ALIGNMENT, spec.alignment, hw)
    else:
        img = _resize(rgb, hw)
    if spec.channels == "BGR":
        img = img[:, :, ::-1]
    lo, hi = spec.value_range
    x = img.transpose(2, 0, 1).astype(np.float32)
    x *= (hi - lo) / 255.0
    x += lo
    return x


def to_uint8_hwc(y: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """CxHxW or NxCxHxW float in the spec's range -> HxWx3 / NxHxWx3 uint8 RGB, contiguous.

    Per channel plane, one OpenCV pass maps the range to 0..255 (in double precision), rounds
    half to even and saturates; cv2.merge interleaves the planes. 3.5x faster than the numpy
    chain (subtract, scale, round, clip, cast, transpose), which matters at ~1 ms per image."""
    lo, hi = spec.value_range
    scale = 255.0 / (hi - lo)
    batch = np.asarray(y, dtype=np.float32)
    single = batch.ndim == 3
    if single:
        batch = batch[None]
    order = slice(None, None, -1) if spec.channels == "BGR" else slice(None)
    out = np.empty((batch.shape[0], batch.shape[2], batch.shape[3], batch.shape[1]), np.uint8)
    for i, planes in enumerate(batch):
        planes = [cv2.addWeighted(np.ascontiguousarray(p), scale, p, 0.0, -lo * scale, dtype=cv2.CV_8U)
                  for p in planes[order]]
        out[i] = cv2.merge(planes) if len(planes) > 1 else planes[0][..., None]
    return out[0] if single else out


def restore_geometry(img: np.ndarray, spec: ModelSpec, out_hw: tuple[int, int]) -> np.ndarray:
    """A model-sized output back to the source's frame and the requested output size."""
    if spec.resize == "warp" and spec.alignment != SOURCE_ALIGNMENT:
        return np.ascontiguousarray(_template_warp(img, spec.alignment, SOURCE_ALIGNMENT, out_hw))
    return np.ascontiguousarray(_resize(img, out_hw))


def postprocess(y: np.ndarray, spec: ModelSpec, out_hw: tuple[int, int]) -> np.ndarray:
    """3xHxW float in the spec's range -> out_hw uint8 RGB."""
    return restore_geometry(to_uint8_hwc(y, spec), spec, out_hw)


# -- the pipeline ---------------------------------------------------------------------------

@dataclass
class _Item:
    relpath: str
    out: str                        # output path (a str: pathlib costs show at thousands of img/s)
    out_hw: tuple[int, int] | None = None
    x: np.ndarray | None = None


class _StageClock:
    """Busy seconds per stage, summed over that stage's threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.busy: dict[str, float] = {"decode": 0.0, "infer": 0.0, "encode": 0.0}

    def add(self, stage: str, dt: float):
        with self.lock:
            self.busy[stage] += dt


def _output_relpath(relpath: str, fmt: str) -> str:
    return str(Path(relpath).with_suffix(OUTPUT_FORMATS[fmt]).as_posix())


def plan_job(src: Path, out: Path, opts: ConvertOptions) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(image relpath, output relpath) for this shard, and (relpath, reason) of skipped files."""
    images, others = walk_files(src, exclude=out)
    if opts.shard is not None:
        i, n = opts.shard
        images = images[i::n]
        others = others[i::n]
    planned, skipped, seen = [], [], {}
    for rel in images:
        o = _output_relpath(rel, opts.fmt)
        if o in seen:
            skipped.append((rel, f"output name {o} already taken by {seen[o]}"))
            continue
        seen[o] = rel
        planned.append((rel, o))
    skipped += [(rel, f"not an image file ({Path(rel).suffix or 'no extension'})") for rel in others]
    return planned, skipped


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def convert(engine: str | Path | Runner, src: str | Path, out: str | Path, *,
            device: str = "cpu", backend: str | None = None, checkpoint: str | Path | None = None,
            precision: str = "fp32", extra: dict[str, Any] | None = None,
            runner_threads: int | None = None, infer_workers: int | None = None,
            processes: int | None = None, **options) -> Summary:
    """Convert every image under ``src`` into ``out`` through ``engine`` (see rt-convert --help).

    An ONNX engine on CPU runs by default as one conversion process per core, each decoding,
    translating (single-threaded) and encoding whole batches: there every stage competes for
    the same cores, and processes spend none of it on the interpreter lock or thread hand-overs
    (runtime/processes.py). ``processes=0`` (or explicit thread options) selects the threaded
    pipeline, which GPUs, TensorRT and torch engines always use.
    """
    cpu_onnx = (str(device) == "cpu" and not isinstance(engine, Runner)
                and (backend in ("onnxruntime", "ort", "onnx") or str(engine).endswith(".onnx")))
    if processes is None:
        processes = default_workers() if cpu_onnx and runner_threads is None and infer_workers is None else 0
    if processes and not cpu_onnx:
        raise RtkitError("--processes applies to ONNX engines on CPU; GPUs, TensorRT and torch engines "
                         "run in the threaded pipeline (use --processes 0)")
    if infer_workers is None:
        infer_workers = default_workers() if cpu_onnx and runner_threads is None else 1
    if cpu_onnx and runner_threads is None and (infer_workers > 1 or processes):
        runner_threads = 1
    options["infer_workers"] = infer_workers
    if options.get("batch_size") is None:
        # CPU: with the bundled engine, batches of 4-32 run within noise of each other on 2 cores
        # (benchmarks/convert_cpu.py --batch-size); small ones keep activations in cache and the
        # hand-out fine-grained. GPUs need large batches to fill the device.
        options["batch_size"] = 64 if str(device).startswith("cuda") else 4
    opts = ConvertOptions(**options)
    opts.validate()
    if processes < 0:
        raise RtkitError(f"--processes must be 0 (threaded pipeline) or more, got {processes}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise RtkitError(f"source folder not found: {src}")
    out.mkdir(parents=True, exist_ok=True)

    own_runner = not isinstance(engine, Runner)
    engine_args = dict(engine=engine, device=device, backend=backend, checkpoint=checkpoint,
                       precision=precision, extra=extra, threads=runner_threads)
    pool = None
    runner = None
    try:
        if processes:
            from rtkit.runtime.processes import ProcessPool
            pool = ProcessPool(engine_args, processes, src, opts)
        runner = open_engine(**engine_args) if own_runner else engine
        if runner.spec.task != "translate":
            raise RtkitError(f"{runner.describe()} is a '{runner.spec.task}' engine; rt-convert needs "
                             f"an image-to-image translator")
        return _convert(runner, src, out, opts, pool)
    finally:
        if pool is not None:
            pool.close()
        if own_runner and runner is not None:
            runner.close()


def _convert(runner: Runner, src: Path, out: Path, opts: ConvertOptions, pool=None) -> Summary:
    t_start = time.perf_counter()
    spec = runner.spec
    config = {"engine": runner.identity, "format": opts.fmt,
              "quality": opts.quality if opts.fmt != "png" else None,
              "size": list(opts.size) if opts.size else None, "extra": _jsonable(runner.extra),
              "shard": list(opts.shard) if opts.shard else None}
    mpath = manifest_path(out, opts.shard)
    summary = Summary(engine=runner.describe(), src=str(src), out=str(out), manifest=str(mpath),
                      workers={"decode": opts.decode_workers, "infer": opts.infer_workers,
                               "encode": opts.encode_workers} if pool is None else {"processes": len(pool)})
    with Manifest(mpath) as man:
        man.bind_job(config, restart=opts.restart)
        planned, skipped = plan_job(src, out, opts)
        man.add_files(planned, skipped)
        if opts.retry_failed:
            man.db.execute("UPDATE files SET status='pending', error=NULL WHERE status='failed'")

        todo: list[_Item] = []
        adopted: list[tuple[str, str]] = []
        planned_set = {r for r, _ in planned}
        for row in man.rows():
            if row.relpath not in planned_set and row.status != "skipped":
                continue  # a file that left the source tree: keep its record, do nothing
            target = out / row.output if row.output else None
            if row.status == "done":
                if target is not None and target.is_file():
                    summary.already_done += 1
                    continue
            elif row.status == "running" and target is not None and target.is_file():
                adopted.append((row.relpath, _file_sha256(target)))
                continue
            elif row.status == "failed":
                summary.failed_before += 1
                summary.failures.append((row.relpath, row.error))
                continue
            elif row.status == "skipped":
                summary.skipped += 1
                summary.failures.append((row.relpath, f"skipped: {row.error}"))
                continue
            todo.append(_Item(row.relpath, os.fspath(target)))
        summary.total = len(planned)
        summary.adopted = len(adopted)
        man.start_run()
        man.record([], [], adopted)
        state = "finished"
        clock = _StageClock()
        rec = _Recorder(man, summary, runner.identity, len(todo), opts, threading.Event())
        try:
            if todo and pool is not None:
                pool.run(todo, rec, clock)
            elif todo:
                _run_threads(runner, spec, src, todo, opts, rec, clock)
            state = "aborted" if summary.aborted else "finished"
        except BaseException:
            state = "interrupted"
            raise
        finally:
            rec.close()
            summary.stage_s = dict(clock.busy)
            summary.wall_s = time.perf_counter() - t_start
            man.finish_run(state, summary.converted, summary.adopted, summary.failed, summary.wall_s)
    return summary


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in d.items()}


def decode_batch(items: list[_Item], src_root: str, spec: ModelSpec, size: tuple[int, int] | None,
                 spng: bool = False) -> tuple[list[_Item], list[tuple[str, str]]]:
    """Read, decode and preprocess a batch: (items with .x set, [(relpath, reason)] failures)."""
    ok, failed = [], []
    for it in items:
        try:
            rgb = decode_image(os.path.join(src_root, it.relpath), spng)
            it.out_hw = size or rgb.shape[:2]
            it.x = preprocess(rgb, spec)
            ok.append(it)
        except DecodeError as e:
            failed.append((it.relpath, str(e)))
        except Exception as e:  # an image library error on one file must not stop the run
            failed.append((it.relpath, f"{type(e).__name__}: {e}"))
    return ok, failed


def infer_batch(runner: Runner, items: list[_Item]) -> np.ndarray:
    """Run one batch of preprocessed items (all of one input shape) and free their inputs."""
    # Keys name the samples: a stochastic engine (UNSB, DDIM) seeds each image's noise from its
    # path, so an output does not depend on batching, sharding or resume.
    y = runner.infer(np.stack([it.x for it in items]), keys=[it.relpath for it in items])
    for it in items:
        it.x = None
    return np.asarray(y)


def encode_batch(items: list[_Item], y: np.ndarray, spec: ModelSpec, fmt: str, quality: int,
                 made_dirs: set[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Postprocess, encode and atomically write a batch: ([(relpath, sha256)], failures)."""
    done, failed = [], []
    imgs = to_uint8_hwc(y, spec)  # the whole batch in one pass
    for it, img in zip(items, imgs):
        try:
            data = encode_image(restore_geometry(img, spec, it.out_hw), fmt, quality)
            folder = os.path.dirname(it.out)
            if folder not in made_dirs:
                os.makedirs(folder, exist_ok=True)
                made_dirs.add(folder)
            atomic_write(it.out, data)
            done.append((it.relpath, hashlib.sha256(data).hexdigest()))
        except Exception as e:
            try:
                os.unlink(temp_path(it.out))
            except OSError:
                pass
            failed.append((it.relpath, f"cannot write output: {type(e).__name__}: {e}"))
    return done, failed


def group_by_shape(items: list[_Item]) -> list[list[_Item]]:
    """A batch may only hold one input shape (fully convolutional engines take any size)."""
    groups: dict[tuple, list[_Item]] = {}
    for it in items:
        groups.setdefault(it.x.shape, []).append(it)
    return list(groups.values())


class _Recorder:
    """Results -> manifest, summary and progress bar, in the main thread.

    The manifest is written a few times a second, not per batch: a commit per batch would cost
    more than the images. Outputs written but not yet recorded are adopted on resume."""

    def __init__(self, man: Manifest, summary: Summary, engine_identity: str, total: int,
                 opts: ConvertOptions, stop: threading.Event):
        self.man, self.summary, self.identity, self.opts, self.stop = man, summary, engine_identity, opts, stop
        self.done: list[tuple[str, str, str]] = []
        self.failed: list[tuple[str, str]] = []
        self.last = 0.0
        self.progress = None
        if opts.progress:
            from tqdm import tqdm
            self.progress = tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr,
                                 desc="rt-convert", smoothing=0.1)

    def add(self, done: list[tuple[str, str]], failed: list[tuple[str, str]]):
        self.done += [(rel, digest, self.identity) for rel, digest in done]
        self.failed += failed

    def flush(self, every: float = 0.0):
        now = time.perf_counter()
        if now - self.last < every:
            return
        self.last = now
        if self.done or self.failed:
            done, failed, self.done, self.failed = self.done, self.failed, [], []
            self.man.record(done, failed)
            s = self.summary
            s.converted += len(done)
            s.failed += len(failed)
            s.failures.extend(failed)
            if self.progress is not None:
                self.progress.update(len(done) + len(failed))
        if (self.opts.max_failures is not None and self.summary.failed > self.opts.max_failures
                and not self.summary.aborted):
            self.summary.aborted = True
            self.stop.set()

    def close(self):
        self.flush()
        if self.progress is not None:
            self.progress.close()


def _run_threads(runner: Runner, spec: ModelSpec, src: Path, todo: list[_Item],
                 opts: ConvertOptions, rec: _Recorder, clock: _StageClock) -> None:
    """Every queue carries whole batches, not images: one hand-over between threads per batch
    keeps the interpreter's share (under the GIL) small next to decode, inference and encode,
    which all run outside it."""
    bs = opts.batch_size
    task_q: queue.Queue = queue.Queue()
    decoded_q: queue.Queue = queue.Queue(maxsize=max(2, opts.queue_batches))
    batch_q: queue.Queue = queue.Queue(maxsize=max(2, opts.queue_batches))
    encode_q: queue.Queue = queue.Queue(maxsize=max(2, opts.queue_batches))
    result_q: queue.Queue = queue.Queue()
    stop = rec.stop
    for i in range(0, len(todo), bs):
        task_q.put(todo[i:i + bs])
    for _ in range(opts.decode_workers):
        task_q.put(_DONE)
    src_root = os.fspath(src)

    def decode_worker():
        while not stop.is_set():
            chunk = task_q.get()
            if chunk is _DONE:
                break
            t0 = time.perf_counter()
            ok, failed = decode_batch(chunk, src_root, spec, opts.size)
            clock.add("decode", time.perf_counter() - t0)
            if failed:
                result_q.put(([], failed))
            if ok:
                decoded_q.put(ok)
        decoded_q.put(_DONE)

    made_dirs: set[str] = set()

    def encode_worker():
        while True:
            job = encode_q.get()
            if job is _DONE:
                break
            t0 = time.perf_counter()
            result = encode_batch(*job, spec, opts.fmt, opts.quality, made_dirs)
            clock.add("encode", time.perf_counter() - t0)
            result_q.put(result)

    errors: list[BaseException] = []

    def infer_worker():
        while True:
            items = batch_q.get()
            if items is _DONE:
                break
            if errors:
                continue  # a failed runner: drain without running
            t0 = time.perf_counter()
            try:
                y = infer_batch(runner, items)
            except BaseException as e:  # a runner failure is a bug or a broken engine: stop the run
                errors.append(e)
                stop.set()
                continue
            clock.add("infer", time.perf_counter() - t0)
            encode_q.put((items, y))

    decoders = [threading.Thread(target=decode_worker, daemon=True, name=f"decode-{i}")
                for i in range(opts.decode_workers)]
    inferers = [threading.Thread(target=infer_worker, daemon=True, name=f"infer-{i}")
                for i in range(opts.infer_workers)]
    encoders = [threading.Thread(target=encode_worker, daemon=True, name=f"encode-{i}")
                for i in range(opts.encode_workers)]
    for t in decoders + inferers + encoders:
        t.start()

    def drain(every: float):
        while True:
            try:
                rec.add(*result_q.get_nowait())
            except queue.Empty:
                break
        rec.flush(every)

    def run_batch(items: list[_Item]):
        rec.man.mark_running([it.relpath for it in items])  # before any output can exist
        while True:  # wait for room while keeping the manifest and the progress bar current
            try:
                batch_q.put(items, timeout=0.05)
                return
            except queue.Full:
                drain(every=0.25)

    pending: dict[tuple, list[_Item]] = {}  # one batch per input shape (fully convolutional models)
    live_decoders = len(decoders)
    try:
        while live_decoders:
            try:
                decoded = decoded_q.get(timeout=0.05)
            except queue.Empty:
                drain(every=0.25)
                continue
            if decoded is _DONE:
                live_decoders -= 1
                continue
            if stop.is_set():
                continue
            for it in decoded:
                group = pending.setdefault(it.x.shape, [])
                group.append(it)
                if len(group) >= bs:
                    run_batch(pending.pop(it.x.shape))
            drain(every=0.25)
        if not stop.is_set():
            for group in pending.values():
                run_batch(group)
    except BaseException:
        stop.set()
        raise
    finally:
        for _ in inferers:
            batch_q.put(_DONE)
        for t in inferers:
            t.join()
        for _ in encoders:
            encode_q.put(_DONE)
        for t in encoders:
            t.join()
        drain(0.0)
    if errors:
        raise errors[0]


def default_workers() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count), up to 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 2
    return max(1, min(16, cores))
