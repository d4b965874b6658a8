"""Runners: one interface over PyTorch, ONNX Runtime and TensorRT, and pipelines over them.

A Runner is a context manager with ``infer(batch, keys=None, **values) -> batch`` and a
``spec``. The batch is NCHW in the model's range and channel order (``spec``), as a numpy array
or a torch tensor; the output comes back as the same kind. ``values`` override graph inputs
(CodeFormer ``w``) or settings by name; defaults come from the engine card. ``keys`` name the
samples of the batch (the converter passes relative paths): a stochastic pipeline draws each
sample's noise from a seed derived from its key, so an output never depends on batching.

A PipelineRunner opens each part of a pipeline card on a backend and runs the card's loop
(rtkit.engines.sampling) over them; no model name appears here.

torch is imported only by the runners that compute with it (torch, TensorRT, pipelines): an
ONNX engine fed numpy runs without it.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rtkit.engines.card import EngineCard, Part, is_card_file, read_card
from rtkit.engines.errors import EngineError, RtkitError, optional_import
from rtkit.engines.spec import ModelSpec, TensorSpec

if TYPE_CHECKING:
    import torch

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
PLAN_SUFFIXES = (".plan", ".engine", ".trt")
PRECISIONS = ("fp32", "fp16", "bf16")
BACKENDS = ("torch", "onnxruntime", "tensorrt")
_BACKEND_ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime", "trt": "tensorrt"}


def _torch_dtype(precision: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _is_torch_tensor(x) -> bool:
    """True for a torch tensor, without importing torch (a tensor implies torch is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _sha256_text(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class Runner:
    backend = "base"

    def __init__(self, card: EngineCard, identity: str, extra: dict[str, Any] | None = None):
        self.card = card
        self.spec: ModelSpec = card.spec
        self.identity = identity  # stable hash of what computes the outputs (manifest key)
        unknown = sorted(set(extra or {}) - set(card.spec.extra_inputs))
        if unknown:
            known = ", ".join(sorted(card.spec.extra_inputs)) or "none"
            raise RtkitError(f"{card.model} has no input or setting {', '.join(unknown)} "
                             f"(it takes: {known})")
        # Every runtime value besides the image, by name: graph inputs and settings.
        self.extra = {**card.spec.extra_inputs, **(extra or {})}

    @property
    def meta(self) -> EngineCard:  # the name older callers use
        return self.card

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        pass

    def infer(self, batch, keys=None, **values):
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.card.model} [{self.backend}]"


def weights_sha256(model) -> str:
    """The weights themselves identify a module that has no file."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class TorchRunner(Runner):
    """Runs a registered torch module; the caller picks device and precision."""

    backend = "torch"

    def __init__(self, model: torch.nn.Module, *, device: str = "cpu", precision: str = "fp32",
                 extra: dict | None = None, checkpoint_sha256: str | None = None,
                 card: EngineCard | None = None, compile: bool = False, pad_to: int | None = None):
        import torch

        from rtkit.engines.card import card_for_module

        if precision not in PRECISIONS:
            raise EngineError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        card = card or card_for_module(model, checkpoint_sha256=checkpoint_sha256)
        card.precision = precision
        sha = checkpoint_sha256 or weights_sha256(model)
        super().__init__(card, _sha256_text("torch", card.model, sha, precision), extra)
        self.device = torch.device(device)
        self.dtype = _torch_dtype(precision)
        self.model = model.to(self.device, self.dtype).eval()
        # Convolutions on CUDA run fastest in NHWC (4-D inputs); on the CPU the default layout is as fast.
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        # A compiled graph is specialised to its batch shape: pad every batch to ``pad_to`` so the
        # last, shorter batch of a job does not trigger a recompile.
        self.pad_to = pad_to
        self._forward = torch.compile(self.model, dynamic=False) if compile else self.model
        # A pipeline model (UNSB, DDIM) runs as its parts and loop, exactly as its exported
        # engines do, so keys seed each sample the same way on every backend.
        entry = _registered(getattr(model, "registry_name", ""))
        self._pipeline = (_torch_pipeline(self.model, entry, card, device=device, precision=precision,
                                          extra=extra, sha=sha)
                          if entry is not None and entry.pipeline is not None else None)

    def close(self):
        if self._pipeline is not None:
            self._pipeline.close()

    def infer(self, batch, keys=None, **values):
        import torch

        if self._pipeline is not None:
            return self._pipeline.infer(batch, keys=keys, **values)
        with torch.inference_mode():
            as_numpy = isinstance(batch, np.ndarray)
            x = torch.from_numpy(batch) if as_numpy else batch
            out_dtype = x.dtype
            x = x.to(self.device, self.dtype, non_blocking=True)
            if x.ndim == 4 and self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            n = x.shape[0]
            if self.pad_to and n < self.pad_to:
                x = torch.cat([x, x[-1:].expand(self.pad_to - n, *x.shape[1:])])
            kwargs = {k: v for k, v in {**self.extra, **values}.items() if v is not None}
            for k, v in kwargs.items():
                if isinstance(v, torch.Tensor):
                    kwargs[k] = v.to(self.device)
            y = self._forward(x, **kwargs) if kwargs else self._forward(x)
            if isinstance(y, (tuple, list)):
                y = y[0]
            y = y[:n].to(out_dtype)
            return y.cpu().numpy() if as_numpy else y


def ort_session(path: str | Path, *, device: str = "cpu", threads: int | None = None):
    """The one ONNX Runtime session set-up: full graph optimisation, CPU or CUDA provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: ORT's warnings are about its own graph rewrites
    if str(device).startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineError("ONNX Runtime here has no CUDA provider: pip install "
                              "'rtkit[gpu]' (onnxruntime-gpu), or use --device cpu")
        idx = int(str(device).split(":")[1]) if ":" in str(device) else 0
        providers = [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        raise EngineError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}; "
                          f"re-export it with rt-export") from None


