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
    # Sorting the values alone is several times faster than an argsort and its gathers; the
    # genuine counts then come from the (sorted) genuine scores by binary search.
    ascending = np.sort(scores)
    genuine = np.sort(scores[labels != 0])
    # Accepting "score >= t" takes whole runs of equal scores: their first index ascending.
    if ascending.size and (ascending[1:] != ascending[:-1]).all():
        first = None  # all scores distinct (the usual case for float scores): no runs
        thresholds = ascending
    else:
        first = np.flatnonzero(np.concatenate(([True], ascending[1:] != ascending[:-1])))
        thresholds = ascending[first]
    # Sorted keys make the search walk forward instead of restarting at every key.
    tps = np.searchsorted(genuine, thresholds, side="left")
    np.subtract(genuine.size, tps, out=tps)                     # genuine scores >= each
    fps = np.subtract(scores.size, first if first is not None else
                      np.arange(scores.size, dtype=np.int64))   # all scores >= each
    fps -= tps
    # Decreasing thresholds, as the ROC is walked from (0, 0).
    return fps[::-1].astype(np.int64), tps[::-1].astype(np.int64), thresholds[::-1]


def roc_curve(labels, scores, drop_intermediate: bool = True) -> RocCurve:
    """ROC of ``scores`` (accept when score >= threshold) against binary ``labels``.

    Same points as ``sklearn.metrics.roc_curve``: the first threshold is +inf, and with
    ``drop_intermediate`` the points collinear with both neighbours (no corner in either the
    false or the true accept counts) are dropped.
    """
    return _curve(*_operating_points(labels, scores), drop_intermediate)


def _prepend(value, x: np.ndarray, dtype) -> np.ndarray:
    out = np.empty(x.size + 1, dtype=dtype)
    out[0] = value
    out[1:] = x
    return out


def _curve(fps, tps, thresholds, drop_intermediate: bool) -> RocCurve:
    if drop_intermediate and fps.size > 2:
        corner = np.diff(fps, 2) != 0
        corner |= np.diff(tps, 2) != 0
        keep = np.flatnonzero(np.concatenate(([True], corner, [True])))
        del corner
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    n_imp, n_gen = int(fps[-1]), int(tps[-1])
    if n_imp == 0 or n_gen == 0:
        raise ValueError(f"a ROC curve needs both genuine and impostor pairs "
                         f"(got {n_gen} genuine, {n_imp} impostor)")
    # Counts divided by the totals in float64, as sklearn divides its float counts.
    fpr = _prepend(0, fps, np.float64)
    fpr /= n_imp
    tpr = _prepend(0, tps, np.float64)
    tpr /= n_gen
    return RocCurve(fpr, tpr, _prepend(np.inf, thresholds, np.float64), n_gen, n_imp)


def _count_at_most(n: int, rate: float) -> int:
    """The largest count c in [0, n] with c / n <= rate as float64 division (c / n grows with
    c, so this is where "rate <= target" stops holding); -1 if none."""
    c = min(max(int(np.floor(rate * n)), 0), n)
    while c < n and (c + 1) / n <= rate:
        c += 1
    while c >= 0 and c / n > rate:
        c -= 1
    return c


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


def _far_threshold_from_points(fps: np.ndarray, thresholds: np.ndarray, far_value: float) -> float:
    """bob.measure's far_threshold from operating points (thresholds decreasing, ``fps[k]``
    impostors at or above ``thresholds[k]``); the impostor scores are the runs where fps grows."""
    far_value = _check_far_value(far_value)
    n = int(fps[-1])
    if n < 2:
        raise ValueError("far_threshold needs at least 2 impostor scores")
    if far_value >= 1.0 - _EPS:  # accept everything: just below the lowest impostor
        low = float(thresholds[np.searchsorted(fps, n, side="left")])
        return float(np.nextafter(low, low - 1))
    # The lowest impostor score t whose count #(impostors >= t) still passes count / n <=
    # target: the first run that reaches the largest passing count.
    last = int(np.searchsorted(fps, _count_at_most(n, far_value), side="right")) - 1
    if last < 0 or fps[last] == 0:  # even the highest impostor score accepts too many
        top = float(thresholds[np.searchsorted(fps, 0, side="right")])
        return float(np.nextafter(top, top + 1))
    return float(thresholds[np.searchsorted(fps, fps[last], side="left")])


def far_threshold(negatives, far_value: float = 0.001) -> float:
    """The threshold bob.measure.far_threshold returns: FMR = #(impostors >= t) / #impostors
    is at most ``far_value``, and t is as low as that allows among the impostor scores (see
    the module docstring for ties and targets below 1/#impostors). bob.measure's ``positives``
    argument is ignored there, so it is not taken here."""
    neg = _scores(negatives, "impostor scores")
    if neg.size < 2:
        raise ValueError("far_threshold needs at least 2 impostor scores")
    fps, _, thresholds = _operating_points(np.zeros(neg.size, np.int8), neg)
    return _far_threshold_from_points(fps, thresholds, far_value)


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
    return _rates_at(neg, pos, threshold)


def _rates_at(neg: np.ndarray, pos: np.ndarray, threshold: float) -> tuple[float, float]:
    return (int(np.count_nonzero(neg >= threshold)) / neg.size,
            int(np.count_nonzero(pos < threshold)) / pos.size)


def tar_at_fmr_bob(negatives, positives, targets=FMR_TARGETS) -> dict[float, dict]:
    """bob.measure convention for each target: threshold, FMR, FNMR and TAR = 1 - FNMR."""
    neg = _scores(negatives, "impostor scores")
    pos = _scores(positives, "genuine scores")
    fps, _, thresholds = _operating_points(np.zeros(neg.size, np.int8), neg)
    return _bob_points(lambda thr: _rates_at(neg, pos, thr), fps, thresholds, targets)


