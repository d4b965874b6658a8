"""rt-train: training commands (the demo translator, recognizers, translators)."""
from __future__ import annotations

import click

from rtkit.cli.common import user_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Train translators and face recognizers."""


@main.command("demo-translator")
@click.option("--out", type=click.Path(file_okay=False), default="engines/bundled", show_default=True,
              help="Folder for render2photo.safetensors / .onnx / .json.")
@click.option("--steps", type=click.IntRange(min=1), default=1200, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@user_errors
def demo_translator(out, steps, seed):
    """Train the bundled render2photo translator on the sample dataset (paired L1, CPU, minutes).

    This reproduces the engine shipped in engines/bundled/ and used by the demo.
    """
    from rtkit.train.demo_translator import DemoTranslatorConfig, train_demo_translator

    torch_threads()
    r = train_demo_translator(out, DemoTranslatorConfig(steps=steps, seed=seed))
    click.echo(f"wrote {r['weights']} and {r['onnx']} ({r['params']} parameters, {r['seconds']:.0f} s)")


def torch_threads():
    import os

    import torch
    torch.set_num_threads(max(1, os.cpu_count() or 1))