_ORT_TYPES = {"tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
              "tensor(double)": np.float64}


class OnnxRunner(Runner):
    """Runs an .onnx with ONNX Runtime (CPU, or the CUDA provider). ``card`` defaults to the
    engine's own; a foreign ONNX (insightface's) passes one built from its graph."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, *, device: str = "cpu", extra: dict | None = None,
                 threads: int | None = None, card: EngineCard | None = None):
        from rtkit.engines.checkpoint import file_sha256

        path = Path(path)
        card = card or read_card(path)
        data = path.with_name(path.name + ".data")  # external weights of a large graph
        digest = file_sha256(path) + (file_sha256(data) if data.is_file() else "")
        super().__init__(card, _sha256_text("onnx", digest), extra)
        self.session = ort_session(path, device=device, threads=threads)
        self.graph_inputs = {i.name: i for i in self.session.get_inputs()}
        if card.input_name not in self.graph_inputs:
            raise EngineError(f"{path}: its card names input {card.input_name!r} but the graph "
                              f"has {sorted(self.graph_inputs)}; re-export the engine")
        self._np_dtype = _ORT_TYPES.get(self.graph_inputs[card.input_name].type, np.float32)
        self.output_name = self.session.get_outputs()[0].name

    def infer(self, batch, keys=None, **values):
        as_numpy = isinstance(batch, np.ndarray)
        x = batch if as_numpy else batch.detach().cpu().numpy()
        out_dtype = x.dtype
        feed = {self.card.input_name: np.ascontiguousarray(x, dtype=self._np_dtype)}
        given = {**self.extra, **values}
        for name, info in self.graph_inputs.items():
            if name == self.card.input_name:
                continue
            tspec = self.spec.input(name) or TensorSpec(name)
            arr = tspec.feed(given.get(name), x.shape[0], _ORT_TYPES.get(info.type, np.float32))
            if arr is None:
                raise EngineError(f"{self.card.model}: graph input {name!r} has no default; pass it")
            feed[name] = arr
        y = self.session.run([self.output_name], feed)[0].astype(out_dtype, copy=False)
        if as_numpy:
            return y
        import torch  # the batch was a tensor, so torch is already loaded

        return torch.from_numpy(y).to(batch.device)


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT plan (TensorRT 10/11 tensor-name API, torch buffers).

    Plans are tied to the TensorRT version and GPU architecture that built them; a mismatch
    is reported with the command that rebuilds the plan from its ONNX.
    """

    backend = "tensorrt"

    def __init__(self, path: str | Path, *, device: str = "cuda", extra: dict | None = None,
                 card: EngineCard | None = None):
        from rtkit.engines.checkpoint import file_sha256

        import torch

        path = Path(path)
        card = card or read_card(path)
        trt = optional_import("tensorrt", extra="gpu", purpose="running a .plan engine")
        if not torch.cuda.is_available():
            raise EngineError(f"{path} is a TensorRT plan and needs a CUDA GPU; none is visible "
                              f"here. Run the .onnx engine instead (ONNX Runtime on CPU)")
        super().__init__(card, _sha256_text("plan", file_sha256(path)), extra)
        built = card.built_with
        dev = torch.device(device if str(device).startswith("cuda") else "cuda")
        cc = "%d.%d" % torch.cuda.get_device_capability(dev)
        rebuild = f"rebuild it: rt-export --to plan {path.with_suffix('.onnx')} {path}"
        if built.get("tensorrt") and built["tensorrt"] != trt.__version__:
            raise EngineError(f"{path} was built with TensorRT {built['tensorrt']}, this is "
                              f"TensorRT {trt.__version__}; {rebuild}")
        if built.get("compute_capability") and built["compute_capability"] != cc:
            raise EngineError(f"{path} was built for GPU compute capability "
                              f"{built['compute_capability']}, this GPU is {cc}; {rebuild}")
        self.device = dev
        self._trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize {path} (corrupt, or built by another "
                              f"TensorRT version or GPU); {rebuild}")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in self.names
                            if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in self.names if n not in self.input_names]

    def _tensor_dtype(self, name):
        import torch

        trt = self._trt
        return {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64,
                trt.DataType.BF16: torch.bfloat16}[self.engine.get_tensor_dtype(name)]

    def infer(self, batch, keys=None, **values):
        import torch

        as_numpy = isinstance(batch, np.ndarray)
        x = torch.from_numpy(batch) if as_numpy else batch
        out_dtype = x.dtype
        feeds = {self.card.input_name: x}
        given = {**self.extra, **values}
        for name in self.input_names:
            if name == self.card.input_name:
                continue
            arr = (self.spec.input(name) or TensorSpec(name)).feed(given.get(name), x.shape[0])
            if arr is None:
                raise EngineError(f"{self.card.model}: graph input {name!r} has no default; pass it")
            feeds[name] = torch.from_numpy(np.ascontiguousarray(arr))
        stream = torch.cuda.current_stream(self.device)
        keep = []
        for name in self.input_names:
            t = feeds[name].to(self.device, self._tensor_dtype(name)).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self._tensor_dtype(name), device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError("TensorRT execution failed (see the TensorRT log above)")
        y = outs[self.output_names[0]].to(out_dtype)
        if as_numpy:
            return y.cpu().numpy()
        return y.to(batch.device)


