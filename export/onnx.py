"""torch -> ONNX: one export function that checks itself.

``to_onnx`` puts a registered model (or a built one) in eval mode, traces it with named inputs
(``input`` plus the model's runtime inputs, e.g. CodeFormer ``w``, UNSB ``t`` and ``z``) and one
named output (``output``, or ``embedding`` for recognizers), makes the batch axis dynamic (and
H/W for fully convolutional models), optionally types the graph in fp16, runs onnx.checker,
writes the engine metadata twice (sidecar ``X.json`` and metadata_props key ``rtkit``) and
finally compares ONNX Runtime with PyTorch (``check_parity``), refusing to leave an engine
that does not match.

Export protocol
---------------
Most models export as they are: ``forward(input, **inputs)`` with one image input whose
size is ``spec.input_size``. A model whose forward is not what the engine should run defines
one or both of these methods:

``export_module() -> nn.Module``
    The module to trace instead of the model, called as ``module(input, **extras)``; e.g. one
    UNSB sampling step ``G(x_t, t, z)`` (the runtime loops over steps) or one DDIM UNet
    evaluation. If it returns a tuple, the first element is the engine's output.
``export_inputs(batch: int) -> dict[str, Tensor]``
    Example inputs for a batch of ``batch``: key ``"input"`` (the image) first, then every other
    graph input by name. Values may be random (draw them from torch's global generator, so
    ``check_parity`` can seed them). An input whose first dimension follows ``batch`` gets a
    dynamic batch axis; others keep their shape (e.g. a scalar ``t`` as shape ``(1,)``).

Defaults when a model does not define them: the model itself, and an image uniformly drawn in
``spec.value_range`` of size ``spec.input_size`` (fully convolutional models, input_size None:
64x64 rounded up to ``spec.size_multiple``, with dynamic H/W axes), plus an example of each
graph input in ``spec.inputs`` (TensorSpec: its default at its shape).

Pipelines (a registry entry with ``pipeline=Pipeline(parts, loop)``, e.g. UNSB's step): each part
is exported as its own engine (``X.onnx`` for a one-part pipeline, ``X.<part>.onnx`` otherwise),
and the card ``X.json`` lists the parts, their inputs and the loop, with the model's spec and
settings, so the runtime runs the same loop around the engines.

insightface compatibility (recognizers)
---------------------------------------
insightface's ``model_zoo.get_model(path)`` routes a single-input ONNX with a square input of
at least 112 (a multiple of 16) and one output to ``ArcFaceONNX``. That class picks its input
normalisation from the graph: if one of the first 8 nodes is named ``Sub*``/``_minus*`` and
one ``Mul*``/``_mul*`` it assumes normalisation is inside the graph and feeds raw 0..255
pixels; otherwise it feeds ``(pixel - 127.5) / 127.5``, RGB. Our recognizers take RGB in
[-1, 1] (normalisation outside the graph), so the exporter keeps those node names away from the
start of the graph and embed engines load there as ArcFace models with the right scaling.
A model whose spec says BGR (AdaFace) can be exported with ``input_channels="RGB"``: the graph
then flips channels at its input and its metadata says RGB.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from rtkit.engines.errors import EngineError, optional_import
from rtkit.engines.card import METADATA_KEY, EngineCard, Part, build_info, write_card
from rtkit.engines.spec import ModelSpec
from rtkit.export.graph import (EXPORT_BATCH, INPUT_NAME, ExportGraph, batch_profile, export_graph,
                                export_inputs, export_spec, export_target, output_name_for, resolve_model)

PRECISIONS = ("fp32", "fp16")
# Node-name prefixes that make insightface assume in-graph normalisation (see module docstring).
_INSIGHTFACE_NORM_PREFIXES = ("Sub", "_minus", "Mul", "_mul")


def _check_traceable(target: nn.Module, extra_names: list[str], name: str) -> None:
    """Refuse early when forward declares a runtime input as a Python number.

    Tracing turns ``int(steps)`` or ``range(nfe)`` into constants: the engine would silently
    ignore the input (and tracing a whole sampler loop can take minutes). Such models export a
    single step through ``export_module()``.
    """
    try:
        params = inspect.signature(target.forward).parameters
    except (TypeError, ValueError):
        return
    numeric = []
    for extra in extra_names:
        p = params.get(extra)
        if p is None or p.annotation is inspect.Parameter.empty:
            continue
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))
        if "Tensor" not in ann and any(t in ann for t in ("int", "float", "bool")):
            numeric.append(f"{extra}: {ann}")
    if numeric:
        raise EngineError(f"{name}: forward takes {', '.join(numeric)} as Python numbers, which "
                          f"tracing would bake into the graph; the model needs export_module() "
                          f"(e.g. one sampling step with tensor inputs; see rtkit.export.onnx)")


def _dynamic_axes(model: nn.Module, inputs: dict[str, torch.Tensor], out_name: str) -> dict:
    """Batch axis 0 everywhere it follows the batch (found by asking for a second batch size),
    plus H/W for fully convolutional models."""
    spec = export_spec(model)
    # Fully convolutional models take any H/W; a part fed vectors (Arc2Face's encoder) has none.
    spatial = spec.input_size is None and inputs[INPUT_NAME].ndim == 4
    axes = {INPUT_NAME: {0: "batch", **({2: "height", 3: "width"} if spatial else {})},
            out_name: {0: "batch"}}
    if spatial and spec.task != "embed":
        axes[out_name].update({2: "height", 3: "width"})
    other = export_inputs(model, EXPORT_BATCH + 1) if len(inputs) > 1 else inputs
    for name, t in inputs.items():
        if name == INPUT_NAME or t.ndim == 0:
            continue
        if t.shape[0] == EXPORT_BATCH and other[name].shape[0] == EXPORT_BATCH + 1:
            axes[name] = {0: "batch"}
    return axes


def _trace_to_file(graph: ExportGraph, inputs: dict, path: Path, out_name: str, axes: dict,
                   opset: int, name: str) -> tuple:
    """Trace ``graph`` to ``path``; return the traced output's shape."""
    kwargs = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        # The TorchScript tracer needs no extra package (the dynamo exporter needs onnxscript)
        # and handles dynamic_axes for every model here; torch warns that it is deprecated.
        kwargs["dynamo"] = False
    args = tuple(inputs.values())
    with warnings.catch_warnings(), _quiet_exporter_log():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)  # exporter shape-inference chatter
        with torch.no_grad():
            traced_shape = tuple(graph(*args).shape)
            try:
                torch.onnx.export(graph, args, str(path), input_names=list(inputs),
                                  output_names=[out_name], dynamic_axes=axes, opset_version=opset,
                                  do_constant_folding=True, **kwargs)
            except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
                # The exporter's messages embed the whole TorchScript graph: keep the first line.
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                first = first.split("  [Caused by")[0][:300]
                raise EngineError(f"torch.onnx cannot export {name}: {first}") from e
    return traced_shape


