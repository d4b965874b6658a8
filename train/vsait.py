"""VSAIT (Theiss et al., ECCV 2022) training: the method (``VSAITMethod``, registered as "vsait")
and its pieces: VGG19 features, LSH hypervectors, VSA loss, mapping network and hypervector
discriminator.

Per step, G then D (Lightning's order): G (with the mapping net) on the hinge GAN and VSA loss,
then D on the translation of the updated G, hinge loss on hypervectors. The generator is saved
as a Lightning checkpoint (``step=N.ckpt``, ``last.ckpt``) with the official key names.

VSAIT compares images in a hyperspace instead of pixel space:

    hv(x) = LSH(VGG19 features of x)            # (N, 4096, h, w), values in [-1, 1]
    src_to_tgt = map(hv(source))                 # learned "source -> target" binding vector
    VSA loss  = mean(1 - cos(hv(G(source)) * src_to_tgt.detach(), hv(source)))     (weight 10)
    D         = 1x1-conv PatchGAN on hypervectors [1024, 1024, 1], hinge loss:
                real: hv(target); fake: hv(G(source)) and hv(source) * map(hv(source))

Binding (elementwise product) is its own inverse for bipolar vectors, so the VSA loss asks that
unbinding the source->target vector from the translated image gives back the source content,
while the discriminator pushes the translation and the bound source towards the target domain.

Official layout, reproduced so the checkpoint keys match (``model.`` + these names):

- ``feature_extractor.net.features.N.weight/bias``: torchvision's VGG19 ``features`` up to
  the deepest tap (no classifier, no conv5_3/5_4: the FX graph keeps only what it runs), frozen. Taps ``features.{2,7,12,21,30}`` (conv1_2, conv2_2, conv3_2, conv4_2,
  conv5_2). The official extractor is an FX graph over torchvision's VGG whose ReLUs are in
  place, so every tap that is followed by a ReLU still inside the traced range comes out
  *after* that ReLU (the ReLU overwrites the returned tensor); the deepest tap (features.30)
  is the last node traced and stays pre-activation. ``VGGFeatures`` returns exactly that.
  Images go in as they are, in [-1, 1] (the official config sets no ImageNet rescaling).
- ``lsh_feat.I.{ssq_weight,_ssq_conv,weight}``: one random Gaussian projection per tap
  (4096 x C_i x k_i x k_i, kernel = stride = [16, 8, 4, 2, 1], so every tap lands on the same
  1/16 grid). The output is the cosine between each concatenated multi-tap patch and each
  concatenated random row: sum_i conv(f_i, W_i) / (|patch| |row| + 1e-5). Never trained.
- ``g_net_map.0.{0,1}.conv.*``: two 1x1 convs 4096 -> 4096 -> 4096 (ReLU between), then tanh;
  the last conv starts at weight 0, bias 1 (a constant tanh(1) vector: identity up to scale).
- ``d_net.net.0.net.{0,1}.conv.*`` and ``d_net.net.0.net.2.*``: 1x1 convs 4096 -> 1024 -> 1024
  -> 1 with LeakyReLU(0.2), Xavier-normal init (gain 0.2), zero biases.

Weights: VGG19 comes from a local file with torchvision's key names (``features.N.weight``;
e.g. torchvision's ``vgg19-dcbb9e9d.pth``, any extra ``classifier.*`` keys are ignored). There
is no download and no torchvision dependency. ``vgg19_tiny`` is the same layer list at 1/8
width; ``vgg19_tiny_fixed`` is that layout with DETERMINISTIC built-in weights, usable without a
file: conv1_1 passes each colour channel (+ and -, offset by a bias of 1) and two luma edges,
conv1_2 passes them on, deeper convs are He-normal from a fixed seed. It sees colour and
contrast (random features do not, and a bias-free first layer makes every feature scale with the
image around mid-grey, which the cosine hypervectors cannot see), so tiny CPU runs close the
style gap with it; it is a stand-in, not VGG19 and not the published recipe.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rtkit.engines.checkpoint import load_state_dict_strict, read_checkpoint
from rtkit.engines.errors import CheckpointError, RtkitError
from rtkit.train.translator_method import TranslatorMethod, cpu_state, register_method, requires_grad

# torchvision's VGG19 ("E") layer list: ints are 3x3 conv widths (each followed by ReLU),
# "M" a 2x2 max-pool. Index N in ``features`` follows from this list.
VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
FEATURE_NETS = {
    "vgg19": VGG19_LAYOUT,
    "vgg19_tiny": tuple(v if v == "M" else max(4, v // 8) for v in VGG19_LAYOUT),
}
FEATURE_NETS["vgg19_tiny_fixed"] = FEATURE_NETS["vgg19_tiny"]   # built-in weights (see above)
BUILTIN_FEATURES = {"vgg19_tiny_fixed": "builtin:vgg19_tiny_fixed-v1"}
DEFAULT_TAPS = (2, 7, 12, 21, 30)
DEFAULT_LSH_KERNELS = (16, 8, 4, 2, 1)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- VGG19 features -------------------------------------------------------------------------------

def build_vgg_layers(layout: Sequence, in_channels: int = 3) -> nn.Sequential:
    """torchvision's ``features`` Sequential for a VGG layer list (conv3x3 + ReLU, "M" max-pool)."""
    layers: list[nn.Module] = []
    ch = in_channels
    for v in layout:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(ch, int(v), kernel_size=3, padding=1), nn.ReLU()]
            ch = int(v)
    return nn.Sequential(*layers)


