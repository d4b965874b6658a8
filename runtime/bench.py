"""Per-image throughput of a runner, measured like the source paper's Table 1 (seconds per image)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from rtkit.runtime.runners import Runner


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


def bench_runner(runner: Runner, *, batch_size: int = 8, min_seconds: float = 2.0, warmup: int = 2,
                 size: int | None = None, seed: int = 0, device: str = "cpu") -> BenchResult:
    """Time ``runner.infer`` on seeded inputs in the runner's range; at least one timed batch."""
    h, w = input_size(runner, size)
    lo, hi = runner.spec.value_range
    x = np.random.default_rng(seed).uniform(lo, hi, (batch_size, 3, h, w)).astype(np.float32)
    if str(device).startswith("cuda"):
        import torch
        x = torch.from_numpy(x).to(device)
        sync = torch.cuda.synchronize
    else:
        sync = lambda: None  # noqa: E731
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
