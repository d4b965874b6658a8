"""rt-generate: ID-conditioned dataset generation (Digi2Real through Arc2Face)."""
from __future__ import annotations

import sys

import click

from rtkit.cli.common import shard_option, user_errors


def _t_value(ctx, param, value):
    """T or LO,HI."""
    if value is None:
        return None
    try:
        parts = [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter("expected a number T or a range LO,HI, e.g. 0.3 or 0,0.3") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return tuple(parts)
    raise click.BadParameter("expected T or LO,HI")


def _generator_options(fn):
    decorators = [
        click.option("--models", type=click.Path(file_okay=False),
                     help="Official Arc2Face folder holding arc2face/ (UNet) and encoder/ (CLIP text encoder)."),
        click.option("--base", type=click.Path(file_okay=False),
                     help="SD-1.5 folder (vae/, tokenizer/, scheduler/), e.g. stable-diffusion-v1-5."),
        click.option("--engine", type=click.Path(),
                     help="An exported Arc2Face card (X.json from rt-export, parts X.<part>.onnx beside it) "
                          "instead of --models/--base."),
        click.option("--generator", "model", default="arc2face", show_default=True,
                     help="Registered generator model for --models/--base (arc2face_tiny: the test variant)."),
        click.option("--random-weights", is_flag=True,
                     help="No weights: run --generator with random weights (timing only)."),
        click.option("--recognizer", "-r", required=True,
                     help="Recognizer for the ID embeddings: an rtkit engine (.onnx/.plan/checkpoint with its "
                          ".json, or a registered name with --recognizer-checkpoint) or an insightface ArcFace "
                          "ONNX such as Arc2Face's arcface.onnx."),
        click.option("--recognizer-checkpoint", type=click.Path(dir_okay=False),
                     help="Weights for a registered recognizer name."),
        click.option("--detector", type=click.Path(dir_okay=False),
                     help="insightface 5-point detector ONNX (antelopev2/scrfd_10g_bnkps.onnx), for "
                          "--detect-sources and --align detect."),
        click.option("--det-size", type=click.IntRange(min=32), help="Detector input size (default 256: "
                     "tight crops are missed at 640)."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N."),
        click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]),
                     help="Runner of --engine parts (default: by file type)."),
        click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
                     show_default=True, help="Torch generator: encoder and UNet precision."),
        click.option("--vae-precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
                     show_default=True, help="Torch generator: VAE precision (fp16 overflows to black images)."),
    ]
    for d in reversed(decorators):
        fn = d(fn)
    return fn


