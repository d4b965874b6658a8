"""Margin heads for recognizer training: class-centre weights plus a margin on the target logit.

Every head is an ``nn.Module`` with one call signature, ``head(embeddings, norms, labels) ->
logits`` (B x classes, already scaled by ``s``), ready for ``F.cross_entropy``. ``uses_norms``
tells the training loop whether the head needs the feature norms (AdaFace) or ignores them
(ArcFace/CosFace accept ``norms=None``). ``split_norm`` turns a raw embedding (IResNet) into
the (unit vector, norm) pair; AdaFace backbones return that pair themselves.

Heads, and the official behaviour each keeps:

- ``AdaFaceHead`` (mk-minchul/AdaFace ``head.AdaFace``): same parameter and buffer names
  (``kernel`` of shape (embedding_size, classes), ``t``, ``batch_mean``, ``batch_std``), so the
  ``head.*`` part of a released checkpoint loads strictly. Kept quirks: the norm statistics
  are updated on every call, in eval mode too, with the unbiased std; ``t`` is never used.
  One deliberate difference: a batch of one sample leaves the statistics unchanged (the
  unbiased std of one value is NaN and would poison them for the rest of training).
- ``CombinedMarginHead`` (insightface arcface_torch ``CombinedMarginLoss(s, m1, m2, m3)`` on a
  full-softmax class-centre matrix ``weight`` of shape (classes, embedding_size), the layout
  of arcface_torch's PartialFC ``weight`` with sample rate 1). ``ArcFaceHead`` is (1, 0.5, 0),
  ``CosFaceHead`` (1, 0, 0.4). Kept quirks: the margin function edits the cosine logits in
  place, and the ArcFace angle margin is applied without gradient, so the backward pass is
  ``s`` times the upstream gradient as if there were no margin. Combinations arcface_torch
  does not compute (m1 != 1 with m3 = 0, where it raises; m3 > 0 together with m1 != 1 or
  m2 != 0, where it silently ignores m1 and m2) raise ``ValueError`` at construction.

``build_head(name, embedding_size, num_classes, **kw)`` builds from the ``HEADS`` table, and
``head.config()`` returns what rebuilds it, to save beside the weights.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rtkit.engines.checkpoint import load_state_dict_strict, read_checkpoint, unwrap
from rtkit.engines.errors import CheckpointError


def split_norm(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings / ||embeddings||, ||embeddings||) with the norm as a (B, 1) column."""
    norms = torch.linalg.vector_norm(embeddings, ord=2, dim=1, keepdim=True)
    return embeddings / norms, norms


