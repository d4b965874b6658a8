"""Digi2Real generation: realistic faces of DigiFace identities through Arc2Face, as a resumable job.

``digi2real(generator, recognizer, src, out, opts)`` is what ``rt-generate digi2real`` runs. SRC
is a DigiFace-layout tree (one folder per identity); OUT gets ``<identity>/<k>.png``, k = 0..N-1,
ArcFace-112 crops in the same layout, so ``rt-train recognizer`` takes OUT as it is and every
output folder names the source identity it came from.

Per identity: the ID embeddings of its source images (cached per recognizer and file content
in ``OUT/.rtkit/embeddings/``), the prototype p = normalize(mean normalize(e_i)), and for output
k the variation v_k = slerp(p, e_j, t_k) toward source j = k mod M (M usable sources, sorted),
t_k fixed or drawn from a range by the output's own seed; Delta (the CLIP shift) is added to the
conditioning ("conditioning" space) or to v_k ("id" space). The generator (a PipelineRunner over
torch, ONNX Runtime or TensorRT parts, loop "arc2face") draws each output's noise from a seed
derived from its relative path, and the 512 frame is warped to an ArcFace-112 crop
(rtkit.engines.digi2real.to_arcface112) or aligned by 5-point detection.

The job machinery is the converter's (rtkit.runtime.job / manifest / outdir / stages): one
manifest row per OUTPUT image (relpath = output relpath; the source identity columns hold a
fingerprint of the identity's source files, so a changed identity is regenerated), the output
lock, folder checks, ``reconcile`` (resume after kill -9 adopts a 'running' row whose output
exists: every output is written exactly once), the Recorder (manifest, progress bar in img/s),
``encode_batch`` (atomic writes; a full disk stops the run) and the Summary. ``--shard i/n``
splits the sorted identities. A corrupt source image is recorded in the manifest as a skipped
row ``source:<relpath>`` with its reason and left out of its identity; an identity with no
usable source fails all its outputs and is reported.

``executor="ray"`` sends each batch of ID vectors to generator actors on a Ray cluster
(runtime/ray_executor.py RayPool, as rt-convert --executor ray); the driver keeps the manifest,
the recorder and the embedding cache, and the actors write through the same generate_batch.

Outputs do not depend on sharding, resume or executor, byte for byte: every generator call runs at the
same batch shape (the last batch is padded by repeating its last row), and at a fixed shape a
row's result does not depend on its position or its neighbours (measured on CPU; torch and ONNX
Runtime kernels do not mix rows). Runs with different ``batch_size`` agree within BLAS rounding
(about 1e-6, i.e. at most one 8-bit level on a few pixels in 10^4).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from rtkit.engines.errors import RtkitError
from rtkit.engines.spec import ModelSpec
from rtkit.datasets.identities import scan_identities as scan_identity_folders
from rtkit.runtime.job import Plan, Recorder, StageClock, Summary, check_shard_layout, reconcile
from rtkit.runtime.manifest import MANIFEST_DIR, Manifest, manifest_path
from rtkit.runtime.outdir import OutputLock, check_folders
from rtkit.runtime.runners import Runner
from rtkit.runtime.sinks import atomic_write
from rtkit.runtime.sources import DecodeError, decode_bytes, read_source, scan_tree
from rtkit.runtime.stages import OutputFolderError, WorkItem, encode_batch

SOURCE_KEY = "source:"       # manifest rows of unusable source images (never an output relpath)
EMBEDDINGS_DIR = "embeddings"
DEFAULT_PER_IDENTITY = 20    # Digi2Real-20K: 399,355 images over 20,000 identities
GENERATOR_LOOP = "arc2face"


@dataclass
class GenerateOptions:
    per_identity: int = DEFAULT_PER_IDENTITY   # N outputs per identity
    t: float | tuple[float, float] = (0.0, 0.3)  # SLERP weight, or a range drawn per output
    delta: Any = None                          # rtkit.engines.digi2real.Delta, or None
    frame: str = "arcface112"                  # the template assumed for the generator's frame
    align: str = "warp"                        # outputs: "warp" (fixed similarity) or "detect" (5 points)
    detect_sources: bool = False               # align source images by detection (not DigiFace crops)
    out_size: int = 112
    batch_size: int = 8                        # outputs per generator call (the UNet sees 2x)
    embed_batch: int = 64
    shard: tuple[int, int] | None = None
    restart: bool = False
    retry_failed: bool = False
    max_failures: int | None = None
    progress: bool = True

    def validate(self) -> None:
        from rtkit.engines.digi2real import FRAMES, draw_t

        if not isinstance(self.per_identity, int) or self.per_identity < 1:
            raise RtkitError(f"--per-identity must be at least 1, got {self.per_identity!r}")
        for name in ("batch_size", "embed_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise RtkitError(f"--{name.replace('_', '-')} must be an integer of at least 1, got {v!r}")
        if not 16 <= int(self.out_size) <= 4096:
            raise RtkitError(f"--out-size must be in 16..4096, got {self.out_size}")
        if self.frame not in FRAMES:
            raise RtkitError(f"--frame must be one of {', '.join(FRAMES)}, got {self.frame!r}")
        if self.align not in ("warp", "detect"):
            raise RtkitError(f"--align must be warp or detect, got {self.align!r}")
        if isinstance(self.t, (int, float)):
            if not 0.0 <= float(self.t) <= 1.0:
                raise RtkitError(f"--t must be in [0, 1], got {self.t}")
        else:
            draw_t(tuple(self.t), 0)  # checks the range
        if self.max_failures is not None and self.max_failures < 0:
            raise RtkitError(f"--max-failures must be 0 or more, got {self.max_failures}")
        if self.shard is not None:
            i, n = self.shard
            if not (n >= 1 and 0 <= i < n):
                raise RtkitError(f"--shard must be i/n with 0 <= i < n, got {i}/{n}")


@dataclass
class GenerateSummary(Summary):
    identities: int = 0                         # identities in this shard
    failed_identities: list[str] = field(default_factory=list)   # every output failed

    def table(self, max_failures_listed: int = 20) -> str:
        lines = [
            "rt-generate digi2real summary",
            f"  generator    {self.engine}",
            f"  source       {self.src}   ({self.identities} identities in this shard)",
            f"  output       {self.out}",
            f"  manifest     {self.manifest}",
            f"  executor     {self.executor}",
            f"  images       {self.total}   generated {self.converted}   already done {self.already_done}   "
            f"adopted {self.adopted}" + (f"   redone {self.redone}" if self.redone else ""),
            f"  failed       {self.failed + self.failed_before}"
            + (f" ({self.failed_before} from earlier runs; --retry-failed to retry)" if self.failed_before else ""),
            f"  skipped      {self.skipped} source files (unusable: see problems)",
            f"  wall time    {self.wall_s:.2f} s (start-up {self.startup_s:.2f} s)",
            f"  throughput   {self.img_per_s:.2f} img/s overall, {self.steady_img_per_s:.2f} img/s after "
            f"start-up   {self.s_per_img:.3f} s/img",
            "  stage time   " + "   ".join(f"{_STAGE_NAMES.get(k, k)} {v:.2f} s" for k, v in self.stage_s.items()),
        ]
        if self.failed_identities:
            shown = ", ".join(self.failed_identities[:10])
            more = f" and {len(self.failed_identities) - 10} more" if len(self.failed_identities) > 10 else ""
            lines.append(f"  FAILED IDENTITIES ({len(self.failed_identities)}: no output at all): {shown}{more}")
        return "\n".join(lines + self.tail_lines(max_failures_listed))


_STAGE_NAMES = {"decode": "embed", "infer": "generate", "encode": "encode"}


# ----------------------------------------------------------------------------------------------
# Opening the generator and the recognizer


def torch_generator(model, *, device: str = "cpu", precision: str = "fp32", vae_precision: str = "fp32",
                    extra: dict | None = None) -> Runner:
    """A registered Arc2Face module as a PipelineRunner over TorchRunners of its parts, each part
    in its own precision (the VAE in fp32 or bf16 beside an fp16 UNet: an fp16 VAE overflows)."""
    import torch

    from rtkit.engines.card import Part, card_for_module
    from rtkit.engines.registry import get_entry
    from rtkit.runtime.runners import PipelineRunner, TorchRunner, weights_sha256

    entry = get_entry(model.registry_name)
    if entry.pipeline is None or entry.pipeline.loop != GENERATOR_LOOP:
        raise RtkitError(f"{model.registry_name} is not an Arc2Face generator (loop {GENERATOR_LOOP!r})")
    sha = weights_sha256(model)
    with torch.no_grad():
        modules = entry.pipeline.part_modules(model)  # the uncond constant in fp32, before placing
    card = card_for_module(model, checkpoint_sha256=sha)
    settings = {**card.spec.settings, **entry.pipeline.model_settings(model)}
    card = dataclasses.replace(card, spec=dataclasses.replace(card.spec, settings=settings),
                               loop=entry.pipeline.loop,
                               parts={k: Part(file="", inputs=m.spec.inputs) for k, m in modules.items()})
    parts = {}
    for name, module in modules.items():
        p = vae_precision if name == "vae_decoder" else precision
        parts[name] = TorchRunner(module, device=device, precision=p, card=card.part_card(name),
                                  checkpoint_sha256=hashlib.sha256(f"{sha}:{name}".encode()).hexdigest())
    return PipelineRunner(card, parts, extra)


def open_generator(*, engine: str | Path | None = None, models: str | Path | None = None,
                   base: str | Path | None = None, model: str = "arc2face", device: str = "cpu",
                   precision: str = "fp32", vae_precision: str = "fp32", settings: dict | None = None,
                   random_weights: bool = False, backend: str | None = None) -> Runner:
    """The Arc2Face generator as a runner: an exported card (``engine``: X.json or a folder with
    engine.json) on ONNX Runtime / TensorRT, or the registered ``model`` on torch from the
    official folders (``models`` with arc2face/ and encoder/, ``base`` the SD-1.5 folder), or
    with random weights (``random_weights``: speed measurements only)."""
    from rtkit.engines import registry

    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    if engine is not None:
        if models is not None or base is not None:
            raise RtkitError("give either --engine (exported parts) or --models/--base, not both")
        from rtkit.runtime.runners import open_engine

        runner = open_engine(engine, device=device, backend=backend, extra=settings)
        if runner.card.loop != GENERATOR_LOOP:
            runner.close()
            raise RtkitError(f"{engine} is not an exported Arc2Face pipeline (its card's loop is "
                             f"{runner.card.loop!r}, expected {GENERATOR_LOOP!r}); export one with "
                             f"rt-export arc2face OUT.onnx")
        return runner
    if (models is None) != (base is None):
        raise RtkitError("the generator needs both --models (arc2face/, encoder/) and --base (the SD-1.5 folder)")
    tiny = model in registry.list_models(tiny=True)
    if models is None and not random_weights and not tiny:
        raise RtkitError("no generator: give --models M --base SD15 (official Arc2Face folders), or "
                         "--engine X.json (exported parts)")
    try:
        entry = registry.get_entry(model)
    except KeyError:
        raise RtkitError(f"unknown generator model {model!r}") from None
    if entry.pipeline is None or entry.pipeline.loop != GENERATOR_LOOP:
        raise RtkitError(f"{model} is not an Arc2Face generator")
    built = registry.create(model, **({"models": models, "base": base} if models is not None else {}))
    return torch_generator(built, device=device, precision=precision, vae_precision=vae_precision,
                           extra=settings)


class Recognizer:
    """What the job needs of a recognizer: ``spec``, ``infer`` and a stable ``identity``."""

    def __init__(self, runner, identity: str):
        self.runner, self.spec, self.identity = runner, runner.spec, identity

    def infer(self, batch):
        return self.runner.infer(batch)

    def close(self):
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()


def open_recognizer(recognizer: str | Path, *, device: str = "cpu", checkpoint: str | Path | None = None) -> Recognizer:
    """A recognizer engine of ours (.onnx / .plan / checkpoint with its card, or a registered
    name with ``checkpoint``), or a foreign insightface ArcFace ONNX (Arc2Face's arcface.onnx)."""
    from rtkit.engines.checkpoint import file_sha256
    from rtkit.runtime.runners import open_engine

    p = Path(recognizer)
    if p.suffix == ".onnx" and p.is_file():
        from rtkit.engines.card import read_card

        try:
            read_card(p)
        except FileNotFoundError:  # no rtkit card: an insightface model
            from rtkit.engines.digi2real import ArcFaceOnnx

            return Recognizer(ArcFaceOnnx(p), "arcface-onnx:" + file_sha256(p))
    runner = open_engine(recognizer, device=device, checkpoint=checkpoint)
    if runner.spec.task != "embed":
        runner.close()
        raise RtkitError(f"{recognizer} is a {runner.spec.task} engine, not a recognizer (task embed)")
    return Recognizer(runner, runner.identity)


def generator_id_dim(gen: Runner) -> int | None:
    """The ID vector width the generator's encoder part takes, when its runner can tell."""
    enc = getattr(gen, "parts", {}).get("encoder")
    if enc is None:
        return None
    if hasattr(enc, "graph_inputs"):  # ONNX Runtime
        shape = enc.graph_inputs[enc.card.input_name].shape
        return shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
    return getattr(getattr(enc, "model", None), "id_dim", None)


# ----------------------------------------------------------------------------------------------
# Sources and embeddings


@dataclass
class Identity:
    name: str
    files: list[tuple[str, tuple[int, int, int]]]   # (relpath, stat), sorted

    def fingerprint(self) -> tuple[int, int, int]:
        """(total bytes, newest mtime, hash of the listing): what the manifest's source identity
        columns hold for each of this identity's outputs, so any change regenerates them."""
        h = hashlib.sha256()
        for rel, st in self.files:
            h.update(f"{rel}\0{st[0]}\0{st[1]}\n".encode())
        return (sum(st[0] for _, st in self.files), max(st[1] for _, st in self.files),
                int.from_bytes(h.digest()[:7], "little"))


def scan_identities(src: Path, out: Path | None = None) -> tuple[list[Identity], list[tuple[str, str]]]:
    """The identity folders of a DigiFace-layout tree (rtkit.datasets.identities: images at any
    depth under one top-level folder, natural order) and the problems met."""
    scan = scan_identity_folders(src, exclude=out, required=False)
    return [Identity(i.name, i.images) for i in scan.identities], scan.problems


class EmbeddingCache:
    """ID embeddings of source images, cached per (recognizer, alignment) and file content:
    ``<root>/<key>/<sha[:2]>/<sha256 of the file>.npy`` (written atomically)."""

    def __init__(self, root: Path, recognizer: Recognizer, *, detector=None, detector_id: str | None = None,
                 batch_size: int = 64):
        key = hashlib.sha256(f"{recognizer.identity}\0{detector_id or 'aligned'}".encode()).hexdigest()[:16]
        self.root = Path(root) / key
        self.recognizer, self.detector, self.batch_size = recognizer, detector, batch_size
        self.hits = self.misses = 0

    def _path(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.npy"

    def embed(self, src: Path, relpaths: Sequence[str]) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
        """{relpath: (D,) float32 unit vector} for the usable files, and (relpath, reason) for the others."""
        from rtkit.engines.digi2real import NoFaceError, align_faces, embed_aligned

        got: dict[str, np.ndarray] = {}
        bad: list[tuple[str, str]] = []
        todo: list[tuple[str, str, np.ndarray]] = []
        for rel in relpaths:
            try:
                data = read_source(os.path.join(src, rel))
                sha = hashlib.sha256(data).hexdigest()
                cached = self._path(sha)
                if cached.is_file():
                    try:
                        got[rel] = np.load(cached, allow_pickle=False)
                        self.hits += 1
                        continue
                    except (OSError, ValueError):
                        pass  # a damaged cache entry is recomputed
                todo.append((rel, sha, decode_bytes(data, os.path.splitext(rel)[1].lower())))
            except DecodeError as e:
                bad.append((rel, str(e)))
            except Exception as e:  # an image library error on one file must not stop the run
                bad.append((rel, f"{type(e).__name__}: {e}"))
        if self.detector is not None:
            aligned = []
            for rel, sha, img in todo:
                try:
                    aligned.append((rel, sha, align_faces([img], self.detector, names=[rel])[0]))
                except NoFaceError as e:
                    bad.append((rel, str(e)))
            todo = aligned
        by_shape: dict[tuple, list] = {}
        for item in todo:
            by_shape.setdefault(item[2].shape, []).append(item)
        for items in by_shape.values():
            emb = embed_aligned(np.stack([im for _, _, im in items]), self.recognizer, batch_size=self.batch_size)
            for (rel, sha, _), e in zip(items, emb):
                got[rel] = e
                self.misses += 1
                path = self._path(sha)
                path.parent.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(e, np.float32), allow_pickle=False)
                atomic_write(path, buf.getvalue())
        return got, sorted(bad)


def output_index(relpath: str) -> tuple[str, int]:
    """(identity, k) of an output relpath ``<identity>/<k>.png``."""
    ident, name = relpath.rsplit("/", 1)
    return ident, int(name.split(".", 1)[0])


def output_relpath(identity: str, k: int) -> str:
    return f"{identity}/{k}.png"


def t_seed(relpath: str, base: int) -> int:
    """The seed of an output's SLERP weight (apart from its noise seed, which is path_seed(relpath))."""
    from rtkit.engines.sampling import path_seed

    return path_seed(relpath + "#t", base)


# ----------------------------------------------------------------------------------------------
# The job


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else repr(v))
            for k, v in sorted(d.items())}


