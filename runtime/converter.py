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
                for k, v in self.stage_s.items()),
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
    One vectorised pass for a whole batch."""
    lo, hi = spec.value_range
    img = (y.astype(np.float32) - lo) * (255.0 / (hi - lo))
    img = np.clip(np.rint(img, out=img), 0, 255, out=img).astype(np.uint8)
    c = img.ndim - 3  # channel axis
    if spec.channels == "BGR":
        img = np.flip(img, axis=c)
    return np.ascontiguousarray(np.moveaxis(img, c, -1))


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


def path_seed(relpath: str, base: int = 0) -> int:
    """A stable 31-bit seed for one file: the same on every run, machine and shard."""
    h = hashlib.sha256(f"{base}:{relpath}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def convert(engine: str | Path | Runner, src: str | Path, out: str | Path, *,
            device: str = "cpu", backend: str | None = None, checkpoint: str | Path | None = None,
            precision: str = "fp32", extra: dict[str, Any] | None = None,
            runner_threads: int | None = None, infer_workers: int | None = None,
            **options) -> Summary:
    """Convert every image under ``src`` into ``out`` through ``engine`` (see rt-convert --help).

    On CPU, small images keep one core busy better than intra-op threading does, so an ONNX
    engine on CPU runs by default as one single-threaded session called from one thread per
    core; GPUs and TensorRT contexts get one inference thread.
    """
    cpu_onnx = (str(device) == "cpu" and not isinstance(engine, Runner)
                and (backend in ("onnxruntime", "ort", "onnx") or str(engine).endswith(".onnx")))
    if infer_workers is None:
        infer_workers = default_workers() if cpu_onnx and runner_threads is None else 1
    if cpu_onnx and runner_threads is None and infer_workers > 1:
        runner_threads = 1
    options["infer_workers"] = infer_workers
    if options.get("batch_size") is None:
        # Measured on 2 CPU cores (benchmarks/convert_cpu.py): small batches keep activations in
        # cache and beat batch 32 by 1.5x; GPUs need large batches to fill the device.
        options["batch_size"] = 64 if str(device).startswith("cuda") else 4
    opts = ConvertOptions(**options)
    opts.validate()
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise RtkitError(f"source folder not found: {src}")
    out.mkdir(parents=True, exist_ok=True)

    own_runner = not isinstance(engine, Runner)
    runner = open_engine(engine, device=device, backend=backend, checkpoint=checkpoint,
                         precision=precision, extra=extra, threads=runner_threads) if own_runner else engine
    try:
        if runner.spec.task != "translate":
            raise RtkitError(f"{runner.describe()} is a '{runner.spec.task}' engine; rt-convert needs "
                             f"an image-to-image translator")
        return _convert(runner, src, out, opts)
    finally:
        if own_runner:
            runner.close()


def _convert(runner: Runner, src: Path, out: Path, opts: ConvertOptions) -> Summary:
    t_start = time.perf_counter()
    spec = runner.spec
    config = {"engine": runner.identity, "format": opts.fmt,
              "quality": opts.quality if opts.fmt != "png" else None,
              "size": list(opts.size) if opts.size else None, "extra": _jsonable(runner.extra),
              "shard": list(opts.shard) if opts.shard else None}
    mpath = manifest_path(out, opts.shard)
    summary = Summary(engine=runner.describe(), src=str(src), out=str(out), manifest=str(mpath),
                      workers={"decode": opts.decode_workers, "infer": opts.infer_workers,
                               "encode": opts.encode_workers})
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
        try:
            _run_pipeline(runner, spec, src, todo, opts, man, summary)
            state = "aborted" if summary.aborted else "finished"
        except BaseException:
            state = "interrupted"
            raise
        finally:
            summary.wall_s = time.perf_counter() - t_start
            man.finish_run(state, summary.converted, summary.adopted, summary.failed, summary.wall_s)
    return summary


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in d.items()}


def _run_pipeline(runner: Runner, spec: ModelSpec, src: Path, todo: list[_Item],
                  opts: ConvertOptions, man: Manifest, summary: Summary) -> None:
    """Every queue carries whole batches, not images: one hand-over between threads per batch
    keeps the interpreter's share (under the GIL) small next to decode, inference and encode,
    which all run outside it."""
    if not todo:
        return
    bs = opts.batch_size
    task_q: queue.Queue = queue.Queue()
    decoded_q: queue.Queue = queue.Queue(maxsize=max(2, opts.queue_batches))
    batch_q: queue.Queue = queue.Queue(maxsize=max(2, opts.queue_batches))
    encode_q: queue.Queue = queue.Queue(maxsize=max(2, opts.queue_batches))
    result_q: queue.Queue = queue.Queue()
    stop = threading.Event()
    clock = _StageClock()
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
            ok, failed = [], []
            for it in chunk:
                try:
                    rgb = decode_image(os.path.join(src_root, it.relpath))
                    it.out_hw = opts.size or rgb.shape[:2]
                    it.x = preprocess(rgb, spec)
                    ok.append(it)
                except DecodeError as e:
                    failed.append((it.relpath, str(e)))
                except Exception as e:  # an image library error on one file must not stop the run
                    failed.append((it.relpath, f"{type(e).__name__}: {e}"))
            clock.add("decode", time.perf_counter() - t0)
            if failed:
                result_q.put(("failed", failed))
            if ok:
                decoded_q.put(ok)
        decoded_q.put(_DONE)

    made_dirs: set[str] = set()

    def encode_worker():
        while True:
            job = encode_q.get()
            if job is _DONE:
                break
            items, y = job
            t0 = time.perf_counter()
            done, failed = [], []
            imgs = to_uint8_hwc(y, spec)  # the whole batch in one pass
            for it, img in zip(items, imgs):
                try:
                    data = encode_image(restore_geometry(img, spec, it.out_hw), opts.fmt, opts.quality)
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
            clock.add("encode", time.perf_counter() - t0)
            if failed:
                result_q.put(("failed", failed))
            if done:
                result_q.put(("done", done))

    errors: list[BaseException] = []

    def per_image_inputs(items):
        # A stochastic engine (UNSB, DDIM) draws its noise from a seed per image derived from the
        # file's path, so an image's output does not depend on batching, sharding or resume.
        if "seed" not in runner.extra:
            return {}
        base = int(runner.extra["seed"])
        return {"seed": [path_seed(it.relpath, base) for it in items]}

    def infer_worker():
        while True:
            items = batch_q.get()
            if items is _DONE:
                break
            if errors:
                continue  # a failed runner: drain without running
            t0 = time.perf_counter()
            try:
                y = runner.infer(np.stack([it.x for it in items]), **per_image_inputs(items))
            except BaseException as e:  # a runner failure is a bug or a broken engine: stop the run
                errors.append(e)
                stop.set()
                continue
            clock.add("infer", time.perf_counter() - t0)
            for it in items:
                it.x = None
            encode_q.put((items, np.asarray(y)))

    decoders = [threading.Thread(target=decode_worker, daemon=True, name=f"decode-{i}")
                for i in range(opts.decode_workers)]
    inferers = [threading.Thread(target=infer_worker, daemon=True, name=f"infer-{i}")
                for i in range(opts.infer_workers)]
    encoders = [threading.Thread(target=encode_worker, daemon=True, name=f"encode-{i}")
                for i in range(opts.encode_workers)]
    for t in decoders + inferers + encoders:
        t.start()

    progress = None
    if opts.progress:
        from tqdm import tqdm
        progress = tqdm(total=len(todo), unit="img", dynamic_ncols=True, file=sys.stderr,
                        desc="rt-convert", smoothing=0.1)

    last_drain = [0.0]

    def drain(every: float = 0.0):
        # The manifest is written a few times a second, not per batch: a commit per batch would
        # cost more than the images. Outputs written but not yet recorded are adopted on resume.
        now = time.perf_counter()
        if now - last_drain[0] < every:
            return
        last_drain[0] = now
        done, failed = [], []
        while True:
            try:
                kind, rows = result_q.get_nowait()
            except queue.Empty:
                break
            if kind == "done":
                done += [(rel, digest, runner.identity) for rel, digest in rows]
            else:
                failed += rows
        if done or failed:
            man.record(done, failed)
            summary.converted += len(done)
            summary.failed += len(failed)
            summary.failures.extend(failed)
            if progress is not None:
                progress.update(len(done) + len(failed))
        if opts.max_failures is not None and summary.failed > opts.max_failures and not summary.aborted:
            summary.aborted = True
            stop.set()

    def run_batch(items: list[_Item]):
        man.mark_running([it.relpath for it in items])  # before any output can exist
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
        drain()
        if progress is not None:
            progress.close()
        summary.stage_s = dict(clock.busy)
    if errors:
        raise errors[0]


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))