@contextlib.contextmanager
def _quiet_exporter_log():
    """Mute the TorchScript exporter's debug log for the duration of an export.

    torch's ``setup_onnx_logging`` tests the function ``_jit_is_onnx_log_enabled`` instead of
    its value, so the log is always on and a failed export dumps the whole IR graph (thousands
    of lines) to stderr before the one-line error we raise.
    """
    original = getattr(torch._C, "_jit_onnx_log", None)
    if original is None:
        yield
        return
    torch._C._jit_onnx_log = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch._C._jit_onnx_log = original


def _set_output_shape(model_proto, out_name: str, traced_shape: tuple, dynamic: dict) -> None:
    """Declare the output's static dims (the tracer sometimes names them after other axes)."""
    for out in model_proto.graph.output:
        if out.name != out_name:
            continue
        dims = out.type.tensor_type.shape.dim
        del dims[:]
        for axis, size in enumerate(traced_shape):
            d = dims.add()
            if axis in dynamic:
                d.dim_param = dynamic[axis]
            else:
                d.dim_value = int(size)


def _check_inputs_kept(model_proto, input_names: list[str], name: str) -> None:
    """Every example input must be a graph input that reaches the output.

    The tracer drops inputs the output does not depend on: either the model ignores them, or
    tracing baked their example value in (Python int()/float()/if on a sampler setting such as
    steps or seed), which would give an engine that silently ignores them.
    """
    graph_inputs = {i.name for i in model_proto.graph.input}
    used = {i for node in model_proto.graph.node for i in node.input}
    used |= {o.name for o in model_proto.graph.output}
    lost = [n for n in input_names if n not in graph_inputs or n not in used]
    if lost:
        raise EngineError(f"{name}: input(s) {', '.join(map(repr, lost))} do not reach the exported "
                          f"graph's output (baked in by tracing, or unused); the model needs an "
                          f"export_module() whose forward uses them as tensors (see rtkit.export.onnx)")


