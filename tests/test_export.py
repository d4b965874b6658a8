"""rtkit.export: ONNX export (fp32/fp16) checked against PyTorch, engine metadata, the
TensorRT plan builder and the rt-export CLI.

Every registered tiny model is exported and compared with ONNX Runtime, so a new model is
covered as soon as it registers a tiny variant.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from rtkit.cli.export import main as rt_export
from rtkit.engines import create, list_models
from rtkit.engines.checkpoint import file_sha256
from rtkit.engines.errors import EngineError, MissingDependency
from rtkit.engines.card import METADATA_KEY, EngineCard, read_card
from rtkit.engines.spec import ModelSpec, TensorSpec
from rtkit.export import check_parity, to_onnx, to_plan
from rtkit.export.graph import export_inputs, export_spec
from rtkit.export.parity import Tolerance, default_tolerance
from rtkit.runtime import open_engine

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_INSIGHTFACE = importlib.util.find_spec("insightface") is not None
HAS_FP16_CONVERTER = importlib.util.find_spec("onnxconverter_common") is not None


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _build_or_skip(name: str):
    try:
        return create(name)
    except MissingDependency as e:
        pytest.skip(f"{name}: {e}")


def _checkpoint(model, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def render_onnx(tmp_path_factory):
    """render2photo_tiny with weights from a file, exported once: (model, ckpt, onnx)."""
    d = tmp_path_factory.mktemp("render")
    torch.manual_seed(0)
    model = create("render2photo_tiny")
    ckpt = _checkpoint(model, d / "render2photo_tiny.safetensors")
    onnx_path = to_onnx("render2photo_tiny", d / "r2p.onnx", checkpoint=ckpt, batch=(1, 4, 16),
                        log=None)
    return model, ckpt, onnx_path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export each tiny model at most once per test session: name -> (model, ckpt, onnx)."""
    d = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(name):
        if name not in cache:
            model = _build_or_skip(name)
            ckpt = _checkpoint(model, d / f"{name}.safetensors")
            path = to_onnx(model, d / f"{name}.onnx", checkpoint=ckpt, parity=False, log=None)
            cache[name] = (model, ckpt, path)
        return cache[name]

    return get


