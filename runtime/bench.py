"""Per-image throughput, measured like the source paper's Table 1 (seconds per image).

``bench_runner`` times one runner on seeded inputs (``rt-bench time``). ``table1`` builds the
whole table (``rt-bench table1``): for each model and each backend / precision / batch size,
compute only (``runner.infer`` on seeded inputs) and end to end (image files in, image files
out, through ``rtkit.runtime.convert``), beside the naive per-image PyTorch loop measured in the
same run and the paper's RTX 3090 Ti figures.
"""
from __future__ import annotations

import csv
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rtkit.engines.errors import RtkitError
from rtkit.runtime.runners import Runner

# Seconds per image on an RTX 3090 Ti, the source paper's Table 1.
PAPER_S_PER_IMG = {"codeformer": 0.41, "vsait": 0.015, "decent": 0.13, "unsb": 0.38, "ddim": 8.7}
PAPER_GPU = "RTX 3090 Ti"
BACKENDS = ("torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class BenchResult:
    engine: str
    backend: str
    device: str
    size: tuple[int, int]
    batch_size: int
    images: int
    seconds: float

    @property
    def img_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def s_per_img(self) -> float:
        return self.seconds / self.images


def input_size(runner: Runner, size: int | None = None) -> tuple[int, int]:
    spec = runner.spec
    if spec.input_size is not None:
        return tuple(spec.input_size)
    s = size or 112
    m = max(1, spec.size_multiple)
    return (-(-s // m) * m,) * 2


def _sync_for(device: str) -> Callable[[], None]:
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def bench_runner(runner: Runner, *, batch_size: int = 8, min_seconds: float = 2.0, warmup: int = 2,
                 size: int | None = None, seed: int = 0, device: str = "cpu") -> BenchResult:
    """Time ``runner.infer`` on seeded inputs in the runner's range; at least one timed batch."""
    h, w = input_size(runner, size)
    lo, hi = runner.spec.value_range
    x = np.random.default_rng(seed).uniform(lo, hi, (batch_size, 3, h, w)).astype(np.float32)
    if str(device).startswith("cuda"):
        import torch
        x = torch.from_numpy(x).to(device)
    sync = _sync_for(device)
    for _ in range(warmup):
        runner.infer(x)
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        runner.infer(x)
        n += batch_size
        sync()
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            break
    return BenchResult(runner.meta.model, runner.backend, str(device), (h, w), batch_size, n, dt)


def table(results: list[BenchResult]) -> str:
    lines = ["| engine | backend | device | input | batch | img/s | s/img |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.engine} | {r.backend} | {r.device} | {r.size[1]}x{r.size[0]} | "
                     f"{r.batch_size} | {r.img_per_s:.2f} | {r.s_per_img:.4f} |")
    return "\n".join(lines)


# -- Table 1 ---------------------------------------------------------------------------------

def paper_s_per_img(model: str) -> float | None:
    """The paper's RTX 3090 Ti s/img for a registered model (tiny variants and CodeFormer with
    its warps inside map to their network)."""
    base = model.removesuffix("_tiny")
    if base.startswith("codeformer"):
        base = "codeformer"
    return PAPER_S_PER_IMG.get(base)


@dataclass
class Table1Row:
    model: str
    weights: str                 # "checkpoint", "bundled", "random (timing only)", "random (tiny)"
    backend: str
    precision: str
    batch_size: int
    device: str
    input: str                   # the network's input, WxH
    naive_s: float | None = None       # naive per-image PyTorch loop, files in -> files out
    compute_s: float | None = None     # runner.infer on seeded inputs
    e2e_s: float | None = None         # rtkit.runtime.convert, files in -> files out
    images: int = 0                    # images converted end to end
    paper_s: float | None = None
    note: str = ""

    @property
    def compute_img_s(self) -> float | None:
        return 1.0 / self.compute_s if self.compute_s else None

    @property
    def e2e_img_s(self) -> float | None:
        return 1.0 / self.e2e_s if self.e2e_s else None

    @property
    def e2e_over_compute(self) -> float | None:
        """End-to-end rate as a fraction of the compute-only rate."""
        return self.compute_s / self.e2e_s if self.compute_s and self.e2e_s else None

    @property
    def speedup_vs_naive(self) -> float | None:
        return self.naive_s / self.e2e_s if self.naive_s and self.e2e_s else None


@dataclass
class Table1Options:
    device: str = "cpu"
    backends: Sequence[str] | None = None     # None: every one available here
    precisions: Sequence[str] | None = None   # None: fp32 on CPU, fp32 and fp16 on CUDA
    batch_sizes: Sequence[int] | None = None  # None: 1 and 8 on CPU, 1, 16 and 64 on CUDA
    images: int = 32                          # end-to-end (and naive loop) images per model
    seconds: float = 2.0                      # minimum timed seconds of each compute measurement
    naive_seconds: float | None = None        # stop the naive loop after this (None: all images)
    size: int | None = None                   # input side of fully convolutional models (112)
    checkpoints: dict[str, str] = field(default_factory=dict)
    random_weights: bool = False
    extra: dict = field(default_factory=dict)
    threads: int | None = None                # torch intra-op threads (None: torch's default)


def available_backends(device: str) -> list[str]:
    """torch always; ONNX Runtime (a dependency); TensorRT where it is installed and a GPU is."""
    import importlib.util

    found = ["torch", "onnxruntime"]
    if str(device).startswith("cuda") and importlib.util.find_spec("tensorrt") is not None:
        found.append("tensorrt")
    return found


def _weights_label(name: str, opts: Table1Options) -> str | None:
    from rtkit.engines.registry import get_entry

    entry = get_entry(name)
    if name in opts.checkpoints:
        return "checkpoint"
    if entry.default_checkpoint:
        return "bundled"
    if entry.tiny:
        return "random (tiny)"
    if opts.random_weights:
        return "random (timing only)"
    return None


def device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU {platform.processor() or platform.machine()} ({len(os.sched_getaffinity(0))} cores)"


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:160]


def naive_loop(runner: Runner, src: Path, files: Sequence[str], out: Path,
               max_seconds: float | None = None) -> tuple[int, float]:
    """The naive per-image PyTorch loop: read, preprocess, one batch-1 call, postprocess, write,
    one file after the other in one thread (how reference implementations convert a dataset).
    Returns (images, seconds); stops after ``max_seconds`` once one image is done."""
    import cv2

    from rtkit.runtime.image import postprocess, preprocess

    def one(rel: str):
        rgb = cv2.cvtColor(cv2.imread(os.path.join(src, rel)), cv2.COLOR_BGR2RGB)
        y = runner.infer(preprocess(rgb, runner.spec)[None])
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), cv2.cvtColor(postprocess(np.asarray(y)[0], runner.spec, rgb.shape[:2]),
                                              cv2.COLOR_RGB2BGR))

    one(files[0])  # warm-up: first-call allocation and kernel selection are not per-image cost
    n, t0 = 0, time.perf_counter()
    for rel in files:
        one(rel)
        n += 1
        if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
            break
    return n, time.perf_counter() - t0


