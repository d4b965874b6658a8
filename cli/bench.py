"""rt-bench: inference throughput of engines, and the paper's Table 1 on your hardware.

``rt-bench MODEL...`` (the ``time`` command, the default) times runners on seeded inputs;
``rt-bench table1`` measures compute-only and end-to-end rates for every translator.
"""
from __future__ import annotations

import click

from rtkit.cli.common import parse_extra, user_errors

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class DefaultGroup(click.Group):
    """A group whose first argument, when it is not a command name, goes to ``time``: so
    ``rt-bench vsait --batch-size 64`` keeps meaning ``rt-bench time vsait --batch-size 64``."""

    default_command = "time"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup, context_settings=CONTEXT, epilog="""\b
Examples:
  rt-bench render2photo engines/bundled/render2photo.onnx      (same as rt-bench time ...)
  rt-bench vsait --checkpoint vsait.ckpt --device cuda --batch-size 64 --size 256
  rt-bench table1 --tiny --out table1/
  rt-bench table1 --device cuda --random-weights --out table1/
""")
def main():
    """Time engines ('time', the default command) or measure the paper's Table 1 ('table1')."""


@main.command("time", context_settings=CONTEXT, epilog="""\b
Examples:
  rt-bench time render2photo engines/bundled/render2photo.onnx
  rt-bench time codeformer --checkpoint codeformer.pth --batch-size 1
""")
@click.argument("engines", nargs=-1, required=True)
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Weights for a registered model name.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--size", type=click.IntRange(min=8), help="Input side for fully convolutional engines "
              "(default 112).")
@click.option("--seconds", type=float, default=2.0, show_default=True, help="Minimum timed seconds.")
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE", help="Runtime input, e.g. w=0.5.")
@click.option("--random-weights", is_flag=True, help="Time a model that has no weights here with "
              "random ones (speed does not depend on them).")
@user_errors
def time_cmd(engines, checkpoint, device, backend, precision, batch_size, size, seconds, extra,
             random_weights):
    """Time ENGINES (files or registered model names) on seeded inputs; print a Markdown table."""
    from rtkit.runtime.bench import bench_runner, table
    from rtkit.runtime.runners import open_engine

    results = []
    for e in engines:
        with open_engine(e, device=device, backend=backend, checkpoint=checkpoint, precision=precision,
                         extra=parse_extra(extra), random_weights=random_weights) as r:
            results.append(bench_runner(r, batch_size=batch_size, size=size, min_seconds=seconds,
                                        device=device))
    click.echo(table(results))