class ScalarBlend(nn.Module):
    """Not registered: a runtime scalar ``w`` cast to the image dtype (a traced Cast(to=float),
    the pattern that onnxconverter-common's fp16 conversion leaves mistyped) and a spec of its own."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.spec = ModelSpec(task="translate", input_size=(16, 16), inputs=(TensorSpec("w", "float32", (1,), 0.5),))

    def forward(self, x, w=0.5):
        w = torch.as_tensor(w, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        return torch.tanh(x + w * self.conv(x))


# --------------------------------------------------------------------------- every tiny model

@pytest.mark.parametrize("name", list_models(tiny=True))
def test_every_tiny_model_exports_and_matches_torch(name, exported):
    model, _, path = exported(name)
    meta = read_card(path)
    if len(meta.parts) > 1:  # a multi-part pipeline: every part is an engine of its own
        from rtkit.engines import get_entry

        modules = get_entry(name).pipeline.part_modules(model)
        assert set(meta.parts) == set(modules)
        for part, module in modules.items():
            file = path.parent / meta.parts[part].file
            assert [i.name for i in _ort(file).get_inputs()] == list(export_inputs(module, 2))
            report = check_parity(module, file)
            assert report.passed, (part, report.failure_line())
        return
    sess = _ort(path)
    assert [i.name for i in sess.get_inputs()] == list(export_inputs(model, 2))
    assert sess.get_inputs()[0].shape[0] == "batch"               # dynamic batch axis
    out = sess.get_outputs()[0]
    assert out.name == ("embedding" if meta.task == "embed" else "output") == meta.output_names[0]
    report = check_parity(model, path)   # batch 3 (traced with 2); 112x112 for any-size models
    print(report.format())
    assert report.passed, report.failure_line()
    assert report.batch == 3


# --------------------------------------------------------------------------- fp16

@pytest.mark.skipif(not HAS_FP16_CONVERTER, reason="onnxconverter-common not installed")
@pytest.mark.parametrize("name", ["render2photo_tiny", "iresnet_tiny", "scalar_blend"])
def test_fp16_export_matches_fp32_torch_within_fp16_tolerance(name, tmp_path):
    model = ScalarBlend() if name == "scalar_blend" else _build_or_skip(name)
    path = to_onnx(model, tmp_path / f"{name}_fp16.onnx", precision="fp16", log=None)
    import onnx

    proto = onnx.load(str(path))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT    # keep_io_types
               for i in list(proto.graph.input) + list(proto.graph.output))
    meta = read_card(path)
    assert (meta.precision, meta.dtype) == ("fp16", "float32")
    report = check_parity(model, path)
    assert report.tolerance == default_tolerance(export_spec(model).task, "fp16")
    assert report.passed and report.max_abs > 0


@pytest.mark.skipif(not HAS_FP16_CONVERTER, reason="onnxconverter-common not installed")
def test_fp16_io_engine_takes_and_returns_half(tmp_path, render_onnx):
    model, ckpt, _ = render_onnx
    path = to_onnx(model, tmp_path / "half_io.onnx", precision="fp16", keep_io_types=False, log=None)
    assert _ort(path).get_inputs()[0].type == "tensor(float16)"
    assert read_card(path).dtype == "float16"
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    with open_engine(path) as runner:
        y = runner.infer(x)
    assert y.dtype == np.float32   # the runner casts to the engine's dtype and back
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(y - ref).max() < default_tolerance("translate", "fp16").atol


# --------------------------------------------------------------------------- metadata

def test_metadata_sidecar_and_metadata_props_round_trip(render_onnx):
    _, ckpt, path = render_onnx
    side = json.loads(path.with_suffix(".json").read_text())
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props[METADATA_KEY]) == side
    meta = EngineCard.from_dict(side)
    assert meta.model == "render2photo_tiny" and meta.task == "translate"
    assert meta.input_name == "input" and meta.output_names == ["output"]
    assert meta.spec == create("render2photo_tiny").spec
    assert meta.batch == {"min": 1, "opt": 4, "max": 16}
    assert meta.checkpoint_sha256 == file_sha256(ckpt)
    assert {"rtkit", "torch", "opset"} <= set(meta.built_with) and meta.built_with["opset"] == 17
    # Without the sidecar the runtime reads the same metadata from the ONNX file itself.
    lone = path.with_name("lone.onnx")
    lone.write_bytes(path.read_bytes())
    assert read_card(lone).to_dict() == meta.to_dict()


def test_onnx_engine_converts_like_the_torch_model(render_onnx):
    """What rt-convert relies on: the exported engine and the checkpoint give the same images."""
    _, ckpt, path = render_onnx
    x = np.random.default_rng(1).uniform(-1, 1, (5, 3, 112, 112)).astype(np.float32)
    with open_engine(path) as onnx_runner, open_engine("render2photo_tiny", checkpoint=ckpt) as torch_runner:
        a, b = onnx_runner.infer(x), torch_runner.infer(x)
    assert a.shape == b.shape == x.shape
    assert np.abs(a - b).max() < 1e-4


def test_engine_with_runtime_input_converts_like_torch(exported):
    """CodeFormer's fidelity weight w is a graph input; the runner feeds it from the metadata
    default or a caller override, like the torch runner."""
    _, ckpt, path = exported("codeformer_tiny")
    assert [i.name for i in _ort(path).get_inputs()] == ["input", "w"]
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    with open_engine(path) as e, open_engine("codeformer_tiny", checkpoint=ckpt) as t:
        for w in (None, 1.0):
            kw = {} if w is None else {"w": w}
            assert np.abs(e.infer(x, **kw) - t.infer(x, **kw)).max() < 1e-4


# --------------------------------------------------------------------------- failures

def test_parity_failure_is_refused_with_the_needed_tolerance(tmp_path):
    model = create("render2photo_tiny")
    out = tmp_path / "strict.onnx"
    with pytest.raises(EngineError) as err:
        to_onnx(model, out, tol=Tolerance(atol=0.0), log=None)
    msg = str(err.value)
    assert "\n" not in msg and "needed atol" in msg
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_parity_report_catches_a_model_that_changed(render_onnx):
    model, _, path = render_onnx
    changed = create("render2photo_tiny")
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(0.05)
    report = check_parity(changed, path)
    assert not report.passed
    worst = report.outputs[0]
    assert worst.needed_atol == pytest.approx(worst.max_abs) and worst.max_abs > 1e-4
    assert np.isfinite(worst.psnr_db)
    with pytest.raises(EngineError, match="needed atol"):
        report.raise_if_failed()


def test_corrupt_onnx_is_a_one_line_engine_error(render_onnx, tmp_path):
    model, _, path = render_onnx
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(path.read_bytes()[: 2000])
    bad.with_suffix(".json").write_text(path.with_suffix(".json").read_text())
    lone = tmp_path / "lone.onnx"         # no sidecar: metadata comes from the broken file
    lone.write_bytes(path.read_bytes()[: 2000])
    for call in (lambda: check_parity(model, bad), lambda: open_engine(bad),
                 lambda: to_plan(bad, tmp_path / "bad.plan"), lambda: read_card(lone)):
        with pytest.raises(EngineError) as err:
            call()
        assert "\n" not in str(err.value) and ".onnx" in str(err.value)


class SamplerLoop(nn.Module):
    """A sampler whose step count is a Python int: tracing would bake it in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.spec = ModelSpec(task="translate", input_size=(8, 8), settings={"steps": 2})

    def forward(self, x, steps: int = 2):
        for _ in range(int(steps)):
            x = self.conv(x)
        return x


class IgnoresW(ScalarBlend):
    def forward(self, x, w=0.5):
        return torch.tanh(self.conv(x))


@pytest.mark.parametrize("model, text", [(SamplerLoop(), "Python numbers"),
                                         (IgnoresW(), "do not reach")])
