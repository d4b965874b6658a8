"""The image contract in batched torch: uint8 NHWC frames <-> model tensors, on CPU or CUDA.

The same code runs on the GPU (copy only uint8 frames in and out: 4x less than float32) and on
CPU in the tests, and it reproduces the OpenCV path of the converter (``preprocess``,
``to_uint8_hwc``, ``restore_geometry``) to within one 8-bit level (tests/test_gpu_image.py
measures it on sample faces). To get there it mirrors what OpenCV actually computes:

- ``cv2.resize`` is separable: each output pixel of an axis is a weighted sum of a few source
  pixels. The weights are rebuilt here per axis exactly as OpenCV derives them for INTER_LINEAR
  (enlarging), INTER_AREA when both axes shrink (true pixel-area weights; a box average for
  integer factors) and INTER_AREA when one axis grows (OpenCV's area-flavoured 2-tap weights), and
  applied as a few gathers (not matmuls, which TF32 may round).
- ``cv2.warpAffine`` ignores INTER_AREA (it is bilinear either way, also when shrinking), rounds
  every source coordinate to 1/32 pixel and reflects outside the image with BORDER_REFLECT_101.
  The sampling grid here does the same (without the 1/32 rounding outputs differ by up to 5
  levels at edges), and ``grid_sample`` interpolates it.
- OpenCV resizes and warps uint8 images, so results are rounded back to 8-bit levels where the
  OpenCV path holds a uint8 image.
Remaining differences are OpenCV's fixed-point bilinear weights and float ties: at most one level
on a few percent of pixels.

Frames are uint8 NHWC RGB, all of one size per call (a batch holds one shape); model tensors are
NCHW in the spec's range, channel order and dtype. This is the GPU path: on CPU the OpenCV
functions stay faster for resizes (measured on one core: 256->112 restore 7.2 ms/img here, 1.0 ms
in OpenCV; the FFHQ-512 warp is on a par), so CPU executors keep runtime/image.py.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from rtkit.engines.align import template_transform
from rtkit.engines.spec import ModelSpec

from rtkit.runtime.image import SOURCE_ALIGNMENT, model_input_size

__all__ = ["as_frames", "preprocess_batch", "to_uint8_nhwc", "restore_geometry_batch",
           "postprocess_batch", "resize_batch_u8", "warp_batch_u8", "resize_mode", "model_input_size"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def as_frames(images, device="cpu", *, pin: bool = True) -> torch.Tensor:
    """A uint8 NHWC tensor on ``device`` from an NHWC array, a list of HxWx3 arrays (one size)
    or a tensor. Host memory is pinned before a copy to CUDA so the copy can overlap compute."""
    device = torch.device(device)
    if isinstance(images, torch.Tensor):
        t = images
    elif isinstance(images, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(images))
    else:
        t = torch.from_numpy(np.stack(images))
    if t.ndim == 3:
        t = t[None]
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 NHWC with 3 channels, got {t.dtype} {tuple(t.shape)}")
    if device.type == "cuda" and t.device.type == "cpu":
        if pin and not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)


# -- resize: OpenCV's per-axis weights -------------------------------------------------------

def resize_mode(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> str | None:
    """Which OpenCV weights the converter's resize uses: None (same size), "linear" (enlarging:
    INTER_LINEAR), "area" (INTER_AREA with both axes shrinking) or "area_mixed" (INTER_AREA with
    one axis growing, where OpenCV falls back to 2-tap weights of its own)."""
    (h, w), (oh, ow) = src_hw, dst_hw
    if (h, w) == (oh, ow):
        return None
    if not (oh < h or ow < w):  # the converter picks INTER_AREA as soon as one axis shrinks
        return "linear"
    return "area" if oh <= h and ow <= w else "area_mixed"


@functools.lru_cache(maxsize=256)
def _axis_taps(src: int, dst: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(index, weight) arrays of shape (dst, K): output i = sum_k weight[i, k] * input[index[i, k]]."""
    # OpenCV's own arithmetic: scale is the reciprocal of dst/src (112->100 gives 1.1199999...,
    # which moves a tap), fractions are rounded to float32.
    inv = dst / src
    scale = 1.0 / inv
    f32 = np.float32
    rows = []
    for d in range(dst):
        if mode == "area":  # overlap of the output cell [d, d+1) * scale with each source pixel
            f1 = d * scale
            f2 = f1 + scale
            cell = min(scale, src - f1)
            s2 = min(math.floor(f2), src - 1)
            s1 = min(math.ceil(f1), s2)
            taps = []
            if s1 - f1 > 1e-3:
                taps.append((s1 - 1, (s1 - f1) / cell))
            taps += [(s, 1.0 / cell) for s in range(s1, s2)]
            if f2 - s2 > 1e-3:
                taps.append((s2, min(f2 - s2, 1.0, cell) / cell))
        else:
            if mode == "linear":  # pixel centres: half-pixel offsets
                f = f32((d + 0.5) * scale - 0.5)
                s = math.floor(f)
                f = float(f - f32(s))
            else:  # "area_mixed"
                s = math.floor(d * scale)
                f = f32((d + 1) - (s + 1) * inv)
                f = 0.0 if f <= 0 else float(f - f32(math.floor(f)))
            if s < 0:
                s, f = 0, 0.0
            if s >= src - 1:
                s, f = src - 1, 0.0
            taps = [(s, 1.0 - f), (min(s + 1, src - 1), f)]
        rows.append(taps)
    k = max(len(t) for t in rows)
    index = np.zeros((dst, k), np.int64)
    weight = np.zeros((dst, k), np.float32)
    for d, taps in enumerate(rows):
        for j, (s, v) in enumerate(taps):
            index[d, j], weight[d, j] = s, v
    return index, weight