class MarginHead(nn.Module):
    """Common interface: ``forward(embeddings, norms, labels) -> scaled logits``, which is
    ``margin_logits(cosine(embeddings), norms, labels)``: the trainer keeps the margin-free
    cosines (its accuracy: the nearest class centre) without computing them twice."""

    name: str = ""
    uses_norms: bool = False

    def __init__(self, embedding_size: int, num_classes: int):
        super().__init__()
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)

    def _hyper(self) -> dict:
        raise NotImplementedError

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, classes) cosines between the embeddings and every class centre, float32."""
        raise NotImplementedError

    def margin_logits(self, cosine: torch.Tensor, norms: torch.Tensor | None,
                      labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, norms: torch.Tensor | None,
                labels: torch.Tensor) -> torch.Tensor:
        return self.margin_logits(self.cosine(embeddings), norms, labels)

    def config(self) -> dict:
        """Everything ``build_head(**config)`` needs to rebuild this head (weights aside)."""
        return {"name": self.name, "embedding_size": self.embedding_size,
                "num_classes": self.num_classes, **self._hyper()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "name")


# --------------------------------------------------------------------------------------------
# AdaFace
# --------------------------------------------------------------------------------------------

class AdaFaceHead(MarginHead):
    """AdaFace: a margin that adapts to image quality, measured by the feature norm.

    With ``z_hat = clip(h * (||z|| - mu) / (sigma + eps), -1, 1)`` (norm clipped to
    [0.001, 100] and detached; mu, sigma EMAs of the batch mean/std with factor ``t_alpha``),
    the target logit is ``s * (cos(clip(theta - m * z_hat, eps, pi - eps)) - (m + m * z_hat))``
    and the others ``s * cos(theta)``, cosines clamped to +-(1 - eps), eps = 1e-3.

    ``forward`` takes L2-normalised embeddings, their norms (B, 1) and labels (B,).
    """

    name = "adaface"
    uses_norms = True
    eps = 1e-3

    def __init__(self, embedding_size: int = 512, classnum: int = 70722, m: float = 0.4,
                 h: float = 0.333, s: float = 64.0, t_alpha: float = 0.01):
        super().__init__(embedding_size, classnum)
        self.m, self.h, self.s, self.t_alpha = float(m), float(h), float(s), float(t_alpha)
        self.kernel = nn.Parameter(torch.empty(embedding_size, classnum))
        # Unused by the computation; kept so official checkpoints load strictly.
        self.register_buffer("t", torch.zeros(1))
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))
        self.reset_parameters()

    @property
    def classnum(self) -> int:
        return self.num_classes

    def reset_parameters(self):
        # Uniform directions scaled to unit-norm class centres (columns), as the official init.
        with torch.no_grad():
            self.kernel.uniform_(-1.0, 1.0)
            self.kernel.div_(torch.linalg.vector_norm(self.kernel, dim=0, keepdim=True))

    def _hyper(self) -> dict:
        return {"m": self.m, "h": self.h, "s": self.s, "t_alpha": self.t_alpha}

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        centres = self.kernel / torch.linalg.vector_norm(self.kernel, ord=2, dim=0, keepdim=True)
        # Margin arithmetic (acos near +-1) in float32 whatever precision the caller runs in.
        return torch.mm(embeddings, centres).float().clamp(-1 + self.eps, 1 - self.eps)

    @torch.no_grad()
    def _update_norm_stats(self, norms: torch.Tensor):
        if norms.numel() < 2:
            return
        a = self.t_alpha
        self.batch_mean.copy_(norms.mean() * a + (1 - a) * self.batch_mean)
        self.batch_std.copy_(norms.std() * a + (1 - a) * self.batch_std)

    def margin_scaler(self, norms: torch.Tensor) -> torch.Tensor:
        """z_hat per sample (B, 1), from the current statistics."""
        z = (norms - self.batch_mean) / (self.batch_std + self.eps)
        return torch.clip(z * self.h, -1.0, 1.0)

    def margin_logits(self, cosine: torch.Tensor, norms: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
        safe_norms = torch.clip(norms.float(), min=0.001, max=100).detach().reshape(-1, 1)
        self._update_norm_stats(safe_norms)
        z_hat = self.margin_scaler(safe_norms)

        target = F.one_hot(labels.reshape(-1).long(), cosine.shape[1]).to(cosine.dtype)
        theta = cosine.acos()
        theta_m = torch.clip(theta + target * (-self.m * z_hat), min=self.eps, max=math.pi - self.eps)
        logits = theta_m.cos() - target * (self.m + self.m * z_hat)
        return logits * self.s

    @classmethod
    def from_checkpoint(cls, path: str | Path, **hyper) -> "AdaFaceHead":
        """Build a head sized from a checkpoint's ``kernel`` and load it strictly.

        Accepts a released Lightning file (``state_dict`` with ``head.`` keys) or a plain head
        state_dict. ``hyper`` sets m, h, s, t_alpha (not stored in the weights).
        """
        sd = unwrap(read_checkpoint(path), "state_dict", "head.", path=path)
        if "kernel" not in sd or sd["kernel"].ndim != 2:
            raise CheckpointError(f"{path}: no AdaFace head 'kernel' (expected 'head.kernel' in "
                                  f"a Lightning checkpoint or 'kernel' in a head state_dict)")
        head = cls(*sd["kernel"].shape, **hyper)
        load_state_dict_strict(head, sd, name="AdaFace head", path=path)
        return head


# --------------------------------------------------------------------------------------------
# arcface_torch CombinedMarginLoss family
# --------------------------------------------------------------------------------------------

def _check_margins(m1: float, m2: float, m3: float):
    if m1 == 1.0 and m3 == 0.0:
        return
    if m3 > 0.0 and m1 == 1.0 and m2 == 0.0:
        return
    raise ValueError(f"margins (m1={m1}, m2={m2}, m3={m3}) are not supported: use m1=1 with "
                     f"either m3=0 (ArcFace angle margin m2) or m2=0 (CosFace margin m3 > 0), "
                     f"as arcface_torch's CombinedMarginLoss computes")


def combined_margin(logits: torch.Tensor, labels: torch.Tensor, s: float, m1: float, m2: float,
                    m3: float, interclass_filtering_threshold: float = 0.0) -> torch.Tensor:
    """arcface_torch's CombinedMarginLoss on cosine logits (B, C); returns the scaled logits.

    Like the original, it writes into ``logits`` in place (unless the inter-class filter,
    which makes a new tensor, is on), applies the ArcFace angle under ``no_grad`` (backward is
    ``s`` x upstream), and rows whose label is -1 get no margin.
    """
    _check_margins(m1, m2, m3)
    rows = torch.where(labels.reshape(-1) != -1)[0]
    cols = labels.reshape(-1)[rows].long()

    if interclass_filtering_threshold > 0:
        with torch.no_grad():
            # Zero non-target cosines above the threshold (likely label noise or duplicates).
            dirty = (logits > interclass_filtering_threshold).to(logits.dtype)
            dirty[rows, cols] = 0
        logits = (1 - dirty) * logits

    if m3 == 0.0:  # ArcFace: cos(theta + m2) on the target
        with torch.no_grad():
            target_theta = logits[rows, cols].arccos()
            logits.arccos_()
            logits[rows, cols] = target_theta + m2
            logits.cos_()
    else:  # CosFace: cos(theta) - m3 on the target
        logits[rows, cols] = logits[rows, cols] - m3
    return logits * s


class CombinedMarginHead(MarginHead):
    """Full-softmax class centres with arcface_torch's combined margin (s, m1, m2, m3).

    ``weight`` (classes, embedding_size) is initialised N(0, 0.01) like PartialFC. Embeddings
    need not be normalised (they are normalised here); ``norms`` is ignored.
    """

    name = "combined"

    def __init__(self, embedding_size: int = 512, num_classes: int = 1000, s: float = 64.0,
                 m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 interclass_filtering_threshold: float = 0.0):
        super().__init__(embedding_size, num_classes)
        _check_margins(m1, m2, m3)
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.weight.normal_(0.0, 0.01)

    def _hyper(self) -> dict:
        return {"s": self.s, "m1": self.m1, "m2": self.m2, "m3": self.m3,
                "interclass_filtering_threshold": self.interclass_filtering_threshold}

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(embeddings), F.normalize(self.weight))
        return cos.float().clamp(-1, 1)

    def margin_logits(self, cosine: torch.Tensor, norms: torch.Tensor | None,
                      labels: torch.Tensor) -> torch.Tensor:
        return combined_margin(cosine, labels, self.s, self.m1, self.m2, self.m3,
                               self.interclass_filtering_threshold)


class ArcFaceHead(CombinedMarginHead):
    """ArcFace: target logit s * cos(theta + margin); arcface_torch (s, 1, margin, 0)."""

    name = "arcface"

    def __init__(self, embedding_size: int = 512, num_classes: int = 1000, s: float = 64.0,
                 margin: float = 0.5, interclass_filtering_threshold: float = 0.0):
        super().__init__(embedding_size, num_classes, s=s, m1=1.0, m2=margin, m3=0.0,
                         interclass_filtering_threshold=interclass_filtering_threshold)

    def _hyper(self) -> dict:
        return {"s": self.s, "margin": self.m2,
                "interclass_filtering_threshold": self.interclass_filtering_threshold}


class CosFaceHead(CombinedMarginHead):
    """CosFace: target logit s * (cos(theta) - margin); arcface_torch (s, 1, 0, margin)."""

    name = "cosface"

    def __init__(self, embedding_size: int = 512, num_classes: int = 1000, s: float = 64.0,
                 margin: float = 0.4, interclass_filtering_threshold: float = 0.0):
        if margin <= 0:
            raise ValueError(f"CosFace margin must be > 0, got {margin}")
        super().__init__(embedding_size, num_classes, s=s, m1=1.0, m2=0.0, m3=margin,
                         interclass_filtering_threshold=interclass_filtering_threshold)

    def _hyper(self) -> dict:
        return {"s": self.s, "margin": self.m3,
                "interclass_filtering_threshold": self.interclass_filtering_threshold}


HEADS: dict[str, type[MarginHead]] = {
    cls.name: cls for cls in (AdaFaceHead, CombinedMarginHead, ArcFaceHead, CosFaceHead)
}


def build_head(name: str, embedding_size: int, num_classes: int, **kw) -> MarginHead:
    """Build head ``name`` (one of ``HEADS``) for ``num_classes`` identities."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose from {', '.join(sorted(HEADS))}")
    return HEADS[name](embedding_size, num_classes, **kw)


__all__ = ["MarginHead", "AdaFaceHead", "CombinedMarginHead", "ArcFaceHead", "CosFaceHead",
           "HEADS", "build_head", "combined_margin", "split_norm"]
