"""ROC curves and TAR at a fixed FMR, shared by the IJB-B/C evaluation and the reports.

Everything here takes labels and scores (higher score = more likely the same person) and
returns numbers, so it can be checked against other implementations on the same scores.

Two conventions for "TAR at FMR = x" are in use and they disagree most at small x:

- ``insightface`` (insightface eval_ijbc.py): the point of sklearn's ROC curve (with its
  collinear points dropped) whose FPR is nearest to x, ties going to the larger TPR. Its FPR
  may be above x.
- ``fmr_le_target`` (bob.measure style): the best TAR over all thresholds whose FMR is at most
  x, i.e. the last point of the full ROC curve with FPR <= x.

Every number we write says which convention produced it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FMR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
CONVENTIONS = {
    "insightface": "ROC point with FPR nearest the target (insightface eval_ijbc.py)",
    "fmr_le_target": "best TAR at a threshold with FMR <= target (bob.measure)",
}


@dataclass
class RocCurve:
    """Points of a ROC curve, from (0, 0) at threshold +inf to (1, 1)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    n_genuine: int
    n_impostor: int


def _operating_points(labels: np.ndarray, scores: np.ndarray):
    """False/true accept counts at each distinct score, thresholds in decreasing order."""
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be 1-D and equal")
    # Order within a run of equal scores does not matter (runs are merged), so the fast sort.
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    genuine = labels[order] != 0
    # The last index of each run of equal scores: accepting "score >= t" takes whole runs.
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), scores.size - 1]
    tps = np.cumsum(genuine, dtype=np.int64)[last_of_run]
    fps = last_of_run + 1 - tps
    return fps, tps, sorted_scores[last_of_run]


def roc_curve(labels, scores, drop_intermediate: bool = True) -> RocCurve:
    """ROC of ``scores`` (accept when score >= threshold) against binary ``labels``.

    Same points as ``sklearn.metrics.roc_curve``: the first threshold is +inf, and with
    ``drop_intermediate`` the points collinear with both neighbours (no corner in either the
    false or the true accept counts) are dropped.
    """
    return _curve(*_operating_points(labels, scores), drop_intermediate)


def _curve(fps, tps, thresholds, drop_intermediate: bool) -> RocCurve:
    if drop_intermediate and fps.size > 2:
        corner = np.logical_or(np.diff(fps, 2), np.diff(tps, 2))
        keep = np.flatnonzero(np.r_[True, corner, True])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps = np.r_[0, fps].astype(np.float64)
    tps = np.r_[0, tps].astype(np.float64)
    thresholds = np.r_[np.inf, thresholds.astype(np.float64)]
    n_imp, n_gen = int(fps[-1]), int(tps[-1])
    if n_imp == 0 or n_gen == 0:
        raise ValueError(f"a ROC curve needs both genuine and impostor pairs "
                         f"(got {n_gen} genuine, {n_imp} impostor)")
    return RocCurve(fps / fps[-1], tps / tps[-1], thresholds, n_gen, n_imp)


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve by the trapezoidal rule (fpr non-decreasing)."""
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    return float((np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0).sum())


def tar_at_fmr_nearest(curve: RocCurve, targets=FMR_TARGETS) -> dict[float, float]:
    """insightface convention: TPR of the point with FPR nearest each target; among equally
    near points the one furthest along the curve (largest TPR). Use the dropped curve."""
    out = {}
    for target in targets:
        dist = np.abs(curve.fpr - target)
        out[target] = float(curve.tpr[np.flatnonzero(dist == dist.min())[-1]])
    return out


def tar_at_fmr_bounded(curve: RocCurve, targets=FMR_TARGETS) -> dict[float, float]:
    """bob.measure convention: best TPR with FPR <= target. Use the full curve
    (``drop_intermediate=False``), where every threshold is a point."""
    out = {}
    for target in targets:
        # fpr is non-decreasing and starts at 0, so the last admissible point has the best TPR.
        idx = int(np.searchsorted(curve.fpr, target, side="right")) - 1
        out[target] = float(curve.tpr[idx])
    return out


def threshold_at_fmr(curve: RocCurve, target: float) -> float:
    """The score threshold of the bounded (FMR <= target) operating point."""
    idx = int(np.searchsorted(curve.fpr, target, side="right")) - 1
    return float(curve.thresholds[idx])


def roc_on_grid(curve: RocCurve, grid: np.ndarray) -> np.ndarray:
    """Best TPR with FPR <= each grid value: a step curve that averages across runs."""
    idx = np.searchsorted(curve.fpr, np.asarray(grid, dtype=np.float64), side="right") - 1
    return curve.tpr[np.maximum(idx, 0)]


ROC_GRID = np.logspace(-7, 0, 141)


def evaluate_scores(labels, scores, targets=FMR_TARGETS, *, return_curve: bool = False):
    """TAR at each FMR under both conventions, AUC, and a compact ROC on a log grid.

    Returns a JSON-ready dict (TAR keys are the targets formatted like ``"1e-04"``), and with
    ``return_curve`` also the ROC curve (collinear points dropped) for plotting.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    points = _operating_points(labels, scores)  # the sort is the costly part: once
    full = _curve(*points, drop_intermediate=False)
    dropped = _curve(*points, drop_intermediate=True)
    doc = {
        "n_pairs": int(labels.size),
        "n_genuine": full.n_genuine,
        "n_impostor": full.n_impostor,
        "auc": auc(dropped.fpr, dropped.tpr),
        "tar_at_fmr": {
            "insightface": {fmr_key(t): v for t, v in tar_at_fmr_nearest(dropped, targets).items()},
            "fmr_le_target": {fmr_key(t): v for t, v in tar_at_fmr_bounded(full, targets).items()},
        },
        "threshold_at_fmr": {fmr_key(t): threshold_at_fmr(full, t) for t in targets},
        "conventions": dict(CONVENTIONS),
        "roc": {"fpr": ROC_GRID.tolist(), "tpr": roc_on_grid(full, ROC_GRID).tolist()},
    }
    return (doc, dropped) if return_curve else doc


def fmr_key(target: float) -> str:
    return f"{target:.0e}"


__all__ = ["FMR_TARGETS", "CONVENTIONS", "RocCurve", "roc_curve", "auc", "tar_at_fmr_nearest",
           "tar_at_fmr_bounded", "threshold_at_fmr", "roc_on_grid", "ROC_GRID", "evaluate_scores",
           "fmr_key"]
