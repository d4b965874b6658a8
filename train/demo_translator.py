"""Training of the bundled demo translator (render2photo) on the sample dataset.

The sample generator draws the same world in two styles, so (render, photo) pairs are pixel
aligned and the translator can be trained with a plain L1 loss on random crops. This is the
documented recipe that reproduces engines/bundled/render2photo.*:

    rt-train demo-translator --out engines/bundled

It writes render2photo.safetensors, render2photo.onnx and their engine card render2photo.json
(with a training block: config, steps, data), so either file reopens by its path.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rtkit.engines import create, num_params


@dataclass
class DemoTranslatorConfig:
    identities: int = 48          # training identities (held-out ones follow them)
    per_identity: int = 8
    heldout_identities: int = 8
    steps: int = 6000
    batch_size: int = 8
    crop: int = 64
    lr: float = 2e-3
    seed: int = 0
    data_seed: int = 0            # seed of the sample world


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


def train_demo_translator(out_dir: str | Path, cfg: DemoTranslatorConfig | None = None,
                          log=lambda m: print(m, flush=True)) -> dict:
    """Train render2photo, write render2photo.safetensors/.onnx/.json into ``out_dir``."""
    from safetensors.torch import save_file

    from rtkit.engines.card import read_card, write_card
    from rtkit.export import to_onnx

    cfg = cfg or DemoTranslatorConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    src, dst = render_pairs(range(cfg.identities), cfg.per_identity, cfg.data_seed)
    held = range(cfg.identities, cfg.identities + cfg.heldout_identities)
    hsrc, hdst = render_pairs(held, cfg.per_identity, cfg.data_seed)
    log(f"pairs: {len(src)} train, {len(hsrc)} held out ({time.perf_counter() - t0:.1f} s)")

    model = create("render2photo", pretrained=False).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    n, c = len(src), cfg.crop
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        y0, x0 = (int(v) for v in torch.randint(0, 112 - c + 1, (2,), generator=gen))
        flip = bool(torch.rand((), generator=gen) < 0.5)
        a = src[idx, :, y0:y0 + c, x0:x0 + c]
        b = dst[idx, :, y0:y0 + c, x0:x0 + c]
        if flip:
            a, b = a.flip(3), b.flip(3)
        loss = (model(a) - b).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == cfg.steps:
            log(f"step {step}/{cfg.steps}  L1 {loss.item() * 127.5:.2f}  "
                f"({time.perf_counter() - t0:.0f} s)")
    model.eval()
    with torch.no_grad():
        before = style_gap(hsrc, hdst)
        after = style_gap(torch.cat([model(hsrc[i:i + 16]) for i in range(0, len(hsrc), 16)]), hdst)
    weights = out_dir / "render2photo.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"config": str(asdict(cfg))})
    onnx_path = to_onnx(create("render2photo", checkpoint=weights), out_dir / "render2photo.onnx",
                        checkpoint=weights)
    # render2photo.json is the card of both files (same stem): the export wrote it for the ONNX
    # engine; the training block records how the weights were made.
    card = read_card(onnx_path)
    card.training = {"trainer": "rtkit.train.demo_translator", "config": asdict(cfg), "step": cfg.steps,
                     "data": {"sample_world_seed": cfg.data_seed, "pairs": len(src),
                              "heldout_pairs": len(hsrc), "size": 112},
                     "metrics": {"heldout_gap_before": before, "heldout_gap_after": after}}
    write_card(onnx_path, card)
    report = {"params": num_params(model), "heldout_gap_before": before, "heldout_gap_after": after,
              "seconds": time.perf_counter() - t0, "weights": str(weights), "onnx": str(onnx_path)}
    log(f"held-out render->photo gap (mean abs, 0-255): {before:.2f} as rendered, "
        f"{after:.2f} translated")
    return report
