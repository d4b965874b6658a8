"""CodeFormer (Zhou et al., NeurIPS 2022): blind face restoration with a codebook lookup transformer.

Re-implemented from the published architecture facts, with the official layer structure and
parameter names so the released ``codeformer.pth['params_ema']`` loads strictly (515 tensors,
94.11 M parameters). The network, in order:

1. a VQGAN encoder (conv; per level 2 residual blocks of GroupNorm-swish-conv, stride-2
   downsampling between levels, self-attention at the latent resolution; a residual/attention/
   residual middle; GroupNorm and a conv to the 256-d latent) that also hands the features of
   some levels to step 4;
2. a pre-norm transformer over the latent tokens (learned position embedding added to queries
   and keys) predicting, per token, logits over the 1024 codebook entries;
3. a lookup of the top-1 code per token (softmax -> top-1 -> codebook row), detached, then AdaIN
   giving the codes the per-channel mean/std of the encoder's latent;
4. the VQGAN generator, where after chosen blocks a fusion block (SFT: scale and shift predicted
   from encoder and decoder features) adds ``w * (dec * scale + shift)``; ``w`` trades quality
   (0) for fidelity (1).

``CodeFormerForArcFace112`` runs the same network (same parameter names) on ArcFace-aligned 112
crops such as DigiFace: it warps them to the FFHQ template CodeFormer was trained on, restores,
and warps the result back, all batched.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from rtkit.engines.align import (
    PADDING_MODES,
    AffineWarp,
    invert_affine,
    template_transform,
)
from rtkit.engines.checkpoint import load_state_dict_strict, read_checkpoint, unwrap
from rtkit.engines.errors import CheckpointError
from rtkit.engines.registry import register_model
from rtkit.engines.spec import ModelSpec, TensorSpec
from torch import nn


@dataclass(frozen=True)
class CodeFormerConfig:
    """Everything that shapes the network; the defaults are the released model.

    attn_resolutions: feature sizes that get self-attention in the VQGAN (None: the latent
        size only, 16 for the released 512 model).
    connect_list: feature sizes (as strings, the checkpoint's ``fuse_convs_dict`` keys) where
        encoder features are fused into the generator.
    norm_groups: GroupNorm groups (32 in the release; smaller for narrow test variants).
    """

    img_size: int = 512
    nf: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4, 8)
    res_blocks: int = 2
    attn_resolutions: tuple[int, ...] | None = None
    codebook_size: int = 1024
    emb_dim: int = 256
    dim_embd: int = 512
    n_head: int = 8
    n_layers: int = 9
    connect_list: tuple[str, ...] = ("32", "64", "128", "256")
    norm_groups: int = 32

    @property
    def latent_res(self) -> int:
        return self.img_size // 2 ** (len(self.ch_mult) - 1)

    @property
    def attention_at(self) -> tuple[int, ...]:
        return tuple(self.attn_resolutions) if self.attn_resolutions is not None else (self.latent_res,)

    def channels(self) -> dict[str, int]:
        """Feature channels per feature size, e.g. {'512': 64, ..., '16': 512} for the release."""
        return {str(self.img_size // 2 ** i): self.nf * m for i, m in enumerate(self.ch_mult)}


FULL_CONFIG = CodeFormerConfig()
# Same classes, four levels of at most 16 channels, a 4x4 latent: a CPU forward in milliseconds.
TINY_CONFIG = CodeFormerConfig(img_size=32, nf=8, ch_mult=(1, 2, 2, 2), codebook_size=16, emb_dim=16,
                               dim_embd=32, n_head=2, n_layers=2, connect_list=("8", "16"), norm_groups=4)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus the input (1x1-projected when channels change)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_out = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.conv_out(x) if self.conv_out is not None else x
        return h + skip


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = group_norm(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q = self.q(n).flatten(2).transpose(1, 2)  # b, hw, c
        k = self.k(n).flatten(2)  # b, c, hw
        v = self.v(n).flatten(2)  # b, c, hw
        attn = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # b, query, key
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VQEncoder(nn.Module):
    """The VQGAN encoder as one flat ``blocks`` list (the checkpoint indexes blocks by position).

    ``taps[size]`` is the index of the block whose output is the encoder feature of that size:
    the last residual block of the level (before its attention, if any).
    """

    def __init__(self, cfg: CodeFormerConfig):
        super().__init__()
        g, nf = cfg.norm_groups, cfg.nf
        blocks: list[nn.Module] = [nn.Conv2d(3, nf, 3, padding=1)]
        self.taps: dict[str, int] = {}
        res, ch = cfg.img_size, nf
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.res_blocks):
                blocks.append(ResBlock(ch, nf * mult, g))
                ch = nf * mult
                self.taps[str(res)] = len(blocks) - 1
                if res in cfg.attention_at:
                    blocks.append(AttnBlock(ch, g))
            if level != len(cfg.ch_mult) - 1:
                blocks.append(Downsample(ch))
                res //= 2
        # Middle, then GroupNorm straight into the latent conv (no activation between, as
        # in the official encoder).
        blocks += [ResBlock(ch, ch, g), AttnBlock(ch, g), ResBlock(ch, ch, g),
                   group_norm(ch, g), nn.Conv2d(ch, cfg.emb_dim, 3, padding=1)]
        self.blocks = nn.ModuleList(blocks)


class VQGenerator(nn.Module):
    """The VQGAN decoder as one flat ``blocks`` list.

    ``taps[size]``: the block after which the fusion of that size happens: the first residual
    block of each level, and at the latent size the last one (before its attention), which
    reproduces the official table {'16': 6, '32': 9, '64': 12, '128': 15, '256': 18, '512': 21}.
    """

    def __init__(self, cfg: CodeFormerConfig):
        super().__init__()
        g, nf = cfg.norm_groups, cfg.nf
        ch = nf * cfg.ch_mult[-1]
        res = cfg.latent_res
        blocks: list[nn.Module] = [nn.Conv2d(cfg.emb_dim, ch, 3, padding=1),
                                   ResBlock(ch, ch, g), AttnBlock(ch, g), ResBlock(ch, ch, g)]
        self.taps: dict[str, int] = {}
        for level in reversed(range(len(cfg.ch_mult))):
            out_ch = nf * cfg.ch_mult[level]
            for r in range(cfg.res_blocks):
                blocks.append(ResBlock(ch, out_ch, g))
                ch = out_ch
                if r == 0 or res == cfg.latent_res:
                    self.taps[str(res)] = len(blocks) - 1
                if res in cfg.attention_at:
                    blocks.append(AttnBlock(ch, g))
            if level != 0:
                blocks.append(Upsample(ch))
                res *= 2
        blocks += [group_norm(ch, g), nn.Conv2d(ch, 3, 3, padding=1)]  # no activation between
        self.blocks = nn.ModuleList(blocks)


class Codebook(nn.Module):
    """The VQGAN codebook (``quantize.embedding``): code vectors looked up by index."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / size, 1.0 / size)

    def lookup(self, logits: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Top-1 code per token from (B, HW, K) logits -> (B, C, H, W) features.

        As the official code: softmax over codes, top-1, the code row. The official version
        builds a one-hot matrix cast to float32 and multiplies it with the codebook, which
        pins that step (and so the network) to float32; a gather gives the identical rows in
        the weights' dtype, so fp16/fp64 runs work. The choice is made on float32 (or wider)
        probabilities so fp16 rounding of the softmax does not change which code wins.
        """
        probs = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=2)
        top_idx = torch.topk(probs, 1, dim=2).indices.squeeze(2)  # b, hw
        codes = F.embedding(top_idx, self.embedding.weight)  # b, hw, c
        b = codes.shape[0]
        # contiguous(): the transposed view is channels-last in memory, which sends every later
        # conv down another CPU kernel; measured against float64 its fp32 error was ~30x larger.
        return codes.transpose(1, 2).reshape(b, -1, hw[0], hw[1]).contiguous()


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: self-attention (position added to queries and keys) + GELU MLP."""

    def __init__(self, dim: int, n_head: int, dim_mlp: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, n_head, dropout=0.0, batch_first=True)
        self.linear1 = nn.Linear(dim, dim_mlp)
        self.linear2 = nn.Linear(dim_mlp, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        qk = h + pos
        x = x + self.self_attn(qk, qk, h, need_weights=False)[0]
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class FuseSFT(nn.Module):
    """Controllable feature fusion: dec + w * (dec * scale + shift), scale/shift from [enc, dec]."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.encode_enc = ResBlock(2 * ch, ch, groups)
        self.scale = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.LeakyReLU(0.2),
                                   nn.Conv2d(ch, ch, 3, padding=1))
        self.shift = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.LeakyReLU(0.2),
                                   nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, enc: torch.Tensor, dec: torch.Tensor, w) -> torch.Tensor:
        h = self.encode_enc(torch.cat([enc, dec], dim=1))
        return dec + w * (dec * self.scale(h) + self.shift(h))


def calc_mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std (unbiased variance + eps, as the official AdaIN)."""
    flat = x.flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2) + eps).sqrt()[..., None, None]
    return mean, std


def adaptive_instance_norm(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Give ``content`` the per-channel mean and std of ``style``."""
    c_mean, c_std = calc_mean_std(content)
    s_mean, s_std = calc_mean_std(style)
    return (content - c_mean) / c_std * s_std + s_mean


class CodeFormerOutput(NamedTuple):
    """What the official forward returns: raw image, code logits (B, HW, K), encoder latent."""

    image: torch.Tensor
    logits: torch.Tensor
    lq_feat: torch.Tensor


def fusion_weight(w, batch: int, like: torch.Tensor):
    """``w`` as used by the fusion blocks, or None when fusion is skipped.

    A Python number follows the official ``if w > 0`` branch: fusion runs only for w > 0 (and
    costs about 220 GFLOP less when skipped). A tensor (0-d, 1 element, or one per sample) is
    how an exported graph receives ``w``: fusion then always runs with ``max(w, 0)``, which for
    w <= 0 adds exactly zero, so the result equals the skipped branch; only the cost differs.
    """
    if isinstance(w, torch.Tensor):
        if not torch.jit.is_tracing() and w.numel() not in (1, batch):
            raise ValueError(f"w must have 1 or {batch} (batch) elements, got shape {tuple(w.shape)}")
        return w.to(device=like.device, dtype=like.dtype).reshape(-1, 1, 1, 1).clamp(min=0)
    w = float(w)
    return w if w > 0 else None


class CodeFormer(nn.Module):
    """CodeFormer with the official parameter names; ``forward(x, w, adain) -> image in [-1, 1]``."""

    def __init__(self, config: CodeFormerConfig = FULL_CONFIG):
        super().__init__()
        cfg = self.config = config
        channels = cfg.channels()
        for size in cfg.connect_list:
            if size not in channels:
                raise ValueError(f"connect_list entry {size!r} is not a feature size of this model "
                                 f"({', '.join(channels)})")
        self.encoder = VQEncoder(cfg)
        self.quantize = Codebook(cfg.codebook_size, cfg.emb_dim)
        self.generator = VQGenerator(cfg)
        self.position_emb = nn.Parameter(torch.zeros(cfg.latent_res ** 2, cfg.dim_embd))
        self.feat_emb = nn.Linear(cfg.emb_dim, cfg.dim_embd)
        self.ft_layers = nn.ModuleList(TransformerLayer(cfg.dim_embd, cfg.n_head, 2 * cfg.dim_embd)
                                       for _ in range(cfg.n_layers))
        self.idx_pred_layer = nn.Sequential(nn.LayerNorm(cfg.dim_embd),
                                            nn.Linear(cfg.dim_embd, cfg.codebook_size, bias=False))
        self.fuse_convs_dict = nn.ModuleDict({size: FuseSFT(channels[size], cfg.norm_groups)
                                              for size in cfg.connect_list})

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Encoder latent (B, emb_dim, h, w) and the encoder features named in connect_list."""
        taps = {self.encoder.taps[size]: size for size in self.config.connect_list}
        feats: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)
            if i in taps:
                feats[taps[i]] = x
        return x, feats

    def predict_logits(self, lq_feat: torch.Tensor) -> torch.Tensor:
        """Transformer over latent tokens -> code logits (B, HW, codebook_size)."""
        tokens = self.feat_emb(lq_feat.flatten(2).transpose(1, 2))  # b, hw, dim
        pos = self.position_emb.unsqueeze(0)
        for layer in self.ft_layers:
            tokens = layer(tokens, pos)
        return self.idx_pred_layer(tokens)

    def decode(self, quant_feat: torch.Tensor, enc_feats: dict[str, torch.Tensor], w) -> torch.Tensor:
        """Generator with the encoder features fused in at the connect_list sizes (weight w)."""
        weight = fusion_weight(w, quant_feat.shape[0], quant_feat)
        taps = {} if weight is None else {self.generator.taps[s]: s for s in self.config.connect_list}
        x = quant_feat
        for i, block in enumerate(self.generator.blocks):
            x = block(x)
            if i in taps:
                size = taps[i]
                # Encoder features enter detached, as in the official forward.
                x = self.fuse_convs_dict[size](enc_feats[size].detach(), x, weight)
        return x

    def forward_official(self, x: torch.Tensor, w=0.5, adain: bool = True) -> CodeFormerOutput:
        """The official forward (detach_16=True): (raw image, logits, encoder latent)."""
        lq_feat, enc_feats = self.encode(x)
        logits = self.predict_logits(lq_feat)
        # The codes carry no gradient (official detach_16); the latent's statistics still do.
        quant_feat = self.quantize.lookup(logits, lq_feat.shape[-2:]).detach()
        if adain:
            quant_feat = adaptive_instance_norm(quant_feat, lq_feat)
        return CodeFormerOutput(self.decode(quant_feat, enc_feats, w), logits, lq_feat)

    def forward(self, x: torch.Tensor, w=0.5, adain: bool = True) -> torch.Tensor:
        """Restore FFHQ-aligned faces (B, 3, img_size, img_size), RGB in [-1, 1].

        ``w`` (fidelity, 0..1): a float, or a tensor when exported as a graph input (see
        ``fusion_weight``). The output is clamped to [-1, 1], as the official inference script
        does when converting it to an image.
        """
        size = self.config.img_size
        # Shape checks are skipped while tracing for export (sizes are symbolic there).
        if not torch.jit.is_tracing() and x.shape[-2:] != (size, size):
            raise ValueError(f"CodeFormer takes {size}x{size} inputs (its position embedding is "
                             f"fixed), got {x.shape[-2]}x{x.shape[-1]}")
        return self.forward_official(x, w, adain).image.clamp(-1.0, 1.0)


class CodeFormerForArcFace112(CodeFormer):
    """CodeFormer on ArcFace-aligned crops (DigiFace 112x112), with the same parameters.

    Each batch is warped to the FFHQ template at the network's size (similarity fit of the two
    5-point templates; about a 3.4x enlargement with 112 -> 512), restored, and warped back. The
    112 crop covers only the middle of the FFHQ frame, so the frame's border is filled by
    ``padding_mode`` ("reflection" by default; "gray" is the official face helper's fill).
    """

    def __init__(self, config: CodeFormerConfig = FULL_CONFIG, face_size: int = 112,
                 padding_mode: str = "reflection"):
        super().__init__(config)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.face_size = face_size
        size = config.img_size
        to_ffhq = template_transform("arcface112", face_size, "ffhq512", size)
        self.to_ffhq = AffineWarp(to_ffhq, face_size, size, padding_mode=padding_mode)
        # The exact inverse, so the restored face lies over its source; it stays inside the
        # FFHQ frame, the border mode only guards rounding at the edges.
        self.to_arcface = AffineWarp(invert_affine(to_ffhq), size, face_size, padding_mode="border")

    def forward(self, x: torch.Tensor, w=0.5, adain: bool = True) -> torch.Tensor:
        if not torch.jit.is_tracing() and x.shape[-2:] != (self.face_size, self.face_size):
            raise ValueError(f"expects {self.face_size}x{self.face_size} ArcFace-aligned crops, "
                             f"got {x.shape[-2]}x{x.shape[-1]}")
        restored = super().forward(self.to_ffhq(x), w, adain)
        return self.to_arcface(restored).clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_KEYS = ("params_ema", "params")


def load_codeformer(model: nn.Module, path: str | Path) -> None:
    """Load the official ``codeformer.pth`` (its 'params_ema', else 'params') or a plain state_dict."""
    obj = read_checkpoint(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    key = next((k for k in CHECKPOINT_KEYS if k in obj), None)
    state = unwrap(obj, key, path=path)
    load_state_dict_strict(model, state, name=getattr(model, "registry_name", "codeformer"), path=path)


def config_dict(model: CodeFormer) -> dict:
    """The model's config as plain JSON-able values (to save beside trained weights)."""
    return asdict(model.config)


# ----------------------------------------------------------------------------- registry

W_DEFAULT = 0.5
W_INPUT = TensorSpec("w", "float32", (1,), W_DEFAULT)  # fidelity weight, a graph input


def _spec(size: int) -> ModelSpec:
    return ModelSpec(task="translate", input_size=(size, size), value_range=(-1.0, 1.0), channels="RGB",
                     alignment="ffhq512", resize="warp", inputs=(W_INPUT,))


ARCFACE_SPEC = ModelSpec(task="translate", input_size=(112, 112), value_range=(-1.0, 1.0), channels="RGB",
                         alignment="arcface112", resize="native", inputs=(W_INPUT,))


def _config(base: CodeFormerConfig, overrides: dict) -> CodeFormerConfig:
    if "ch_mult" in overrides:
        overrides["ch_mult"] = tuple(overrides["ch_mult"])
    if "connect_list" in overrides:
        overrides["connect_list"] = tuple(str(s) for s in overrides["connect_list"])
    return replace(base, **overrides)


@register_model("codeformer", spec=_spec(FULL_CONFIG.img_size), loader=load_codeformer,
                description="CodeFormer face restoration (official weights, FFHQ-aligned 512x512)")
def codeformer(**overrides) -> CodeFormer:
    return CodeFormer(_config(FULL_CONFIG, overrides))


@register_model("codeformer_tiny", spec=_spec(TINY_CONFIG.img_size), loader=load_codeformer, tiny=True,
                description="CodeFormer classes at 32x32, width 8, 2 layers, 16 codes (tests)")
def codeformer_tiny(**overrides) -> CodeFormer:
    return CodeFormer(_config(TINY_CONFIG, overrides))


@register_model("codeformer_arcface112", spec=ARCFACE_SPEC, loader=load_codeformer,
                description="CodeFormer on ArcFace-aligned 112 crops (DigiFace): warp to FFHQ-512, "
                            "restore, warp back; official weights")
def codeformer_arcface112(padding_mode: str = "reflection", **overrides) -> CodeFormerForArcFace112:
    return CodeFormerForArcFace112(_config(FULL_CONFIG, overrides), padding_mode=padding_mode)


@register_model("codeformer_arcface112_tiny", spec=ARCFACE_SPEC, loader=load_codeformer, tiny=True,
                description="codeformer_arcface112 around the tiny CodeFormer (tests)")
def codeformer_arcface112_tiny(padding_mode: str = "reflection", **overrides) -> CodeFormerForArcFace112:
    return CodeFormerForArcFace112(_config(TINY_CONFIG, overrides), padding_mode=padding_mode)


__all__ = [
    "FULL_CONFIG",
    "TINY_CONFIG",
    "CodeFormer",
    "CodeFormerConfig",
    "CodeFormerForArcFace112",
    "CodeFormerOutput",
    "adaptive_instance_norm",
    "config_dict",
    "fusion_weight",
    "load_codeformer",
]