def test_export_refuses_an_engine_that_would_ignore_a_runtime_input(model, text, tmp_path):
    with pytest.raises(EngineError, match=text) as err:
        to_onnx(model, tmp_path / "m.onnx", log=None)
    assert "export_module()" in str(err.value) and not (tmp_path / "m.onnx").exists()


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_plan_without_tensorrt_is_one_line_missing_dependency(render_onnx, tmp_path):
    _, _, path = render_onnx
    with pytest.raises(MissingDependency) as err:
        to_plan(path, tmp_path / "r.plan")
    assert "\n" not in str(err.value) and "rtkit[gpu]" in str(err.value)
    for args in ([str(path), "--to", "plan", str(tmp_path / "r.plan")],
                 ["render2photo_tiny", "--to", "plan", str(tmp_path / "r2.plan")]):
        res = CliRunner().invoke(rt_export, args)
        assert res.exit_code == 1 and "tensorrt" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r2.onnx").exists()   # refused before exporting anything


# --------------------------------------------------------------------------- recognizers

def test_bgr_recognizer_exported_for_rgb_input(tmp_path):
    model = _build_or_skip("adaface_tiny")
    assert model.spec.channels == "BGR"
    path = to_onnx(model, tmp_path / "ada_rgb.onnx", input_channels="RGB", log=None)
    assert read_card(path).spec.channels == "RGB"
    rgb = np.random.default_rng(3).uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    got = _ort(path).run(None, {"input": rgb})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(rgb[:, ::-1].copy())).numpy()
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.skipif(not HAS_INSIGHTFACE, reason="insightface not installed")
def test_insightface_loads_exported_recognizer_as_arcface(tmp_path):
    from insightface.model_zoo import get_model

    model = _build_or_skip("iresnet_tiny")
    path = to_onnx(model, tmp_path / "iresnet_tiny.onnx", log=None)
    arc = get_model(str(path), providers=["CPUExecutionProvider"])
    assert type(arc).__name__ == "ArcFaceONNX"
    assert (arc.input_mean, arc.input_std) == (127.5, 127.5)   # normalisation outside the graph
    assert arc.input_size == (112, 112)
    bgr = np.random.default_rng(4).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    feats = arc.get_feat(list(bgr))
    x = torch.from_numpy(((bgr[..., ::-1].astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        ref = model(x).numpy()
    assert feats.shape == (3, model.spec.output_dim)
    assert np.abs(feats - ref).max() < 1e-3


# --------------------------------------------------------------------------- CLI

def test_cli_help_lists_usage_and_tolerances():
    res = CliRunner().invoke(rt_export, ["--help"])
    assert res.exit_code == 0
    for text in ("--to", "--batch", "--fp16", "--timing-cache", "--no-parity", "--list", "1e-4"):
        assert text in res.output


def test_cli_list_and_export(tmp_path):
    res = CliRunner().invoke(rt_export, ["--list"])
    assert res.exit_code == 0 and "render2photo_tiny" in res.output
    out = tmp_path / "cli.onnx"
    res = CliRunner().invoke(rt_export, ["render2photo_tiny", "--to", "onnx", str(out),
                                         "--batch", "2:8:32"])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output and "max_abs" in res.output
    assert read_card(out).batch == {"min": 2, "opt": 8, "max": 32}


@pytest.mark.parametrize("args, exit_code, text", [
    (["no_such_model", "x.onnx"], 1, "unknown model"),
    (["render2photo_tiny", "x.onnx", "--batch", "8:4:2"], 1, "MIN <= OPT <= MAX"),  # usage errors exit 1 too
    (["render2photo_tiny", "x.txt"], 1, "--to onnx|plan"),
    (["render2photo_tiny", "x.onnx", "--fp16-io"], 1, "--fp16-io needs --fp16"),
])
def test_cli_user_errors_are_one_line(args, exit_code, text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(rt_export, args)
    assert res.exit_code == exit_code, res.output
    assert text in res.output and "Traceback" not in res.output


# --------------------------------------------------------------------------- TensorRT (GPU)

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="tensorrt not installed")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plan_matches_onnx_and_records_gpu(precision, tmp_path):
    import tensorrt as trt

    model = create("render2photo_tiny")
    onnx_path = to_onnx(model, tmp_path / f"r_{precision}.onnx", precision=precision, log=None)
    cache = tmp_path / "timing.cache"
    plan = to_plan(onnx_path, tmp_path / f"r_{precision}.plan", batch=(1, 4, 8), timing_cache=cache,
                   log=None)
    assert cache.stat().st_size > 0
    meta = read_card(plan)
    assert meta.built_with["tensorrt"] == trt.__version__
    assert meta.built_with["compute_capability"] == "%d.%d" % torch.cuda.get_device_capability()
    assert meta.batch == {"min": 1, "opt": 4, "max": 8} and meta.precision == precision
    x = np.random.default_rng(5).uniform(-1, 1, (3, 3, 112, 112)).astype(np.float32)
    with open_engine(plan, device="cuda") as p, open_engine(onnx_path) as o:
        diff = np.abs(p.infer(x) - o.infer(x)).max()
    assert diff < default_tolerance("translate", precision).atol * (1 if precision == "fp16" else 10)
