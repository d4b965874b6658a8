"""rt-convert: convert a whole image tree through a translator engine."""
from __future__ import annotations

import sys

import click

from rtkit.cli.common import (engine_options, parse_extra, random_weights_option, shard_option, size_option,
                              user_errors)
from rtkit.engines.errors import RtkitError


def _devices(ctx, param, value):
    """cuda:0,cuda:1 | all | cpu,cpu: the syntax here; whether the CUDA devices exist, in main."""
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise click.BadParameter("expected a comma-separated list such as cuda:0,cuda:1, or all")
    if names == ["all"]:
        return names
    for n in names:
        kind, colon, index = n.partition(":")
        if not (n == "cpu" or (kind == "cuda" and (not colon or index.isdigit()))):
            raise click.BadParameter(f"{n!r} is not a device; use cuda:N, all, or cpu")
    return names


def _cuda_devices(names: list[str] | None) -> list[str] | None:
    """Expand 'all' to every CUDA device and check that the named ones exist (one-line errors)."""
    if not names or not (names == ["all"] or any(n.startswith("cuda") for n in names)):
        return names
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise RtkitError(f"--devices {','.join(names)}: no CUDA device is visible here; name CPU "
                         f"devices (cpu,cpu) or leave --devices out")
    if names == ["all"]:
        return [f"cuda:{i}" for i in range(count)]
    for n in names:
        if ":" in n and int(n.split(":")[1]) >= count:
            raise RtkitError(f"--devices: {n} does not exist here ({count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1})")
    return names


EPILOG = """\b
Pipeline: decode workers -> batcher -> runner -> encode workers, overlapped with bounded
queues. An ONNX engine on CPU runs instead as one process per core (--processes), each
decoding, translating and encoding whole batches, overlapping with the others; the main
process hands out batches and keeps the manifest. OUT mirrors SRC (file extensions follow
--format). The job manifest
OUT/.rtkit/manifest.sqlite (manifest.shard-I-of-N.sqlite with --shard) has one row per
source file: status (done/failed/skipped), error, output, sha256, engine.

\b
Resume: run the same command again. Finished files are not redone; a run killed at any
moment leaves no partial file (an output is written unnamed and linked under its name
when complete, or written to .NAME.part and renamed).
Corrupt, truncated, zero-byte and non-image files are recorded with their reason and
skipped. --shard i/n splits the sorted file list so n processes/GPUs/machines share
a dataset without coordination.

\b
Safety: OUT may not be SRC, contain SRC or link into it (OUT inside SRC is skipped by the
walk); one run at a time holds OUT (a second is told who holds it), and a new run starts only
once every process of a killed one has exited. Each row records its source's size, mtime,
ctime and sha256 and its output's sha256, size and mtime: a changed source, a lost or damaged
output, or an output of other settings is redone, never reported done. Output-name
collisions (a/x.png and a/x.jpg) are refused before any work. A full or read-only output
folder stops the run with one line; nothing untried is marked failed.

\b
Exit codes: 0 everything converted; 1 user error (bad path, engine, option);
2 finished, but some files failed (see the summary and the manifest);
3 stopped early because failures exceeded --max-failures; 130 / 143 stopped by Ctrl-C /
SIGTERM (finished files are kept).

\b
Examples:
  rt-convert --engine render2photo.onnx sample/render out/
  rt-convert --engine vsait.plan --device cuda --batch-size 256 digiface/ out/ --shard 0/4
  rt-convert --engine codeformer_arcface112 --checkpoint codeformer.pth --set w=0.7 src/ out/
  rt-convert --engine vsait.onnx --devices all digiface/ out/        # one worker per GPU here
  rt-convert --engine vsait.onnx --device cuda --executor ray --ray-address HEAD:6379 digiface/ out/
"""


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"],
                                                 "max_content_width": 100})
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@engine_options
@random_weights_option
@click.option("--format", "fmt", type=click.Choice(["png", "jpg", "webp"]), default="png",
              show_default=True, help="Output image format.")
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True,
              help="JPEG/WebP quality.")
@click.option("--size", callback=size_option, help="Output size N or WxH (default: the source size). "
              "Images are resized to the engine's input size by the engine's resize policy and back.")
@click.option("--batch-size", "-b", type=click.IntRange(min=1),
              help="Images per runner call (default: 4 on CPU, 64 on GPU).")
@click.option("--decode-workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Threaded pipeline: CPU threads decoding and preprocessing.")
@click.option("--encode-workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Threaded pipeline: CPU threads postprocessing, encoding and writing.")
@click.option("--infer-workers", type=click.IntRange(min=1), help="Threaded pipeline: threads "
              "calling the runner concurrently (default: one per core for an ONNX engine on CPU, else 1; "
              "setting it selects the threaded pipeline).")
