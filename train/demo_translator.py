"""Training of the bundled demo translator (render2photo) on the sample dataset.

The sample generator draws the same world in two styles, so (render, photo) pairs are pixel
aligned. The photo style's noise, pores, strands and JPEG are random given the render, so a
plain L1 (or L2) loss teaches only their mean: a clean, washed-out image (the earlier bundled
engine). The recipe therefore splits the target:

- low frequencies (Gaussian blur, sigma 1.5): L1 to the photo twin (colour, shading, highlight);
- texture: L1 between the local high-frequency energy maps of output and twin (per channel,
  RMS of the image minus its sigma-1 blur over 8x8 windows): how much texture, and where;
- adversarial: a small PatchGAN (rtkit.train.decent's, ndf 8, 2 layers) with the LSGAN loss
  of the CUT family, on the full crops: what the texture looks like (grain, JPEG, strands).

The generator gets its randomness from render2photo's input-derived noise channels.

Reproduction. ``rt-train demo-translator --out engines/bundled --force`` rewrites the shipped
files; without --force the command refuses to write over existing engine files, and its
default folder is runs/demo-translator. The run is deterministic: one torch thread (default
``threads=1``), ``torch.use_deterministic_algorithms``, all randomness from seeded generators
and the sample world (numpy Philox, the same bits on every machine). On one machine and torch
build two runs give byte-identical files (tests/test_bundled.py checks this on a short run; the
full recipe, 3000 steps, 3.3 CPU-minutes, 7.4 minutes wall on a loaded 2-core machine, was run
twice there, concurrently: .safetensors, .onnx and .json had the same sha256 both times). Across CPUs
(another SIMD width, another oneDNN kernel) or torch versions the float rounding of
convolutions differs, the runs diverge slowly and the weights differ in their bits; what is
reproduced there is the recipe's outcome: the held-out figures recorded in the card's
training block, within the run-to-run spread of a GAN (a few tenths of a level in the colour
gap, about 10 % in the texture gaps).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rtkit.engines import create, num_params
from rtkit.engines.errors import RtkitError

ENGINE_FILES = ("render2photo.safetensors", "render2photo.onnx", "render2photo.json")


@dataclass
class DemoTranslatorConfig:
    identities: int = 48          # training identities (held-out ones follow them)
    per_identity: int = 8
    heldout_identities: int = 8
    steps: int = 3000
    batch_size: int = 8
    crop: int = 64
    lr: float = 2e-3              # generator (Adam, cosine to 0)
    lr_d: float = 2e-4            # discriminator (Adam 0.5/0.999, constant)
    ndf: int = 8                  # PatchGAN width
    d_layers: int = 2
    lambda_low: float = 1.0       # L1 of the sigma-1.5 blurs
    lambda_texture: float = 5.0   # L1 of the local high-frequency energy maps
    lambda_gan: float = 0.2       # LSGAN generator term
    seed: int = 0
    data_seed: int = 0            # seed of the sample world
    threads: int = 1              # torch threads (part of what makes the bits reproducible)


def render_pairs(ids, per_identity, seed):
    from rtkit.datasets.sample import render_pair

    src, dst = [], []
    for i in ids:
        for k in range(per_identity):
            render, photo = render_pair(i, k, seed, 112)
            src.append(render)
            dst.append(photo)
    to_t = lambda a: torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    return to_t(src), to_t(dst)


def style_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference in [0, 255] units between two aligned image batches."""
    return float((a - b).abs().mean() * 127.5)


def to_frames(x) -> np.ndarray:
    """[-1, 1] NCHW (tensor or array) -> uint8 NHWC frames, rounded as the converter encodes."""
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.clip(np.rint((x.transpose(0, 2, 3, 1) + 1) * 127.5), 0, 255).astype(np.uint8)


def heldout_figures(translated, source, photo) -> dict[str, float]:
    """Colour and texture gaps of ``translated`` (and of the untranslated ``source``) to the photo
    twins: mean |pixel difference| (0-255), rtkit.eval.quality's style distance and texture gaps."""
    from rtkit.eval.quality import style_distance, texture_gaps, texture_statistics

    out = {}
    ph = to_frames(photo)
    for name, x in (("render", source), ("translated", translated)):
        fr = to_frames(x)
        out[f"{name}_pixel_gap"] = style_gap(torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(photo)))
        out[f"{name}_style_distance"] = style_distance(fr, ph)
        out.update({f"{name}_{k}_gap": v for k, v in texture_gaps(fr, ph).items()})
    out.update({f"photo_{k}": float(v) for k, v in
                zip(("laplacian_var", "local_contrast", "fine_contrast", "blockiness4"),
                    texture_statistics(ph).mean(0))})
    return out


def _gauss(sigma: float) -> torch.Tensor:
    r = int(np.ceil(3 * sigma))
    g = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, -1, -1).contiguous()


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    r = kernel.shape[-1] // 2
    return F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), kernel, groups=3)


