"""Face alignment templates and batched similarity warps between them (torch, CPU or GPU).

DigiFace crops are ArcFace-aligned at 112x112; CodeFormer was trained on FFHQ-aligned 512x512
crops, where the face is smaller (eye distance 0.246 of the width against 0.315, mouth at 0.72
of the height against 0.82). A plain resize of a DigiFace crop shows CodeFormer a face about
28% too large, so the converter can instead re-warp between the templates with the least-squares
similarity transform and warp the result back.

Conventions: a 2x3 ``matrix`` maps source pixel coordinates (x, y) to destination pixel
coordinates, as ``cv2.warpAffine`` reads it; integer coordinates are pixel centres. Images are
NCHW tensors; warps run through ``affine_grid``/``grid_sample`` so whole batches go at once, on
whatever device the images are on.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# insightface's 5-point ArcFace template (left eye, right eye, nose tip, left and right mouth
# corner) for 112x112 crops.
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)

# The 5-point FFHQ template facexlib / CodeFormer's face helper warps to at 512x512.
FFHQ_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                     [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float64)

TEMPLATES = {"arcface112": (ARCFACE_112, 112), "ffhq512": (FFHQ_512, 512)}

# Fill of the official face helper's constant border (BGR 135,133,132 as RGB), in [-1, 1].
OFFICIAL_GRAY = tuple(v / 127.5 - 1.0 for v in (132, 133, 135))

PADDING_MODES = ("reflection", "border", "zeros", "gray")


def template_points(alignment: str, size: int | None = None) -> np.ndarray:
    """The 5 landmarks (x, y) of ``alignment`` for a square crop of ``size`` pixels."""
    if alignment not in TEMPLATES:
        raise ValueError(f"unknown alignment {alignment!r}; known: {', '.join(TEMPLATES)}")
    points, native = TEMPLATES[alignment]
    return points * ((size or native) / native)


def similarity_transform(src_pts, dst_pts) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) src -> dst.

    Umeyama's closed form. ``src_pts``/``dst_pts``: (N, 2), or (B, N, 2) for one transform per
    sample. Returns a (2, 3) matrix, or (B, 2, 3).
    """
    src = np.asarray(src_pts, dtype=np.float64)
    dst = np.asarray(dst_pts, dtype=np.float64)
    if src.shape != dst.shape or src.shape[-1] != 2 or src.shape[-2] < 2:
        raise ValueError(f"need matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    single = src.ndim == 2
    if single:
        src, dst = src[None], dst[None]
    mu_src, mu_dst = src.mean(1, keepdims=True), dst.mean(1, keepdims=True)
    src_c, dst_c = src - mu_src, dst - mu_dst
    n = src.shape[1]
    cov = np.einsum("bni,bnj->bij", dst_c, src_c) / n
    u, s, vt = np.linalg.svd(cov)
    # Flip the weakest axis when the best orthogonal fit would be a reflection.
    d = np.ones_like(s)
    d[:, -1] = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    d[d == 0] = 1.0
    rot = u @ (d[:, :, None] * vt)
    src_var = (src_c ** 2).sum(axis=(1, 2)) / n
    scale = (s * d).sum(1) / src_var
    shift = mu_dst[:, 0] - scale[:, None] * np.einsum("bij,bj->bi", rot, mu_src[:, 0])
    matrix = np.concatenate([scale[:, None, None] * rot, shift[:, :, None]], axis=2)
    return matrix[0] if single else matrix


def apply_transform(matrix, points) -> np.ndarray:
    """Map (N, 2) points through a (2, 3) matrix."""
    m = np.asarray(matrix, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    return p @ m[:2, :2].T + m[:2, 2]


def invert_affine(matrix):
    """Inverse of a (2, 3) or (B, 2, 3) affine matrix, numpy or torch (kept as given)."""
    is_torch = isinstance(matrix, torch.Tensor)
    m = matrix.detach().cpu().double().numpy() if is_torch else np.asarray(matrix, np.float64)
    a, t = m[..., :2, :2], m[..., :2, 2:]
    a_inv = np.linalg.inv(a)
    inv = np.concatenate([a_inv, -a_inv @ t], axis=-1)
    return torch.as_tensor(inv, dtype=matrix.dtype, device=matrix.device) if is_torch else inv


def template_transform(src_alignment: str, src_size: int, dst_alignment: str, dst_size: int) -> np.ndarray:
    """The similarity matrix taking a ``src_alignment`` crop to a ``dst_alignment`` crop."""
    return similarity_transform(template_points(src_alignment, src_size),
                                template_points(dst_alignment, dst_size))


def _size2(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _as_batch_matrix(matrix) -> np.ndarray:
    m = matrix.detach().cpu().double().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix, np.float64)
    if m.shape[-2:] != (2, 3) or m.ndim not in (2, 3):
        raise ValueError(f"matrix must be (2, 3) or (B, 2, 3), got {m.shape}")
    return m[None] if m.ndim == 2 else m


def affine_theta(matrix, src_size, out_size) -> np.ndarray:
    """``affine_grid`` thetas (B, 2, 3) for pixel-space matrices (align_corners=False).

    theta maps normalised output coordinates to normalised source coordinates, so it composes
    output-normalised -> output pixels, the inverse warp, and source pixels -> source-normalised.
    """
    m = _as_batch_matrix(matrix)
    (src_h, src_w), (out_h, out_w) = _size2(src_size), _size2(out_size)
    inv = np.concatenate([_as_batch_matrix(invert_affine(m)), np.tile([[[0.0, 0.0, 1.0]]], (len(m), 1, 1))], 1)
    out_from_norm = np.array([[out_w / 2, 0, (out_w - 1) / 2], [0, out_h / 2, (out_h - 1) / 2], [0, 0, 1]])
    norm_from_src = np.array([[2 / src_w, 0, 1 / src_w - 1], [0, 2 / src_h, 1 / src_h - 1], [0, 0, 1]])
    return (norm_from_src @ inv @ out_from_norm)[:, :2]


def sampling_grid(matrix, src_size, out_size, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``grid_sample`` grid (B, H, W, 2) realising a pixel-space matrix."""
    out_h, out_w = _size2(out_size)
    theta = torch.as_tensor(affine_theta(matrix, src_size, out_size), dtype=torch.float64)
    # Built in float64 then cast, so fp16 runs lose only the final rounding of the coordinates.
    grid = F.affine_grid(theta, [theta.shape[0], 1, out_h, out_w], align_corners=False)
    return grid.to(device=device, dtype=dtype)


def antialias_sigma(matrix) -> np.ndarray:
    """Gaussian sigma (source pixels) to blur with before a warp that shrinks, per matrix."""
    m = _as_batch_matrix(matrix)
    scale = np.sqrt(np.abs(np.linalg.det(m[:, :2, :2])))
    shrink = 1.0 / np.maximum(scale, 1e-12)
    # skimage's choice for downscaling; zero when enlarging.
    return np.maximum((shrink - 1.0) / 2.0, 0.0)


def gaussian_kernel1d(sigma: float, *, dtype=torch.float32, device=None) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def separable_kernels(kernel1d: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise conv weights (C, 1, 1, K) and (C, 1, K, 1) of a 1-D kernel."""
    k = kernel1d.numel()
    return (kernel1d.reshape(1, 1, 1, k).repeat(channels, 1, 1, 1),
            kernel1d.reshape(1, 1, k, 1).repeat(channels, 1, 1, 1))


def blur_separable(images: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """Depthwise blur by the kernels of ``separable_kernels`` with reflect padding."""
    c, r = images.shape[1], kx.shape[-1] // 2
    mode = "reflect" if min(images.shape[-2:]) > r else "replicate"
    x = F.conv2d(F.pad(images, (r, r, 0, 0), mode=mode), kx, groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), ky, groups=c)


def blur_batch(images: torch.Tensor, kernel1d: torch.Tensor) -> torch.Tensor:
    """Separable depthwise Gaussian (or any 1-D kernel) blur with reflect padding."""
    return blur_separable(images, *separable_kernels(kernel1d, images.shape[1]))


def _sample(images, grid, padding_mode, interpolation, fill):
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if padding_mode == "gray":
        # A constant border: sample the offset image with zero padding, then add the offset back.
        offset = torch.as_tensor(fill, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return F.grid_sample(images - offset, grid, mode=interpolation, padding_mode="zeros",
                             align_corners=False) + offset
    return F.grid_sample(images, grid, mode=interpolation, padding_mode=padding_mode, align_corners=False)


def warp_batch(images: torch.Tensor, matrix, out_size, *, padding_mode: str = "reflection",
               interpolation: str = "bilinear", antialias: bool = True,
               fill: Sequence[float] = OFFICIAL_GRAY) -> torch.Tensor:
    """Warp NCHW ``images`` by ``matrix`` ((2, 3) for all, or (B, 2, 3)) to ``out_size``.

    ``padding_mode``: what fills pixels that fall outside the source: "reflection", "border"
    (replicate), "zeros", or "gray" (the official face helper's constant gray, ``fill``).
    ``antialias`` blurs the source first when the warp shrinks it, so downscaling does not alias.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be NCHW, got shape {tuple(images.shape)}")
    m = _as_batch_matrix(matrix)
    if len(m) not in (1, images.shape[0]):
        raise ValueError(f"{len(m)} matrices for a batch of {images.shape[0]}")
    src = images
    if antialias:
        sigmas = np.round(antialias_sigma(m), 2)
        if len(m) == 1 or np.all(sigmas == sigmas[0]):
            if sigmas[0] > 0:
                src = blur_batch(images, gaussian_kernel1d(float(sigmas[0]), dtype=images.dtype,
                                                           device=images.device))
        else:
            src = images.clone()
            for s in np.unique(sigmas[sigmas > 0]):
                idx = torch.as_tensor(np.nonzero(sigmas == s)[0], device=images.device)
                k = gaussian_kernel1d(float(s), dtype=images.dtype, device=images.device)
                src[idx] = blur_batch(images[idx], k)
    grid = sampling_grid(m, images.shape[-2:], out_size, device=images.device, dtype=images.dtype)
    if grid.shape[0] == 1 and images.shape[0] > 1:
        grid = grid.expand(images.shape[0], -1, -1, -1)
    return _sample(src, grid, padding_mode, interpolation, fill)


def inverse_warp_batch(images: torch.Tensor, matrix, out_size, **kwargs) -> torch.Tensor:
    """Undo ``warp_batch(x, matrix, ...)``: warp by the inverse matrix back to ``out_size``."""
    return warp_batch(images, invert_affine(_as_batch_matrix(matrix)), out_size, **kwargs)


def resize_batch(images: torch.Tensor, out_size, *, antialias: bool = True) -> torch.Tensor:
    """Plain bilinear resize (the "resize" policy), antialiased when shrinking."""
    return F.interpolate(images, size=_size2(out_size), mode="bilinear", align_corners=False,
                         antialias=antialias)


def arcface112_to_ffhq512(batch: torch.Tensor, out_size: int = 512, **kwargs) -> torch.Tensor:
    """ArcFace-aligned square crops (any size, 112 for DigiFace) -> FFHQ-aligned ``out_size`` crops."""
    m = template_transform("arcface112", batch.shape[-1], "ffhq512", out_size)
    return warp_batch(batch, m, out_size, **kwargs)


def ffhq512_to_arcface112(batch: torch.Tensor, out_size: int = 112, **kwargs) -> torch.Tensor:
    """FFHQ-aligned square crops (any size, 512 for CodeFormer) -> ArcFace-aligned ``out_size`` crops.

    Uses the exact inverse of ``arcface112_to_ffhq512``'s matrix (a least-squares fit in the
    other direction would differ slightly, as the templates are not exactly similar), so a
    restored face warped back lies exactly over its source.
    """
    m = invert_affine(template_transform("arcface112", out_size, "ffhq512", batch.shape[-1]))
    return warp_batch(batch, m, out_size, **kwargs)


class AffineWarp(nn.Module):
    """A fixed warp between two sizes as a module: precomputed grid and blur kernel.

    Both are non-persistent buffers: they follow ``.to(device, dtype)`` but never appear in a
    state_dict, so a model wrapping official weights with warps still loads them strictly. With
    constant tensors only, the warp exports to ONNX (GridSample, opset >= 16).
    """

    def __init__(self, matrix, src_size, out_size, *, padding_mode: str = "reflection",
                 interpolation: str = "bilinear", antialias: bool = True,
                 fill: Sequence[float] = OFFICIAL_GRAY, channels: int = 3):
        super().__init__()
        m = _as_batch_matrix(matrix)
        if len(m) != 1:
            raise ValueError("AffineWarp takes one (2, 3) matrix")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.src_size, self.out_size = _size2(src_size), _size2(out_size)
        self.padding_mode, self.interpolation = padding_mode, interpolation
        self.fill = tuple(float(v) for v in fill)
        self.register_buffer("grid", sampling_grid(m, self.src_size, self.out_size), persistent=False)
        sigma = float(np.round(antialias_sigma(m)[0], 2)) if antialias else 0.0
        # Stored at full depthwise shape: a traced conv needs a weight of known shape.
        kx, ky = separable_kernels(gaussian_kernel1d(sigma), channels) if sigma > 0 else (None, None)
        self.register_buffer("blur_x", kx, persistent=False)
        self.register_buffer("blur_y", ky, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and tuple(images.shape[-2:]) != self.src_size:
            raise ValueError(f"warp expects {self.src_size[0]}x{self.src_size[1]} inputs, "
                             f"got {images.shape[-2]}x{images.shape[-1]}")
        if self.blur_x is not None:
            images = blur_separable(images, self.blur_x, self.blur_y)
        grid = self.grid.expand(images.shape[0], -1, -1, -1)
        return _sample(images, grid, self.padding_mode, self.interpolation, self.fill)


__all__ = [
    "ARCFACE_112",
    "FFHQ_512",
    "OFFICIAL_GRAY",
    "TEMPLATES",
    "AffineWarp",
    "affine_theta",
    "antialias_sigma",
    "apply_transform",
    "arcface112_to_ffhq512",
    "blur_batch",
    "blur_separable",
    "ffhq512_to_arcface112",
    "gaussian_kernel1d",
    "inverse_warp_batch",
    "invert_affine",
    "resize_batch",
    "sampling_grid",
    "separable_kernels",
    "similarity_transform",
    "template_points",
    "template_transform",
    "warp_batch",
]