def _csv_list(cast):
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return [cast(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None
    return parse


def _checkpoints(ctx, param, values):
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected MODEL=PATH, got {v!r}")
        out[name] = path
    return out


@main.command("table1", context_settings=CONTEXT, epilog="""\b
Writes OUT/table1.md, OUT/table1.csv and OUT/table1.png (bar chart, log scale) and prints the
Markdown table. Models without weights here are timed only with --random-weights, and the table
labels them. The naive loop runs one image at a time through PyTorch (fp32, batch 1).
\b
Examples:
  rt-bench table1 --tiny --images 16 --seconds 0.5 --out table1-tiny/
  rt-bench table1 vsait codeformer --device cuda --random-weights --batch-sizes 1,64 --out t1/
""")
@click.argument("models", nargs=-1)
@click.option("--tiny", is_flag=True, help="Every tiny translator (the default: every full-size one).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--backends", callback=_csv_list(str), help="Comma-separated, from torch, onnxruntime, "
              "tensorrt (default: every one available here).")
@click.option("--precisions", callback=_csv_list(str), help="Comma-separated, from fp32, fp16, bf16 "
              "(default: fp32 on CPU, fp32,fp16 on CUDA).")
@click.option("--batch-sizes", callback=_csv_list(int), help="Comma-separated (default: 1,8 on CPU, "
              "1,16,64 on CUDA).")
@click.option("--images", type=click.IntRange(min=1), default=32, show_default=True,
              help="Sample images converted end to end (and by the naive loop) per configuration.")
@click.option("--seconds", type=float, default=2.0, show_default=True,
              help="Minimum timed seconds of each compute-only measurement.")
@click.option("--naive-seconds", type=float, help="Stop the naive loop after this many seconds "
              "(default: all --images).")
@click.option("--size", type=click.IntRange(min=8), help="Input side for fully convolutional models "
              "(default 112).")
@click.option("--checkpoint", "checkpoints", multiple=True, callback=_checkpoints, metavar="MODEL=PATH",
              help="Weights of one model (repeatable).")
@click.option("--random-weights", is_flag=True, help="Time models that have no weights here with "
              "random ones (labelled in the table).")
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE", help="Runtime input for every model.")
@click.option("--threads", type=click.IntRange(min=1), help="torch intra-op threads (default: torch's; "
              "1 avoids oversubscription on a loaded CPU).")
@click.option("--out", type=click.Path(file_okay=False), default="table1", show_default=True,
              help="Folder for table1.md, table1.csv, table1.png and the work files (OUT/work).")
@user_errors
def table1_cmd(models, tiny, device, backends, precisions, batch_sizes, images, seconds, naive_seconds,
               size, checkpoints, random_weights, extra, threads, out):
    """Measure the paper's Table 1 for MODELS (default: every translator) on this machine."""
    from pathlib import Path

    from rtkit.engines.registry import list_models
    from rtkit.runtime.bench import Table1Options, table1, table1_markdown, write_table1

    models = list(models) or list_models(task="translate", tiny=tiny)
    opts = Table1Options(device=device, backends=backends, precisions=precisions, batch_sizes=batch_sizes,
                         images=images, seconds=seconds, naive_seconds=naive_seconds, size=size,
                         checkpoints=checkpoints, random_weights=random_weights, extra=parse_extra(extra),
                         threads=threads)
    rows = table1(models, Path(out) / "work", opts, log=lambda s: click.echo(s, err=True))
    paths = write_table1(rows, out, device)
    click.echo(table1_markdown(rows, device))
    click.echo("\nwrote " + ", ".join(str(p) for p in paths.values()))


@main.command("generate", context_settings=CONTEXT, epilog="""\b
Examples:
  rt-bench generate --tiny
  rt-bench generate --random-weights --device cuda --precision fp16 --batch-sizes 8,16,32 --steps 25,4
  rt-bench generate --engine a2f.json --device cuda
""")
@click.option("--engine", help="An exported generator card (X.json); default: the registered model.")
@click.option("--models", type=click.Path(file_okay=False), help="Arc2Face folder (arc2face/, encoder/).")
@click.option("--base", type=click.Path(file_okay=False), help="Stable Diffusion 1.5 folder (vae/, tokenizer/).")
@click.option("--tiny", is_flag=True, help="The tiny registered generator (arc2face_tiny).")
@click.option("--random-weights", is_flag=True, help="Full-size random weights (speed does not depend on them).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--vae-precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="The VAE's precision (fp16 VAEs overflow to black images; fp32 or bf16).")
@click.option("--batch-sizes", default="1,4,8", show_default=True, callback=_csv_list(int))
@click.option("--steps", default="25,4", show_default=True, callback=_csv_list(int))
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True)
@user_errors
def generate_cmd(engine, models, base, tiny, random_weights, device, precision, vae_precision,
                 batch_sizes, steps, repeats):
    """Time the Arc2Face generator: s/img and img/s per batch size and number of steps (guidance
    in one batched UNet call)."""
    from rtkit.runtime.generate import open_generator, time_generator

    sync = None
    if str(device).startswith("cuda"):
        import torch

        sync = torch.cuda.synchronize
    with open_generator(engine=engine, models=models, base=base, model="arc2face_tiny" if tiny else "arc2face",
                        device=device, precision=precision, vae_precision=vae_precision,
                        random_weights=random_weights) as gen:
        rows = time_generator(gen, batch_sizes=batch_sizes, steps=steps, repeats=repeats, sync=sync)
    click.echo("| batch | steps | guidance | s/img | img/s |\n|---|---|---|---|---|")
    for r in rows:
        click.echo(f"| {r['batch']} | {r['steps']} | {r['guidance']} | {r['s_per_img']:.4f} | {r['img_per_s']:.1f} |")
