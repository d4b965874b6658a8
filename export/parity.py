"""Parity: does an exported engine compute what the PyTorch model computes?

``check_parity(model, onnx_path)`` runs ONNX Runtime (CPU) and PyTorch on the same seeded
inputs and reports, per output, the max and mean absolute error, the PSNR and the tolerance
that would have been needed to pass (the comparator idea of Polygraphy). ``to_onnx`` runs it on
every export and refuses an engine that fails.

Default tolerances (element-wise ``|onnx - torch| <= atol + rtol * |torch|``), for images whose
range is [-1, 1] (atol scales with the width of ``spec.value_range``):

======================  ==========  ==========
engine                  atol        rtol
======================  ==========  ==========
fp32 image output       1e-4        0
fp32 embedding          1e-3        1e-3
fp16 image output       5e-2        0
fp16 embedding          2e-2        2e-2
======================  ==========  ==========

fp16 engines are compared with the fp32 PyTorch model, so their tolerance covers fp16
rounding through the whole network. Inputs are drawn with a batch of 3 (the graph is traced
with 2) and, for fully convolutional models, at 112x112-ish (traced at 64x64), so a batch or
size baked into the graph fails here instead of in a conversion run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from rtkit.engines.errors import EngineError

PARITY_BATCH = 3
PARITY_SIDE = 112     # DigiFace-sized check for fully convolutional models


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float = 0.0

    def __str__(self) -> str:
        return f"atol {self.atol:g}, rtol {self.rtol:g}"


def default_tolerance(task: str, precision: str, value_range=(-1.0, 1.0)) -> Tolerance:
    """The documented default tolerance for a task ("translate"/"generate"/"embed") and precision."""
    scale = (value_range[1] - value_range[0]) / 2.0
    if task == "embed":
        return Tolerance(1e-3, 1e-3) if precision == "fp32" else Tolerance(2e-2, 2e-2)
    return Tolerance(1e-4 * scale) if precision == "fp32" else Tolerance(5e-2 * scale)


@dataclass
class OutputParity:
    name: str
    shape: tuple
    max_abs: float
    mean_abs: float
    psnr_db: float
    needed_atol: float      # smallest atol that passes at the configured rtol
    needed_rtol: float      # smallest rtol that passes at the configured atol
    passed: bool
    min_cosine: float | None = None  # embeddings: worst per-row cosine similarity

    def row(self) -> str:
        cos = f"{self.min_cosine:.6f}" if self.min_cosine is not None else "-"
        return (f"  {self.name:<10} {str(self.shape):<18} {self.max_abs:>10.3g} {self.mean_abs:>10.3g} "
                f"{self.psnr_db:>8.1f} {cos:>10} {self.needed_atol:>11.3g} {self.needed_rtol:>11.3g}"
                f"  {'ok' if self.passed else 'FAIL'}")


@dataclass
class ParityReport:
    engine: str
    reference: str
    precision: str
    tolerance: Tolerance
    batch: int
    outputs: list[OutputParity] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def format(self) -> str:
        head = (f"parity {self.engine} vs {self.reference} ({self.precision}, batch {self.batch}, "
                f"tolerance {self.tolerance}): {'PASS' if self.passed else 'FAIL'}")
        cols = (f"  {'output':<10} {'shape':<18} {'max_abs':>10} {'mean_abs':>10} {'psnr_db':>8} "
                f"{'min_cos':>10} {'needed_atol':>11} {'needed_rtol':>11}")
        return "\n".join([head, cols] + [o.row() for o in self.outputs])

    __str__ = format

    def failure_line(self) -> str:
        bad = [o for o in self.outputs if not o.passed]
        parts = [f"{o.name} max abs error {o.max_abs:.3g} (needed atol {o.needed_atol:.3g} at rtol "
                 f"{self.tolerance.rtol:g}, or rtol {o.needed_rtol:.3g} at atol {self.tolerance.atol:g})"
                 for o in bad]
        return (f"{self.engine} differs from {self.reference} beyond {self.tolerance}: "
                + "; ".join(parts))

    def raise_if_failed(self) -> "ParityReport":
        if not self.passed:
            raise EngineError(self.failure_line())
        return self


def psnr(reference: np.ndarray, candidate: np.ndarray, peak: float) -> float:
    mse = float(np.mean((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def compare_output(name: str, reference: np.ndarray, candidate: np.ndarray, tol: Tolerance, *,
                   peak: float | None = None, embedding: bool = False) -> OutputParity:
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise EngineError(f"output {name!r}: engine shape {cand.shape} != reference {ref.shape}")
    if not np.isfinite(cand).all():  # NaN/inf in the engine (e.g. fp16 overflow)
        return OutputParity(name, ref.shape, math.inf, math.inf, -math.inf, math.inf, math.inf, False)
    diff = np.abs(ref - cand)
    mag = np.abs(ref)
    needed_atol = float(np.max(np.maximum(diff - tol.rtol * mag, 0.0), initial=0.0))
    over = np.maximum(diff - tol.atol, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(over > 0, over / mag, 0.0)
    needed_rtol = float(np.max(ratios, initial=0.0))
    if peak is None:
        peak = float(ref.max() - ref.min()) or 1.0
    min_cos = None
    if embedding and ref.ndim == 2:
        num = (ref * cand).sum(1)
        den = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
        min_cos = float(np.min(num / np.maximum(den, 1e-12)))
    passed = bool(np.all(diff <= tol.atol + tol.rtol * mag))
    return OutputParity(name, ref.shape, float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0,
                        psnr(ref, cand, peak), needed_atol, needed_rtol, passed, min_cos)


def seeded_inputs(model: nn.Module, batch: int = PARITY_BATCH, seed: int = 0
                  ) -> dict[str, torch.Tensor]:
    """The model's example inputs drawn from a seeded generator (global RNG left untouched)."""
    from rtkit.export.graph import default_image_size, export_inputs, export_spec

    spec = export_spec(model)
    size = None if spec.input_size else default_image_size(spec, PARITY_SIDE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return export_inputs(model, batch, size)


def _ort_session(path: Path):
    from rtkit.runtime.runners import ort_session

    return ort_session(path)


_ORT_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def run_onnx(session, inputs: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
    """Run an ORT session on named inputs, casting each to the graph's input type."""
    feed = {}
    for i in session.get_inputs():
        if i.name not in inputs:
            raise EngineError(f"the ONNX graph needs input {i.name!r}; given {sorted(inputs)}")
        v = inputs[i.name]
        v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        feed[i.name] = np.ascontiguousarray(v, dtype=_ORT_NP.get(i.type, np.float32))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def check_parity(model: nn.Module | str, onnx_path: str | Path, inputs=None, *, seed: int = 0,
                 tol: Tolerance | None = None, batch: int = PARITY_BATCH) -> ParityReport:
    """Compare ONNX Runtime on ``onnx_path`` with the PyTorch ``model`` on the same inputs.

    model: the module that was exported (or a registered name, built with its bundled weights).
    inputs: None (seeded example inputs, ``batch`` of them), an image batch (array/tensor; the
        other inputs take their example values) or a dict by graph input name.
    tol: overrides the default tolerance for the engine's task and precision.
    Returns a ParityReport; it does not raise on a mismatch (``report.raise_if_failed()`` does).
    """
    from rtkit.engines.card import read_card
    from rtkit.export.graph import INPUT_NAME, export_graph, export_spec, resolve_model

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"engine not found: {onnx_path}")
    if isinstance(model, str):
        model = resolve_model(model)[0]
    session = _ort_session(onnx_path)
    try:
        meta = read_card(onnx_path).engine_card()
    except FileNotFoundError:
        meta = None  # a foreign ONNX: compare it as the model's spec says
    spec = export_spec(model)
    precision = meta.precision if meta else ("fp16" if "float16" in str(session.get_inputs()[0].type) else "fp32")
    if isinstance(inputs, Mapping):
        feed = dict(inputs)
    else:
        n = batch if inputs is None else int(inputs.shape[0])
        feed = seeded_inputs(model, n, seed)
        if inputs is not None:
            feed[INPUT_NAME] = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor)
                                               else inputs)
    flip = meta is not None and meta.spec.channels != spec.channels
    graph = export_graph(model, list(feed), flip)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    args = [torch.as_tensor(v) for v in feed.values()]
    args = [a.to(device, torch.float32) if a.is_floating_point() else a.to(device) for a in args]
    with torch.inference_mode():
        ref = graph(*args)
    ref = ref.float().cpu().numpy()
    got = run_onnx(session, feed)
    out_names = [o.name for o in session.get_outputs()]
    tol = tol or default_tolerance(spec.task, precision, spec.value_range)
    embedding = spec.task == "embed"
    peak = None if embedding else float(spec.value_range[1] - spec.value_range[0])
    report = ParityReport(engine=onnx_path.name, reference=f"PyTorch {getattr(model, 'registry_name', type(model).__name__)}",
                          precision=precision, tolerance=tol, batch=int(next(iter(feed.values())).shape[0]))
    report.outputs.append(compare_output(out_names[0], ref, got[out_names[0]], tol, peak=peak,
                                         embedding=embedding))
    return report