def _delta_id(delta) -> str | None:
    if delta is None:
        return None
    v = np.ascontiguousarray(delta.vector.detach().float().cpu().numpy())
    return hashlib.sha256(v.tobytes() + f"{delta.space}:{float(delta.scale)!r}".encode()).hexdigest()


def job_config(gen: Runner, recognizer: Recognizer, src: Path, opts: GenerateOptions,
               detector_id: str | None) -> dict:
    """What makes two runs the same job (a resume with anything else is refused)."""
    return {"job": "digi2real", "generator": gen.identity, "settings": _jsonable(gen.extra),
            "recognizer": recognizer.identity, "source": os.path.realpath(src),
            "per_identity": opts.per_identity,
            "t": list(opts.t) if not isinstance(opts.t, (int, float)) else float(opts.t),
            "delta": _delta_id(opts.delta), "frame": opts.frame, "align": opts.align,
            "detect_sources": bool(opts.detect_sources),
            "detector": detector_id if (opts.align == "detect" or opts.detect_sources) else None,
            "out_size": int(opts.out_size),
            "shard": list(opts.shard) if opts.shard else None}


def plan_outputs(identities: list[Identity], opts: GenerateOptions) -> Plan:
    """This shard's identities (sorted, every n-th) and their outputs as manifest rows."""
    if opts.shard is not None:
        i, n = opts.shard
        identities = identities[i::n]
    images = []
    for ident in identities:
        fp = ident.fingerprint()
        images += [(output_relpath(ident.name, k), output_relpath(ident.name, k), fp)
                   for k in range(opts.per_identity)]
    return Plan(images, [])