def _keep_insightface_scaling(model_proto) -> None:
    """Rename early nodes whose names insightface reads as in-graph normalisation."""
    for node in model_proto.graph.node[:8]:
        if node.name.startswith(_INSIGHTFACE_NORM_PREFIXES):
            node.name = "/" + node.name


def to_fp16(model_proto, keep_io_types: bool = True):
    """Type the graph in fp16 (onnxconverter-common), keeping fp32 inputs/outputs if asked."""
    float16 = optional_import("onnxconverter_common.float16", extra="gpu",
                              purpose="an fp16 ONNX export", package="onnxconverter-common")
    from onnx import TensorProto

    float_io = {v.name for v in list(model_proto.graph.input) + list(model_proto.graph.output)
                if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "values truncated to fp16 range"
        # The converter's own keep_io_types pairs its input casts with the graph's Cast(to=float)
        # nodes and deletes both, leaving fp32 tensors in fp16 arithmetic; we add the IO casts.
        converted = float16.convert_float_to_float16(model_proto, keep_io_types=False)
    _retarget_float_casts(converted)
    if keep_io_types:
        _cast_io_to_float(converted, float_io)
    return converted


def _cast_io_to_float(model_proto, names: set[str]) -> None:
    """fp32 graph inputs/outputs around an fp16 graph: a Cast after each input, before each output."""
    from onnx import TensorProto, helper

    g = model_proto.graph

    def rename_uses(old: str, new: str, *, outputs: bool) -> None:
        for node in g.node:
            ports = node.output if outputs else node.input
            for i, name in enumerate(ports):
                if name == old:
                    ports[i] = new

    head, tail = [], []
    for inp in g.input:
        if inp.name in names and inp.type.tensor_type.elem_type == TensorProto.FLOAT16:
            half = inp.name + "_fp16"
            rename_uses(inp.name, half, outputs=False)
            head.append(helper.make_node("Cast", [inp.name], [half], to=TensorProto.FLOAT16,
                                         name=f"/rtkit/{inp.name}_to_fp16"))
            inp.type.tensor_type.elem_type = TensorProto.FLOAT
    for out in g.output:
        if out.name in names and out.type.tensor_type.elem_type == TensorProto.FLOAT16:
            half = out.name + "_fp16"
            rename_uses(out.name, half, outputs=True)
            rename_uses(out.name, half, outputs=False)
            tail.append(helper.make_node("Cast", [half], [out.name], to=TensorProto.FLOAT,
                                         name=f"/rtkit/{out.name}_to_fp32"))
            out.type.tensor_type.elem_type = TensorProto.FLOAT
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)


def _retarget_float_casts(model_proto) -> None:
    """Make ``Cast(to=float)`` nodes cast to fp16 where the converted graph expects fp16.

    The converter retypes every tensor annotation to fp16 but leaves Cast targets alone, so a
    traced ``w.to(x.dtype)`` or ``t.float()`` still produces fp32 into fp16 arithmetic and ONNX
    Runtime refuses the graph ("Type (tensor(float16)) ... does not match expected type").
    """
    from onnx import TensorProto

    declared = {v.name: v.type.tensor_type.elem_type
                for v in list(model_proto.graph.value_info) + list(model_proto.graph.output)}
    for node in model_proto.graph.node:
        if node.op_type != "Cast" or declared.get(node.output[0]) != TensorProto.FLOAT16:
            continue
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16