class PartFn:
    """One part of a pipeline as the loop sees it: ``part(first, *inputs)`` with torch tensors,
    the inputs in the order of the part's TensorSpecs; ``inputs`` maps their names to specs."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.inputs = {i.name: i for i in runner.spec.inputs}
        self._order = list(self.inputs)

    def __call__(self, first, *args):
        import torch

        values = dict(zip(self._order, args))
        y = self.runner.infer(first, **values)
        return y if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y))


class PipelineRunner(Runner):
    """Runs a pipeline card: each part opened on a backend, the card's loop over them.

    Settings (NFE, steps, seed...) come from the card, overridden by ``extra``; a seeded loop gets
    one seed per sample, derived from the sample's key when the caller names the samples."""

    def __init__(self, card: EngineCard, parts: dict[str, Runner], extra: dict | None = None):
        from rtkit.engines.sampling import get_loop, is_seeded

        self.parts = parts
        self._loop = get_loop(card.loop)
        self._seeded = is_seeded(card.loop)
        identity = _sha256_text("pipeline", card.loop, *(f"{k}={r.identity}" for k, r in sorted(parts.items())))
        super().__init__(card, identity, extra)
        self.backend = "+".join(sorted({r.backend for r in parts.values()}))
        self._fns = {name: PartFn(r) for name, r in parts.items()}

    def close(self):
        for r in self.parts.values():
            r.close()

    def infer(self, batch, keys=None, **values):
        import torch

        from rtkit.engines.sampling import path_seed

        as_numpy = isinstance(batch, np.ndarray)
        x = torch.from_numpy(batch) if as_numpy else batch
        settings = {k: v for k, v in {**self.extra, **values}.items() if v is not None}
        if self._seeded and keys is not None:
            base = int(settings.get("seed", 0))
            settings["seed"] = [path_seed(str(k), base) for k in keys]
        with torch.inference_mode():
            y = self._loop(self._fns, x, **settings)
        return y.cpu().numpy() if as_numpy else y