class _Prepared:
    """One identity, ready to generate: its source embeddings (usable files, sorted) and prototype."""

    def __init__(self, embeddings: np.ndarray | None, problem: str | None):
        from rtkit.engines.digi2real import prototype

        self.embeddings = embeddings
        self.problem = problem
        self.proto = prototype(embeddings).numpy() if embeddings is not None else None


def digi2real(gen: Runner, recognizer: Recognizer, src: str | Path, out: str | Path,
              opts: GenerateOptions | None = None, *, detector=None, detector_id: str | None = None,
              t_start: float | None = None, executor: str = "local", generator_args: dict | None = None,
              ray_address: str | None = None, ray_cpus: int | None = None,
              ray_actors: int | None = None) -> GenerateSummary:
    """Generate ``opts.per_identity`` realistic ArcFace-112 crops per DigiFace identity of SRC into
    OUT/<identity>/<k>.png as a resumable job; returns the summary (see the module docstring).

    ``executor="ray"`` runs the generator calls in actors on a Ray cluster (runtime/ray_executor.py
    RayPool: the one at ``ray_address``, else a local one of ``ray_cpus`` CPUs; ``ray_actors``
    actors, default one per GPU or CPU), each opening the generator from ``generator_args``
    (open_generator's keywords, the same generator as ``gen``); this process keeps the manifest and
    computes the ID vectors with ``recognizer``. The files are the local executor's bytes."""
    t_start = time.perf_counter() if t_start is None else t_start
    opts = opts or GenerateOptions()
    opts.validate()
    check_executor_options(executor, generator_args, opts, ray_address, ray_cpus, ray_actors)
    if (opts.align == "detect" or opts.detect_sources) and detector is None:
        raise RtkitError(f"{'--align detect' if opts.align == 'detect' else '--detect-sources'} needs "
                         f"--detector (an insightface detector ONNX, e.g. antelopev2/scrfd_10g_bnkps.onnx)")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise RtkitError(f"source folder not found: {src}")
    check_folders(src, out)
    check_shard_layout(out, opts.shard)
    mpath = manifest_path(out, opts.shard)
    try:
        mpath.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RtkitError(f"cannot write into the output folder {out}: {e.strerror or e}") from None
    with OutputLock(mpath) as lock:
        pool = None
        if executor == "ray":
            pool = _ray_pool(generator_args, opts, str(lock.writers_path), ray_address, ray_cpus, ray_actors)
        try:
            return _run(gen, recognizer, src, out, mpath, opts, detector, detector_id, t_start, pool)
        finally:
            if pool is not None:
                pool.close()


