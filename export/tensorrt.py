"""ONNX -> TensorRT plan (TensorRT 10 and 11).

``to_plan`` parses an exported ONNX, adds one optimisation profile (batch min/opt/max on every
input whose first axis is dynamic; H/W fixed at ``image_size`` for fully convolutional models),
limits the workspace pool, loads and saves a timing cache, builds the serialized plan and
writes ``X.json`` beside it: the ONNX engine's metadata plus the TensorRT version and the GPU
compute capability the plan is tied to (``TensorRTRunner`` refuses a plan built by another
TensorRT or for another GPU and prints the rebuild command).

Precision
---------
fp32: no reduced-precision flag; TF32 is switched off so the plan computes what the ONNX
computes (an fp32 plan is about fidelity; take fp16 for speed).
fp16: TensorRT 11 has no ``BuilderFlag.FP16`` (networks are strongly typed): the ONNX must be
typed in fp16 already (``rt-export MODEL --fp16 --to onnx X.onnx``). TensorRT 10 builds an
fp16-typed ONNX as a strongly typed network too, and an fp32 ONNX with the FP16 flag.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from rtkit.engines.errors import EngineError, optional_import
from rtkit.engines.card import EngineCard, read_card, write_card

PLAN_SUFFIXES = (".plan", ".engine", ".trt")


def _validated_onnx_meta(onnx_path: Path) -> EngineCard:
    """The engine metadata of an rtkit ONNX, after checking the file is a readable model."""
    import onnx

    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX engine not found: {onnx_path}")
    try:
        onnx.checker.check_model(str(onnx_path))
    except Exception as e:  # onnx raises ValidationError / DecodeError / its own types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EngineError(f"{onnx_path} is not a valid ONNX model ({first}); re-export it "
                          f"with rt-export") from None
    try:
        return read_card(onnx_path)
    except FileNotFoundError:
        raise EngineError(f"{onnx_path} has no rtkit engine metadata (no {onnx_path.stem}.json "
                          f"beside it, no metadata_props); export it with rt-export") from None


def _profile_shapes(dims: tuple, name: str, batch: dict, image_size: tuple[int, int] | None,
                    is_image: bool) -> tuple[tuple, tuple, tuple]:
    """min/opt/max shapes for one network input with TensorRT dims ``dims`` (-1 = dynamic)."""
    shapes = ([], [], [])
    for axis, d in enumerate(dims):
        if d >= 0:
            for s in shapes:
                s.append(d)
        elif axis == 0:
            for s, b in zip(shapes, (batch["min"], batch["opt"], batch["max"])):
                s.append(b)
        elif is_image and axis in (2, 3) and image_size:
            for s in shapes:
                s.append(image_size[axis - 2])
        else:
            raise EngineError(f"input {name!r} axis {axis} is dynamic and no size was given for it "
                              f"(use image_size / --image-size for fully convolutional models)")
    return tuple(shapes[0]), tuple(shapes[1]), tuple(shapes[2])


def _is_fp16_typed(onnx_path: Path) -> bool:
    import onnx
    from onnx import TensorProto

    m = onnx.load(str(onnx_path), load_external_data=False)
    return any(t.data_type == TensorProto.FLOAT16 for t in m.graph.initializer)


def to_plan(onnx_path: str | Path, plan_path: str | Path, *, batch=None, precision: str | None = None,
            workspace_gb: float = 4.0, timing_cache: str | Path | None = None,
            image_size: tuple[int, int] | None = None, device: int = 0, parity: bool = True,
            log: Callable[[str], None] | None = print) -> Path:
    """Build a TensorRT plan from an rtkit ONNX engine; return the plan path.

    batch: (min, opt, max); default the profile recorded in the ONNX metadata.
    precision: "fp32" or "fp16"; default the ONNX engine's precision.
    workspace_gb: builder workspace pool limit in GiB.
    timing_cache: a file loaded before the build (if it exists) and saved after it, which
        makes rebuilds of similar networks much faster.
    image_size: (H, W) of the profile for fully convolutional models (input_size None in the
        spec); default 112x112 rounded up to the model's size_multiple.
    parity: run the plan against ONNX Runtime on the source ONNX (``check_plan_parity``); on
        failure the plan is removed and EngineError says by how much.
    """
    from rtkit.export.graph import batch_profile, default_image_size
    from rtkit.export.onnx import PRECISIONS

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if plan_path.suffix not in PLAN_SUFFIXES:
        raise EngineError(f"plan output must end in one of {PLAN_SUFFIXES}, got {plan_path}")
    meta = _validated_onnx_meta(onnx_path)
    profile = batch_profile(batch if batch is not None else meta.batch)
    precision = precision or meta.precision
    if precision not in PRECISIONS:
        raise EngineError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    fp16_graph = _is_fp16_typed(onnx_path)
    if precision == "fp32" and fp16_graph:
        raise EngineError(f"{onnx_path} is typed in fp16; an fp32 plan needs an fp32 ONNX "
                          f"(rt-export {meta.model} --to onnx without --fp16)")
    if image_size is None and meta.spec.input_size is None:
        image_size = default_image_size(meta.spec, 112)

    trt = optional_import("tensorrt", extra="gpu", purpose="building a TensorRT plan")
    import torch

    if not torch.cuda.is_available():
        raise EngineError("building a TensorRT plan needs a CUDA GPU; none is visible here")
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise EngineError(f"TensorRT {trt.__version__} is too old: rtkit builds with TensorRT 10 or 11")
    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")  # gone in TensorRT 11
    if precision == "fp16" and not fp16_graph and not has_fp16_flag:
        raise EngineError(f"TensorRT {trt.__version__} has no FP16 builder flag: build from an "
                          f"fp16-typed ONNX (rt-export {meta.model} --fp16 --to onnx "
                          f"{onnx_path.with_name(onnx_path.stem + '_fp16.onnx')})")

    torch.cuda.set_device(device)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if fp16_graph and has_fp16_flag and strongly_typed is not None:
        # TensorRT 10: keep the graph's own fp16/fp32 types (11 is always strongly typed).
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0].strip().splitlines()[0] if errors else "unknown parser error"
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {first}"
                          + (f" (+{len(errors) - 1} more errors)" if len(errors) > 1 else ""))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp16" and not fp16_graph:
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    opt_profile = builder.create_optimization_profile()
    shapes_used = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = tuple(t.shape)
        if all(d >= 0 for d in dims):
            continue
        lo, mid, hi = _profile_shapes(dims, t.name, profile, image_size, t.name == meta.input_name)
        opt_profile.set_shape(t.name, lo, mid, hi)
        shapes_used[t.name] = {"min": list(lo), "opt": list(mid), "max": list(hi)}
    config.add_optimization_profile(opt_profile)

    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)  # (cache, ignore_mismatch)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build a plan from {onnx_path} (see the TensorRT "
                          f"log above; a larger --workspace-gb sometimes helps)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(plan_path, bytes(serialized))
    if cache_path is not None:
        _atomic_write(cache_path, bytes(config.get_timing_cache().serialize()))

    cc = "%d.%d" % torch.cuda.get_device_capability(device)
    built = dict(meta.built_with)
    built.update({"tensorrt": trt.__version__, "compute_capability": cc,
                  "gpu": torch.cuda.get_device_name(device), "workspace_gb": workspace_gb,
                  "profile": shapes_used, "source_onnx": onnx_path.name})
    import dataclasses

    plan_meta = dataclasses.replace(meta, precision=precision, batch=profile, built_with=built,
                                    parts={k: dataclasses.replace(p, file=plan_path.name, precision=precision)
                                           for k, p in meta.parts.items()})
    write_card(plan_path, plan_meta)
    if parity:
        from rtkit.export.parity import check_plan_parity

        report = check_plan_parity(plan_path, onnx_path, image_size=image_size,
                                   device=f"cuda:{device}")
        if log is not None:
            log(report.format())
        if not report.passed:
            for p in (plan_path, plan_path.with_suffix(".json")):
                p.unlink(missing_ok=True)
            raise EngineError(f"{plan_path.name}: {report.failure_line()}; the plan was removed "
                              f"(build with parity off, --no-parity, to keep it)")
    if log is not None:
        log(f"built {plan_path} ({precision}, batch {profile['min']}:{profile['opt']}:{profile['max']}, "
            f"TensorRT {trt.__version__}, compute capability {cc})")
    return plan_path


def _parser_error_text(err) -> str:
    desc = err.desc() if hasattr(err, "desc") else str(err)
    node = err.node() if hasattr(err, "node") else -1
    return f"{desc} (node {node})" if node is not None and node >= 0 else str(desc)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