def check_plan_parity(plan_path: str | Path, onnx_path: str | Path, *, seed: int = 0,
                      batch: int | None = None, image_size: tuple[int, int] | None = None,
                      device: str = "cuda", tol: Tolerance | None = None) -> ParityReport:
    """Compare a TensorRT plan with ONNX Runtime (CPU) on the ONNX it was built from.

    The ONNX was itself checked against PyTorch when it was exported, so this closes the chain
    torch -> ONNX -> plan. ``batch`` defaults to 3 clipped to the plan's profile.
    """
    from rtkit.engines.card import read_card
    from rtkit.export.graph import default_export_inputs, default_image_size
    from rtkit.runtime.runners import TensorRTRunner

    plan_path, onnx_path = Path(plan_path), Path(onnx_path)
    meta = read_card(plan_path).engine_card()
    spec = meta.spec
    n = batch or min(max(PARITY_BATCH, meta.batch.get("min", 1)), meta.batch.get("max", PARITY_BATCH))
    size = image_size or (None if spec.input_size else default_image_size(spec, PARITY_SIDE))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        feed = default_export_inputs(spec, n, size)
    session = _ort_session(onnx_path)
    graph_inputs = {i.name for i in session.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in graph_inputs}
    ref = run_onnx(session, feed)[session.get_outputs()[0].name]
    image = feed.pop(meta.input_name)
    with TensorRTRunner(plan_path, device=device, card=meta) as runner:
        got = runner.infer(image, **feed).float().cpu().numpy()
    tol = tol or default_tolerance(spec.task, meta.precision, spec.value_range)
    embedding = spec.task == "embed"
    peak = None if embedding else float(spec.value_range[1] - spec.value_range[0])
    report = ParityReport(engine=plan_path.name, reference=f"ONNX Runtime {onnx_path.name}",
                          precision=meta.precision, tolerance=tol, batch=n)
    report.outputs.append(compare_output(meta.output_names[0], ref, got, tol, peak=peak,
                                         embedding=embedding))
    return report
