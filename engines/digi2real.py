"""Digi2Real: realistic faces of DigiFace identities through Arc2Face, the math and the face I/O.

Digi2Real (George & Marcel, 2024) keeps a DigiFace identity and regenerates it with Arc2Face:
a class prototype of the identity's ArcFace embeddings, intra-class variations by spherical
interpolation from the prototype toward each source image's embedding, and a "CLIP shift" Delta
added to the conditioning. The paper does not publish these values (shared/reference/arc2face.md
B2), so each is a parameter with the reading of B3 as default:

- prototype p = normalize(mean_i normalize(e_i)) over one identity's images;
- v_j = slerp(p, e_j, t_j) on the unit sphere, t_j fixed or drawn per output from a range
  (default [0, 0.3], the low end of B3's "[0, 0.3-0.5]": identity first);
- Delta = lambda * (mean over real images - mean over synthetic images) of the feature in the
  chosen space: "conditioning" (default: the (77, H) encoder output the UNet sees) or "id" (the
  normalised ArcFace vector before the encoder); lambda = 1 by default. Saved with its
  provenance as a small safetensors file.

Output frame. Arc2Face was trained on WebFace42M's ArcFace-aligned 112x112 crops upsampled 4x
(to 448) and rendered at 512 (reference A1), so we assume its 512 frame is the ArcFace-112
template scaled by 512/112; the fixed warp back to a 112 crop is then a uniform downscale
(``to_arcface112``). ``frame="ffhq512"`` assumes the FFHQ template instead (its fine-tuning
data); 5-point detection + alignment (``FaceDetector``, ``align_faces``) is the data-driven option.

ID embeddings (``embed_aligned``): any recognizer with ``.spec`` and ``.infer`` (rtkit runners,
``ArcFaceOnnx`` for a local insightface ArcFace ONNX such as Arc2Face's arcface.onnx) on
ArcFace-aligned crops; unaligned images go through ``FaceDetector`` first.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rtkit.engines.align import (resize_batch, similarity_transform, template_points, template_transform,
                                 warp_batch)
from rtkit.engines.errors import RtkitError, optional_import
from rtkit.engines.spec import ModelSpec

DEFAULT_T = (0.0, 0.3)
DELTA_SPACES = ("conditioning", "id")
DEFAULT_DELTA_SPACE = "conditioning"
DEFAULT_DELTA_SCALE = 1.0
GENERATOR_FRAME = "arcface112"
FRAMES = ("arcface112", "ffhq512")
DELTA_FORMAT = "rtkit-digi2real-delta"
DELTA_VERSION = 1
DET_SIZE = 256  # tight crops (DigiFace 112, FFHQ) are missed at insightface's 640 (reference A3)


class NoFaceError(RtkitError):
    """The detector found no face in an image that needed alignment."""


# ----------------------------------------------------------------------------------------------
# Prototype and SLERP


def normalize(x, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise along ``dim`` (numpy arrays come back as tensors)."""
    return F.normalize(torch.as_tensor(x), dim=dim, eps=eps)


def prototype(embeddings) -> torch.Tensor:
    """Class prototype (D,): normalize(mean_i normalize(e_i)) over (M, D) embeddings of one identity."""
    e = torch.as_tensor(embeddings)
    if e.ndim != 2 or e.shape[0] == 0:
        raise ValueError(f"need (M >= 1, D) embeddings, got {tuple(e.shape)}")
    return normalize(normalize(e).mean(0))