@functools.lru_cache(maxsize=256)
def _axis_taps_on(src: int, dst: int, mode: str, device: torch.device):
    index, weight = _axis_taps(src, dst, mode)
    return torch.from_numpy(index).to(device), torch.from_numpy(weight).to(device)


def _resample_axis(x: torch.Tensor, dim: int, dst: int, mode: str) -> torch.Tensor:
    src = x.shape[dim]
    if src == dst and mode != "area_mixed":
        return x
    index, weight = _axis_taps_on(src, dst, mode, x.device)
    shape = [1] * x.ndim
    shape[dim] = dst
    out = None
    for k in range(index.shape[1]):
        term = x.index_select(dim, index[:, k]) * weight[:, k].view(shape)
        out = term if out is None else out.add_(term)
    return out


def _round_u8(x: torch.Tensor) -> torch.Tensor:
    """To the nearest 8-bit level (halves up, as OpenCV's fixed-point kernels round), in float."""
    return torch.floor_(x.add_(0.5)).clamp_(0, 255)


def resize_batch_u8(x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Resize float NCHW holding 0..255 values as the converter's ``cv2.resize`` does, rounded
    to 8-bit levels (INTER_AREA when shrinking, which antialiases; INTER_LINEAR when enlarging)."""
    mode = resize_mode(tuple(x.shape[-2:]), tuple(out_hw))
    if mode is None:
        return x
    x = _resample_axis(x.float(), -1, out_hw[1], mode)  # OpenCV filters rows first
    return _round_u8(_resample_axis(x, -2, out_hw[0], mode))


# -- template warp: cv2.warpAffine's sampling -------------------------------------------------

def _reflect101(v: np.ndarray, n: int) -> np.ndarray:
    """BORDER_REFLECT_101 (…dcb|abcd|cba…) on continuous coordinates: for bilinear taps,
    reflecting the coordinate about the first and last pixel centres equals reflecting each tap."""
    if n == 1:
        return np.zeros_like(v)
    period = 2 * (n - 1)
    v = np.mod(v, period)
    return np.where(v > n - 1, period - v, v)


@functools.lru_cache(maxsize=64)
def _warp_grid(src_alignment: str, dst_alignment: str, src_hw: tuple[int, int],
               out_hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The (1, H, W, 2) ``grid_sample`` grid (align_corners=True) of the converter's warp."""
    m = template_transform(src_alignment, src_hw[0], dst_alignment, out_hw[0])
    a, t = m[:, :2], m[:, 2]
    inv_a = np.linalg.inv(a)
    inv = np.concatenate([inv_a, (-inv_a @ t)[:, None]], 1)  # output pixel -> source pixel
    xs = np.arange(out_hw[1], dtype=np.float64)
    ys = np.arange(out_hw[0], dtype=np.float64)

    def coord(row):  # warpAffine: terms in 1/1024 pixel, then rounded to 1/32 pixel
        fixed = np.rint(row[0] * xs * 1024)[None, :] + np.rint((row[1] * ys + row[2]) * 1024)[:, None]
        return np.floor((fixed + 16) / 32) / 32

    gx = _reflect101(coord(inv[0]), src_hw[1])
    gy = _reflect101(coord(inv[1]), src_hw[0])
    grid = np.stack([gx * 2 / max(src_hw[1] - 1, 1) - 1, gy * 2 / max(src_hw[0] - 1, 1) - 1], -1)
    return torch.from_numpy(grid[None]).to(device=device, dtype=torch.float32)


def warp_batch_u8(x: torch.Tensor, src_alignment: str, dst_alignment: str,
                  out_hw: tuple[int, int]) -> torch.Tensor:
    """Similarity warp of float NCHW (0..255 values) between alignment templates, as the
    converter's ``cv2.warpAffine`` does it (bilinear, BORDER_REFLECT_101), rounded to 8-bit levels."""
    grid = _warp_grid(src_alignment, dst_alignment, tuple(x.shape[-2:]), tuple(out_hw), x.device)
    y = F.grid_sample(x.float(), grid.expand(x.shape[0], -1, -1, -1), mode="bilinear",
                      padding_mode="border", align_corners=True)
    return _round_u8(y)


def _warps(spec: ModelSpec) -> bool:
    return spec.resize == "warp" and spec.alignment != SOURCE_ALIGNMENT


# -- the contract ----------------------------------------------------------------------------

def preprocess_batch(frames: torch.Tensor, spec: ModelSpec, *, dtype: torch.dtype | str = torch.float32,
                     channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC RGB frames (one size) -> NCHW model input in the spec's size, channel order,
    range and ``dtype``, on the frames' device (the converter's ``preprocess``, batched).

    Raises the converter's DecodeError when a "native" engine gets frames of another size.
    """
    dtype = _DTYPES.get(dtype, dtype)
    n, h, w, _ = frames.shape
    hw = tuple(model_input_size(spec, h, w))
    x = frames.permute(0, 3, 1, 2)  # a view: NCHW with channels_last strides
    if _warps(spec):
        x = warp_batch_u8(x.float(), SOURCE_ALIGNMENT, spec.alignment, hw)
    elif hw != (h, w):
        x = resize_batch_u8(x.float(), hw)
    if spec.channels == "BGR":
        x = x.flip(1)
    lo, hi = spec.value_range
    # float32 arithmetic in the CPU path's order (x / 255, then the range), then one cast:
    # bit-identical fp32 inputs wherever the geometry matched.
    x = x.float()
    if (lo, hi) != (0.0, 255.0):
        x = x / 255.0
        if (lo, hi) != (0.0, 1.0):
            x = x.mul_(hi - lo).add_(lo)
    x = x.to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def to_uint8_nhwc(y: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """NCHW model output in the spec's range and channel order -> uint8 NHWC RGB, contiguous,
    on the output's device (the converter's ``to_uint8_hwc``: rounds half to even, saturates,
    NaN -> 0)."""
    lo, hi = spec.value_range
    scale = 255.0 / (hi - lo)
    v = y.float() * scale + (-lo * scale)
    if spec.channels == "BGR":
        v = v.flip(1)
    v = torch.nan_to_num_(v, nan=0.0).round_().clamp_(0, 255)
    return v.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def restore_geometry_batch(frames: torch.Tensor, spec: ModelSpec, out_hw: tuple[int, int]) -> torch.Tensor:
    """uint8 NHWC model-sized frames -> the source's frame at ``out_hw`` (the converter's
    ``restore_geometry``): the inverse template warp for "warp" engines, else a resize."""
    out_hw = tuple(int(v) for v in out_hw)
    x = frames.permute(0, 3, 1, 2)
    if _warps(spec):
        x = warp_batch_u8(x.float(), spec.alignment, SOURCE_ALIGNMENT, out_hw)
    elif tuple(frames.shape[1:3]) != out_hw:
        x = resize_batch_u8(x.float(), out_hw)
    else:
        return frames.contiguous()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def postprocess_batch(y: torch.Tensor, spec: ModelSpec, out_hw: tuple[int, int]) -> torch.Tensor:
    """NCHW model output -> uint8 NHWC RGB at ``out_hw``, on the output's device: copy only this."""
    return restore_geometry_batch(to_uint8_nhwc(y, spec), spec, out_hw)