class _VGGTrunk(nn.Module):
    """Holds ``features`` (up to the deepest tap, as the official FX extractor keeps them) so
    state_dict keys read ``features.N.*`` as torchvision's do."""

    def __init__(self, layout: Sequence, last: int):
        super().__init__()
        full = build_vgg_layers(layout)
        if not 0 <= last < len(full):
            raise RtkitError(f"feature taps must be in 0..{len(full) - 1}, got {last}")
        self.features = full[: last + 1]


class VGGFeatures(nn.Module):
    """Frozen VGG feature taps: ``forward(x) -> [tap features]`` (see the module docstring).

    ``normalize``: "none" feeds [-1, 1] images as the official config does; "imagenet" maps
    them to [0, 1] and applies ImageNet mean/std first.
    """

    def __init__(self, layout: Sequence = VGG19_LAYOUT, taps: Sequence[int] = DEFAULT_TAPS,
                 normalize: str = "none"):
        super().__init__()
        if normalize not in ("none", "imagenet"):
            raise RtkitError(f"feature normalisation must be 'none' or 'imagenet', got {normalize!r}")
        self.taps = tuple(sorted(set(int(t) for t in taps)))
        if not self.taps or self.taps[0] < 0:
            raise RtkitError(f"feature taps must be non-negative layer indices, got {list(taps)}")
        self.net = _VGGTrunk(layout, self.taps[-1])
        for t in self.taps:
            if not isinstance(self.net.features[t], nn.Conv2d):
                raise RtkitError(f"feature tap {t} is not a conv layer of the VGG features")
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always eval

    @property
    def out_channels(self) -> list[int]:
        return [self.net.features[t].out_channels for t in self.taps]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.normalize == "imagenet":
            x = ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        last = self.taps[-1]
        out: dict[int, torch.Tensor] = {}
        pending: int | None = None  # a tap whose in-place ReLU (official) is applied next
        for idx, layer in enumerate(self.net.features):
            x = layer(x)
            if pending is not None:
                if isinstance(layer, nn.ReLU):
                    out[pending] = x
                pending = None
            if idx in self.taps:
                out[idx] = x
                if idx != last:
                    pending = idx
            if idx == last:
                break
        return [out[t] for t in self.taps]


