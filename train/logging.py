"""Training metrics to a CSV file (always) and TensorBoard (when the package is installed), and
the images-per-second meter the logs report.

``MetricLogger(out_dir).log(step, loss=..., lr=...)`` appends one CSV row. Columns are the
union of every key logged so far (``step`` first); a key seen for the first time rewrites the
header, so a metric that starts late (a verification accuracy after the first epoch) still
lands in its own column. Opened with ``resume_step=N``, rows after step N (written by a run
that died after its last checkpoint) are dropped, so the log matches the resumed training.

Only the main process should log; other ranks pass ``enabled=False``.
"""
from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path


class MetricLogger:
    def __init__(self, out_dir: str | Path, *, filename: str = "log.csv", enabled: bool = True,
                 tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / filename
        self.fields: list[str] = ["step"]
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            rows, fields = self._read()
            if resume_step is None:
                rows = []          # a fresh run in an old folder starts a fresh log
            else:
                rows = [r for r in rows if _int(r.get("step")) <= resume_step]
            self.fields = fields or self.fields
            self._rewrite(rows)
        if tensorboard:
            self._tb = _tensorboard_writer(self.path.parent / "tensorboard")

    def _read(self) -> tuple[list[dict], list[str]]:
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            return list(reader), list(reader.fieldnames or [])

    def _rewrite(self, rows: list[dict]):
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, restval="")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def log(self, step: int, **metrics):
        """Append a row; values may be numbers or strings. Non-finite numbers are kept as text."""
        if not self.enabled:
            return
        new = [k for k in metrics if k not in self.fields]
        if new:
            rows, _ = self._read() if self.path.is_file() else ([], [])
            self.fields += new
            self._rewrite(rows)
        elif not self.path.is_file():
            self._rewrite([])
        row = {"step": step, **{k: _fmt(v) for k, v in metrics.items()}}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, restval="").writerow(row)
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def rows(self) -> list[dict]:
        """The log as written so far (strings, as CSV holds them)."""
        return self._read()[0] if self.path.is_file() else []

    def close(self):
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt(v):
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v


def _int(v) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return -1


def _tensorboard_writer(folder: Path):
    """A SummaryWriter if tensorboard is installed, else None (CSV logging carries on)."""
    try:
        import tensorboard  # noqa: F401  (SummaryWriter imports it lazily and fails late)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))


class RateMeter:
    """Images per second between calls to ``rate()`` (synchronising CUDA for honest numbers)."""

    def __init__(self, device=None):
        self.device = device
        self.reset()

    def reset(self):
        self._sync()
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, images: int):
        self.images += images

    def _sync(self):
        if self.device is not None and self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def rate(self, reset: bool = True) -> float:
        self._sync()
        dt = time.perf_counter() - self.t0
        value = self.images / dt if dt > 0 else 0.0
        if reset:
            self.t0 = time.perf_counter()
            self.images = 0
        return value


__all__ = ["MetricLogger", "RateMeter"]