def _sample_set(root: Path, images: int) -> list[str]:
    from rtkit.datasets.sample import make_sample_dataset
    from rtkit.runtime.sources import walk_files

    per = min(4, images)
    make_sample_dataset(root, identities=math.ceil(images / per), per_identity=per, seed=0)
    return walk_files(root)[0]


def _export_onnx(name: str, checkpoint: str | None, precision: str, work: Path) -> Path:
    from rtkit.engines import registry
    from rtkit.export import to_onnx

    model = registry.create(name, checkpoint=checkpoint)  # random init when there is no file
    return to_onnx(model, work / f"{name}-{precision}.onnx", precision=precision, parity=False, log=None)


def _export_plan(onnx_path: Path, batch_sizes: Sequence[int], size: int | None) -> Path:
    from rtkit.export import to_plan

    top = max(batch_sizes)
    return to_plan(onnx_path, onnx_path.with_suffix(".plan"), batch=(1, top, top),
                   image_size=(size, size) if size else None, parity=False, log=None)


def table1(models: Sequence[str], work_dir: str | Path, opts: Table1Options | None = None,
           log: Callable[[str], None] | None = None) -> list[Table1Row]:
    """Measure Table 1 for ``models`` (registered names) in ``work_dir`` (sample images, exported
    engines and outputs go there). A backend that cannot run a model (export failure, out of
    memory) gives a row with a note instead of stopping the table."""
    from rtkit.engines.registry import get_entry
    from rtkit.runtime.converter import convert
    from rtkit.runtime.runners import open_engine

    opts = opts or Table1Options()
    log = log or (lambda s: None)
    cuda = str(opts.device).startswith("cuda")
    backends = list(opts.backends or available_backends(opts.device))
    precisions = list(opts.precisions or (["fp32", "fp16"] if cuda else ["fp32"]))
    batch_sizes = list(opts.batch_sizes or ([1, 16, 64] if cuda else [1, 8]))
    for kind, given, known in (("backend", backends, BACKENDS), ("precision", precisions, PRECISIONS)):
        for v in given:
            if v not in known:
                raise RtkitError(f"unknown {kind} {v!r}; use {', '.join(known)}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise RtkitError(f"batch sizes must be at least 1, got {batch_sizes}")
    for name in models:
        try:
            spec = get_entry(name).spec
        except KeyError as e:
            raise RtkitError(str(e).strip("'\"")) from None
        if spec.task != "translate":
            raise RtkitError(f"{name} is a '{spec.task}' model; Table 1 times image translators")
    labels = {name: _weights_label(name, opts) for name in models}
    missing = [n for n, w in labels.items() if w is None]
    if missing:
        raise RtkitError(f"no weights for {', '.join(missing)}: pass --checkpoint MODEL=PATH, or "
                         f"--random-weights to time them with random weights (speed does not depend "
                         f"on the weights; the table says so)")
    if opts.images < 1:
        raise RtkitError(f"--images must be at least 1, got {opts.images}")

    if opts.threads is not None:
        import torch

        torch.set_num_threads(max(1, opts.threads))
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    files = _sample_set(src, opts.images)
    rows: list[Table1Row] = []
    for name in models:
        ck = opts.checkpoints.get(name)
        common = dict(device=opts.device, extra=opts.extra or None, random_weights=True)
        with open_engine(name, checkpoint=ck, precision="fp32", **common) as naive_runner:
            n, dt = naive_loop(naive_runner, src, files, work / "out-naive" / name, opts.naive_seconds)
        naive_s = dt / n
        log(f"{name}: naive loop {naive_s:.4g} s/img ({n} images)")
        for backend in backends:
            for precision in precisions:
                engine_path, note = None, ""
                try:
                    if backend == "onnxruntime":
                        engine_path = _export_onnx(name, ck, precision, work / "engines")
                    elif backend == "tensorrt":
                        engine_path = _export_plan(_export_onnx(name, ck, precision, work / "engines"),
                                                   batch_sizes, opts.size)
                except Exception as e:  # an exporter's failure belongs in the table, not a crash
                    note = f"export failed: {_one_line(e)}"
                for bs in batch_sizes:
                    row = Table1Row(model=name, weights=labels[name], backend=backend, precision=precision,
                                    batch_size=bs, device=opts.device, input="", naive_s=naive_s,
                                    paper_s=paper_s_per_img(name), note=note)
                    rows.append(row)
                    if note:
                        continue
                    _measure(row, name, ck, engine_path, src, work, opts, common, convert, open_engine)
                    log(f"{name} {backend} {precision} batch {bs}: compute {row.compute_s or 0:.4g} "
                        f"s/img, end to end {row.e2e_s or 0:.4g} s/img {row.note}")
    return rows


def _measure(row: Table1Row, name, ck, engine_path, src, work, opts, common, convert, open_engine):
    engine = engine_path if engine_path is not None else name
    out = work / "out" / f"{name}-{row.backend}-{row.precision}-b{row.batch_size}"
    shutil.rmtree(out, ignore_errors=True)
    try:
        with open_engine(engine, checkpoint=ck if engine_path is None else None,
                         backend=row.backend, precision=row.precision, **common) as runner:
            h, w = input_size(runner, opts.size)
            row.input = f"{w}x{h}"
            r = bench_runner(runner, batch_size=row.batch_size, min_seconds=opts.seconds, size=opts.size,
                             device=opts.device)
            row.compute_s = r.s_per_img
            # Files in -> files out. A torch runner is handed over warm; an engine file is opened
            # by the converter itself, in the mode it picks for it (processes for ONNX on CPU).
            target = runner if engine_path is None else engine_path
            summary = convert(target, src, out, device=opts.device, backend=row.backend,
                              precision=row.precision, batch_size=row.batch_size, progress=False,
                              extra=(opts.extra or None) if engine_path is not None else None)
        if summary.converted:
            row.e2e_s = summary.wall_s / summary.converted
            row.images = summary.converted
        if summary.failed:
            row.note = f"{summary.failed} images failed: {summary.failures[0][1]}"
    except RtkitError as e:
        row.note = _one_line(e)
    except RuntimeError as e:  # CUDA out of memory at a large batch: a row, not the end
        if "out of memory" not in str(e):
            raise
        row.note = "out of memory"


# -- Table 1 output --------------------------------------------------------------------------

COLUMNS = ["model", "weights", "backend", "precision", "batch", "input", "naive loop s/img",
           "compute s/img", "compute img/s", "end-to-end s/img", "end-to-end img/s",
           "end-to-end / compute", "end-to-end vs naive", f"paper {PAPER_GPU} s/img", "note"]


def _cells(r: Table1Row) -> list:
    return [r.model, r.weights, r.backend, r.precision, r.batch_size, r.input, r.naive_s, r.compute_s,
            r.compute_img_s, r.e2e_s, r.e2e_img_s, r.e2e_over_compute, r.speedup_vs_naive, r.paper_s,
            r.note]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"
    return str(v)


def table1_markdown(rows: Sequence[Table1Row], device: str = "") -> str:
    head = [f"Table 1 on {device_name(device) if device else 'this machine'}: seconds per image "
            f"(s/img) and images per second (img/s); paper: the source paper's {PAPER_GPU} figures "
            f"for the full-size network (also shown beside its tiny variant).",
            "Compute: the runner on seeded inputs at the batch size. End to end: image files in, "
            "image files out (rtkit.runtime.convert). Naive loop: one image at a time in PyTorch "
            "(fp32, batch 1), files in and out, in the same run."]
    if any(r.weights.startswith("random") for r in rows):
        head.append("Weights 'random': randomly initialised networks, for timing only (speed does "
                    "not depend on the weights; their images are meaningless).")
    lines = head + ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [_fmt(v) for v in _cells(r)]
        for i in (11, 12):  # ratios
            cells[i] = f"{_cells(r)[i]:.2f}x" if _cells(r)[i] is not None else "-"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table1(rows: Sequence[Table1Row], out_dir: str | Path, device: str = "") -> dict[str, Path]:
    """table1.md, table1.csv and table1.png (bar chart, log scale) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "table1.md", "csv": out / "table1.csv", "chart": out / "table1.png"}
    paths["markdown"].write_text(table1_markdown(rows, device) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", *COLUMNS])
        for r in rows:
            w.writerow([r.device, *("" if v is None else v for v in _cells(r))])
    _chart(rows, paths["chart"], device)
    return paths


def _chart(rows: Sequence[Table1Row], path: Path, device: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.model}\n{r.backend} {r.precision} b{r.batch_size}" for r in rows]
    series = [("naive loop", [r.naive_s for r in rows]), ("compute", [r.compute_s for r in rows]),
              ("end to end", [r.e2e_s for r in rows]), (f"paper {PAPER_GPU}", [r.paper_s for r in rows])]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.8))
    width = 0.8 / len(series)
    x = np.arange(len(rows))
    for k, (label, vals) in enumerate(series):
        v = np.array([np.nan if s is None else s for s in vals], dtype=float)
        ax.bar(x + (k - (len(series) - 1) / 2) * width, v, width, label=label)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per image (log scale)")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=7, rotation=45, ha="right")
    title = "Table 1: s/img" + (f" on {device_name(device)}" if device else "")
    if any(r.weights.startswith("random") for r in rows):
        title += " (random weights: timing only)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
