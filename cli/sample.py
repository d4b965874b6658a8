"""rt-sample: write the procedural sample face dataset (DigiFace-1M layout)."""
from __future__ import annotations

import time

import click

from rtkit.cli.common import user_errors

EPILOG = """\b
Layout: OUT/<identity>/<k>.png (identity folders 0, 1, ...; k = 0..K-1), 112x112 RGB,
eyes, nose tip and mouth corners near the ArcFace-112 template, as in DigiFace-1M.
With --style both: OUT/render/... and OUT/photo/..., pixel-aligned pairs of one scene.
The same arguments always give byte-identical files.

\b
Examples:
  rt-sample data/sample                       # 20 identities x 8 renders
  rt-sample data/pairs --style both -n 50 -k 8
  rt-sample data/test --style photo -n 20 --first-identity 100   # identities 100..119
"""


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--style", type=click.Choice(["render", "photo", "both"]), default="render", show_default=True,
              help="render: flat colours, hard edges (the synthetic look); photo: soft light, texture, noise, "
                   "JPEG artefacts (the realistic look); both: one folder for each.")
@click.option("--identities", "-n", type=click.IntRange(min=1), default=20, show_default=True,
              help="Number of identities (folders).")
@click.option("--per-identity", "-k", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images per identity.")
@click.option("--first-identity", type=click.IntRange(0, 2 ** 32 - 1), default=0, show_default=True,
              help="Number of the first identity (and its folder name): sets of one seed with disjoint "
                   "ranges share no identity, e.g. train -n 100, test --first-identity 100.")
@click.option("--seed", type=click.IntRange(0, 2 ** 32 - 1), default=0, show_default=True,
              help="Seed of the whole dataset: another seed gives other identities.")
@click.option("--size", type=click.IntRange(32, 1024), default=112, show_default=True,
              help="Image side in pixels (the geometry scales with it).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Drawing threads (default: up to 4). Does not change the output.")
@user_errors
def main(out, style, identities, per_identity, first_identity, seed, size, workers):
    """Write a deterministic procedural face dataset to OUT for demos and tests."""
    from rtkit.datasets.sample import make_sample_dataset

    start = time.perf_counter()
    paths = make_sample_dataset(out, style=style, identities=identities, per_identity=per_identity,
                                seed=seed, size=size, workers=workers, first_identity=first_identity)
    took = time.perf_counter() - start
    looks = "render + photo pairs" if style == "both" else style
    ids = f" {first_identity}..{first_identity + identities - 1}" if first_identity else ""
    click.echo(f"wrote {len(paths)} images ({identities} identities{ids} x {per_identity}, {looks}, "
               f"{size}x{size}, seed {seed}) to {out} in {took:.1f} s")


if __name__ == "__main__":
    main()