EPILOG = """\b
Digi2Real: for each identity folder of SRC (DigiFace layout, SRC/<identity>/<image>),
the ID embeddings of its images (cached in OUT/.rtkit/embeddings/ per recognizer and file),
the prototype p = normalize(mean normalize(e_i)), and for output k the variation
v_k = slerp(p, e_j, t_k) toward source j = k mod M; the Delta file (digi2real-delta) shifts
the conditioning. Outputs OUT/<identity>/<k>.png are ArcFace-112 crops (a fixed warp from the
generator's 512 frame, --frame; or --align detect), so rt-train recognizer takes OUT as is.

\b
Job: OUT/.rtkit/manifest.sqlite has one row per output image; run the same command again
to resume (after kill -9 too: every output is written exactly once, and the images are the
same bytes as an uninterrupted run's). Noise and t are seeded per output file from its
relative path, so --shard i/n (over the sorted identities) and resuming never change an
image. A corrupt source image is recorded (row source:<relpath>) and left out; an identity
without a usable image fails its outputs and is listed in the summary.

\b
Exit codes: 0 done; 1 user error; 2 some images failed; 3 stopped by --max-failures.

\b
Examples:
  rt-generate digi2real --models models --base sd15 -r models/antelopev2/arcface.onnx digiface/ d2r/
  rt-generate digi2real --engine arc2face.json --device cuda -b 32 -r arcface.onnx digiface/ d2r/ --shard 0/8
  rt-generate digi2real --engine arc2face.json --device cuda -r arcface.onnx --executor ray --ray-address HEAD:6379 digiface/ d2r/
  rt-generate digi2real-delta --models models --base sd15 -r arcface.onnx --real ffhq112/ --synthetic digiface/ -o delta.safetensors
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EPILOG)
def main():
    """Generate face datasets with an ID-conditioned generator (Arc2Face)."""


@main.command("digi2real", epilog=EPILOG, context_settings={"max_content_width": 100})
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@_generator_options
@click.option("--per-identity", "-n", type=click.IntRange(min=1), default=20, show_default=True,
              help="Images generated per identity (Digi2Real-20K has ~20).")
@click.option("--t", "t", callback=_t_value, default="0,0.3", show_default=True,
              help="SLERP weight from the prototype toward each source embedding: T, or LO,HI drawn per output.")
@click.option("--delta", type=click.Path(dir_okay=False), help="Delta file from digi2real-delta (the CLIP shift).")
@click.option("--steps", type=click.IntRange(min=1), help="Sampling steps (default 25).")
@click.option("--guidance", type=float, help="Classifier-free guidance scale (default 3.0).")
@click.option("--scheduler", help="diffusers scheduler class (default DPMSolverMultistepScheduler).")
@click.option("--seed", type=int, help="Base seed (each output's seed derives from it and its path).")
@click.option("--frame", type=click.Choice(["arcface112", "ffhq512"]), default="arcface112", show_default=True,
              help="Template assumed for the generator's 512 frame (arcface112: its training crops, scaled).")
@click.option("--align", type=click.Choice(["warp", "detect"]), default="warp", show_default=True,
              help="Outputs to 112 crops by the fixed warp of --frame, or by 5-point detection (--detector).")
@click.option("--detect-sources", is_flag=True, help="Align source images by detection (--detector) "
              "instead of taking them as ArcFace-aligned crops.")
@click.option("--out-size", type=click.IntRange(16, 4096), default=112, show_default=True, help="Output crop side.")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images per generator call (the UNet runs 2x that with guidance).")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads of torch (default: all cores).")
@click.option("--shard", callback=shard_option, metavar="I/N", help="Generate only shard I of N of the identities.")
@click.option("--max-failures", type=click.IntRange(min=0), help="Stop (exit 3) past this many failed images.")
@click.option("--retry-failed", is_flag=True, help="Try images that failed in earlier runs again.")
@click.option("--restart", is_flag=True, help="Accept changed settings and generate everything again.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: the generator in this process; ray: one generator actor per GPU (--device cuda) "
              "or CPU of a Ray cluster, the manifest and the ID embeddings kept here (needs rtkit[ray]).")
@click.option("--ray-address", metavar="HOST:PORT", help="--executor ray: the cluster to use (default: "
              "$RAY_ADDRESS, else a new local cluster).")
@click.option("--ray-cpus", type=click.IntRange(min=1), help="--executor ray: CPUs of the local cluster "
              "(default: this machine's cores).")
@click.option("--ray-actors", type=click.IntRange(min=1), help="--executor ray: generator actors (default: "
              "one per GPU of the cluster with --device cuda, else one per CPU).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@user_errors
def digi2real_cmd(src, out, models, base, engine, model, random_weights, recognizer, recognizer_checkpoint,
                  detector, det_size, device, backend, precision, vae_precision, per_identity, t, delta, steps,
                  guidance, scheduler, seed, frame, align, detect_sources, out_size, batch_size, threads, shard,
                  max_failures, retry_failed, restart, executor, ray_address, ray_cpus, ray_actors, quiet):
    """Regenerate the identities of SRC (DigiFace layout) as realistic faces into OUT."""
    from rtkit.runtime.generate import run_digi2real

    if threads:
        import torch

        torch.set_num_threads(threads)
    summary = run_digi2real(src, out, recognizer=recognizer, engine=engine, models=models, base=base, model=model,
                            device=device, precision=precision, vae_precision=vae_precision,
                            recognizer_checkpoint=recognizer_checkpoint, detector=detector, det_size=det_size,
                            delta=delta, steps=steps, guidance=guidance, scheduler=scheduler, seed=seed,
                            random_weights=random_weights, backend=backend, per_identity=per_identity, t=t,
                            frame=frame, align=align, detect_sources=detect_sources, out_size=out_size,
                            batch_size=batch_size, shard=shard, max_failures=max_failures,
                            retry_failed=retry_failed, restart=restart, progress=not quiet, executor=executor,
                            ray_address=ray_address, ray_cpus=ray_cpus, ray_actors=ray_actors)
    click.echo(summary.table())
    sys.exit(summary.exit_code)


@main.command("digi2real-delta", context_settings={"max_content_width": 100})
@_generator_options
@click.option("--real", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of real face images (e.g. FFHQ crops).")
@click.option("--synthetic", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of synthetic face images (e.g. DigiFace).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Delta file to write (.safetensors).")
@click.option("--space", type=click.Choice(["conditioning", "id"]), default="conditioning", show_default=True,
              help="conditioning: the encoder output the UNet sees (77 x H); id: the normalised ID vectors.")
@click.option("--scale", type=float, default=1.0, show_default=True, help="lambda: the Delta is applied as lambda x mean difference.")
@click.option("--detect-real", is_flag=True, help="Align the real images by detection (--detector).")
@click.option("--detect-synthetic", is_flag=True, help="Align the synthetic images by detection (--detector).")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=64, show_default=True)
@user_errors
def delta_cmd(models, base, engine, model, random_weights, recognizer, recognizer_checkpoint, detector, det_size,
              device, backend, precision, vae_precision, real, synthetic, output, space, scale, detect_real,
              detect_synthetic, batch_size):
    """Compute the Digi2Real CLIP shift Delta = lambda (mean real - mean synthetic) and save it with its provenance."""
    from rtkit.engines.errors import RtkitError
    from rtkit.runtime.generate import delta_from_sets, open_generator, open_recognizer

    det = None
    if detect_real or detect_synthetic:
        if detector is None:
            raise RtkitError("--detect-real / --detect-synthetic need --detector")
        from rtkit.engines.digi2real import DET_SIZE, FaceDetector

        det = FaceDetector(detector, det_size=det_size or DET_SIZE)
    rec = open_recognizer(recognizer, device=device, checkpoint=recognizer_checkpoint)
    gen = None
    try:
        if space == "conditioning":
            gen = open_generator(engine=engine, models=models, base=base, model=model, device=device,
                                 precision=precision, vae_precision=vae_precision, random_weights=random_weights,
                                 backend=backend)
        delta, problems = delta_from_sets(real, synthetic, rec, gen, space=space, scale=scale,
                                          real_detector=det if detect_real else None,
                                          synthetic_detector=det if detect_synthetic else None,
                                          batch_size=batch_size)
    finally:
        rec.close()
        if gen is not None:
            gen.close()
    path = delta.save(output)
    p = delta.provenance
    click.echo(f"wrote {path}: {space} space {tuple(delta.vector.shape)}, scale {scale:g}, from {p['n_real']} real "
               f"and {p['n_synthetic']} synthetic images; |Delta| = {float(delta.vector.norm()):.4g}")
    for rel, why in problems[:20]:
        click.echo(f"  unusable: {rel}: {why}")
    if len(problems) > 20:
        click.echo(f"  ... {len(problems) - 20} more unusable files")


if __name__ == "__main__":
    main()