def build_feature_extractor(name: str = "vgg19", *, weights: str | Path | None = None,
                            random_features: bool = False, taps: Sequence[int] = DEFAULT_TAPS,
                            normalize: str = "none") -> VGGFeatures:
    """The frozen feature network; weights from ``weights`` (torchvision key names).

    Without a file, ``random_features=True`` must say so explicitly: random features still
    train (the LSH geometry holds) but are not the published recipe. ``vgg19_tiny_fixed`` has
    built-in deterministic weights and takes neither.
    """
    if name not in FEATURE_NETS:
        raise RtkitError(f"unknown feature network {name!r}; choose from {', '.join(FEATURE_NETS)}")
    net = VGGFeatures(FEATURE_NETS[name], taps=taps, normalize=normalize)
    if name in BUILTIN_FEATURES:
        if weights is not None or random_features:
            raise RtkitError(f"{name} has built-in weights; --features and --random-features apply to "
                             f"vgg19 and vgg19_tiny")
        fixed_tiny_features_(net.net.features)
    elif weights is not None:
        load_vgg_weights(net, weights)
    elif random_features:
        he_normal_(net.net.features, torch.Generator().manual_seed(0))
    else:
        raise RtkitError(f"VSAIT needs {name} weights: pass a local file with torchvision's key names "
                         f"(e.g. vgg19-dcbb9e9d.pth) as --features, --feature-net vgg19_tiny_fixed for "
                         f"built-in stand-in features, or --random-features to train on randomly "
                         f"initialised features")
    return net


def he_normal_(features: nn.Sequential, generator: torch.Generator):
    """He-normal conv weights (so every tap, not just the first, carries signal through 16
    random layers) and zero biases, drawn from ``generator``."""
    with torch.no_grad():
        for m in features:
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                m.bias.zero_()


def fixed_tiny_features_(features: nn.Sequential):
    """The deterministic ``vgg19_tiny_fixed`` weights (module docstring): He-normal from seed 0,
    then conv1_1 = +/- each colour channel with bias 1 and two luma edges, conv1_2 = identity."""
    he_normal_(features, torch.Generator().manual_seed(0))
    first, second = features[0], features[2]
    if first.out_channels < 8 or second.out_channels < 8 or second.in_channels != first.out_channels:
        raise RtkitError("the fixed tiny features need 8 channels in conv1_1 and conv1_2")
    with torch.no_grad():
        w = torch.zeros_like(first.weight)
        for c in range(3):
            w[c, c, 1, 1], w[3 + c, c, 1, 1] = 1.0, -1.0
        w[6, :, 1, 0], w[6, :, 1, 2] = -1 / 3, 1 / 3      # horizontal luma gradient
        w[7, :, 0, 1], w[7, :, 2, 1] = -1 / 3, 1 / 3      # vertical luma gradient
        first.weight.copy_(w)
        first.bias[:6] = 1.0
        centre = torch.zeros(3, 3)
        centre[1, 1] = 1.0
        eye = torch.zeros_like(second.weight)
        eye[:8, :8] = torch.eye(8)[:, :, None, None] * centre
        second.weight.copy_(eye)


def load_vgg_weights(net: VGGFeatures, path: str | Path) -> None:
    """Load ``features.N.weight/bias`` from a torchvision-style VGG file (strict on features).

    Accepted layouts: torchvision's full state_dict (``features.*`` + ``classifier.*``), a
    ``features``-only one, or a VSAIT Lightning checkpoint (``model.feature_extractor.net.``).
    """
    raw = read_checkpoint(path)
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a state_dict of VGG weights")
    state = {}
    for k, v in raw.items():
        for prefix in ("model.feature_extractor.net.", "module.", ""):
            if k.startswith(prefix + "features.") and isinstance(v, torch.Tensor):
                state[k[len(prefix):]] = v
                break
    if not state:
        raise CheckpointError(f"{path} has no 'features.N.weight' keys (torchvision VGG layout expected)")
    # layers past the deepest tap (torchvision's conv5_3/5_4) are not part of the extractor
    n = len(net.net.features)
    state = {k: v for k, v in state.items() if int(k.split(".")[1]) < n}
    load_state_dict_strict(net.net, state, name="vgg19 features", path=path)


# -- LSH hypervectors -------------------------------------------------------------------------------