def check_executor_options(executor: str, generator_args: dict | None, opts: GenerateOptions,
                           address: str | None, num_cpus: int | None, actors: int | None) -> None:
    """Refuse executor option mixes before any folder, model or cluster is touched."""
    if executor not in ("local", "ray"):
        raise RtkitError(f"--executor must be 'local' or 'ray', got {executor!r}")
    if executor == "local":
        if (address, num_cpus, actors) != (None, None, None):
            raise RtkitError("--ray-address, --ray-cpus and --ray-actors need --executor ray")
        return
    if generator_args is None:
        raise RtkitError("executor 'ray' needs generator_args (open_generator's keywords): the actors "
                         "open the generator themselves")
    if opts.align == "detect":
        raise RtkitError("--align detect runs the detector in this process only; with --executor ray "
                         "use --align warp")
    if address and num_cpus is not None:
        raise RtkitError("--ray-cpus sizes a local Ray cluster; a cluster at --ray-address has its own")
    for name, v in (("--ray-cpus", num_cpus), ("--ray-actors", actors)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise RtkitError(f"{name} must be an integer of at least 1, got {v!r}")
    from rtkit.runtime.ray_executor import require_ray

    require_ray()


def _ray_pool(generator_args: dict, opts: GenerateOptions, writers_lock: str, address, num_cpus, actors):
    from rtkit.runtime.ray_executor import RayPool

    args = dict(generator_args)
    for key in ("engine", "models", "base"):  # actors run in other folders and on other machines
        if args.get(key) is not None:
            args[key] = os.path.abspath(args[key])
    on_gpu = str(args.get("device", "cpu")).startswith("cuda")
    if on_gpu:
        args["device"] = "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to the actor's own GPU
    delta = opts.delta
    cond_delta = delta.applied() if delta is not None and delta.space == "conditioning" else None
    worker_opts = dataclasses.replace(opts, delta=None, progress=False)  # "id" Deltas are applied here
    return RayPool(GenerateWorker, (args, worker_opts, cond_delta), writers_lock, on_gpu=on_gpu,
                   label="rt-generate", address=address, num_cpus=num_cpus, actors=actors)


def _run(gen, recognizer, src, out, mpath, opts, detector, detector_id, t_start, pool=None) -> GenerateSummary:
    identities, problems = scan_identities(src, out)
    if not identities:
        raise RtkitError(f"{src} has no identity folders with images (DigiFace layout: SRC/<identity>/<image>)")
    summary = GenerateSummary(engine=gen.describe(), src=str(src), out=str(out), manifest=str(mpath),
                              executor=pool.name if pool is not None else "main thread", source="cpu")
    plan = plan_outputs(identities, opts)
    shard_idents = {output_index(rel)[0] for rel, _, _ in plan.images}
    summary.identities = len(shard_idents)
    by_name = {i.name: i for i in identities if i.name in shard_idents}
    with Manifest(mpath) as man:
        epoch = man.bind_job(job_config(gen, recognizer, src, opts, detector_id), restart=opts.restart)
        man.add_files(plan.images, [])
        if opts.retry_failed:
            man.retry_failed()
        todo = reconcile(man, plan, src, out, summary, epoch)
        summary.total = len(plan.images)
        listed = {rel for rel, _ in summary.failures}
        for rel, why in problems:
            summary.failures.append((rel, why))
        bad_sources = {r.relpath for r in man.rows("skipped") if r.relpath.startswith(SOURCE_KEY)}
        man.start_run(os.getpid(), socket.gethostname(), epoch)
        clock = StageClock()
        rec = Recorder(man, summary, gen.identity, len(todo), dataclasses.replace(opts, progress=False),
                       threading.Event(), epoch)
        if opts.progress:  # the Recorder's own bar is named rt-convert
            from tqdm import tqdm

            rec.progress = tqdm(total=len(todo), unit="img", dynamic_ncols=True, file=sys.stderr,
                                desc="rt-generate", smoothing=0.1)
        state = "finished"
        try:
            if todo:
                _generate(gen, recognizer, src, out, todo, by_name, opts, man, summary, rec, clock,
                          detector, detector_id, listed, bad_sources, pool)
            state = "aborted" if summary.aborted else "finished"
        except BaseException as e:
            state = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"
            raise
        finally:
            rec.close()
            summary.stage_s = dict(clock.busy)
            summary.wall_s = time.perf_counter() - t_start
            summary.startup_s = (rec.first_result - t_start) if rec.first_result is not None else summary.wall_s
            if rec.fatal:
                state = "stopped"
            man.finish_run(state, summary.converted, summary.adopted, summary.failed, summary.wall_s,
                           summary.startup_s)
        if rec.fatal:
            raise OutputFolderError(f"{rec.fatal}; the run stopped ({summary.converted} generated now, "
                                    f"nothing else marked failed); free space or fix permissions and run "
                                    f"the same command again")
        planned = {rel for rel, _, _ in plan.images}
        status: dict[str, list[str]] = {}
        for row in man.rows():
            if row.relpath in planned:
                status.setdefault(output_index(row.relpath)[0], []).append(row.status)
        summary.failed_identities = sorted(k for k, v in status.items() if v and all(s == "failed" for s in v))
    return summary


def _generate(gen, recognizer, src, out, todo, by_name, opts, man, summary, rec, clock, detector,
              detector_id, listed, bad_sources, pool=None) -> None:
    import torch

    from rtkit.engines.digi2real import draw_t, slerp

    src_det = detector if opts.detect_sources else None
    cache = EmbeddingCache(out / MANIFEST_DIR / EMBEDDINGS_DIR, recognizer, detector=src_det,
                           detector_id=detector_id if src_det is not None else None, batch_size=opts.embed_batch)
    base = int(gen.extra.get("seed", 0) or 0)
    delta = opts.delta
    cond_delta = delta.applied() if delta is not None and delta.space == "conditioning" else None
    id_dim = generator_id_dim(gen)
    todo = sorted(todo, key=lambda it: (output_index(it.relpath)[0], output_index(it.relpath)[1]))
    prepared: dict[str, _Prepared] = {}
    made_dirs: set[str] = set()
    b = opts.batch_size

    def prepare(name: str) -> _Prepared:
        if name in prepared:
            return prepared[name]
        if len(prepared) > 256:
            prepared.clear()
        t0 = time.perf_counter()
        ident = by_name[name]
        rels = [rel for rel, _ in ident.files]
        got, bad = cache.embed(src, rels)
        clock.add("decode", time.perf_counter() - t0)
        new_bad = []
        for rel, why in bad:
            key = SOURCE_KEY + rel
            if key not in listed:
                summary.failures.append((key, f"skipped: {why}"))
                summary.skipped += 1
                listed.add(key)
            if key not in bad_sources:
                new_bad.append((key, why))
        if new_bad:
            man.add_files([], new_bad)
        healed = [SOURCE_KEY + r for r in got if SOURCE_KEY + r in bad_sources]
        if healed:  # replaced by a good file: no longer a problem of this job
            man.reset(healed)
            bad_sources.difference_update(healed)
            kept = [(k, w) for k, w in summary.failures if k not in healed]
            summary.skipped -= len(summary.failures) - len(kept)  # reconcile listed them as skipped
            summary.failures[:] = kept
        usable = [got[r] for r in rels if r in got]
        if not usable:
            p = _Prepared(None, f"no usable source image in identity {name!r} "
                                f"({len(bad)} of {len(rels)} unreadable, e.g. {bad[0][0]}: {bad[0][1]})")
        else:
            emb = np.stack(usable).astype(np.float32)
            if id_dim is not None and emb.shape[1] != id_dim:
                raise RtkitError(f"the recognizer gives {emb.shape[1]}-d embeddings but the generator "
                                 f"takes {id_dim}-d ID vectors; use the recognizer it was trained with "
                                 f"(Arc2Face: its arcface.onnx, 512-d)")
            p = _Prepared(emb, None)
        prepared[name] = p
        return p

    def batches():
        """(items, ID vectors) per generator call; outputs that cannot be made are recorded here."""
        for i in range(0, len(todo), b):
            if rec.stop.is_set():
                return
            items: list[WorkItem] = []
            failed: list[tuple[str, str]] = []
            vectors = []
            for it in todo[i:i + b]:
                name, k = output_index(it.relpath)
                p = prepare(name)
                if p.problem is not None:
                    failed.append((it.relpath, p.problem))
                    continue
                e_j = p.embeddings[k % len(p.embeddings)]
                t = draw_t(opts.t if isinstance(opts.t, (int, float)) else tuple(opts.t), t_seed(it.relpath, base))
                v = slerp(torch.from_numpy(p.proto), torch.from_numpy(e_j), t)
                if delta is not None and delta.space == "id":
                    v = delta.apply(v[None])[0]
                vectors.append(v.float())
                it.out_hw = (opts.out_size, opts.out_size)
                items.append(it)
            if failed:
                rec.add([], failed)
            if items:
                yield items, torch.stack(vectors)
            rec.flush(every=0.5)

    if pool is not None:
        def record(result):
            done, bad, fatal, infer_s, encode_s = result
            rec.add(done, bad, fatal)
            clock.add("infer", infer_s)
            clock.add("encode", encode_s)

        # Actors get absolute output paths and plain arrays: only names and ID vectors cross the cluster.
        pool.run(((items, ([WorkItem(it.relpath, os.path.abspath(it.out), it.out_hw) for it in items],
                           ids.numpy())) for items, ids in batches()), record, rec)
        return
    for items, ids in batches():
        rec.mark_running(items)  # before any output of the batch can exist
        done, bad, fatal, infer_s, encode_s = generate_batch(gen, items, ids, opts, cond_delta, detector, made_dirs)
        clock.add("infer", infer_s)
        clock.add("encode", encode_s)
        rec.add(done, bad, fatal)
        if rec.fatal:
            break


def generate_batch(gen: Runner, items: list[WorkItem], ids, opts: GenerateOptions, cond_delta, detector,
                   made_dirs: set[str]):
    """One generator call over ``ids`` (one ID vector per item), the crops aligned and written
    atomically to each item's ``out``: (done, failures, folder error, infer s, encode s). Every call
    runs at ``opts.batch_size`` rows (the last rows repeated), so no output depends on the split."""
    import torch

    from rtkit.engines.digi2real import align_faces, to_arcface112

    t0 = time.perf_counter()
    b = opts.batch_size
    out_spec = ModelSpec(task="generate", input_size=(opts.out_size, opts.out_size), value_range=(-1.0, 1.0),
                         channels="RGB", alignment="arcface112", resize="native")
    keys = [it.relpath for it in items]
    ids = torch.as_tensor(ids)
    pad = b - len(items)
    if pad:
        ids = torch.cat([ids, ids[-1:].expand(pad, -1)])
        keys += [keys[-1]] * pad
    extra = {"delta": cond_delta} if cond_delta is not None else {}
    images = torch.as_tensor(gen.infer(ids, keys=keys, **extra))[:len(items)].float().cpu()
    t1 = time.perf_counter()
    failed: list[tuple[str, str]] = []
    if opts.align == "detect":
        crops, keep = [], []
        rgb = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for it, im in zip(items, rgb):
            try:
                crops.append(align_faces([im], detector, out_size=opts.out_size, names=[it.relpath])[0])
                keep.append(it)
            except RtkitError as e:
                failed.append((it.relpath, str(e)))
        items = keep
        y = (np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
             if crops else np.zeros((0, 3, opts.out_size, opts.out_size), np.float32))
    else:
        y = to_arcface112(images, frame=opts.frame, out_size=opts.out_size).numpy()
    done, bad, fatal = encode_batch(items, y, out_spec, "png", 95, made_dirs)
    return done, failed + bad, fatal, t1 - t0, time.perf_counter() - t1


class GenerateWorker:
    """A Ray generation actor's work (runtime/ray_executor.py BatchActor): the generator opened
    once from ``generator_args`` (open_generator's keywords), then batches of (items, ID vectors)
    through generate_batch, so its files are the local run's bytes."""

    def __init__(self, generator_args: dict, opts: GenerateOptions, cond_delta):
        args = dict(generator_args)
        if not str(args.get("device", "cpu")).startswith("cuda"):
            import torch

            torch.set_num_threads(1)  # one CPU per actor, as Ray counts it
        self.gen = open_generator(**args)
        self.opts, self.cond_delta = opts, cond_delta
        self.made_dirs: set[str] = set()

    def __call__(self, payload):
        items, ids = payload
        return generate_batch(self.gen, items, ids, self.opts, self.cond_delta, None, self.made_dirs)


def run_digi2real(src: str | Path, out: str | Path, *, recognizer: str | Path, engine: str | Path | None = None,
                  models: str | Path | None = None, base: str | Path | None = None, model: str = "arc2face",
                  device: str = "cpu", precision: str = "fp32", vae_precision: str = "fp32",
                  recognizer_checkpoint: str | Path | None = None, detector: str | Path | None = None,
                  det_size: int | None = None, delta: str | Path | None = None, steps: int | None = None,
                  guidance: float | None = None, scheduler: str | None = None, seed: int | None = None,
                  random_weights: bool = False, backend: str | None = None, executor: str = "local",
                  ray_address: str | None = None, ray_cpus: int | None = None, ray_actors: int | None = None,
                  **options) -> GenerateSummary:
    """What ``rt-generate digi2real`` runs: options checked and folders refused before any model
    loads, then the generator, recognizer, optional detector and Delta file opened and
    ``digi2real`` run. ``options``: the fields of GenerateOptions (per_identity, t, frame, align,
    out_size, batch_size, shard, restart, retry_failed, max_failures, progress). ``executor="ray"``
    runs the generator in Ray actors (see ``digi2real``)."""
    t_start = time.perf_counter()
    opts = GenerateOptions(**options)
    opts.validate()
    settings = {"steps": steps, "guidance": guidance, "scheduler": scheduler, "seed": seed}
    generator_args = dict(engine=engine, models=models, base=base, model=model, device=device, precision=precision,
                          vae_precision=vae_precision, settings=settings, random_weights=random_weights,
                          backend=backend)
    check_executor_options(executor, generator_args, opts, ray_address, ray_cpus, ray_actors)
    if not Path(src).is_dir():
        raise RtkitError(f"source folder not found: {src}")
    check_folders(src, out)
    delta_obj = None
    if delta is not None:
        from rtkit.engines.digi2real import load_delta

        delta_obj = load_delta(delta)
    det, det_id = None, None
    if detector is not None:
        from rtkit.engines.checkpoint import file_sha256
        from rtkit.engines.digi2real import DET_SIZE, FaceDetector

        det = FaceDetector(detector, det_size=det_size or DET_SIZE)
        det_id = f"{file_sha256(detector)}:{det_size or DET_SIZE}"
    opts.delta = delta_obj
    rec = open_recognizer(recognizer, device=device, checkpoint=recognizer_checkpoint)
    try:
        gen = open_generator(**generator_args)
        try:
            if delta_obj is not None and delta_obj.space == "conditioning":
                _check_delta_shape(gen, delta_obj)
            # Sources are taken as aligned crops unless a detector is given (DigiFace crops are aligned).
            return digi2real(gen, rec, src, out, opts, detector=det, detector_id=det_id, t_start=t_start,
                             executor=executor, generator_args=generator_args, ray_address=ray_address,
                             ray_cpus=ray_cpus, ray_actors=ray_actors)
        finally:
            gen.close()
    finally:
        rec.close()


def _check_delta_shape(gen: Runner, delta) -> None:
    """A conditioning-space Delta must have the (77, H) shape of the generator's conditioning."""
    import torch

    from rtkit.runtime.runners import PartFn

    d = generator_id_dim(gen)
    if d is None:
        return
    with torch.inference_mode():
        cond = PartFn(gen.parts["encoder"])(torch.zeros(1, d))
    want = tuple(cond.shape[1:])
    if tuple(delta.vector.shape[-2:]) != want:
        raise RtkitError(f"the Delta file's conditioning offset is {tuple(delta.vector.shape)} but this "
                         f"generator's conditioning is {want}; compute it with this generator "
                         f"(rt-generate digi2real-delta)")


# ----------------------------------------------------------------------------------------------
# Delta from two image sets


def embed_tree(folder: str | Path, recognizer: Recognizer, *, detector=None, batch_size: int = 64
               ) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Embeddings (N, D) of every image under ``folder`` (sorted), and the files that could not be used."""
    from rtkit.engines.digi2real import NoFaceError, align_faces, embed_aligned

    folder = Path(folder)
    scan = scan_tree(folder)
    out, bad = [], list(scan.problems)
    chunk: list[np.ndarray] = []

    def flush():
        by_shape: dict[tuple, list] = {}
        for im in chunk:
            by_shape.setdefault(im.shape, []).append(im)
        for ims in by_shape.values():
            out.append(embed_aligned(np.stack(ims), recognizer, batch_size=batch_size))
        chunk.clear()

    for rel, _ in scan.images:
        try:
            img = decode_bytes(read_source(os.path.join(folder, rel)), os.path.splitext(rel)[1].lower())
            if detector is not None:
                img = align_faces([img], detector, names=[rel])[0]
            chunk.append(img)
        except (DecodeError, NoFaceError) as e:
            bad.append((rel, str(e)))
        if len(chunk) >= batch_size:
            flush()
    flush()
    if not out:
        raise RtkitError(f"{folder}: no usable image (of {len(scan.images)} found)")
    return np.concatenate(out), bad


def delta_from_sets(real: str | Path, synthetic: str | Path, recognizer: Recognizer, gen: Runner | None = None,
                    *, space: str = "conditioning", scale: float = 1.0, real_detector=None,
                    synthetic_detector=None, batch_size: int = 64):
    """The Digi2Real CLIP shift from two image sets: scale * (mean over ``real`` - mean over
    ``synthetic``) of the features in ``space`` ("conditioning": the generator encoder's output
    the UNet sees; "id": the normalised ID vectors), with its provenance. Returns
    (Delta, [(file, reason)] unusable files)."""
    import torch

    from rtkit.engines.digi2real import DELTA_SPACES, compute_delta, delta_features
    from rtkit.runtime.runners import PartFn

    if space not in DELTA_SPACES:
        raise RtkitError(f"--space must be one of {', '.join(DELTA_SPACES)}, got {space!r}")
    encoder = None
    if space == "conditioning":
        if gen is None:
            raise RtkitError("the conditioning space needs the generator (--models/--base or --engine)")
        encoder = PartFn(gen.parts["encoder"])
    feats, problems = [], []
    for folder, det in ((real, real_detector), (synthetic, synthetic_detector)):
        emb, bad = embed_tree(folder, recognizer, detector=det, batch_size=batch_size)
        problems += [(f"{folder}/{r}", why) for r, why in bad]
        with torch.inference_mode():
            feats.append([delta_features(space, torch.from_numpy(emb[j:j + batch_size]), encoder)
                          for j in range(0, len(emb), batch_size)])
    prov = {"real": os.path.realpath(real), "synthetic": os.path.realpath(synthetic),
            "recognizer": recognizer.identity, "generator": gen.identity if gen is not None else None,
            "generator_model": gen.card.model if gen is not None else None,
            "made": time.strftime("%Y-%m-%d %H:%M:%S"), "unusable_files": len(problems)}
    return compute_delta(feats[0], feats[1], space=space, scale=scale, provenance=prov), problems


# ----------------------------------------------------------------------------------------------
# Timing (what rt-bench calls)


def time_generator(gen: Runner, *, batch_sizes: Sequence[int] = (1, 4, 8), steps: Sequence[int] = (25, 4),
                   id_dim: int | None = None, repeats: int = 2, guidance: float | None = None,
                   scheduler: str | None = None, sync: Callable[[], None] | None = None) -> list[dict]:
    """Seconds per image and images per second of ``gen`` per (batch size, steps): one warm-up
    call, then the mean of ``repeats`` timed calls on random unit ID vectors. Rows: {batch,
    steps, guidance, s_per_img, img_per_s}. ``sync`` (e.g. torch.cuda.synchronize) runs before
    each clock read."""
    import torch

    d = id_dim or generator_id_dim(gen) or 512
    rows = []
    for n_steps in steps:
        for bs in batch_sizes:
            ids = torch.nn.functional.normalize(torch.randn(bs, d, generator=torch.Generator().manual_seed(bs)), dim=-1)
            kw = {"steps": int(n_steps)}
            if guidance is not None:
                kw["guidance"] = float(guidance)
            if scheduler is not None:
                kw["scheduler"] = scheduler
            keys = [f"bench/{i}.png" for i in range(bs)]
            gen.infer(ids, keys=keys, **kw)
            if sync:
                sync()
            t0 = time.perf_counter()
            for _ in range(repeats):
                gen.infer(ids, keys=keys, **kw)
            if sync:
                sync()
            dt = (time.perf_counter() - t0) / repeats
            rows.append({"batch": bs, "steps": int(n_steps), "guidance": kw.get("guidance", gen.extra.get("guidance")),
                         "s_per_img": dt / bs, "img_per_s": bs / dt})
    return rows


__all__ = ["GenerateOptions", "GenerateSummary", "digi2real", "generate_batch", "GenerateWorker",
           "check_executor_options", "run_digi2real", "open_generator", "torch_generator",
           "open_recognizer", "Recognizer", "generator_id_dim", "scan_identities", "Identity",
           "EmbeddingCache", "plan_outputs", "job_config", "output_relpath", "output_index", "t_seed",
           "delta_from_sets", "embed_tree", "time_generator", "SOURCE_KEY", "DEFAULT_PER_IDENTITY"]
