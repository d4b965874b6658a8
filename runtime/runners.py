"""Runners: one interface over PyTorch, ONNX Runtime and TensorRT.

A Runner is a context manager with ``infer(batch, **extra) -> batch`` and a ``spec``. The batch
is NCHW in the model's range and channel order (``spec``), as a numpy array or a torch tensor;
the output comes back as the same kind. ``extra`` overrides runtime inputs such as CodeFormer's
``w`` (defaults come from the spec / engine metadata).

torch is imported only by the runners that compute with it (torch, TensorRT, step loops):
an ONNX engine fed numpy runs without it.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rtkit.engines.errors import EngineError, optional_import
from rtkit.engines.spec import ModelSpec
from rtkit.export.metadata import EngineMeta, read_metadata

if TYPE_CHECKING:
    import torch

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
PRECISIONS = ("fp32", "fp16", "bf16")


def _torch_dtype(precision: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _is_torch_tensor(x) -> bool:
    """True for a torch tensor, without importing torch (a tensor implies torch is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


class Runner:
    backend = "base"

    def __init__(self, meta: EngineMeta, identity: str, extra: dict[str, Any] | None = None):
        self.meta = meta
        self.spec: ModelSpec = meta.spec
        self.identity = identity  # stable hash of what computes the outputs (manifest key)
        self.extra = {**meta.spec.extra_inputs, **(extra or {})}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        pass

    def infer(self, batch, **extra):
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.meta.model} [{self.backend}]"