class LSHProjection(nn.Module):
    """One tap's random projection; buffers named as the official ``LSH(concatenate=True)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.kernel_size = int(kernel_size)
        k = self.kernel_size
        w = torch.randn(out_channels, in_channels, k, k, generator=generator)
        self.register_buffer("ssq_weight", w.pow(2).sum(dim=(1, 2, 3)).view(1, -1, 1, 1))
        self.register_buffer("_ssq_conv", torch.ones(1, 1, k, k))
        self.register_buffer("weight", w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projection, squared norm of each input patch), both on the stride-k grid."""
        s = self.kernel_size
        proj = F.conv2d(x, self.weight, stride=s)
        ssq = F.conv2d(x.pow(2).sum(dim=1, keepdim=True), self._ssq_conv, stride=s)
        return proj, ssq


class LSHHypervectors(nn.ModuleList):
    """Multi-tap LSH: the cosine between concatenated tap patches and random rows, in [-1, 1].

    Taps are projected on their own grids and resized (nearest) to the first tap's grid before
    summing, as the official ``LSHCat``. Computed in float32 whatever autocast says: the sums
    of squares overflow fp16. The projections are drawn from ``seed`` so a run can rebuild them.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 4096,
                 kernel_sizes: Sequence[int] = DEFAULT_LSH_KERNELS, seed: int = 0):
        if len(kernel_sizes) != len(in_channels):
            raise RtkitError(f"need one LSH kernel size per feature tap: {len(in_channels)} taps, "
                             f"kernel sizes {list(kernel_sizes)}")
        g = torch.Generator().manual_seed(int(seed))
        super().__init__(LSHProjection(c, out_channels, k, generator=g)
                         for c, k in zip(in_channels, kernel_sizes))
        self.out_channels = int(out_channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        with torch.autocast(feats[0].device.type, enabled=False):
            total = patch_ssq = None
            for lsh, f in zip(self, feats):
                proj, ssq = lsh(f.float())
                if total is None:
                    total, patch_ssq = proj, ssq
                else:
                    size = total.shape[2:]
                    total = total + F.interpolate(proj, size=size, mode="nearest")
                    patch_ssq = patch_ssq + F.interpolate(ssq, size=size, mode="nearest")
            row_ssq = sum(lsh.ssq_weight for lsh in self)
            return total / (patch_ssq.sqrt() * row_ssq.sqrt() + 1e-5)


class Hyperspace(nn.Module):
    """hv(x) = LSH(features(x)); frozen. State keys ``feature_extractor.*`` and ``lsh_feat.*``."""

    def __init__(self, feature_extractor: VGGFeatures, hv_dim: int = 4096,
                 kernel_sizes: Sequence[int] = DEFAULT_LSH_KERNELS, seed: int = 0):
        super().__init__()
        self.feature_extractor = feature_extractor
        self.lsh_feat = LSHHypervectors(feature_extractor.out_channels, hv_dim, kernel_sizes, seed)
        self.requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.lsh_feat.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lsh_feat(self.feature_extractor(x))


# -- mapping network and discriminator ------------------------------------------------------------

class Conv1x1Block(nn.Module):
    """1x1 conv then an activation; the conv sits at ``conv`` as in the official ConvBlock."""

    def __init__(self, in_channels: int, out_channels: int, act: nn.Module | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class MappingNet(nn.Sequential):
    """Source -> target binding vector: tanh(conv1x1(relu(conv1x1(hv)))); keys ``0.0.conv``,
    ``0.1.conv``. The last conv starts at weight 0 / bias 1 (a constant vector)."""

    def __init__(self, dim: int = 4096, hidden: int | None = None):
        hidden = hidden or dim
        mlp = nn.Sequential(Conv1x1Block(dim, hidden, nn.ReLU()), Conv1x1Block(hidden, dim))
        super().__init__(mlp, nn.Tanh())
        nn.init.constant_(mlp[-1].conv.weight, 0.0)
        nn.init.constant_(mlp[-1].conv.bias, 1.0)


class _PatchStack(nn.Module):
    def __init__(self, in_channels: int, channels: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for width in channels[:-1]:
            layers.append(Conv1x1Block(ch, width, nn.LeakyReLU(0.2)))
            ch = width
        layers.append(nn.Conv2d(ch, channels[-1], kernel_size=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class HypervectorDiscriminator(nn.Module):
    """1x1-conv PatchGAN on hypervectors: one logit per hypervector position.

    Keys ``net.0.net.{0,1}.conv.*`` and ``net.0.net.2.*`` (the official VSADiscriminator at one
    scale). Xavier-normal init with gain 0.2 and zero biases, as the official discriminator.
    """

    def __init__(self, in_channels: int = 4096, channels: Sequence[int] = (1024, 1024, 1)):
        super().__init__()
        if len(channels) < 2:
            raise RtkitError(f"discriminator needs at least two layers, got {list(channels)}")
        self.net = nn.ModuleList([_PatchStack(in_channels, channels)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight, gain=0.2)
                nn.init.zeros_(m.bias)

    def forward(self, hv: torch.Tensor) -> torch.Tensor:
        return self.net[0](hv)


# -- losses --------------------------------------------------------------------------------------

def vsa_loss(hv_fake: torch.Tensor, hv_src: torch.Tensor, src_to_tgt: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos(hv(fake) * map(hv(src)), hv(src))) over the channel axis; only hv(fake)
    carries gradient (the mapping net learns from the adversarial term alone)."""
    unbound = hv_fake.float() * src_to_tgt.detach().float()
    return (1.0 - F.cosine_similarity(unbound, hv_src.detach().float(), dim=1)).mean()


