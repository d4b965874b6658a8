"""rt-train: training commands (the demo translator, recognizers, translators)."""
from __future__ import annotations

import click

from rtkit.cli.common import user_errors
from rtkit.train.launch import is_rank_zero


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Train translators and face recognizers."""


@main.command("demo-translator")
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo-translator", show_default=True,
              help="Folder for render2photo.safetensors / .onnx / .json (engines/bundled is the shipped "
                   "engine's, written only with --force).")
@click.option("--force", is_flag=True, help="Overwrite engine files already in --out.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Training steps [default: the recipe's, 3000].")
@click.option("--seed", type=int, default=0, show_default=True)
@user_errors
def demo_translator(out, force, steps, seed):
    """Train the bundled render2photo translator on the sample dataset (paired twins: blurred L1,
    texture-energy L1 and a small PatchGAN; one CPU thread, 3.3 CPU-minutes: 4-8 minutes).

    `rt-train demo-translator --out engines/bundled --force` reproduces the engine shipped in
    engines/bundled/ (the demo's): byte for byte on the machine that made it, the card's held-out
    figures elsewhere (see rtkit.train.demo_translator). Existing files are never overwritten
    without --force.
    """
    from rtkit.train.demo_translator import DemoTranslatorConfig, check_out_dir, train_demo_translator

    check_out_dir(out, force)
    cfg = DemoTranslatorConfig(seed=seed) if steps is None else DemoTranslatorConfig(steps=steps, seed=seed)
    r = train_demo_translator(out, cfg, force=force)
    click.echo(f"wrote {r['weights']} and {r['onnx']} ({r['params']} parameters, {r['seconds']:.0f} s)")


def _set_threads(threads: int | None):
    from rtkit.train.launch import set_torch_threads

    set_torch_threads(threads)


# -- rt-train recognizer ----------------------------------------------------------------------

def _milestones(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated epochs such as 12,20,26, got {value!r}") from None


@main.command("recognizer", context_settings={"show_default": True, "max_content_width": 100})
@click.option("--data", "data", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="Dataset root in DigiFace layout (<root>/<identity>/<k>.png). Repeat to combine "
                   "datasets (e.g. the original and a converted copy).")
@click.option("--same-identities", is_flag=True,
              help="Folders with the same name are the same identity in every --data root (a dataset "
                   "and its translated copy). Default: each root's identities are distinct classes.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: checkpoints/, model.json + weights, log.csv, config.json.")
@click.option("--backbone", default="adaface_ir50",
              help="Registered recognizer: adaface_ir18/50/101, iresnet18/34/50/100 (tiny variants for tests).")
@click.option("--backbone-opt", "backbone_opts", multiple=True, metavar="KEY=VALUE",
              help="Backbone builder override, e.g. dropout=0.0 (repeatable).")
@click.option("--init", "backbone_checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Start from these backbone weights (official files accepted) instead of random init.")
@click.option("--head", type=click.Choice(["adaface", "arcface", "cosface", "combined"]), default="adaface",
              help="Margin head.")
@click.option("--head-opt", "head_opts", multiple=True, metavar="KEY=VALUE",
              help="Head setting, e.g. m=0.4 h=0.333 s=64 (adaface), margin=0.5 (arcface/cosface).")
@click.option("--epochs", type=click.IntRange(min=1), default=30)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Images per step per process.")
@click.option("--lr", type=float, default=0.1, help="Peak SGD learning rate.")
@click.option("--momentum", type=float, default=0.9)
@click.option("--weight-decay", type=float, default=5e-4, help="Not applied to normalisation layers and biases.")
@click.option("--scheduler", type=click.Choice(["multistep", "poly"]), default="multistep",
              help="multistep: x gamma at each milestone epoch (AdaFace); poly: arcface_torch's decay.")
@click.option("--milestones", default="12,20,26", callback=_milestones, help="Epochs where multistep decays.")
@click.option("--gamma", type=float, default=0.1)
@click.option("--warmup-epochs", type=float, default=0.0, help="Linear warm-up length (per step).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              help="auto: bf16 (or fp16 with loss scaling) on GPU, fp32 on CPU.")
@click.option("--clip-grad", type=float, default=None, help="Clip the backbone gradient norm (arcface_torch: 5).")
@click.option("--no-augment", is_flag=True, help="Turn off crop/low-res/photometric augmentation and flips.")
@click.option("--augment-p", type=click.FloatRange(0, 1), default=0.2,
              help="Probability of each of crop, low-res and photometric augmentation.")
@click.option("--image-size", type=click.IntRange(min=16), default=112,
              help="Square input size, a multiple of 16; the trained model's card records it (rt-eval "
                   "then feeds that size).")
@click.option("--workers", type=click.IntRange(min=0), default=8, help="Decode processes per GPU/process.")
@click.option("--device", default="auto", help="auto, cpu, cuda (under torchrun: cuda:LOCAL_RANK).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads of each training process (default: the cores / processes per node). "
                   "Tiny models train faster on 1 when other work shares the cores.")
@click.option("--seed", type=int, default=0)
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many optimiser steps; the LR schedule is scaled to them.")
@click.option("--save-every", type=click.IntRange(min=0), default=0,
              help="Also checkpoint every N steps (0: only at the end of each epoch).")
@click.option("--keep", type=click.IntRange(min=0), default=3, help="Checkpoints kept (0: all).")
@click.option("--val-bin", "val_bins", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Verification .bin (lfw.bin, cfp_fp.bin...) evaluated during training (repeatable).")
@click.option("--val-every", type=click.IntRange(min=0), default=0,
              help="Verify every N steps (0: at the end of each epoch).")
@click.option("--log-every", type=click.IntRange(min=1), default=50, help="Log to log.csv every N steps.")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[CKPT]",
              help="Continue a run: alone, from the latest checkpoint in --out; or from the given "
                   "checkpoint file or output folder.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs only).")
@user_errors
def recognizer(data, same_identities, out, backbone, backbone_opts, backbone_checkpoint, head, head_opts,
               epochs, batch_size, lr, momentum, weight_decay, scheduler, milestones, gamma, warmup_epochs,
               precision, clip_grad, no_augment, augment_p, image_size, workers, device, threads, seed, max_steps,
               save_every, keep, val_bins, val_every, log_every, resume, no_progress):
    """Train a face recognizer (IR50 + AdaFace by default: the paper recipe) on face folders.

    \b
    Single GPU:
      rt-train recognizer --data DigiFace1M --out runs/digi --val-bin bins/lfw.bin
    Original + converted dataset, same people:
      rt-train recognizer --data DigiFace1M --data DigiFace1M_vsait --same-identities --out runs/both
    Several GPUs / nodes (batch size is per process):
      torchrun --nproc-per-node 8 $(which rt-train) recognizer --data DigiFace1M --out runs/ddp

    Writes checkpoints every epoch (exact resume with --resume), the trained backbone in its
    official format with its engine card (model.ckpt|.pth + model.json: `rt-eval verify --engine
    OUT/model.ckpt` and `rt-export` open it by its path), and log.csv. Images that do not decode
    are skipped (never trained on) and listed in OUT/skipped_images.txt.
    """
    from rtkit.cli.common import parse_extra
    from rtkit.train.data import AugmentConfig
    from rtkit.train.recognizer import RecognizerConfig, train_recognizer

    _set_threads(threads)
    augment = AugmentConfig.none() if no_augment else AugmentConfig(crop_p=augment_p, low_res_p=augment_p,
                                                                     photometric_p=augment_p)
    cfg = RecognizerConfig(
        data=list(data), same_identities=same_identities, image_size=image_size, augment=augment,
        workers=workers, backbone=backbone, backbone_overrides=parse_extra(backbone_opts),
        backbone_checkpoint=backbone_checkpoint, head=head, head_kwargs=parse_extra(head_opts),
        epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
        scheduler=scheduler, milestones=milestones, gamma=gamma, warmup_epochs=warmup_epochs,
        clip_grad_norm=clip_grad, precision=precision, seed=seed, device=device, max_steps=max_steps,
        save_every_steps=save_every, keep_checkpoints=keep, log_every_steps=log_every,
        val_bins=list(val_bins), val_every_steps=val_every, progress=not no_progress)
    s = train_recognizer(cfg, out, resume=resume, log=click.echo)
    if is_rank_zero():
        val = "".join(f", {k[4:]} {100 * v:.2f}%" for k, v in s.items()
                      if k.startswith("val_") and not k.endswith("_std"))
        click.echo(f"{s['steps']} steps ({s['epochs']:.2f} epochs), loss {s['first_loss']:.4f} -> "
                   f"{s['last_loss']:.4f}, {s['img_per_s']:.0f} img/s{val}; model {s['weights']}")


# -- rt-train translator ----------------------------------------------------------------------

def _preset_help() -> str:
    from rtkit.train.presets import PRESETS

    return ("Start from a named recipe; options given on the command line override it. tiny: every "
            "width scaled for 64 px on a CPU (" + "; ".join(
                f"{m}: {r['generator']}, {r['steps']} steps" for m, r in PRESETS["tiny"].items())
            + "); see rtkit/train/presets.py.")


@main.command("translator", context_settings={"show_default": True, "max_content_width": 100})
@click.option("--method", required=True, type=click.Choice(["vsait", "decent", "unsb"]),
              help="vsait: VSA hypervector GAN; decent: density-changing CUT-family GAN; unsb: "
                   "Schrödinger bridge.")
@click.option("--source", required=True, type=click.Path(exists=True, file_okay=False),
              help="Source-domain image tree (e.g. rendered faces); any layout, png/jpg/jpeg/webp/bmp.")
@click.option("--target", required=True, type=click.Path(exists=True, file_okay=False),
              help="Target-domain image tree (e.g. real photos); unpaired with the source.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: weights/ (official-format generator + engine card), checkpoints/, "
                   "samples/, log.csv, config.json.")
@click.option("--preset", type=click.Choice(["tiny"]), default=None, help=_preset_help())
@click.option("--generator", default=None,
              help="Registered generator to train (default: the method's, e.g. vsait/decent/unsb; "
                   "vsait_tiny/cut_tiny/unsb_tiny for quick runs).")
@click.option("--generator-opt", "generator_opts", multiple=True, metavar="KEY=VALUE",
              help="Generator builder override, e.g. ngf=32 (recorded in the weights' card).")
@click.option("--init", "generator_checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Start the generator from these weights instead of random init.")
@click.option("--method-opt", "method_opts", multiple=True, metavar="KEY=VALUE",
              help="Method hyper-parameter, e.g. lr_g=1e-4 vsa_weight=10 (vsait), lambda_var=0.01 "
                   "(decent), lambda_sb=1 tau=0.01 (unsb); tuples as 0,4,8. Unknown keys list the valid ones.")
@click.option("--steps", type=click.IntRange(min=1), default=200_000)
@click.option("--batch-size", type=click.IntRange(min=1), default=1, help="Images per domain per step per process.")
@click.option("--crop", "crop_size", type=click.IntRange(min=16), default=256,
              help="Random crop size (multiple of 4); smaller images are scaled up first.")
@click.option("--load-size", type=click.IntRange(min=16), default=None,
              help="Resize every image to this square before cropping (CUT-family recipe: 286 for 256 crops).")
@click.option("--no-flip", is_flag=True, help="No random horizontal flips.")
@click.option("--features", "feature_weights", type=click.Path(exists=True, dir_okay=False),
              help="VSAIT: local VGG19 weights with torchvision's key names (e.g. vgg19-dcbb9e9d.pth).")
@click.option("--feature-net", type=click.Choice(["vgg19", "vgg19_tiny", "vgg19_tiny_fixed"]), default="vgg19",
              help="VSAIT feature network. vgg19_tiny: 1/8 width (weights from --features or "
                   "--random-features); vgg19_tiny_fixed: the same layout with deterministic built-in "
                   "colour/edge filters, no file needed (a CPU stand-in, not VGG19).")
@click.option("--random-features", is_flag=True,
              help="VSAIT without a VGG19 file: the features are RANDOM (not the published recipe).")
@click.option("--val-source", type=click.Path(exists=True, file_okay=False),
              help="Held-out source images: their translations' style gap to --val-target is logged "
                   "every --val-every steps and keeps the best weights. Default: fixed crops of the "
                   "training folders.")
@click.option("--val-target", type=click.Path(exists=True, file_okay=False),
              help="Held-out target images (with --val-source).")
@click.option("--val-every", type=click.IntRange(min=0), default=500,
              help="Style gap (and best weights) every N steps and at the end (0: at the end only).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              help="auto: bf16 (or fp16 with loss scaling) on GPU, fp32 on CPU.")
@click.option("--device", default="auto", help="auto, cpu, cuda (under torchrun: cuda:LOCAL_RANK).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads of each training process (default: the cores / processes per node). "
                   "Tiny models train faster on 1 when other work shares the cores.")
@click.option("--seed", type=int, default=0)
@click.option("--workers", type=click.IntRange(min=0), default=4, help="Decode processes per training process.")
@click.option("--save-every", type=click.IntRange(min=0), default=5000, help="Checkpoint every N steps (and at the end).")
@click.option("--sample-every", type=click.IntRange(min=0), default=1000, help="Sample grid every N steps (0: never).")
@click.option("--log-every", type=click.IntRange(min=1), default=100, help="Log to log.csv every N steps.")
@click.option("--keep", type=click.IntRange(min=0), default=3, help="Checkpoints and step-numbered weights kept (0: all).")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[CKPT]",
              help="Continue a run: alone, from the latest checkpoint in --out; or from the given "
                   "checkpoint file or output folder.")
@user_errors
def translator(method, source, target, out, preset, generator, generator_opts, generator_checkpoint, method_opts,
               steps, batch_size, crop_size, load_size, no_flip, feature_weights, feature_net, random_features,
               val_source, val_target, val_every, precision, device, threads, seed, workers, save_every, sample_every,
               log_every, keep, resume):
    """Train an unpaired image translator (VSAIT, DECENT or UNSB) on two image folders.

    \b
    VSAIT on 112x112 faces (needs VGG19 weights as a local file):
      rt-train translator --method vsait --source DigiFace1M --target FFHQ112 --out runs/vsait \\
          --features vgg19-dcbb9e9d.pth --crop 112
    DECENT with the CUT-family recipe:
      rt-train translator --method decent --source renders --target photos --out runs/decent --load-size 286
    Minutes on a CPU, every width scaled down (64 px images):
      rt-train translator --method decent --preset tiny --source renders --target photos --out runs/tiny \\
          --val-source heldout_renders --val-target heldout_photos
    Several GPUs (batch size is per process):
      torchrun --nproc-per-node 4 $(which rt-train) translator --method unsb ...

    The generator is saved in its official format under OUT/weights with its engine card beside
    it, so `rt-convert --engine OUT/weights/last.ckpt` (VSAIT) or `.../latest_net_G.pth`
    (DECENT, UNSB), `.../best*` (the lowest held-out style gap) and `rt-export` use it directly.
    """
    from rtkit.cli.common import parse_extra
    from rtkit.train.translator import TranslatorConfig, train_translator

    _set_threads(threads)
    given = dict(generator=generator, steps=steps, batch_size=batch_size, crop_size=crop_size, load_size=load_size,
                 flip=not no_flip, feature_net=feature_net, feature_weights=feature_weights,
                 random_features=random_features, val_source=val_source, val_target=val_target,
                 val_every=val_every, precision=precision, device=device, seed=seed, workers=workers,
                 save_every=save_every, sample_every=sample_every, log_every=log_every, keep=keep)
    options = parse_extra(method_opts)
    if preset is not None:
        # only what the command line states overrides the preset (click knows which were typed)
        ctx = click.get_current_context()
        param_of = {"flip": "no_flip"}
        given = {k: v for k, v in given.items()
                 if ctx.get_parameter_source(param_of.get(k, k)) != click.core.ParameterSource.DEFAULT}
        cfg = TranslatorConfig.from_preset(method, source, target, preset, options=options,
                                           generator_overrides=parse_extra(generator_opts),
                                           generator_checkpoint=generator_checkpoint, **given)
    else:
        cfg = TranslatorConfig(method=method, source=source, target=target,
                               generator_overrides=parse_extra(generator_opts),
                               generator_checkpoint=generator_checkpoint, options=options, **given)
    s = train_translator(cfg, out, resume=resume, log=click.echo)
    if is_rank_zero():
        best = (f"; best {s['best_weights']} (step {s['best']['step']}, style gap "
                f"{s['best']['val_style_gap']:.2f})" if s.get("best_weights") else "")
        click.echo(f"{method}: steps {s['start_step']} -> {s['final_step']} in {s['seconds']:.0f} s "
                   f"({s['img_per_s']:.1f} img/s); generator {s['weights']}{best}")