def _backend_for(path: Path, backend: str | None) -> str:
    if backend is not None:
        kind = _BACKEND_ALIASES.get(backend, backend)
        if kind not in BACKENDS:
            raise EngineError(f"unknown backend {backend!r}; use torch, onnxruntime or tensorrt")
        return kind
    if path.suffix == ".onnx":
        return "onnxruntime"
    if path.suffix in PLAN_SUFFIXES:
        return "tensorrt"
    return "torch"


def _open_file(path: Path, kind: str, *, card: EngineCard | None, device: str, precision: str,
               threads: int | None, extra: dict | None = None, compile: bool = False,
               pad_to: int | None = None) -> Runner:
    """A runner over one engine or weights file."""
    _need_file(path)
    if kind == "onnxruntime":
        return OnnxRunner(path, device=device, threads=threads, card=card, extra=extra)
    if kind == "tensorrt":
        return TensorRTRunner(path, device=device, card=card, extra=extra)
    from rtkit.engines import registry
    from rtkit.engines.checkpoint import file_sha256

    card = card or read_card(path)
    model = registry.create(card.model, checkpoint=path, **card.overrides)
    return TorchRunner(model, device=device, precision=precision, extra=extra,
                       checkpoint_sha256=file_sha256(path), card=card, compile=compile, pad_to=pad_to)


def _torch_pipeline(model, entry, card: EngineCard, *, device, precision, extra, sha) -> Runner:
    """A registered pipeline model on torch: each part module in a TorchRunner, the same loop."""
    import dataclasses

    settings = {**card.spec.settings, **entry.pipeline.model_settings(model)}
    modules = entry.pipeline.part_modules(model)
    card = dataclasses.replace(card, spec=dataclasses.replace(card.spec, settings=settings),
                               loop=entry.pipeline.loop,
                               parts={name: Part(file="", inputs=m.spec.inputs) for name, m in modules.items()})
    parts = {}
    for name, module in modules.items():
        module.registry_name = f"{card.model}.{name}"
        part_sha = _sha256_text(sha or weights_sha256(model), name)
        parts[name] = TorchRunner(module, device=device, precision=precision,
                                  checkpoint_sha256=part_sha, card=card.part_card(name))
    return PipelineRunner(card, parts, extra)