def set_metadata_props(model_proto, meta: EngineCard) -> None:
    for p in list(model_proto.metadata_props):
        if p.key == METADATA_KEY:
            model_proto.metadata_props.remove(p)
    entry = model_proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = meta.to_json()


# Protobuf holds at most 2 GiB; past this (with headroom for the graph) weights go to a .data file.
EXTERNAL_DATA_BYTES = (1 << 31) - (1 << 26)


def external_data_file(path: Path) -> Path:
    """Where the weights of an engine saved with external data live: ``X.onnx.data`` beside it."""
    return path.with_name(path.name + ".data")


def _save(model_proto, path: Path, final: Path, external: bool | None) -> bool:
    """Write ``model_proto`` to ``path`` (a temporary name of ``final``); weights past 2 GB (or
    ``external=True``) go to ``final``'s .data file, which the graph names. True if they did."""
    import onnx

    size = sum(t.ByteSize() for t in model_proto.graph.initializer)
    if external is None:
        external = size > EXTERNAL_DATA_BYTES
    if not external:
        onnx.save_model(model_proto, str(path))
        return False
    data = external_data_file(final)
    _remove(data)  # save_model appends to an existing data file
    onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return True


def _remove(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _engine_card(model: nn.Module, name: str, engine_spec: ModelSpec, out_path: Path, out_name: str,
                 in_dtype: str, precision: str, profile: dict, sha: str | None, built: dict) -> EngineCard:
    """The card of an exported engine; for a pipeline's part, the pipeline's card listing it."""
    import dataclasses

    card = EngineCard(model=name, spec=engine_spec, overrides=dict(getattr(model, "registry_overrides", {}) or {}),
                      input_name=INPUT_NAME, output_names=[out_name], dtype=in_dtype, precision=precision,
                      batch=profile, checkpoint_sha256=sha, built_with=built)
    pipeline = _pipeline_of(model)
    if pipeline is None:
        return card
    (part,) = pipeline.parts  # export_module() is the one part; multi-part pipelines export per part
    settings = {**model.spec.settings, **pipeline.model_settings(model)}
    top = dataclasses.replace(model.spec, inputs=(), settings=settings, channels=engine_spec.channels)
    return dataclasses.replace(card, spec=top, loop=pipeline.loop,
                               parts={part: Part(file=out_path.name, inputs=engine_spec.inputs,
                                                 outputs=(out_name,), precision=precision)})


def _pipeline_of(model: nn.Module):
    from rtkit.engines.registry import get_entry

    try:
        return get_entry(getattr(model, "registry_name", "")).pipeline
    except KeyError:
        return None


def to_onnx(model_or_name: nn.Module | str, out_path: str | Path, *,
            checkpoint: str | Path | None = None, precision: str = "fp32",
            keep_io_types: bool = True, opset: int = 17, batch=(1, 8, 64),
            input_channels: str | None = None, parity: bool = True, tol=None,
            log: Callable[[str], None] | None = print, overrides: dict | None = None,
            part_precision: Mapping[str, str] | None = None, external_data: bool | None = None) -> Path:
    """Export a model to ONNX with its engine metadata; return the .onnx path.

    model_or_name: a registered name (built with ``checkpoint``, else its bundled weights, and
        builder ``overrides``), a weights file with its card (a training output), or a module from
        ``rtkit.engines.create`` (``checkpoint`` is then only recorded by sha256).
    precision: "fp32", or "fp16" (graph typed in fp16; inputs/outputs stay fp32 unless
        ``keep_io_types=False``).
    batch: (min, opt, max) batch profile recorded for the TensorRT build; the ONNX batch axis
        is dynamic regardless.
    input_channels: "RGB"/"BGR" to make the engine take another channel order than the model
        (the graph flips channels first); None keeps the spec's.
    parity: compare ONNX Runtime with PyTorch on seeded inputs; on failure the files are removed
        and EngineError says by how much (``tol`` overrides the default tolerance).
    log: where the parity report goes (None: nowhere).
    part_precision: pipelines with several parts: precision per part overriding ``precision``
        (e.g. ``{"vae_decoder": "fp32"}`` beside fp16 parts: an fp16 VAE overflows to black images).
    external_data: weights in ``X.onnx.data`` beside the graph: None (automatic past 2 GB), True
        or False.

    A pipeline with several parts (Arc2Face: encoder, uncond, unet, vae_decoder) is written as
    ``X.<part>.onnx`` per part plus the card ``X.json`` listing them; the card's path is returned.
    """
    if precision not in PRECISIONS:
        raise EngineError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    profile = batch_profile(batch)
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise EngineError(f"ONNX output must end in .onnx, got {out_path}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model, name, sha = resolve_model(model_or_name, checkpoint, overrides)
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).float().cpu()  # trace in fp32 on CPU; leave the caller's as is
    model.eval()
    pipeline = _pipeline_of(model)
    if pipeline is not None and len(pipeline.parts) > 1:
        return _pipeline_to_onnx(model, name, sha, pipeline, out_path, precision=precision,
                                 part_precision=part_precision, keep_io_types=keep_io_types, opset=opset,
                                 profile=profile, parity=parity, tol=tol, log=log, external_data=external_data)
    if part_precision:
        raise EngineError(f"{name} is one engine; part_precision applies to pipelines with several parts")

    def card_of(engine_spec: ModelSpec, out_name: str, in_dtype: str, built: dict) -> EngineCard:
        return _engine_card(model, name, engine_spec, out_path, out_name, in_dtype, precision, profile, sha, built)

    _export_engine(model, name, out_path, card_of, precision=precision, keep_io_types=keep_io_types,
                   opset=opset, input_channels=input_channels, external_data=external_data, sidecar=True)
    if parity:
        _parity_or_remove(model, out_path, [out_path, out_path.with_suffix(".json"), external_data_file(out_path)],
                          tol, log)
    return out_path


def _build(opset: int, precision: str) -> dict:
    import onnx

    build = {"opset": opset, "exporter": "torch.onnx (TorchScript tracer)", "onnx": onnx.__version__}
    if precision == "fp16":
        from importlib.metadata import version
        build["onnxconverter_common"] = version("onnxconverter-common")
    return build


def _export_engine(model: nn.Module, name: str, out_path: Path, card_of, *, precision: str,
                   keep_io_types: bool, opset: int, input_channels: str | None, external_data: bool | None,
                   sidecar: bool) -> EngineCard:
    """Trace one engine file (a model, or one part of a pipeline) and write it atomically, with
    ``card_of(engine_spec, output_name, input_dtype, built_with)`` in its metadata_props (and
    beside it when ``sidecar``)."""
    import onnx

    spec = export_spec(model)
    if input_channels not in (None, "RGB", "BGR"):
        raise EngineError(f"input_channels must be RGB or BGR, got {input_channels!r}")
    flip = input_channels is not None and input_channels != spec.channels
    engine_spec = ModelSpec.from_dict({**spec.to_dict(), "channels": input_channels or spec.channels})

    _check_traceable(export_target(model), list(spec.extra_inputs), name)
    inputs = export_inputs(model, EXPORT_BATCH)
    out_name = output_name_for(spec)
    graph = export_graph(model, list(inputs), flip)
    axes = _dynamic_axes(model, inputs, out_name)

    tmp = out_path.with_name(f".{out_path.stem}.{os.getpid()}.part.onnx")
    # The tracer writes models past 2 GB as one file per tensor beside its output: a folder of its own.
    trace_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.stem}.trace.", dir=out_path.parent))
    try:
        traced = trace_dir / "model.onnx"
        traced_shape = _trace_to_file(graph, inputs, traced, out_name, axes, opset, name)
        proto = onnx.load(str(traced))
        shutil.rmtree(trace_dir, ignore_errors=True)
        _set_output_shape(proto, out_name, traced_shape, axes[out_name])
        _check_inputs_kept(proto, list(inputs), name)
        if precision == "fp16":
            proto = to_fp16(proto, keep_io_types)
        if spec.task == "embed":
            _keep_insightface_scaling(proto)
        in_dtype = "float16" if precision == "fp16" and not keep_io_types else "float32"
        meta = card_of(engine_spec, out_name, in_dtype, build_info(**_build(opset, precision)))
        set_metadata_props(proto, meta)
        external = _save(proto, tmp, out_path, external_data)
        del proto
        onnx.checker.check_model(str(tmp))  # by path: also reads external data
        os.replace(tmp, out_path)
        if not external:
            _remove(external_data_file(out_path))  # left by an earlier export of the same name
    finally:
        _remove(tmp)
        shutil.rmtree(trace_dir, ignore_errors=True)
    if sidecar:
        write_card(out_path, meta)
    return meta