@click.option("--runner-threads", type=click.IntRange(min=1), help="Intra-op threads of the ONNX "
              "Runtime CPU runner (setting it selects the threaded pipeline; default: all cores).")
@click.option("--processes", type=click.IntRange(min=0), help="ONNX engines on CPU: conversion "
              "processes, one single-threaded engine each, so each holds its own copy of the weights "
              "(default: one per core; 0 = the threaded pipeline in one process, as for GPU, TensorRT "
              "and torch engines).")
@click.option("--devices", callback=_devices, metavar="LIST", help="One worker process per device "
              "over the same job and manifest: cuda:0,cuda:1, all (every CUDA device), or cpu,cpu.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: threads, processes or --devices on this machine; ray: one runner actor per "
              "GPU (--device cuda) or CPU of a Ray cluster, the manifest kept here (needs rtkit[ray]).")
@click.option("--ray-address", metavar="HOST:PORT", help="--executor ray: the cluster to use (default: "
              "$RAY_ADDRESS, else a new local cluster).")
@click.option("--ray-cpus", type=click.IntRange(min=1), help="--executor ray: CPUs of the local cluster "
              "(default: this machine's cores).")
@click.option("--ray-actors", type=click.IntRange(min=1), help="--executor ray: runner actors (default: "
              "one per GPU of the cluster with --device cuda, else one per CPU).")
@click.option("--source", type=click.Choice(["cpu", "dali"]), default="cpu", show_default=True,
              help="Image decoding: cpu (threads or conversion processes) or dali (nvidia-dali, extra "
              "'dali': JPEG on the GPU with --device cuda, PNG on DALI's CPU threads; threaded pipeline).")
@click.option("--image-ops", type=click.Choice(["cv2", "torch"]), help="Pre/post-processing: cv2 "
              "(OpenCV on CPU threads) or torch (batched on the runner's device, only uint8 copied; "
              "threaded pipeline). Default: torch with --device cuda, else cv2.")
@click.option("--encode-processes", type=click.IntRange(min=0), default=0, show_default=True,
              help="Threaded pipeline: encode and write in this many processes (GPU machines, where "
              "encoding is the CPU-bound stage; 0 = encoder threads).")
@click.option("--compile", "compile_", is_flag=True, help="Torch engines: run the module through "
              "torch.compile (one graph per job: the last batch is padded to the batch size).")
@click.option("--shard", callback=shard_option, metavar="I/N", help="Convert only shard I of N (0-based).")
@click.option("--max-failures", type=click.IntRange(min=0),
              help="Stop (exit 3) once more files than this have failed in this run.")
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE",
              help="Runtime input of the engine, e.g. w=0.7 for CodeFormer (repeatable).")
@click.option("--retry-failed", is_flag=True, help="Try files that failed in earlier runs again.")
@click.option("--restart", is_flag=True, help="Accept changed settings and convert everything again.")
@click.option("--sheet", type=click.Path(dir_okay=False), help="Also write a before/after contact "
              "sheet PNG of converted images.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@user_errors
def main(src, out, engine, checkpoint, device, backend, precision, random_weights, fmt, quality, size, batch_size,
         decode_workers, encode_workers, infer_workers, runner_threads, processes, devices, executor,
         ray_address, ray_cpus, ray_actors, source, image_ops, encode_processes, compile_, shard, max_failures, extra, retry_failed, restart, sheet, quiet):
    """Convert every image under SRC through a translator ENGINE into OUT."""
    from rtkit.runtime.converter import convert

    summary = convert(engine, src, out, device=device, backend=backend, checkpoint=checkpoint,
                      precision=precision, extra=parse_extra(extra), runner_threads=runner_threads,
                      infer_workers=infer_workers, processes=processes, random_weights=random_weights,
                      devices=_cuda_devices(devices), executor=executor, ray_address=ray_address,
                      ray_cpus=ray_cpus, ray_actors=ray_actors, source=source, image_ops=image_ops, compile=compile_,
                      encode_processes=encode_processes,
                      fmt=fmt, quality=quality, size=size, batch_size=batch_size,
                      decode_workers=decode_workers, encode_workers=encode_workers, shard=shard,
                      max_failures=max_failures, retry_failed=retry_failed, restart=restart,
                      progress=not quiet)
    click.echo(summary.table())
    if sheet and summary.converted + summary.already_done + summary.adopted:
        from rtkit.runtime.contact_sheet import sheet_from_manifest
        from rtkit.runtime.manifest import Manifest

        with Manifest(summary.manifest) as man:
            click.echo(f"contact sheet: {sheet_from_manifest(src, out, man, sheet)}")
    sys.exit(summary.exit_code)
