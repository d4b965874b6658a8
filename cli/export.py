"""rt-export: a registered model -> ONNX (fp32/fp16) -> TensorRT plan, each checked."""
from __future__ import annotations

from pathlib import Path

import click

from rtkit.cli.common import parse_extra, size_option, user_errors

EPILOG = """\b
Every engine X.onnx / X.plan gets X.json beside it (ONNX files also carry it in their
metadata_props, key "rtkit"): model, task, input size/range/channels, runtime inputs and
their defaults, batch profile, checkpoint sha256 and what built it. rt-convert needs nothing
else.

\b
An ONNX export is compared with PyTorch through ONNX Runtime on seeded inputs (max/mean
abs error, PSNR, the tolerance it would have needed) and refused if it differs by more
than the tolerance: fp32 images 1e-4, fp32 embeddings 1e-3 (+1e-3 relative), fp16 images
5e-2, fp16 embeddings 2e-2 (+2e-2 relative). A plan is compared with ONNX Runtime on
its ONNX the same way. --no-parity skips the checks.

\b
TensorRT plans are tied to the TensorRT version and GPU that built them; the runner says
when a plan does not match and how to rebuild it from its ONNX. TensorRT 11 has no FP16
builder flag: an fp16 plan is built from an fp16-typed ONNX (--fp16 does both steps).

\b
Examples:
  rt-export --list
  rt-export render2photo --to onnx render2photo.onnx
  rt-export vsait --checkpoint last.ckpt --to onnx vsait.onnx --batch 1:64:256
  rt-export codeformer_arcface112 --checkpoint codeformer.pth --fp16 --to plan cf.plan
  rt-export vsait.onnx --to plan vsait.plan --batch 1:128:512 --timing-cache trt.cache
  rt-export adaface_ir50 --checkpoint adaface.ckpt --channels RGB --to onnx ada.onnx
  rt-export runs/decent/weights/latest_net_G.pth --to onnx decent.onnx   # a training output, by path
  rt-export vsait --random-weights --to onnx vsait_random.onnx           # timing only
"""


def _batch(ctx, param, value):
    if value is None:
        return None
    try:
        parts = tuple(int(v) for v in value.split(":"))
    except ValueError:
        raise click.BadParameter("expected MIN:OPT:MAX, e.g. 1:8:64") from None
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or not (1 <= parts[0] <= parts[1] <= parts[2]):
        raise click.BadParameter(f"expected MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, got {value}")
    return parts


def _list_models() -> None:
    from rtkit.engines import registry

    rows = []
    for name in registry.list_models():
        e = registry.get_entry(name)
        s = e.spec
        size = "x".join(str(v) for v in s.input_size) if s.input_size else f"any/{s.size_multiple}"
        extra = ",".join(s.extra_inputs) or "-"
        rows.append((name, s.task, size, extra, "tiny" if e.tiny else "", e.description))
    widths = [max(len(r[i]) for r in rows + [("model", "task", "input", "extra", "", "")])
              for i in range(5)]
    head = ("model", "task", "input", "extra", "", "description")
    for r in [head] + rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"],
                                                 "max_content_width": 100})
@click.argument("model", required=False)
@click.argument("out", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--to", "to", type=click.Choice(["onnx", "plan"]),
              help="What to build (default: from OUT's suffix). A plan from a model name also "
                   "writes the ONNX it is built from beside it (OUT with .onnx).")
@click.option("--checkpoint", "-c", type=click.Path(dir_okay=False, path_type=Path),
              help="Weights for MODEL (official files accepted as published); default: the "
                   "model's bundled weights, if any.")
@click.option("--fp16", is_flag=True, help="Type the graph in fp16 (inputs/outputs stay fp32) "
                                            "and build an fp16 plan.")
@click.option("--fp16-io", is_flag=True, help="With --fp16: make the engine's inputs and outputs "
                                               "fp16 too.")
@click.option("--batch", callback=_batch, metavar="MIN:OPT:MAX",
              help="Batch profile (ONNX metadata, TensorRT optimisation profile).  [default: 1:8:64, "
                   "for a plan from an ONNX: the ONNX's profile]")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset.")
@click.option("--channels", type=click.Choice(["RGB", "BGR"]),
              help="Channel order the engine takes, if not the model's (the graph flips channels "
                   "first). E.g. --channels RGB makes an AdaFace (BGR) engine usable by insightface.")
@click.option("--image-size", callback=size_option, metavar="WxH",
              help="Plan profile size for fully convolutional models (any input size).  "
                   "[default: 112x112]")
@click.option("--workspace-gb", type=float, default=4.0, show_default=True,
              help="TensorRT builder workspace limit.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path),
              help="TensorRT timing cache file: loaded if it exists, saved after the build.")
@click.option("--no-parity", is_flag=True, help="Skip the checks (ONNX Runtime vs PyTorch, "
                                                "TensorRT vs ONNX Runtime).")
@click.option("--override", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Builder option of MODEL (e.g. ngf=32), repeatable; a training output's card "
                   "already carries the ones it was trained with.")
@click.option("--random-weights", is_flag=True, help="Allow a full-size model without weights "
              "(random init: for timing only).")
@click.option("--list", "list_", is_flag=True, help="List registered models and exit.")
@user_errors
def main(model, out, to, checkpoint, fp16, fp16_io, batch, opset, channels, image_size,
         workspace_gb, timing_cache, no_parity, overrides, random_weights, list_):
    """Export MODEL (a registered name, see --list) to an ONNX engine or a TensorRT plan OUT,
    or build a plan from an exported MODEL.onnx.

    \b
      rt-export MODEL --checkpoint PATH --to onnx|plan OUT [--fp16] [--batch 1:8:64]
      rt-export MODEL.onnx --to plan OUT.plan
    """
    if list_:
        _list_models()
        return
    if not model or not out:
        raise click.UsageError("give MODEL and OUT (or --list)")
    from rtkit.export.build import export_engine

    written = export_engine(model, out, to=to, checkpoint=checkpoint, overrides=parse_extra(overrides),
                            fp16=fp16, fp16_io=fp16_io, batch=batch, opset=opset, channels=channels,
                            image_size=image_size, workspace_gb=workspace_gb, timing_cache=timing_cache,
                            parity=not no_parity, random_weights=random_weights, log=click.echo)
    click.echo("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