def _parity_or_remove(model: nn.Module, path: Path, files: list[Path], tol, log) -> None:
    from rtkit.export.parity import check_parity

    report = check_parity(model, path, tol=tol)
    if log is not None:
        log(report.format())
    if not report.passed:
        _remove(*files)
        raise EngineError(f"{path.name}: {report.failure_line()}; the files were removed "
                          f"(export with parity off, --no-parity, to keep and inspect them)")


def part_path(out_path: Path, part: str) -> Path:
    """The engine file of one part of a multi-part pipeline exported as ``X.onnx``: ``X.<part>.onnx``."""
    return out_path.with_name(f"{out_path.stem}.{part}.onnx")


def _pipeline_to_onnx(model: nn.Module, name: str, sha: str | None, pipeline, out_path: Path, *,
                      precision: str, part_precision: Mapping[str, str] | None, keep_io_types: bool,
                      opset: int, profile: dict, parity: bool, tol, log, external_data: bool | None) -> Path:
    """A pipeline with several parts: ``X.<part>.onnx`` per part (its part card in
    metadata_props), then the one card ``X.json`` listing the parts and the loop; parity per
    part. Returns the card's path (what ``rtkit.runtime.open_engine`` opens)."""
    import dataclasses

    modules = pipeline.part_modules(model)
    precisions = {k: precision for k in modules}
    for k, p in dict(part_precision or {}).items():
        if k not in modules:
            raise EngineError(f"{name} has no part {k!r}; its parts: {', '.join(modules)}")
        if p not in PRECISIONS:
            raise EngineError(f"precision of part {k} must be one of {PRECISIONS}, got {p!r}")
        precisions[k] = p
    for m in modules.values():
        m.eval()
    in_dtype = "float16" if precision == "fp16" and not keep_io_types else "float32"
    settings = {**model.spec.settings, **pipeline.model_settings(model)}
    built = build_info(**_build(opset, "fp16" if "fp16" in precisions.values() else "fp32"))
    card = EngineCard(model=name, spec=dataclasses.replace(model.spec, inputs=(), settings=settings),
                      overrides=dict(getattr(model, "registry_overrides", {}) or {}), input_name=INPUT_NAME,
                      output_names=[output_name_for(model.spec)], dtype=in_dtype, precision=precision,
                      batch=profile, checkpoint_sha256=sha, built_with=built, loop=pipeline.loop,
                      parts={k: Part(file=part_path(out_path, k).name, inputs=export_spec(m).inputs,
                                     outputs=(output_name_for(export_spec(m)),), precision=precisions[k])
                             for k, m in modules.items()})
    written: list[Path] = []
    try:
        for k, m in modules.items():
            path = part_path(out_path, k)
            io_dtype = "float16" if precisions[k] == "fp16" and not keep_io_types else "float32"

            def card_of(engine_spec, out_name, dtype, built_part, k=k, io_dtype=io_dtype):
                return dataclasses.replace(card.part_card(k), dtype=io_dtype,
                                           built_with={**card.built_with, **built_part})

            written += [path, external_data_file(path)]
            _export_engine(m, f"{name}.{k}", path, card_of, precision=precisions[k],
                           keep_io_types=keep_io_types, opset=opset, input_channels=None,
                           external_data=external_data, sidecar=False)
            if parity:
                _parity_or_remove(m, path, [path, external_data_file(path)], tol, log)
    except BaseException:
        _remove(*written)  # no half pipeline: its card is not written either
        raise
    return write_card(out_path, card)