def texture_energy(x: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    """Per-channel RMS of x minus its sigma-1 blur over 8x8 windows (stride 4)."""
    hp = x - _blur(x, fine)
    return torch.sqrt(F.avg_pool2d(hp * hp, 8, stride=4) + 1e-6)


@contextlib.contextmanager
def deterministic_torch(threads: int):
    """One fixed thread count and deterministic kernels for the duration (restored after)."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def check_out_dir(out_dir: str | Path, force: bool) -> Path:
    """Refuse (before any work) to write over existing engine files unless ``force``."""
    out_dir = Path(out_dir)
    existing = [n for n in ENGINE_FILES if (out_dir / n).exists()]
    if existing and not force:
        raise RtkitError(f"{out_dir} already holds {', '.join(existing)}; pass --force to overwrite "
                         f"(--out engines/bundled --force rewrites the shipped engine)")
    return out_dir


def train_demo_translator(out_dir: str | Path, cfg: DemoTranslatorConfig | None = None,
                          log=lambda m: print(m, flush=True), force: bool = False) -> dict:
    """Train render2photo, write render2photo.safetensors/.onnx/.json into ``out_dir``.

    Refuses to overwrite existing engine files there unless ``force``."""
    cfg = cfg or DemoTranslatorConfig()
    out_dir = check_out_dir(out_dir, force)
    with deterministic_torch(cfg.threads):
        return _train(out_dir, cfg, log)


def _train(out_dir: Path, cfg: DemoTranslatorConfig, log) -> dict:
    from safetensors.torch import save_file

    from rtkit.engines.card import read_card, write_card
    from rtkit.export import to_onnx
    from rtkit.train.cut_family import lsgan_loss
    from rtkit.train.decent import PatchGANDiscriminator

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    src, dst = render_pairs(range(cfg.identities), cfg.per_identity, cfg.data_seed)
    held = range(cfg.identities, cfg.identities + cfg.heldout_identities)
    hsrc, hdst = render_pairs(held, cfg.per_identity, cfg.data_seed)
    log(f"pairs: {len(src)} train, {len(hsrc)} held out ({time.perf_counter() - t0:.1f} s)")

    model = create("render2photo", pretrained=False).train()
    D = PatchGANDiscriminator(3, cfg.ndf, cfg.d_layers).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(0.5, 0.999))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    low_k, fine_k = _gauss(1.5), _gauss(1.0)
    n, c = len(src), cfg.crop
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        y0, x0 = (int(v) for v in torch.randint(0, 112 - c + 1, (2,), generator=gen))
        flip = bool(torch.rand((), generator=gen) < 0.5)
        a = src[idx, :, y0:y0 + c, x0:x0 + c]
        b = dst[idx, :, y0:y0 + c, x0:x0 + c]
        if flip:
            a, b = a.flip(3), b.flip(3)
        fake = model(a)
        loss_d = 0.5 * (lsgan_loss(D(fake.detach()), False) + lsgan_loss(D(b), True))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        low = (_blur(fake, low_k) - _blur(b, low_k)).abs().mean()
        tex = (texture_energy(fake, fine_k) - texture_energy(b, fine_k)).abs().mean()
        gan = lsgan_loss(D(fake), True)
        loss = cfg.lambda_low * low + cfg.lambda_texture * tex + cfg.lambda_gan * gan
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == cfg.steps:
            log(f"step {step}/{cfg.steps}  low {low.item() * 127.5:.2f}  texture {tex.item() * 127.5:.2f}  "
                f"G {gan.item():.3f}  D {loss_d.item():.3f}  ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    with torch.no_grad():
        translated = torch.cat([model(hsrc[i:i + 16]) for i in range(0, len(hsrc), 16)])
    metrics = heldout_figures(translated, hsrc, hdst)
    train_seconds = time.perf_counter() - t0
    weights = out_dir / "render2photo.safetensors"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"config": str(asdict(cfg))})
    onnx_path = to_onnx(create("render2photo", checkpoint=weights), out_dir / "render2photo.onnx",
                        checkpoint=weights, log=None)
    # render2photo.json is the card of both files (same stem): the export wrote it for the ONNX
    # engine; the training block records how the weights were made.
    card = read_card(onnx_path)
    card.training = {"trainer": "rtkit.train.demo_translator", "command": "rt-train demo-translator",
                     "config": asdict(cfg), "step": cfg.steps,
                     "losses": "L1 of sigma-1.5 blurs + L1 of 8x8 high-frequency energy maps "
                               "+ LSGAN PatchGAN (paired twins)",
                     "data": {"sample_world_seed": cfg.data_seed, "pairs": len(src),
                              "heldout_pairs": len(hsrc), "heldout_identities": [held.start, held.stop],
                              "size": 112},
                     "metrics": {k: round(v, 4) for k, v in metrics.items()}}
    write_card(onnx_path, card)
    report = {"params": num_params(model), "metrics": metrics, "seconds": train_seconds,
              "weights": str(weights), "onnx": str(onnx_path),
              "heldout_gap_before": metrics["render_pixel_gap"], "heldout_gap_after": metrics["translated_pixel_gap"]}
    log(f"held-out render->photo gap (mean abs, 0-255): {metrics['render_pixel_gap']:.2f} as rendered, "
        f"{metrics['translated_pixel_gap']:.2f} translated; Laplacian-variance gap "
        f"{metrics['render_laplacian_var_gap']:.1f} -> {metrics['translated_laplacian_var_gap']:.1f}")
    return report
