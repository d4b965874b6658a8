"""Dataset-quality statistics: how far one image set's style is from another's, and how much of
an image's content a translation kept.

Images are uint8 RGB frames, (N, H, W, 3) as numpy arrays or torch tensors (what decoders give
and what ``rtkit.runtime.gpu_image.to_uint8_nhwc`` makes of a model's output), so the numbers
do not depend on any model's value range or channel order.

- ``style_statistics``: per image, the channel means and standard deviations, the mean HSV
  saturation and the mean |Laplacian| of luma (a high-frequency measure), on the 0-255 scale.
- ``style_distance(a, b)``: the domain gap of two sets, the mean absolute difference of their
  average statistics (0 when colour and frequency statistics agree). It compares set averages,
  so it needs sets of some size: with 4 identities x 4 images two sets of the SAME style differ
  by 11-15 on the sample world (as much as the render/photo gap, 14), with 64 faces by 1.2-1.9
  against a render/photo gap of 9.3.
- ``texture_statistics``: per image, statistics of luma that see texture rather than colour:
  the variance of its Laplacian (high-frequency energy), the mean local contrast (standard
  deviation in 5x5 windows), the mean fine contrast (the same of luma minus its Gaussian blur
  at sigma 1: noise, pores, grain) and the 4-pixel blockiness (mean |step| across every 4th
  pixel boundary over the mean |step| across the others; 1 without a 4x4 grid).
- ``texture_gaps(a, b)``: those statistics' set-average differences, one number each.
- ``content_correlation(a, b)``: per image pair, the Pearson correlation of luma: a translation
  that kept the face correlates with its source far more than with another image.
"""
from __future__ import annotations

import cv2
import numpy as np

STYLE_FEATURES = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "saturation", "high_freq")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)


def _frames(images) -> np.ndarray:
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().cpu().numpy()
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB frames (N, H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


def style_statistics(images) -> np.ndarray:
    """(N, 8) float64 statistics of uint8 RGB frames, in ``STYLE_FEATURES`` order (0-255 scale)."""
    x = _frames(images).astype(np.float32)
    n = x.shape[0]
    flat = x.reshape(n, -1, 3)
    mean = flat.mean(axis=1)
    std = flat.std(axis=1, ddof=1)
    mx, mn = x.max(axis=3), x.min(axis=3)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0).mean(axis=(1, 2)) * 255
    luma = x @ _LUMA
    hf = np.array([np.abs(cv2.filter2D(l, -1, _LAPLACIAN, borderType=cv2.BORDER_REPLICATE)).mean()
                   for l in luma])
    return np.concatenate([mean, std, sat[:, None], hf[:, None]], axis=1).astype(np.float64)


def style_distance(a, b) -> float:
    """Domain gap between two image sets: mean |difference| of their average style statistics."""
    return float(np.abs(style_statistics(a).mean(0) - style_statistics(b).mean(0)).mean())


TEXTURE_FEATURES = ("laplacian_var", "local_contrast", "fine_contrast", "blockiness4")


def _local_std(luma: np.ndarray, k: int) -> np.ndarray:
    m = cv2.blur(luma, (k, k), borderType=cv2.BORDER_REFLECT)
    m2 = cv2.blur(luma * luma, (k, k), borderType=cv2.BORDER_REFLECT)
    return np.sqrt(np.maximum(m2 - m * m, 0.0))


def _blockiness(luma: np.ndarray, period: int = 4) -> float:
    steps = [np.abs(np.diff(luma, axis=1)), np.abs(np.diff(luma, axis=0)).T]
    on = np.mean([s[:, period - 1::period].mean() for s in steps])
    off = np.mean([np.delete(s, np.s_[period - 1::period], axis=1).mean() for s in steps])
    return float(on / max(off, 1e-6))


def texture_statistics(images) -> np.ndarray:
    """(N, 4) float64 texture statistics of uint8 RGB frames, in ``TEXTURE_FEATURES`` order.

    Luma on the 0-255 scale: Laplacian variance, mean 5x5 local standard deviation, mean 5x5
    local standard deviation of luma minus its Gaussian blur (sigma 1), 4-pixel blockiness."""
    x = _frames(images).astype(np.float32)
    rows = []
    for l in x @ _LUMA:
        lap = cv2.filter2D(l, -1, _LAPLACIAN, borderType=cv2.BORDER_REPLICATE)
        fine = l - cv2.GaussianBlur(l, (0, 0), 1.0, borderType=cv2.BORDER_REFLECT)
        rows.append((lap.var(), _local_std(l, 5).mean(), _local_std(fine, 5).mean(), _blockiness(l)))
    return np.array(rows, np.float64)


def texture_gaps(a, b) -> dict[str, float]:
    """|difference| of the set averages of each texture statistic of ``a`` and ``b``."""
    d = np.abs(texture_statistics(a).mean(0) - texture_statistics(b).mean(0))
    return {k: float(v) for k, v in zip(TEXTURE_FEATURES, d)}


def content_correlation(a, b) -> np.ndarray:
    """(N,) Pearson correlation of the luma of aligned frame pairs (same sizes)."""
    la = (_frames(a).astype(np.float32) @ _LUMA).reshape(len(a), -1)
    lb = (_frames(b).astype(np.float32) @ _LUMA).reshape(len(b), -1)
    la = la - la.mean(axis=1, keepdims=True)
    lb = lb - lb.mean(axis=1, keepdims=True)
    den = np.maximum(np.linalg.norm(la, axis=1) * np.linalg.norm(lb, axis=1), 1e-8)
    return (la * lb).sum(axis=1) / den


__all__ = ["STYLE_FEATURES", "style_statistics", "style_distance", "TEXTURE_FEATURES", "texture_statistics",
           "texture_gaps", "content_correlation"]
