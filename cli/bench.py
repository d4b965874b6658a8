"""rt-bench: per-image inference throughput of engines (the paper's Table 1, on your hardware)."""
from __future__ import annotations

import click

from rtkit.cli.common import parse_extra, user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
               epilog="""\b
Examples:
  rt-bench render2photo engines/bundled/render2photo.onnx
  rt-bench vsait --checkpoint vsait.ckpt --device cuda --batch-size 64 --size 256
  rt-bench codeformer --checkpoint codeformer.pth --batch-size 1
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
@user_errors
def main(engines, checkpoint, device, backend, precision, batch_size, size, seconds, extra):
    """Time ENGINES (files or registered model names) on seeded inputs; print a Markdown table."""
    from rtkit.runtime.bench import bench_runner, table
    from rtkit.runtime.runners import open_engine

    results = []
    for e in engines:
        with open_engine(e, device=device, backend=backend, checkpoint=checkpoint, precision=precision,
                         extra=parse_extra(extra)) as r:
            results.append(bench_runner(r, batch_size=batch_size, size=size, min_seconds=seconds,
                                        device=device))
    click.echo(table(results))
