"""Named translator recipes: ``rt-train translator --method M --preset tiny`` (explicit options win).

"tiny": every width of each method scaled down for 64 px images on a CPU, trained at raised
learning rates for a short run. The published recipes (hv_dim 4096, 1024-wide discriminators,
VGG19, ndf 64, 256 patches) take seconds per step on CPU; these take tens of milliseconds.

- vsait: generator vsait_tiny (ngf 8, 2 residual blocks); hypervectors 256 wide (published 4096),
  mapping net 256 -> 256 -> 256; hypervector discriminator 256 -> 64 -> 64 -> 1 (1024, 1024, 1);
  feature net ``vgg19_tiny_fixed``: VGG19's layer list at 1/8 width with DETERMINISTIC built-in
  weights (no file; first layer passes the colour channels and two luma edges, the rest are
  seeded He-random), a stand-in that sees colour and contrast; it is not VGG19 and not the
  published recipe (use --features vgg19-dcbb9e9d.pth --feature-net vgg19 for that).
- decent: generator cut_tiny (ngf 8, 2 blocks); PatchGAN ndf 8 with 2 layers (64, 3); 64 patches
  per layer (256); flows as published (one BNAF block per layer, already small).
- unsb: generator unsb_tiny (ngf 8, 2 blocks); time-conditioned discriminator and energy net
  ndf 8 with 1 layer (64, 3); NCE head 32 wide (256) on 64 patches (256); lambda_nce 4.

Each trains on 64 px images (crop 64, or 32 for UNSB whose step is costlier) with flips, 600
steps. Measured (rtkit sample world, 128 render / 128 photo faces at 64 px for training, 64 + 64
other faces held out, seed 0, one torch thread, fp32; CPU seconds of the whole run):

    method   CPU s   held-out style gap: untranslated -> best (step)   end    content (best)
    vsait      62    10.59 -> 7.06 (200)                               9.36   0.86
    decent     60    10.59 -> 4.50 (600)                               4.50   0.86
    unsb       51    13.82 -> 6.14 (300), on 32 px centre crops        8.52   0.52

The GANs' gap wanders after it first falls (VSAIT's learning rates are raised for short runs),
which is why the trainer keeps the best held-out weights (weights/best*). Wall time was 1.5-2.5
minutes per run on a shared two-core machine.
"""
from __future__ import annotations

PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {
        "vsait": dict(generator="vsait_tiny", feature_net="vgg19_tiny_fixed", batch_size=4, crop_size=64,
                      steps=600, options=dict(hv_dim=256, d_channels=(64, 64, 1), lr_g=2e-4, lr_d=1e-3,
                                               vsa_weight=3.0)),
        "decent": dict(generator="cut_tiny", batch_size=2, crop_size=64, steps=600,
                       options=dict(ndf=8, n_layers_d=2, num_patches=64, lr=1e-3)),
        # UNSB: lr 1e-3 and a one-layer D keep content and let the NCE head learn (at 2e-3 the
        # head's outputs collapse to one direction and NCE sits at chance, ln 64)
        "unsb": dict(generator="unsb_tiny", batch_size=2, crop_size=32, steps=600,
                     options=dict(ndf=8, n_layers_d=1, num_patches=64, netf_nc=32, lr=1e-3, lambda_nce=4.0)),
    },
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


__all__ = ["PRESETS", "preset_names"]
