"""rt-eval: evaluate recognizers on verification .bin benchmarks and IJB-C/IJB-B, and report."""
from __future__ import annotations


import click

from rtkit.cli.common import engine_options, random_weights_option, user_errors


def _embedding_options(fn):
    """--batch-size, --workers, --cache-dir, --no-cache, --no-flip, --label, --run."""
    decorators = [
        click.option("--batch-size", "-b", default=64, show_default=True,
                     help="Images per runner call (each call is repeated for the flipped images)."),
        click.option("--workers", "-j", type=int, default=None,
                     help="Decode/alignment threads [default: min(8, CPU cores)]."),
        click.option("--cache-dir", type=click.Path(file_okay=False),
                     help="Embedding cache [default: $RTKIT_EMBED_CACHE or "
                          "~/.cache/rtkit/embeddings]. Keyed by engine identity, benchmark file "
                          "hash and flip, so evaluating again costs nothing."),
        click.option("--no-cache", is_flag=True, help="Neither read nor write the embedding cache."),
        click.option("--no-flip", is_flag=True,
                     help="Embed only the images, not also their horizontal flips."),
        click.option("--label", help="Report row this result belongs to (training data / transfer "
                                     "method, e.g. DigiFace1M) [default: checkpoint file stem, "
                                     "else model name]."),
        click.option("--run", "run_id", help="Run id; runs sharing a label are aggregated as mean "
                                             "± std [default: engine hash prefix]."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    ]
    for d in reversed(decorators):
        fn = d(fn)
    return fn


def _embedder(engine, checkpoint, device, backend, precision, random_weights, batch_size, workers,
              cache_dir, no_cache, quiet):
    from rtkit.eval.embed import Embedder

    return Embedder(engine, checkpoint=checkpoint, device=device, backend=backend,
                    precision=precision, batch_size=batch_size, workers=workers,
                    cache_dir=False if no_cache else cache_dir, progress=not quiet,
                    random_weights=random_weights)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Evaluate face recognizers: verification .bin benchmarks (LFW, CFP-FP, CPLFW, CALFW,
    AgeDB-30), IJB-C / IJB-B 1:1, and reports over several runs.

    A recognizer is a registered model (iresnet50, adaface_ir50, ...) with --checkpoint, an
    exported .onnx/.plan with its metadata, or a plain insightface recognition .onnx. It runs
    through the runtime's runners on CPU or GPU; the input size, range and channel order come
    from the model's spec (AdaFace takes BGR, the runtime swaps).
    """


@main.command(epilog="""\b
Protocol (insightface): embeddings of each image and its flip are summed and
L2-normalised; distance is squared L2; thresholds 0, 0.01, ..., 3.99; ten contiguous
folds, the best threshold of nine folds applied to the tenth; accuracy = mean ± std over
folds. The five-benchmark average is printed when lfw, cfp_fp, cplfw, calfw and agedb_30
are all given (file names give benchmark names).

\b
Example:
  rt-eval verify -e adaface_ir50 --checkpoint run1/model.pt --bin data/faces_bins/ \\
      --label DigiFace1M --run seed1 --out results/digiface_seed1.json""")
@engine_options
@random_weights_option
@click.option("--bin", "bins", multiple=True, required=True, type=click.Path(),
              help="A verification .bin (repeat for several), or a folder holding lfw.bin, "
                   "cfp_fp.bin, cplfw.bin, calfw.bin, agedb_30.bin.")
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help="Write the result document (JSON, input of 'rt-eval report') here.")
@click.option("--folds", default=10, show_default=True,
              help="Number of folds (2 or more; each fold's threshold is chosen on the others).")
@_embedding_options
@user_errors
def verify(engine, checkpoint, device, backend, precision, random_weights, bins, out, folds, batch_size, workers,
           cache_dir, no_cache, no_flip, label, run_id, quiet):
    """Accuracy on insightface verification .bin files (10-fold protocol)."""
    from rtkit.eval.results import write_result
    from rtkit.eval.verification import check_n_folds, format_verification, run_verification

    check_n_folds(folds)  # before the recognizer is opened

    with _embedder(engine, checkpoint, device, backend, precision, random_weights, batch_size, workers,
                   cache_dir, no_cache, quiet) as emb:
        doc = run_verification(emb, bins, flip=not no_flip, n_folds=folds, label=label,
                               run=run_id)
    click.echo(format_verification(doc))
    if out:
        click.echo(f"wrote {write_result(doc, out)}")


@main.command(epilog="""\b
ROOT holds meta/ijbc_face_tid_mid.txt, meta/ijbc_template_pair_label.txt,
meta/ijbc_name_5pts_score.txt and loose_crop/ (ijbb_* for IJB-B). Faces are aligned from
the 5 landmarks to the ArcFace 112x112 template on worker threads. TAR is reported at
FMR 1e-6 .. 1e-1 under two labelled conventions: 'insightface' (ROC point with FPR nearest
the target, as eval_ijbc.py; the point's ROC index is recorded) and 'bob_measure' (threshold
among the impostor scores with FMR <= target, as bob.measure.far_threshold; TAR = 1 - FNMR
from bob.measure.farfrr), with the EER as bob.measure.eer. With --out, the ROC curve is
written beside it as .png and .pdf.

\b
Example:
  rt-eval ijbc -e iresnet50 --checkpoint backbone.pth --root /data/IJB_release/IJBC \\
      --device cuda --batch-size 256 --label WebFace4M --out results/webface_ijbc.json""")
@engine_options
@random_weights_option
@click.option("--root", required=True, type=click.Path(),
              help="The IJB-C (or IJB-B) folder: meta/ and loose_crop/.")
@click.option("--dataset", type=click.Choice(["IJBC", "IJBB"], case_sensitive=False),
              default="IJBC", show_default=True, help="Which benchmark's meta files to read.")
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help="Write the result document (JSON) here, and the ROC as .png/.pdf beside it.")
@click.option("--norm-weight/--no-norm-weight", default=True, show_default=True,
              help="Keep each image feature's norm as its weight in the template "
                   "(insightface default); off: unit-normalise image features first.")
@click.option("--faceness/--no-faceness", default=True, show_default=True,
              help="Weight image features by the detector's faceness score.")
@click.option("--save-scores", type=click.Path(dir_okay=False),
              help="Also save the template-pair scores as .npy.")
@_embedding_options
@user_errors
def ijbc(engine, checkpoint, device, backend, precision, random_weights, root, dataset, out, norm_weight, faceness,
         save_scores, batch_size, workers, cache_dir, no_cache, no_flip, label, run_id, quiet):
    """IJB-C / IJB-B 1:1 template verification: TAR at FMR, AUC, ROC."""
    from rtkit.eval.ijbc import format_ijb, run_ijb
    from rtkit.eval.report import write_ijb_outputs

    with _embedder(engine, checkpoint, device, backend, precision, random_weights, batch_size, workers,
                   cache_dir, no_cache, quiet) as emb:
        doc, curve = run_ijb(emb, root, dataset.upper(), flip=not no_flip,
                             norm_weight=norm_weight, faceness_weight=faceness, label=label,
                             run=run_id, scores_out=save_scores)
    click.echo(format_ijb(doc))
    if out:
        for p in write_ijb_outputs(doc, curve, out):
            click.echo(f"wrote {p}")


@main.command(epilog="""\b
Rows are labels (training data / transfer method) in the order first seen; runs with the
same label are aggregated as mean ± sample std. Table 2 shows the benchmarks the results
hold; its avg is the five-benchmark average when all five are there, else the mean over
those present (the column title says which). Writes DIR/report.md (all tables),
DIR/table2_verification.csv, DIR/table3_<dataset>_<convention>.csv (insightface and
bob_measure) and
DIR/roc_<dataset>.png/.pdf (mean ROC per label).

\b
Example:
  rt-eval report results/*.json --out report/""")
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the Markdown/CSV tables and ROC figures.")
@click.option("--no-plots", is_flag=True, help="Tables only.")
@user_errors
def report(results, out_dir, no_plots):
    """Tables 2 (verification) and 3 (IJB TAR@FMR) and ROC figures from result files
    (or folders of them)."""
    from rtkit.eval.report import write_report

    for p in write_report(results, out_dir, plots=not no_plots):
        click.echo(f"wrote {p}")


@main.command("make-pairs", epilog="""\b
ROOT holds one folder per identity (ROOT/<identity>/<image>, e.g. a DigiFace-style tree or
rt-sample output). The pairs are laid out as LFW's and the .bin benchmarks': N folds of
P pairs, each fold P/2 genuine pairs then P/2 impostor pairs, every identity in one fold
only (thresholds are chosen on other people), seeded. Evaluate with the same --folds.

\b
Example:
  rt-eval make-pairs aligned/ pairs.txt --folds 10 --pairs-per-fold 600 --seed 0
  rt-eval make-bin aligned/ pairs.txt mybench.bin""")
@click.argument("root", type=click.Path())
@click.argument("pairs", type=click.Path(dir_okay=False))
@click.option("--folds", default=10, show_default=True, help="Identity-disjoint folds (2 or more).")
@click.option("--pairs-per-fold", default=600, show_default=True,
              help="Pairs in each fold, half genuine and half impostor (LFW: 600).")
@click.option("--seed", default=0, show_default=True, help="Seed of the draw.")
@user_errors
def make_pairs(root, pairs, folds, pairs_per_fold, seed):
    """Write a genuine/impostor pairs list of an identity-folder tree (input of make-bin)."""
    from rtkit.eval.pairs import make_pairs as write_pairs

    res = write_pairs(root, pairs, folds=folds, pairs_per_fold=pairs_per_fold, seed=seed)
    click.echo(f"wrote {res.path}: {res.pairs} pairs in {res.folds} folds "
               f"({res.pairs_per_fold // 2} genuine + {res.pairs_per_fold // 2} impostor each) "
               f"from {res.identities} identities, {res.images} images")


@main.command("make-bin", epilog="""\b
PAIRS lists one pair per line: 'relpath1 relpath2 1' (same person) or '... 0'
('rt-eval make-pairs' writes one). Images (JPEG/PNG, ideally aligned 112x112) are stored
as they are; each is checked to decode.

\b
Example:
  rt-eval make-bin aligned/ pairs.txt mybench.bin""")
@click.argument("root", type=click.Path())
@click.argument("pairs", type=click.Path())
@click.argument("out_bin", type=click.Path(dir_okay=False))
@user_errors
def make_bin(root, pairs, out_bin):
    """Build an insightface-format verification .bin from a folder and a pairs list."""
    from rtkit.eval.verification import build_bin

    n = build_bin(root, pairs, out_bin)
    click.echo(f"wrote {out_bin}: {n} pairs")


if __name__ == "__main__":
    main()
