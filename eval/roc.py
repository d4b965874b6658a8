"""ROC curves, TAR at a fixed FMR and the EER, shared by the IJB-B/C evaluation and the reports.

Everything here takes labels and scores (higher score = more likely the same person) and
returns numbers, so it can be checked against other implementations on the same scores.

Two conventions for "TAR at FMR = x" are in use; they disagree most at small x, and every
number we write says which one produced it:

- ``insightface`` (eval_ijbc.py): the points of sklearn's ROC curve (collinear points dropped),
  and for each x the point whose FPR is nearest x, ties going to the larger TPR. Its FPR may
  be above x.
- ``bob_measure`` (bob.measure's ``far_threshold`` then ``farfrr``): the threshold is chosen
  among the impostor scores alone: the lowest impostor score t with #(impostors >= t) <= x *
  #impostors, tied impostors counting together. When even the highest impostor score accepts
  too many (x below 1/#impostors, or ties at the top) it is the next float above that score;
  for x >= 1 - eps the next float below the lowest impostor. TAR = 1 - FNMR, with FNMR =
  #(genuine < t) / #genuine.

The equal error rate follows bob.measure's ``eer_threshold`` and ``eer`` (see ``eer``).

Not a TAR@FMR convention: the best TPR over all thresholds, genuine scores included, with FPR
<= x is the upper envelope of the ROC; ``roc_on_grid`` samples it only to draw and average
curves.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FMR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
CONVENTIONS = {
    "insightface": "ROC point with FPR nearest the target (insightface eval_ijbc.py)",
    "bob_measure": "threshold among the impostor scores with FMR <= target, TAR = 1 - FNMR "
                   "there (bob.measure far_threshold and farfrr)",
}


@dataclass
class RocCurve:
    """Points of a ROC curve, from (0, 0) at threshold +inf to (1, 1)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    n_genuine: int
    n_impostor: int