def _sha256_text(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class TorchRunner(Runner):
    """Runs a registered torch module; the caller picks device and precision."""

    backend = "torch"

    def __init__(self, model: torch.nn.Module, *, device: str = "cpu", precision: str = "fp32",
                 extra: dict | None = None, checkpoint_sha256: str | None = None):
        import torch

        if precision not in PRECISIONS:
            raise EngineError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        name = getattr(model, "registry_name", type(model).__name__)
        meta = EngineMeta(model=name, spec=model.spec, precision=precision,
                          checkpoint_sha256=checkpoint_sha256)
        if checkpoint_sha256 is None:
            # No file: the weights themselves identify the engine.
            h = hashlib.sha256()
            for k, v in sorted(model.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            checkpoint_sha256 = h.hexdigest()
        super().__init__(meta, _sha256_text("torch", name, checkpoint_sha256, precision), extra)
        self.device = torch.device(device)
        self.dtype = _torch_dtype(precision)
        self.model = model.to(self.device, self.dtype).eval()

    def infer(self, batch, **extra):
        import torch

        with torch.inference_mode():
            as_numpy = isinstance(batch, np.ndarray)
            x = torch.from_numpy(batch) if as_numpy else batch
            out_dtype = x.dtype
            x = x.to(self.device, self.dtype, non_blocking=True)
            kwargs = {**self.extra, **extra}
            y = self.model(x, **kwargs) if kwargs else self.model(x)
            if isinstance(y, (tuple, list)):
                y = y[0]
            y = y.to(out_dtype)
            return y.cpu().numpy() if as_numpy else y


class OnnxRunner(Runner):
    """Runs an exported .onnx with ONNX Runtime (CPU, or CUDA / TensorRT providers)."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, *, device: str = "cpu", extra: dict | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        from rtkit.engines.checkpoint import file_sha256

        path = Path(path)
        meta = read_metadata(path)
        super().__init__(meta, _sha256_text("onnx", file_sha256(path)), extra)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if str(device).startswith("cuda"):
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                raise EngineError("ONNX Runtime here has no CUDA provider: pip install "
                                  "'rtkit[gpu]' (onnxruntime-gpu), or use --device cpu")
            idx = int(str(device).split(":")[1]) if ":" in str(device) else 0
            providers = [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise EngineError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}; "
                              f"re-export it with rt-export") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        if meta.input_name not in self.inputs:
            raise EngineError(f"{path}: metadata names input {meta.input_name!r} but the graph "
                              f"has {sorted(self.inputs)}; re-export the engine")
        self._np_dtype = np.float16 if self.inputs[meta.input_name].type == "tensor(float16)" else np.float32
        self.output_name = self.session.get_outputs()[0].name

    def _feed_extra(self, name, value):
        info = self.inputs[name]
        if isinstance(value, dict):  # a descriptor {dtype, shape, default}: per-call input
            if "default" not in value:
                return None
            value = value["default"]
        dt = {"tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}.get(info.type, np.float32)
        arr = np.asarray(value, dtype=dt)
        if arr.ndim < len(info.shape):
            arr = arr.reshape((1,) * (len(info.shape) - arr.ndim) + arr.shape)
        return arr

    def infer(self, batch, **extra):
        as_numpy = isinstance(batch, np.ndarray)
        x = batch if as_numpy else batch.detach().cpu().numpy()
        out_dtype = x.dtype
        feed = {self.meta.input_name: np.ascontiguousarray(x, dtype=self._np_dtype)}
        for k, v in {**self.extra, **extra}.items():
            if k in self.inputs:
                if _is_torch_tensor(v):
                    v = v.detach().cpu().numpy()
                arr = self._feed_extra(k, v)
                if arr is not None:
                    feed[k] = arr
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

    def __init__(self, path: str | Path, *, device: str = "cuda", extra: dict | None = None):
        from rtkit.engines.checkpoint import file_sha256

        import torch

        path = Path(path)
        meta = read_metadata(path)
        trt = optional_import("tensorrt", extra="gpu", purpose="running a .plan engine")
        if not torch.cuda.is_available():
            raise EngineError(f"{path} is a TensorRT plan and needs a CUDA GPU; none is visible "
                              f"here. Run the .onnx engine instead (ONNX Runtime on CPU)")
        super().__init__(meta, _sha256_text("plan", file_sha256(path)), extra)
        built = meta.built_with
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

    def _torch_dtype(self, name):
        import torch

        trt = self._trt
        return {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64,
                trt.DataType.BF16: torch.bfloat16}[self.engine.get_tensor_dtype(name)]

    def infer(self, batch, **extra):
        import torch

        as_numpy = isinstance(batch, np.ndarray)
        x = torch.from_numpy(batch) if as_numpy else batch
        out_dtype = x.dtype
        feeds = {self.meta.input_name: x}
        for k, v in {**self.extra, **extra}.items():
            if k in self.input_names:
                if isinstance(v, dict):  # a descriptor {dtype, shape, default}
                    if "default" not in v:
                        continue
                    v = v["default"]
                t = torch.as_tensor(v)
                feeds[k] = t.reshape(1) if t.ndim == 0 else t
        stream = torch.cuda.current_stream(self.device)
        keep = []
        for name in self.input_names:
            t = feeds[name].to(self.device, self._torch_dtype(name)).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError("TensorRT execution failed (see the TensorRT log above)")
        y = outs[self.output_names[0]].to(out_dtype)
        if as_numpy:
            return y.cpu().numpy()
        return y.to(batch.device)


# Engines that export one network evaluation and need a sampling loop around it to translate:
# model module -> its loop function, loop(step_fn, x, **runtime_inputs).
_STEP_LOOPS = {"rtkit.engines.unsb": "sample", "rtkit.engines.ddim": "translate_with_step"}


def _step_loop_module(model: str) -> str | None:
    from rtkit.engines.registry import get_entry

    try:
        mod = get_entry(model).builder.__module__
    except KeyError:
        return None
    return mod if mod in _STEP_LOOPS else None


class StepLoopRunner(Runner):
    """Runs a multi-step translator from an engine of its single step (e.g. UNSB G(x, t, z)):
    the loop, with its seeded noise, runs here, so ONNX/TensorRT engines give the same images as
    the torch model."""

    def __init__(self, step: Runner, extra: dict | None = None):
        import importlib

        from rtkit.engines.registry import get_entry

        mod = _step_loop_module(step.meta.model)
        self._loop = getattr(importlib.import_module(mod), _STEP_LOOPS[mod])
        self.step = step
        spec = get_entry(step.meta.model).spec
        if spec.input_size is None and step.meta.spec.input_size is not None:
            spec = ModelSpec.from_dict({**spec.to_dict(), "input_size": step.meta.spec.input_size,
                                        "resize": step.meta.spec.resize})
        meta = EngineMeta(model=step.meta.model, spec=spec, precision=step.meta.precision,
                          checkpoint_sha256=step.meta.checkpoint_sha256, built_with=step.meta.built_with)
        super().__init__(meta, _sha256_text("loop", step.identity), extra)
        self.backend = step.backend

    def close(self):
        self.step.close()

    def infer(self, batch, **extra):
        import torch

        as_numpy = isinstance(batch, np.ndarray)
        x = torch.from_numpy(batch) if as_numpy else batch

        def step_fn(xt, t, z=None):
            inputs = {"t": t} if z is None else {"t": t, "z": z}
            y = self.step.infer(xt.numpy() if as_numpy else xt, **inputs)
            return torch.from_numpy(y) if as_numpy else y

        kwargs = {**self.extra, **extra}
        z = self.step.meta.spec.extra_inputs.get("z")
        if isinstance(z, dict) and len(z.get("shape", [])) == 2:
            kwargs.setdefault("z_dim", int(z["shape"][1]))
        y = self._loop(step_fn, x, **kwargs)
        return y.numpy() if as_numpy else y


def open_engine(engine: str | Path, *, device: str = "cpu", backend: str | None = None,
                checkpoint: str | Path | None = None, precision: str = "fp32",
                extra: dict | None = None, threads: int | None = None) -> Runner:
    """Open a runner for an engine file (.onnx, .plan), a checkpoint with a sidecar JSON naming
    its model, or a registered model name (with ``checkpoint``, else its bundled weights)."""
    p = Path(engine)
    kind = backend
    if kind is None:
        if p.suffix == ".onnx":
            kind = "onnxruntime"
        elif p.suffix in (".plan", ".engine", ".trt"):
            kind = "tensorrt"
        else:
            kind = "torch"
    if kind in ("onnxruntime", "ort", "onnx"):
        _need_file(p)
        return _wrap_step(OnnxRunner(p, device=device, threads=threads), extra)
    if kind in ("tensorrt", "trt"):
        _need_file(p)
        return _wrap_step(TensorRTRunner(p, device=device), extra)
    if kind != "torch":
        raise EngineError(f"unknown backend {backend!r}; use torch, onnxruntime or tensorrt")
    from rtkit.engines import registry
    from rtkit.engines.checkpoint import file_sha256

    if p.suffix in CHECKPOINT_SUFFIXES and p.is_file():
        meta = read_metadata(p)  # the sidecar names the registered model
        model = registry.create(meta.model, checkpoint=p)
        return TorchRunner(model, device=device, precision=precision, extra=extra,
                           checkpoint_sha256=file_sha256(p))
    try:
        registry.get_entry(str(engine))
    except KeyError:
        raise EngineError(f"engine {str(engine)!r} is neither a file (.onnx, .plan, or a checkpoint "
                          f"with its .json) nor a registered model; see rt-export --list") from None
    model = registry.create(str(engine), checkpoint=checkpoint)
    ck = checkpoint or registry.get_entry(str(engine)).default_checkpoint
    sha = file_sha256(ck) if ck else None
    return TorchRunner(model, device=device, precision=precision, extra=extra, checkpoint_sha256=sha)


def _wrap_step(runner: Runner, extra: dict | None) -> Runner:
    """A step engine of a looped model gets its loop; any other engine takes ``extra`` itself."""
    if "t" in runner.meta.spec.extra_inputs and _step_loop_module(runner.meta.model):
        return StepLoopRunner(runner, extra)
    runner.extra.update(extra or {})
    return runner


def _need_file(p: Path):
    if not p.is_file():
        raise FileNotFoundError(f"engine not found: {p}")
    if p.stat().st_size == 0:
        raise EngineError(f"engine file is empty (0 bytes): {p}; re-export it")
