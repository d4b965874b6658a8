"""``convert``: what rt-convert runs. It opens the engine, takes the output lock, picks the executor
and hands them to the job (runtime/job.py), which owns the plan, the manifest and the guarantees.

Executors: the threaded pipeline (runtime/executors.py) for GPU, TensorRT and torch engines;
conversion processes (runtime/processes.py), one per core for ONNX engines on CPU, or one per
device with ``devices``; runner actors on a Ray cluster with ``executor="ray"``
(runtime/ray_executor.py).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from rtkit.engines.errors import RtkitError
from rtkit.runtime.job import ConvertOptions, Summary, run_job
from rtkit.runtime.manifest import manifest_path
from rtkit.runtime.outdir import OutputLock, check_folders
from rtkit.runtime.runners import Runner, open_engine
from rtkit.runtime.stages import CpuSource


def default_workers() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count), up to 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 2
    return max(1, min(16, cores))


SOURCES = ("cpu", "dali")


def make_source(name: str, src: Path, device: str, batch_size: int):
    """The Source behind ``--source``: CPU decode, or DALI (on the GPU when ``device`` is CUDA,
    CPU-only otherwise)."""
    if name == "dali":
        from rtkit.runtime.dali_source import DaliSource

        return DaliSource(os.fspath(src), device=device if str(device).startswith("cuda") else "cpu",
                          batch_size=batch_size)
    return CpuSource(os.fspath(src))


def _is_onnx(engine, backend) -> bool:
    return (not isinstance(engine, Runner)
            and (backend in ("onnxruntime", "ort", "onnx") or str(engine).endswith(".onnx")))


def convert(engine: str | Path | Runner, src: str | Path, out: str | Path, *,
            device: str = "cpu", backend: str | None = None, checkpoint: str | Path | None = None,
            precision: str = "fp32", extra: dict[str, Any] | None = None,
            runner_threads: int | None = None, infer_workers: int | None = None,
            processes: int | None = None, devices: list[str] | None = None,
            executor: str = "local", ray_address: str | None = None, ray_cpus: int | None = None,
            ray_actors: int | None = None, random_weights: bool = False, source: str = "cpu",
            image_ops: str | None = None, compile: bool = False, encode_processes: int = 0,
            **options) -> Summary:
    """Convert every image under ``src`` into ``out`` through ``engine`` (see rt-convert --help).

    An ONNX engine on CPU runs by default as one conversion process per core, each decoding,
    translating (single-threaded) and encoding whole batches: there every stage competes for
    the same cores, and processes spend none of it on the interpreter lock or thread hand-overs.
    ``processes=0`` (or explicit thread options) selects the threaded pipeline, which GPUs,
    TensorRT and torch engines use. ``devices`` runs one worker process per device.
    ``executor="ray"`` runs one runner actor per GPU (or CPU) of a Ray cluster instead: the one at
    ``ray_address``, else a local one of ``ray_cpus`` CPUs. ``source``: "cpu" (decode threads or
    processes) or "dali" (nvidia-dali: JPEG on the GPU, PNG on DALI's CPU threads; the threaded
    pipeline). ``image_ops``: "cv2" (OpenCV on CPU threads) or "torch" (batched torch on the
    runner's device: uint8 copies only); default torch on CUDA, cv2 otherwise. ``encode_processes``:
    the threaded pipeline encodes and writes in that many processes (GPU machines: encoding is the
    CPU-bound stage).
    """
    t_start = time.perf_counter()
    cpu_onnx = str(device) == "cpu" and _is_onnx(engine, backend)
    kind = executor
    if kind not in ("local", "ray"):
        raise RtkitError(f"--executor must be 'local' or 'ray', got {kind!r}")
    if kind == "ray":
        from rtkit.runtime.ray_executor import check_ray_options

        check_ray_options(engine, devices, processes, ray_address, ray_cpus, ray_actors)
        processes = 0
    elif (ray_address, ray_cpus, ray_actors) != (None, None, None):
        raise RtkitError("--ray-address, --ray-cpus and --ray-actors need --executor ray")
    if devices:
        if isinstance(engine, Runner):
            raise RtkitError("--devices needs an engine path or name, not an open runner")
        if processes:
            raise RtkitError("--devices and --processes are exclusive: one worker runs per device")
    if image_ops is None:
        image_ops = "torch" if str(device).startswith("cuda") else "cv2"
    if image_ops not in ("cv2", "torch"):
        raise RtkitError(f"--image-ops must be cv2 or torch, got {image_ops!r}")
    if image_ops == "torch" and (processes or devices or kind == "ray"):
        raise RtkitError("--image-ops torch runs in the threaded pipeline (no --processes, --devices or "
                         "--executor ray)")
    if image_ops == "torch":
        processes = 0
    if encode_processes < 0:
        raise RtkitError(f"--encode-processes must be 0 or more, got {encode_processes}")
    if encode_processes and (processes or devices or kind == "ray"):
        raise RtkitError("--encode-processes belongs to the threaded pipeline (--processes 0, no --devices "
                         "or --executor ray)")
    if encode_processes:
        processes = 0
    if source not in SOURCES:
        raise RtkitError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source != "cpu":
        if processes or devices or kind == "ray":
            raise RtkitError(f"--source {source} runs in the threaded pipeline (no --processes, --devices "
                             f"or --executor ray)")
        processes = 0
    if processes is None:
        processes = default_workers() if cpu_onnx and runner_threads is None and infer_workers is None else 0
    if processes < 0:
        raise RtkitError(f"--processes must be 0 (threaded pipeline) or more, got {processes}")
    if processes and not cpu_onnx:
        raise RtkitError("--processes applies to ONNX engines on CPU; GPUs, TensorRT and torch engines "
                         "run in the threaded pipeline (use --processes 0) or one per device (--devices)")
    if infer_workers is None:
        infer_workers = default_workers() if cpu_onnx and runner_threads is None else 1
    if (cpu_onnx or devices) and runner_threads is None and (infer_workers > 1 or processes or devices):
        # One process per core or CPU "device": each single-threaded; GPU workers keep their defaults.
        runner_threads = 1 if not devices or all(str(d) == "cpu" for d in devices) else None
    options["infer_workers"] = infer_workers
    if options.get("batch_size") is None:
        # CPU: with the bundled engine, batches of 4-32 run within noise of each other on 2 cores
        # (benchmarks/convert_cpu.py --batch-size); small ones keep activations in cache and the
        # hand-out fine-grained. GPUs need large batches to fill the device.
        on_gpu = str(device).startswith("cuda") or any(str(d).startswith("cuda") for d in devices or ())
        options["batch_size"] = 64 if on_gpu else 4
    opts = ConvertOptions(**options)
    opts.validate()
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise RtkitError(f"source folder not found: {src}")
    check_folders(src, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RtkitError(f"cannot create the output folder {out}: {e.strerror or e}") from None

    own_runner = not isinstance(engine, Runner)
    engine_args = dict(engine=engine, device=device, backend=backend, checkpoint=checkpoint,
                       precision=precision, extra=extra, threads=runner_threads,
                       random_weights=random_weights)
    if compile:  # torch.compile, one graph for the job: every batch padded to the batch size
        engine_args.update(compile=True, pad_to=opts.batch_size)
    lock = OutputLock(manifest_path(out, opts.shard))
    executor = None
    runner = None
    try:
        lock.acquire()  # before any worker exists: a new run waits for the last one's workers
        if kind == "ray":
            from rtkit.runtime.ray_executor import RayExecutor

            executor = RayExecutor(engine_args, src, opts, str(lock.writers_path), address=ray_address,
                                   num_cpus=ray_cpus, actors=ray_actors)
        elif processes or devices:
            from rtkit.runtime.processes import ProcessExecutor

            executor = ProcessExecutor(engine_args, processes, src, opts, str(lock.writers_path),
                                       devices=list(devices) if devices else None)
        runner = open_engine(**engine_args) if own_runner else engine
        if runner.spec.task != "translate":
            raise RtkitError(f"{runner.describe()} is a '{runner.spec.task}' engine; rt-convert needs "
                             f"an image-to-image translator")
        if executor is None:
            from rtkit.runtime.executors import ThreadExecutor

            from rtkit.runtime.stages import TorchImageOps

            ops = TorchImageOps(device) if image_ops == "torch" else None
            encoders = None
            if encode_processes:
                from rtkit.runtime.processes import EncoderPool

                encoders = EncoderPool(encode_processes, str(lock.writers_path))
                opts.encode_workers = max(opts.encode_workers, encode_processes)  # one thread feeds each
            executor = ThreadExecutor(runner, make_source(source, src, device, opts.batch_size), opts, ops,
                                      encoders)
        return run_job(runner, src, out, opts, executor, t_start=t_start, executor_name=executor.name,
                       source_name=getattr(getattr(executor, "source", None), "name", "cpu")
                       + (", image ops torch" if image_ops == "torch" else ""))
    finally:
        if executor is not None:
            executor.close()
        if own_runner and runner is not None:
            runner.close()
        lock.release()