def _scores(values, what: str = "scores") -> np.ndarray:
    s = np.asarray(values, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError(f"{what} hold NaN")
    return s


def _operating_points(labels: np.ndarray, scores: np.ndarray):
    """False/true accept counts at each distinct score, thresholds in decreasing order:
    ``fps[k]`` impostors and ``tps[k]`` genuine scores are >= ``thresholds[k]``."""
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


# -- insightface: the nearest ROC point --------------------------------------------------------

def nearest_point_index(curve: RocCurve, target: float) -> int:
    """Index into ``curve`` (sklearn's roc_curve order, collinear points dropped) of the point
    insightface's eval_ijbc.py reads for ``target``: FPR nearest it, the largest TPR on ties."""
    dist = np.abs(curve.fpr - target)
    return int(np.flatnonzero(dist == dist.min())[-1])


def tar_at_fmr_nearest(curve: RocCurve, targets=FMR_TARGETS) -> dict[float, float]:
    """insightface convention: TPR of the point with FPR nearest each target. Use the dropped
    curve (``roc_curve(..., drop_intermediate=True)``), as sklearn returns it by default."""
    return {t: float(curve.tpr[nearest_point_index(curve, t)]) for t in targets}


# -- bob.measure: thresholds among the impostor scores -----------------------------------------

_EPS = float(np.finfo(np.float64).eps)


def _check_far_value(far_value: float) -> float:
    far_value = float(far_value)
    if not 0.0 <= far_value <= 1.0:  # also refuses NaN
        raise ValueError(f"an FMR target must be in [0, 1], got {far_value}")
    return far_value


def _impostor_runs(fps: np.ndarray, thresholds: np.ndarray):
    """From operating points: the distinct impostor scores (decreasing) and how many
    impostors are >= each (a run holds an impostor where the count grows)."""
    has_impostor = np.diff(fps, prepend=0) > 0
    return thresholds[has_impostor], fps[has_impostor]


def _far_threshold_from_runs(values: np.ndarray, counts: np.ndarray, n_impostor: int,
                             far_value: float) -> float:
    """bob.measure's far_threshold given the distinct impostor scores in decreasing order and
    the number of impostors at or above each."""
    far_value = _check_far_value(far_value)
    if n_impostor < 2:
        raise ValueError("far_threshold needs at least 2 impostor scores")
    if far_value >= 1.0 - _EPS:  # accept everything: just below the lowest impostor
        low = float(values[-1])
        return float(np.nextafter(low, low - 1))
    # count / n grows with the count, so the admissible runs are a prefix of the list.
    admissible = int(np.count_nonzero(counts / n_impostor <= far_value))
    if admissible == 0:  # even the highest impostor score accepts too many: just above it
        top = float(values[0])
        return float(np.nextafter(top, top + 1))
    return float(values[admissible - 1])


def far_threshold(negatives, far_value: float = 0.001) -> float:
    """The threshold bob.measure.far_threshold returns: FMR = #(impostors >= t) / #impostors
    is at most ``far_value``, and t is as low as that allows among the impostor scores (see
    the module docstring for ties and targets below 1/#impostors). bob.measure's ``positives``
    argument is ignored there, so it is not taken here."""
    neg = _scores(negatives, "impostor scores")
    fps, _, thresholds = _operating_points(np.zeros(neg.size, np.int8), neg)
    return _far_threshold_from_runs(thresholds, fps, neg.size, far_value)


def farfrr(negatives, positives, threshold: float) -> tuple[float, float]:
    """(FMR, FNMR) at ``threshold`` as bob.measure.farfrr counts them: impostors with score >=
    threshold are false matches, genuine scores < threshold false non-matches. A NaN
    threshold gives (1.0, 1.0), as there."""
    neg = _scores(negatives, "impostor scores")
    pos = _scores(positives, "genuine scores")
    if neg.size == 0 or pos.size == 0:
        raise ValueError("farfrr needs both impostor and genuine scores")
    if np.isnan(threshold):
        return 1.0, 1.0
    return (int(np.count_nonzero(neg >= threshold)) / neg.size,
            int(np.count_nonzero(pos < threshold)) / pos.size)


def tar_at_fmr_bob(negatives, positives, targets=FMR_TARGETS) -> dict[float, dict]:
    """bob.measure convention for each target: threshold, FMR, FNMR and TAR = 1 - FNMR."""
    neg = _scores(negatives, "impostor scores")
    fps, _, thresholds = _operating_points(np.zeros(neg.size, np.int8), neg)
    return _bob_points(neg, _scores(positives, "genuine scores"), fps, thresholds, targets)


def _bob_points(neg, pos, fps, thresholds, targets) -> dict[float, dict]:
    values, counts = _impostor_runs(fps, thresholds)
    out = {}
    for t in targets:
        thr = _far_threshold_from_runs(values, counts, neg.size, t)
        far, frr = farfrr(neg, pos, thr)
        out[t] = {"threshold": thr, "fmr": far, "fnmr": frr, "tar": 1.0 - frr}
    return out


# -- the equal error rate (bob.measure eer_threshold / eer) ------------------------------------

@dataclass
class EqualErrorRate:
    eer: float          # (FMR + FNMR) / 2 at the threshold, as bob.measure.eer returns it
    threshold: float    # bob.measure.eer_threshold
    fmr: float
    fnmr: float

    def as_dict(self) -> dict:
        return {"eer": self.eer, "threshold": self.threshold, "fmr": self.fmr, "fnmr": self.fnmr}


def _eer_threshold_from_points(fps, tps, thresholds) -> float:
    """bob.measure.eer_threshold from operating points (thresholds decreasing).

    bob walks the merged ascending scores one distinct value at a time while both classes
    still have scores left: before each step it evaluates |FMR - FNMR|, FMR starting at 1 and
    losing 1/#impostors per impostor passed, FNMR starting at 0 and gaining 1/#genuine per
    genuine score passed (running float sums, reproduced here with sequential accumulation).
    The candidate threshold is the lowest score first, then the midpoint between the value
    just passed and the next. Ties go to the later step; the state after the last step
    replaces them only when strictly better. (bob then tries "above every score", FMR 0 and
    FNMR 1, which can never win: the first step already scores |1 - 0|.)
    """
    n_neg, n_pos = int(fps[-1]), int(tps[-1])
    if n_neg == 0 or n_pos == 0:
        raise ValueError("eer_threshold needs both impostor and genuine scores")
    values = thresholds[::-1].astype(np.float64)      # distinct scores, ascending
    # Scores <= values[j]: all of them minus those above, i.e. at the next higher value.
    neg_le = n_neg - np.r_[fps[::-1][1:], 0]
    pos_le = n_pos - np.r_[tps[::-1][1:], 0]
    exhausted = (neg_le == n_neg) | (pos_le == n_pos)
    steps = int(np.argmax(exhausted)) + 1             # steps taken before one class runs out
    far_run = np.full(n_neg + 1, 1.0 / n_neg)
    far_run[0] = 1.0
    np.subtract.accumulate(far_run, out=far_run)      # FMR after passing c impostors
    frr_run = np.full(n_pos + 1, 1.0 / n_pos)
    frr_run[0] = 0.0
    np.add.accumulate(frr_run, out=frr_run)           # FNMR after passing c genuine scores
    passed_neg = np.r_[0, neg_le[:steps]]             # states 0 .. steps
    passed_pos = np.r_[0, pos_le[:steps]]
    pred = np.abs(far_run[passed_neg] - frr_run[passed_pos])
    cand = np.empty(steps + 1)
    cand[0] = values[0]
    j = np.arange(1, steps + 1)
    inner = j < values.size
    cand[1:][inner] = (values[j[inner] - 1] + values[j[inner]]) / 2
    cand[1:][~inner] = values[j[~inner] - 1]          # both classes used up: the last value
    in_loop = pred[:steps]
    best = int(np.flatnonzero(in_loop == in_loop.min())[-1])
    if pred[steps] < in_loop[best]:
        best = steps
    return float(cand[best])


def _stack(negatives, positives):
    neg = _scores(negatives, "impostor scores")
    pos = _scores(positives, "genuine scores")
    labels = np.r_[np.zeros(neg.size, np.int8), np.ones(pos.size, np.int8)]
    return neg, pos, labels, np.r_[neg, pos]


def eer_threshold(negatives, positives) -> float:
    """The threshold bob.measure.eer_threshold returns (see ``_eer_threshold_from_points``)."""
    _, _, labels, scores = _stack(negatives, positives)
    return _eer_threshold_from_points(*_operating_points(labels, scores))


def eer(negatives, positives) -> EqualErrorRate:
    """bob.measure.eer: (FMR + FNMR) / 2 at ``eer_threshold``, with FMR and FNMR there."""
    neg, pos, labels, scores = _stack(negatives, positives)
    thr = _eer_threshold_from_points(*_operating_points(labels, scores))
    far, frr = farfrr(neg, pos, thr)
    return EqualErrorRate((far + frr) / 2.0, thr, far, frr)


# -- curves for plotting -----------------------------------------------------------------------

def roc_on_grid(curve: RocCurve, grid: np.ndarray) -> np.ndarray:
    """The ROC's upper envelope at each grid FPR (best TPR with FPR <= it, any score as the
    threshold), from the full curve: a step curve to draw and to average across runs. Not a
    TAR@FMR convention (see the module docstring)."""
    idx = np.searchsorted(curve.fpr, np.asarray(grid, dtype=np.float64), side="right") - 1
    return curve.tpr[np.maximum(idx, 0)]


ROC_GRID = np.logspace(-7, 0, 141)


def _finite_or_none(x: float):
    return float(x) if np.isfinite(x) else None  # JSON has no inf


def evaluate_scores(labels, scores, targets=FMR_TARGETS, *, return_curve: bool = False):
    """TAR at each FMR under both conventions, the points they read, the EER, AUC and a
    compact ROC on a log grid.

    Returns a JSON-ready dict (target keys formatted like ``"1e-04"``), and with
    ``return_curve`` also the ROC curve (collinear points dropped) for plotting. In
    ``operating_points["insightface"]``, ``roc_index`` indexes sklearn's ``roc_curve`` output
    (insightface reads the same point at ``len - 1 - roc_index`` of the flipped arrays).
    """
    labels = np.asarray(labels)
    scores = _scores(scores)
    points = _operating_points(labels, scores)  # the sort is the costly part: once
    full = _curve(*points, drop_intermediate=False)
    dropped = _curve(*points, drop_intermediate=True)
    impostor = labels == 0
    neg, pos = scores[impostor], scores[~impostor]
    del impostor
    # The impostor runs of the joint sort are those bob.measure's sort of the impostors gives.
    bob = _bob_points(neg, pos, points[0], points[2], targets)
    eer_thr = _eer_threshold_from_points(*points)
    far, frr = farfrr(neg, pos, eer_thr)
    nearest = {}
    for t in targets:
        i = nearest_point_index(dropped, t)
        nearest[fmr_key(t)] = {"roc_index": i, "fmr": float(dropped.fpr[i]),
                               "tar": float(dropped.tpr[i]),
                               "threshold": _finite_or_none(dropped.thresholds[i])}
    doc = {
        "n_pairs": int(labels.size),
        "n_genuine": full.n_genuine,
        "n_impostor": full.n_impostor,
        "auc": auc(dropped.fpr, dropped.tpr),
        "tar_at_fmr": {
            "insightface": {k: p["tar"] for k, p in nearest.items()},
            "bob_measure": {fmr_key(t): p["tar"] for t, p in bob.items()},
        },
        "operating_points": {
            "insightface": nearest,
            "bob_measure": {fmr_key(t): p for t, p in bob.items()},
        },
        "eer": EqualErrorRate((far + frr) / 2.0, eer_thr, far, frr).as_dict(),
        "conventions": dict(CONVENTIONS),
        "roc": {"fpr": ROC_GRID.tolist(), "tpr": roc_on_grid(full, ROC_GRID).tolist(),
                "kind": "upper envelope on a log grid (for plots)"},
    }
    return (doc, dropped) if return_curve else doc


def fmr_key(target: float) -> str:
    return f"{target:.0e}"


__all__ = ["FMR_TARGETS", "CONVENTIONS", "RocCurve", "roc_curve", "auc", "nearest_point_index",
           "tar_at_fmr_nearest", "far_threshold", "farfrr", "tar_at_fmr_bob", "EqualErrorRate",
           "eer_threshold", "eer", "roc_on_grid", "ROC_GRID", "evaluate_scores", "fmr_key"]
