"""torch is imported only where it computes: the CLIs' --help, the light modules and a whole
conversion with an ONNX engine run without it (importing torch costs over a second)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

import rtkit.engines.bundled

BUNDLED_ONNX = Path(rtkit.engines.bundled.__file__).parent / "render2photo.onnx"

TORCH_LOADED = "import sys; print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"


def run_python(code: str, *args: str, cwd: Path | None = None) -> str:
    """Run ``code`` in a fresh interpreter (this one has torch loaded already); return stdout."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_light_modules_do_not_import_torch():
    out = run_python("""
        import rtkit.cli.convert, rtkit.runtime, rtkit.runtime.converter, rtkit.engines.card
        import rtkit.engines.errors, rtkit.engines.spec, rtkit.engines, rtkit.export
        from rtkit.engines import ModelSpec, RtkitError, EngineError, optional_import
        from rtkit.engines.checkpoint import file_sha256
        from rtkit.runtime import open_engine, OnnxRunner, TorchRunner, TensorRTRunner
        """ + TORCH_LOADED)
    assert out.strip().endswith("NO-TORCH")


@pytest.mark.parametrize("argv", [
    ["convert"], ["bench"], ["export"], ["train"], ["eval"], ["sample"],
    ["train", "recognizer"], ["train", "translator"], ["train", "demo-translator"],
    ["eval", "verify"], ["eval", "ijbc"], ["eval", "report"], ["eval", "make-bin"],
    ["generate"], ["generate", "digi2real"], ["generate", "digi2real-delta"], ["bench", "generate"],
    ["experiment"], ["experiment", "run"], ["experiment", "init"],
])
def test_cli_help_does_not_import_torch(argv):
    out = run_python("""
        import importlib, sys
        from click.testing import CliRunner
        cli, *sub = sys.argv[1:]
        result = CliRunner().invoke(importlib.import_module("rtkit.cli." + cli).main, [*sub, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output
        """ + TORCH_LOADED, *argv)
    assert out.strip().endswith("NO-TORCH")


def _tiny_tree(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / f"id{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(sub / f"{i}.png"), rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    return root


def test_onnx_conversion_through_the_library_does_not_import_torch(tmp_path):
    src = _tiny_tree(tmp_path / "src")
    out = run_python("""
        import sys
        from rtkit.runtime import convert
        summary = convert(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
        assert summary.converted == 6 and summary.exit_code == 0, summary.table()
        """ + TORCH_LOADED, str(BUNDLED_ONNX), str(src), str(tmp_path / "out"))
    assert out.strip().endswith("NO-TORCH")
    assert len(list((tmp_path / "out").rglob("*.png"))) == 6


def test_onnx_conversion_through_the_cli_does_not_import_torch(tmp_path):
    src = _tiny_tree(tmp_path / "src")
    out = run_python("""
        import sys
        from rtkit.cli.convert import main
        try:
            main(["--engine", sys.argv[1], sys.argv[2], sys.argv[3], "--quiet"])
        except SystemExit as e:
            assert e.code == 0, e.code
        """ + TORCH_LOADED, str(BUNDLED_ONNX), str(src), str(tmp_path / "out"))
    assert "converted 6" in out
    assert out.strip().endswith("NO-TORCH")


def test_lazy_engine_names_are_the_registry_functions():
    import rtkit.engines as engines
    from rtkit.engines import checkpoint, registry

    for name in ("create", "list_models", "get_entry", "model_spec", "num_params", "register_model"):
        assert getattr(engines, name) is getattr(registry, name)
    for name in ("read_checkpoint", "unwrap", "load_state_dict_strict"):
        assert getattr(engines, name) is getattr(checkpoint, name)
    assert set(engines.__all__) <= set(dir(engines))
    with pytest.raises(AttributeError):
        engines.no_such_name  # noqa: B018


def test_onnx_runner_takes_torch_tensors_when_torch_is_loaded():
    import torch

    from rtkit.runtime import open_engine

    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    with open_engine(BUNDLED_ONNX) as runner:
        y_np = runner.infer(x)
        y_t = runner.infer(torch.from_numpy(x))
    assert isinstance(y_t, torch.Tensor) and y_t.dtype == torch.float32
    np.testing.assert_array_equal(y_t.numpy(), y_np)