def slerp(p, e, t) -> torch.Tensor:
    """Spherical interpolation on the unit sphere from normalize(p) (t=0) to normalize(e) (t=1).

    p, e: (D,) or (N, D), broadcast against each other. t: a number, or a 1-D tensor broadcast
    over the leading dim (N values for N pairs, or T values for one pair: (T, D)). The endpoints
    are the normalised inputs exactly; the path stays on the sphere and the angle to p grows
    linearly in t. Nearly parallel pairs (sin of the angle < 1e-7) fall back to normalised lerp.
    """
    a, b = normalize(p), normalize(e)
    a, b = torch.broadcast_tensors(a, b)
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    if t.ndim > 1:
        raise ValueError(f"t must be a number or 1-D, got shape {tuple(t.shape)}")
    if t.ndim == 1:
        t = t[:, None]
        if a.ndim == 1:
            a, b = a.expand(t.shape[0], -1), b.expand(t.shape[0], -1)
    dot = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(dot)
    sin_omega = torch.sin(omega)
    near = sin_omega < 1e-7
    safe = torch.where(near, torch.ones_like(sin_omega), sin_omega)
    out = torch.sin((1 - t) * omega) / safe * a + torch.sin(t * omega) / safe * b
    lerp = normalize((1 - t) * a + t * b)
    return torch.where(near, lerp, out)