def _bob_points(rates, fps, thresholds, targets) -> dict[float, dict]:
    """``rates(threshold) -> (FMR, FNMR)`` counted as bob.measure.farfrr counts them."""
    out = {}
    for t in targets:
        thr = _far_threshold_from_points(fps, thresholds, t)
        far, frr = rates(thr)
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

    Here a state is named by the run k (decreasing scores) about to be passed: it has passed
    every score below thresholds[k], i.e. n - fps[k] impostors and m - tps[k] genuine scores;
    k = -1 is the state after everything.
    """
    n_neg, n_pos = int(fps[-1]), int(tps[-1])
    if n_neg == 0 or n_pos == 0:
        raise ValueError("eer_threshold needs both impostor and genuine scores")
    size = int(fps.size)
    # bob stops once the highest impostor or the highest genuine score has been passed.
    last_step = max(int(np.searchsorted(fps, 0, side="right")),
                    int(np.searchsorted(tps, 0, side="right")))
    far = np.full(n_neg + 1, 1.0 / n_neg)
    far[0] = 1.0
    np.subtract.accumulate(far, out=far)      # FMR after passing c impostors
    frr = np.full(n_pos + 1, 1.0 / n_pos)
    frr[0] = 0.0
    np.add.accumulate(frr, out=frr)           # FNMR after passing c genuine scores
    # Indexed by what is still ahead (fps, tps) instead of what was passed: reversed views.
    far_ahead, frr_ahead = far[::-1], frr[::-1]
    # The later step (lower k) wins ties: the first of equal minima, over blocks in k order
    # (a block is replaced only by a strictly smaller value) to keep temporaries small.
    best, best_pred = -2, np.inf
    for lo in range(last_step, size, 1 << 20):
        hi = min(lo + (1 << 20), size)
        pred = far_ahead[fps[lo:hi]]
        pred -= frr_ahead[tps[lo:hi]]
        np.abs(pred, out=pred)
        i = int(np.argmin(pred))
        if pred[i] < best_pred:
            best, best_pred = lo + i, pred[i]
    if last_step > 0:
        after = abs(far_ahead[fps[last_step - 1]] - frr_ahead[tps[last_step - 1]])
    else:
        after = abs(far[n_neg] - frr[n_pos])
    if after < best_pred:
        best = last_step - 1
    if best == size - 1:
        return float(thresholds[size - 1])   # the lowest score, where bob starts
    if best == -1:
        return float(thresholds[0])          # both classes used up: the last value passed
    return float((thresholds[best + 1] + thresholds[best]) / 2)


def _stack(negatives, positives):
    neg = _scores(negatives, "impostor scores")
    pos = _scores(positives, "genuine scores")
    if neg.size == 0 or pos.size == 0:
        raise ValueError("the EER needs both impostor and genuine scores")
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


def _envelope_on_grid(fps, tps, grid) -> np.ndarray:
    """``roc_on_grid`` of the full curve, from operating points without building the curve."""
    n_imp, n_gen = int(fps[-1]), int(tps[-1])
    out = np.zeros(len(grid))
    for i, g in enumerate(np.asarray(grid, dtype=np.float64)):
        k = int(np.searchsorted(fps, _count_at_most(n_imp, g), side="right"))
        out[i] = tps[k - 1] / n_gen if k > 0 else 0.0
    return out


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
    dropped = _curve(*points, drop_intermediate=True)
    pos = scores[labels != 0]
    n_neg = scores.size - pos.size

    def rates(thr: float) -> tuple[float, float]:
        # bob.measure.farfrr's counts; impostors >= t as all scores >= t less the genuine
        # ones, so the 15 M impostor scores of IJB-C need no copy of their own.
        pos_ge = int(np.count_nonzero(pos >= thr))
        neg_ge = int(np.count_nonzero(scores >= thr)) - pos_ge
        return neg_ge / n_neg, (pos.size - pos_ge) / pos.size

    # The impostor runs of the joint sort are those bob.measure's sort of the impostors gives.
    bob = _bob_points(rates, points[0], points[2], targets)
    eer_thr = _eer_threshold_from_points(*points)
    far, frr = rates(eer_thr)
    nearest = {}
    for t in targets:
        i = nearest_point_index(dropped, t)
        nearest[fmr_key(t)] = {"roc_index": i, "fmr": float(dropped.fpr[i]),
                               "tar": float(dropped.tpr[i]),
                               "threshold": _finite_or_none(dropped.thresholds[i])}
    doc = {
        "n_pairs": int(labels.size),
        "n_genuine": dropped.n_genuine,
        "n_impostor": dropped.n_impostor,
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
        "roc": {"fpr": ROC_GRID.tolist(),
                "tpr": _envelope_on_grid(points[0], points[1], ROC_GRID).tolist(),
                "kind": "upper envelope on a log grid (for plots)"},
    }
    return (doc, dropped) if return_curve else doc


def fmr_key(target: float) -> str:
    return f"{target:.0e}"


__all__ = ["FMR_TARGETS", "CONVENTIONS", "RocCurve", "roc_curve", "auc", "nearest_point_index",
           "tar_at_fmr_nearest", "far_threshold", "farfrr", "tar_at_fmr_bob", "EqualErrorRate",
           "eer_threshold", "eer", "roc_on_grid", "ROC_GRID", "evaluate_scores", "fmr_key"]