def hinge_generator_loss(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Average over discriminator outputs of -mean(D(x))."""
    return sum(-o.float().mean() for o in outputs) / len(outputs)


def hinge_discriminator_loss(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """Average over all outputs of mean(relu(1 - D(real))) and mean(relu(1 + D(fake)))."""
    terms = [F.relu(1.0 - o.float()).mean() for o in real] + [F.relu(1.0 + o.float()).mean() for o in fake]
    return sum(terms) / len(terms)




# -- the method -----------------------------------------------------------------------------------

@dataclass
class VSAITOptions:
    hv_dim: int = 4096                               # LSH hypervector size
    lsh_kernels: tuple = (16, 8, 4, 2, 1)            # kernel = stride per feature tap
    taps: tuple = (2, 7, 12, 21, 30)                 # VGG19 features.N
    lsh_seed: int = 0                                # the random projections are drawn from this
    feature_normalize: str = "none"                  # "none" (official) or "imagenet"
    d_channels: tuple = (1024, 1024, 1)
    map_hidden: int = 0                              # mapping-net hidden width; 0: hv_dim
    vsa_weight: float = 10.0
    gan_weight: float = 1.0
    lr_g: float = 1e-4
    lr_d: float = 4e-4
    beta1: float = 0.0
    beta2: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 100_000                           # StepLR period in steps
    lr_gamma: float = 0.5


@register_method("vsait")
class VSAITMethod(TranslatorMethod):
    """VSAIT: G then D each step (Lightning's order), hinge GAN on hypervectors, VSA loss.

    The G optimiser holds the generator and the mapping net (the official prefix
    ``model.g_net`` matches both); D's step sees the translation of the updated generator.
    """

    Options = VSAITOptions
    default_generator = "vsait"
    step_file = "step={step}.ckpt"
    latest_file = "last.ckpt"
    best_file = "best.ckpt"
    layout = "lightning"

    def __init__(self, cfg, opts: VSAITOptions, ctx, dtype):
        super().__init__(cfg, opts, ctx, dtype)
        from rtkit.engines.checkpoint import file_sha256

        self.generator = self.build_generator()
        features = build_feature_extractor(cfg.feature_net, weights=cfg.feature_weights,
                                           random_features=cfg.random_features, taps=opts.taps,
                                           normalize=opts.feature_normalize)
        self.hyperspace = Hyperspace(features, opts.hv_dim, opts.lsh_kernels, seed=opts.lsh_seed).to(self.device)
        # Frozen and rebuilt on resume (LSH from lsh_seed, VGG from its file): check it is the same file.
        self.features_id = (BUILTIN_FEATURES.get(cfg.feature_net)
                            or (file_sha256(cfg.feature_weights) if cfg.feature_weights else "random"))
        self.map_net = MappingNet(opts.hv_dim, opts.map_hidden or None).to(self.device)
        self.discriminator = HypervectorDiscriminator(opts.hv_dim, opts.d_channels).to(self.device)
        self.nets = {"g_net": self.generator, "g_net_map": self.map_net, "d_net": self.discriminator}
        betas = (opts.beta1, opts.beta2)
        self.optimizers = {
            "G": torch.optim.Adam(list(self.generator.parameters()) + list(self.map_net.parameters()),
                                  lr=opts.lr_g, betas=betas, weight_decay=opts.weight_decay),
            "D": torch.optim.Adam(self.discriminator.parameters(), lr=opts.lr_d, betas=betas,
                                  weight_decay=opts.weight_decay),
        }
        self.schedulers = {k: torch.optim.lr_scheduler.StepLR(o, step_size=opts.lr_step, gamma=opts.lr_gamma)
                           for k, o in self.optimizers.items()}
        self.finish_setup()

    def train_step(self, batch):
        src, tgt = batch["source"], batch["target"]
        G, D, M, hv = self.generator, self.discriminator, self.map_net, self.hyperspace
        o = self.opts
        with torch.no_grad(), self.autocast():
            hv_src = hv(src)
        # generator + mapping net
        requires_grad([D], False)
        with self.autocast():
            fake = G(src)
            hv_fake = hv(fake)
            src_to_tgt = M(hv_src)
            loss_vsa = vsa_loss(hv_fake, hv_src, src_to_tgt)
            loss_adv = hinge_generator_loss([D(hv_fake), D(hv_src * src_to_tgt)])
            loss_g = o.vsa_weight * loss_vsa + o.gan_weight * loss_adv
        self.update("G", loss_g)
        requires_grad([D], True)
        # discriminator: translation of the updated G and the bound source are fakes
        with torch.no_grad(), self.autocast():
            hv_fake = hv(G(src))
            bound = hv_src * M(hv_src)
            hv_tgt = hv(tgt)
        with self.autocast():
            loss_d = hinge_discriminator_loss([D(hv_tgt)], [D(hv_fake), D(bound)])
        self.update("D", loss_d)
        return {"loss_G": loss_g.detach(), "vsa": loss_vsa.detach(), "adv": loss_adv.detach(),
                "loss_D": loss_d.detach()}

    def extra_state(self) -> dict:
        return {"features_sha256": self.features_id}

    def load_extra_state(self, state: dict):
        saved = state.get("features_sha256")
        if saved is not None and saved != self.features_id:
            raise RtkitError(f"the checkpoint was trained with other VGG features ({saved[:32]}, now "
                             f"{self.features_id[:32]}); resume with the same --features / --feature-net")

    def weights_object(self, step: int):
        """The official Lightning layout: G, D, mapping net, LSH and VGG under ``model.*``."""
        import json

        from rtkit.engines.vsait import lightning_checkpoint

        ckpt = lightning_checkpoint(self.generator, global_step=int(step),
                                    hyper_parameters={"rtkit_translator": json.loads(json.dumps(
                                        self.cfg.to_dict(), default=str))})
        sd = ckpt["state_dict"]
        for prefix, module in (("model.d_net.", self.discriminator), ("model.g_net_map.", self.map_net),
                               ("model.lsh_feat.", self.hyperspace.lsh_feat),
                               ("model.feature_extractor.", self.hyperspace.feature_extractor)):
            sd.update({prefix + k: v for k, v in module.state_dict().items()})
        ckpt["state_dict"] = cpu_state(sd)
        return ckpt


__all__ = ["VGG19_LAYOUT", "FEATURE_NETS", "BUILTIN_FEATURES", "DEFAULT_TAPS", "DEFAULT_LSH_KERNELS",
           "VGGFeatures", "build_vgg_layers", "build_feature_extractor", "he_normal_", "fixed_tiny_features_",
           "load_vgg_weights", "LSHProjection", "LSHHypervectors", "Hyperspace", "MappingNet",
           "HypervectorDiscriminator", "vsa_loss", "hinge_generator_loss", "hinge_discriminator_loss",
           "VSAITOptions", "VSAITMethod"]