def draw_t(t: float | Sequence[float] = DEFAULT_T, seed: int = 0) -> float:
    """The SLERP weight of one output: ``t`` itself, or uniform in the range (lo, hi) from the
    output's own seed (so it never depends on batching, sharding or resume)."""
    if isinstance(t, (int, float)):
        return float(t)
    lo, hi = (float(v) for v in t)
    if not 0.0 <= lo <= hi <= 1.0:
        raise RtkitError(f"SLERP range must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")
    u = torch.rand((), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    return lo + (hi - lo) * float(u)


def variations(proto, embeddings, t: float | Sequence[float] = DEFAULT_T,
               seeds: Sequence[int] | None = None) -> torch.Tensor:
    """v_j = slerp(p, e_j, t_j) for (N, D) source embeddings; t_j = draw_t(t, seeds[j])."""
    e = torch.as_tensor(embeddings)
    seeds = list(seeds) if seeds is not None else list(range(e.shape[0]))
    if len(seeds) != e.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {e.shape[0]} embeddings")
    ts = torch.tensor([draw_t(t, s) for s in seeds], dtype=e.dtype)
    return slerp(torch.as_tensor(proto, dtype=e.dtype), e, ts)


# ----------------------------------------------------------------------------------------------
# Delta (the CLIP shift)


class MeanAccumulator:
    """Running float64 mean of feature batches (N, ...), for sets too large to hold at once."""

    def __init__(self):
        self.total, self.count = None, 0

    def add(self, batch) -> None:
        x = torch.as_tensor(batch).detach().to("cpu", torch.float64)
        s = x.sum(0)
        self.total = s if self.total is None else self.total + s
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        if not self.count:
            raise RtkitError("cannot average an empty image set")
        return self.total / self.count


def _mean_of(features) -> tuple[torch.Tensor, int]:
    acc = MeanAccumulator()
    if isinstance(features, (torch.Tensor, np.ndarray)):
        acc.add(features)
    else:
        for b in features:
            acc.add(b)
    return acc.mean(), acc.count


@dataclass
class Delta:
    """An offset in ``space`` ("conditioning": (77, H); "id": (D,)), applied as scale * vector."""

    vector: torch.Tensor
    space: str = DEFAULT_DELTA_SPACE
    scale: float = DEFAULT_DELTA_SCALE
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.space not in DELTA_SPACES:
            raise RtkitError(f"delta space must be one of {', '.join(DELTA_SPACES)}, got {self.space!r}")

    def applied(self) -> torch.Tensor:
        """scale * vector, float32 (what ``arc2face_loop(delta=...)`` adds for "conditioning")."""
        return (self.vector.double() * float(self.scale)).float()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x + scale * vector; in the "id" space the result is renormalised onto the sphere."""
        y = x + self.applied().to(x.device, x.dtype)
        return normalize(y) if self.space == "id" else y

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"format": DELTA_FORMAT, "version": str(DELTA_VERSION), "space": self.space,
                "scale": repr(float(self.scale)), "provenance": json.dumps(self.provenance, sort_keys=True)}
        save_file({"delta": self.vector.detach().float().contiguous().cpu()}, str(path), metadata=meta)
        return path


def compute_delta(real, synthetic, *, space: str = DEFAULT_DELTA_SPACE, scale: float = DEFAULT_DELTA_SCALE,
                  provenance: Mapping | None = None) -> Delta:
    """Delta = mean(real) - mean(synthetic) of features in ``space``: tensors (N, ...) or
    iterables of such batches (averaged in float64). ``provenance`` (sources, recognizer,
    generator, ...) is stored with it, plus both set sizes."""
    mr, nr = _mean_of(real)
    ms, ns = _mean_of(synthetic)
    if mr.shape != ms.shape:
        raise RtkitError(f"real and synthetic features differ in shape: {tuple(mr.shape)} vs {tuple(ms.shape)}")
    prov = {**dict(provenance or {}), "n_real": nr, "n_synthetic": ns}
    return Delta((mr - ms).float(), space=space, scale=float(scale), provenance=prov)


def delta_features(space: str, id_embeddings, encoder=None) -> torch.Tensor:
    """The features Delta averages: normalised ID vectors ("id"), or the encoder's conditioning
    of them ("conditioning"; ``encoder`` is the loop's encoder part)."""
    ids = normalize(torch.as_tensor(id_embeddings).float())
    if space == "id":
        return ids
    if space == "conditioning":
        if encoder is None:
            raise ValueError("the conditioning space needs the encoder part")
        out = encoder(ids)
        return torch.as_tensor(out[0] if isinstance(out, (tuple, list)) else out).float()
    raise RtkitError(f"delta space must be one of {', '.join(DELTA_SPACES)}, got {space!r}")


def load_delta(path: str | Path) -> Delta:
    """A Delta file written by ``Delta.save``; a missing or foreign file is one RtkitError."""
    path = Path(path)
    if not path.is_file():
        raise RtkitError(f"delta file not found: {path}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            vector = f.get_tensor("delta") if "delta" in f.keys() else None
    except Exception as e:  # safetensors raises its own error types for foreign files
        raise RtkitError(f"{path}: not a Delta file ({type(e).__name__})") from None
    if meta.get("format") != DELTA_FORMAT or vector is None:
        raise RtkitError(f"{path}: not a Delta file (written by rt-generate digi2real-delta)")
    if int(meta.get("version", "0")) > DELTA_VERSION:
        raise RtkitError(f"{path}: Delta format {meta['version']} is newer than this rtkit ({DELTA_VERSION})")
    return Delta(vector, space=meta.get("space", DEFAULT_DELTA_SPACE), scale=float(meta.get("scale", 1.0)),
                 provenance=json.loads(meta.get("provenance", "{}")))


# ----------------------------------------------------------------------------------------------
# Generator frame -> ArcFace-112 crops


def frame_transform(size: int, frame: str = GENERATOR_FRAME, out_size: int = 112) -> np.ndarray:
    """The (2, 3) similarity taking a ``size`` generator image in ``frame`` to an ArcFace crop."""
    if frame not in FRAMES:
        raise RtkitError(f"generator frame must be one of {', '.join(FRAMES)}, got {frame!r}")
    return template_transform(frame, size, "arcface112", out_size)


def to_arcface112(images: torch.Tensor, *, frame: str = GENERATOR_FRAME, out_size: int = 112,
                  padding_mode: str = "border") -> torch.Tensor:
    """Generator images (N, 3, S, S) -> ArcFace-aligned (N, 3, out_size, out_size) crops by the
    fixed similarity warp of ``frame_transform`` (antialiased, so the 512 -> 112 shrink does not alias)."""
    return warp_batch(images, frame_transform(images.shape[-1], frame, out_size), out_size,
                      padding_mode=padding_mode, antialias=True)


# ----------------------------------------------------------------------------------------------
# Detection + alignment (insightface, optional)


def _to_nchw(images, spec_range=(-1.0, 1.0)) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB, or float (N, 3, H, W) RGB in [-1, 1] -> float NCHW in ``spec_range``."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3) RGB, got {images.shape}")
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    else:
        x = torch.as_tensor(images).float()
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"float images must be (N, 3, H, W) RGB in [-1, 1], got {tuple(x.shape)}")
    lo, hi = spec_range
    return (x + 1.0) * ((hi - lo) / 2.0) + lo


class FaceDetector:
    """insightface's 5-point detector (SCRFD, e.g. antelopev2's scrfd_10g_bnkps.onnx) on CPU or GPU.

    ``det_size`` 256 by default: tight crops are missed at insightface's usual 640. The face with
    the largest box is kept, as the official demo does.
    """

    def __init__(self, path: str | Path, *, det_size: int = DET_SIZE, det_thresh: float = 0.5,
                 providers: Sequence[str] | None = None):
        path = Path(path)
        if not path.is_file():
            raise RtkitError(f"face detector not found: {path} (an insightface detector ONNX, e.g. "
                             f"antelopev2/scrfd_10g_bnkps.onnx)")
        zoo = optional_import("insightface.model_zoo", extra="gen", purpose="face detection",
                              package="insightface")
        self.model = zoo.get_model(str(path), providers=list(providers or ["CPUExecutionProvider"]))
        if self.model is None or getattr(self.model, "taskname", None) != "detection":
            raise RtkitError(f"{path} is not an insightface detection model")
        self.model.prepare(ctx_id=-1, det_thresh=float(det_thresh), input_size=(int(det_size), int(det_size)))

    def landmarks(self, image_rgb: np.ndarray, name: str = "image") -> np.ndarray:
        """(5, 2) keypoints of the largest face in an RGB uint8 image; NoFaceError if none."""
        bboxes, kps = self.model.detect(np.ascontiguousarray(image_rgb[..., ::-1]), max_num=0)
        if bboxes is None or len(bboxes) == 0 or kps is None:
            raise NoFaceError(f"no face detected in {name} (try another det_size, or pass aligned crops)")
        area = (bboxes[:, 2] - bboxes[:, 0]) * (bboxes[:, 3] - bboxes[:, 1])
        return np.asarray(kps[int(np.argmax(area))], dtype=np.float64)


def align_faces(images: Sequence[np.ndarray], detector: FaceDetector, *, out_size: int = 112,
                names: Sequence[str] | None = None) -> np.ndarray:
    """RGB uint8 images of any size -> (N, out_size, out_size, 3) ArcFace-aligned uint8 crops by
    5-point detection and the least-squares similarity to the ArcFace template."""
    dst = template_points("arcface112", out_size)
    crops = []
    for i, img in enumerate(images):
        kps = detector.landmarks(img, names[i] if names else f"image {i}")
        m = similarity_transform(kps, dst)
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        y = warp_batch(x, m, out_size, padding_mode="zeros", antialias=True)
        crops.append(y[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    return np.stack(crops) if crops else np.zeros((0, out_size, out_size, 3), np.uint8)


# ----------------------------------------------------------------------------------------------
# ID embeddings


class ArcFaceOnnx:
    """A local insightface ArcFace ONNX (e.g. Arc2Face's arcface.onnx) as a recognizer with
    ``spec`` and ``infer``, on ONNX Runtime.

    Preprocessing follows insightface's rule: graphs that start with their own Sub/Mul
    normalisation (MXNet conversions) take pixels in [0, 255], others (x - 127.5) / 127.5; RGB.
    Exports fixed to batch 1 are run one crop at a time.
    """

    def __init__(self, path: str | Path, *, providers: Sequence[str] | None = None):
        path = Path(path)
        if not path.is_file():
            raise RtkitError(f"ArcFace ONNX not found: {path}")
        onnx = optional_import("onnx", extra="gpu", purpose="reading an ArcFace ONNX")
        ort = optional_import("onnxruntime", extra="gpu", purpose="running an ArcFace ONNX")
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception as e:  # protobuf decode errors
            raise RtkitError(f"{path}: not an ONNX model ({type(e).__name__})") from None
        own_norm = any(n.op_type in ("Sub", "Mul") for n in graph.node[:8])
        self.session = ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        if len(inp.shape) != 4:
            raise RtkitError(f"{path}: expected an NCHW image input, got shape {inp.shape}")
        self.input_name, self.output_name = inp.name, out.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        h, w = (int(d) if isinstance(d, int) else 112 for d in inp.shape[2:])
        dim = out.shape[-1] if isinstance(out.shape[-1], int) else None
        self.spec = ModelSpec(task="embed", input_size=(h, w), value_range=(0.0, 255.0) if own_norm else (-1.0, 1.0),
                              channels="RGB", alignment="arcface112", resize="resize", output_dim=dim)
        self.path = path

    def infer(self, batch, **_):
        x = np.ascontiguousarray(torch.as_tensor(batch).float().numpy() if not isinstance(batch, np.ndarray)
                                 else batch, dtype=np.float32)
        if self.fixed_batch == 1 and x.shape[0] != 1:
            return np.concatenate([self.session.run([self.output_name], {self.input_name: x[i:i + 1]})[0]
                                   for i in range(x.shape[0])])
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def embed_aligned(crops, recognizer, *, batch_size: int = 64) -> np.ndarray:
    """L2-normalised (N, D) float32 embeddings of ArcFace-aligned crops.

    crops: uint8 (N, H, W, 3) RGB or float (N, 3, H, W) RGB in [-1, 1]. recognizer: anything
    with ``spec`` (input size, value range, channel order) and ``infer(NCHW float32)`` -> (B, D):
    an rtkit runner (``rtkit.runtime.open_engine``) or ``ArcFaceOnnx``. Crops are brought to the
    recognizer's contract (resize, range, BGR if its spec says so) and run ``batch_size`` at a time.
    """
    spec = recognizer.spec
    n = len(crops)
    out = []
    for i in range(0, n, batch_size):
        x = _to_nchw(crops[i:i + batch_size], tuple(spec.value_range))
        if spec.input_size is not None and tuple(x.shape[-2:]) != tuple(spec.input_size):
            x = resize_batch(x, tuple(spec.input_size))
        if spec.channels == "BGR":
            x = x.flip(1)
        y = recognizer.infer(np.ascontiguousarray(x.numpy(), dtype=np.float32))
        y = torch.as_tensor(np.asarray(y[0] if isinstance(y, (tuple, list)) else y)).float()
        out.append(normalize(y.reshape(y.shape[0], -1)).numpy())
    if not out:
        dim = spec.output_dim or 0
        return np.zeros((0, dim), np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def embed_images(images: Sequence[np.ndarray], recognizer, *, detector: FaceDetector | None = None,
                 names: Sequence[str] | None = None, batch_size: int = 64) -> np.ndarray:
    """Embeddings of RGB uint8 images: aligned by ``detector`` first when given (unaligned
    inputs), else taken as ArcFace-aligned crops (DigiFace) as they are."""
    if detector is not None:
        crops = align_faces(images, detector, out_size=(recognizer.spec.input_size or (112, 112))[0], names=names)
    else:
        crops = np.stack([np.asarray(im, np.uint8) for im in images]) if len(images) else np.zeros((0, 112, 112, 3), np.uint8)
    return embed_aligned(crops, recognizer, batch_size=batch_size)


def angle(a, b) -> torch.Tensor:
    """Angle (radians) between rows of a and b (normalised first)."""
    return torch.arccos((normalize(a) * normalize(b)).sum(-1).clamp(-1.0, 1.0))


__all__ = ["DEFAULT_T", "DELTA_SPACES", "DEFAULT_DELTA_SPACE", "DEFAULT_DELTA_SCALE", "GENERATOR_FRAME",
           "FRAMES", "DET_SIZE", "NoFaceError", "normalize", "prototype", "slerp", "draw_t", "variations",
           "MeanAccumulator", "Delta", "compute_delta", "delta_features", "load_delta", "frame_transform",
           "to_arcface112", "FaceDetector", "align_faces", "ArcFaceOnnx", "embed_aligned", "embed_images",
           "angle"]