def open_engine(engine: str | Path, *, device: str = "cpu", backend: str | None = None,
                checkpoint: str | Path | None = None, precision: str = "fp32",
                extra: dict | None = None, threads: int | None = None,
                random_weights: bool = False, compile: bool = False, pad_to: int | None = None) -> Runner:
    """Open a runner for an engine by its path alone: an .onnx / .plan engine, a pipeline card
    (.json, or a folder holding engine.json), a checkpoint with its card beside it, or a
    registered model name (with ``checkpoint``, else its bundled weights; a model without either
    needs ``random_weights=True``). Torch engines: ``compile`` runs the module through
    torch.compile, with every batch padded to ``pad_to`` so one graph serves the whole job."""
    p = Path(engine)
    if p.is_dir() or is_card_file(p):
        card = read_card(p)
        if not card.parts:
            raise EngineError(f"{p} is a card without parts; open the weights file beside it")
        return _open_pipeline(card, p if p.is_dir() else p.parent, backend, device=device,
                              precision=precision, threads=threads, extra=extra)
    if p.suffix in (".onnx", *PLAN_SUFFIXES, *CHECKPOINT_SUFFIXES) or p.is_file():
        kind = _backend_for(p, backend)
        _need_file(p)
        card = read_card(p)
        if card.parts:
            return _open_pipeline(card, p.parent, kind, device=device, precision=precision,
                                  threads=threads, extra=extra)
        legacy = _legacy_step_card(card)
        if legacy is not None:  # a format 1 step engine of a looped model
            return _open_pipeline(legacy, p.parent, kind, device=device, precision=precision,
                                  threads=threads, extra=extra, files={"step": p})
        return _open_file(p, kind, card=card, device=device, precision=precision, threads=threads,
                          extra=extra, compile=compile, pad_to=pad_to)
    return _open_registered(str(engine), checkpoint, device=device, precision=precision, extra=extra,
                            random_weights=random_weights, backend=backend, compile=compile, pad_to=pad_to)


def _open_registered(name: str, checkpoint, *, device, precision, extra, random_weights, backend,
                     compile=False, pad_to=None) -> Runner:
    from rtkit.engines import registry
    from rtkit.engines.checkpoint import file_sha256

    try:
        entry = registry.get_entry(name)
    except KeyError:
        raise EngineError(f"engine {name!r} is neither a file (.onnx, .plan, a pipeline card, or a "
                          f"checkpoint with its .json) nor a registered model; see rt-export --list") from None
    if backend is not None and _backend_for(Path(name), backend) != "torch":
        raise EngineError(f"a registered model name runs on torch; export it (rt-export) for {backend}")
    ck = checkpoint or entry.default_checkpoint
    if ck is None and not entry.tiny and not random_weights:
        raise RtkitError(f"{name} has no weights here: pass its official checkpoint (--checkpoint PATH), "
                         f"or --random-weights to run it with random weights (timing only)")
    model = registry.create(name, checkpoint=checkpoint)
    sha = file_sha256(ck) if ck else None
    return TorchRunner(model, device=device, precision=precision, extra=extra, checkpoint_sha256=sha,
                       compile=compile, pad_to=pad_to)


def _open_pipeline(card: EngineCard, root: Path, backend: str | None, *, device, precision, threads,
                   extra, files: dict[str, Path] | None = None) -> Runner:
    parts = {}
    try:
        for name, part in card.parts.items():
            path = (files or {}).get(name) or root / part.file
            kind = _backend_for(path, backend)
            parts[name] = _open_file(path, kind, card=card.part_card(name), device=device,
                                     precision=precision, threads=threads)
    except BaseException:
        for r in parts.values():
            r.close()
        raise
    return PipelineRunner(card, parts, extra)


def _legacy_step_card(card: EngineCard) -> EngineCard | None:
    """Format 1 exported a looped model's step with the step's spec: rebuild the pipeline card
    (the model's spec from the registry, the file's input size) so old engines keep running."""
    import dataclasses

    if card.format_version != 1 or not card.spec.inputs:
        return None
    try:
        from rtkit.engines.registry import get_entry

        entry = get_entry(card.model)
    except KeyError:
        return None
    if entry.pipeline is None or len(entry.pipeline.parts) != 1:
        return None
    spec = entry.spec
    if spec.input_size is None and card.spec.input_size is not None:
        spec = dataclasses.replace(spec, input_size=card.spec.input_size, resize=card.spec.resize)
    (name,) = entry.pipeline.parts
    return dataclasses.replace(card, spec=spec, loop=entry.pipeline.loop,
                               parts={name: Part(file="", inputs=card.spec.inputs,
                                                 precision=card.precision)})


def _registered(model: str):
    """The registry entry of ``model``, or None for modules that are not registered (parts)."""
    from rtkit.engines import registry

    try:
        return registry.get_entry(model)
    except KeyError:
        return None


def _need_file(p: Path):
    if not p.is_file():
        raise FileNotFoundError(f"engine not found: {p}")
    if p.stat().st_size == 0:
        raise EngineError(f"engine file is empty (0 bytes): {p}; re-export it")
