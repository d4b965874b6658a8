"""benchmarks/gpu_convert.py runs with --tiny on CPU (so the GPU benchmark cannot rot), and it
finds rtkit from the repository alone, as on a GPU machine where nothing is installed."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_convert.py"


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_tiny_run_on_cpu_converts_every_image_and_reports_each_stage(tmp_path):
    out = tmp_path / "figures.json"
    proc = run("--tiny", "--work", str(tmp_path / "work"), "--json", str(out))
    results = {r["model"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"vsait_tiny", "codeformer_tiny"}
    assert results["vsait_tiny"]["images"] == 64 and results["codeformer_tiny"]["images"] == 32
    assert results["codeformer_tiny"]["model_input"] == "32x32"  # the warp to the FFHQ template ran
    for name, r in results.items():
        assert r["failed"] == 0
        written = list((tmp_path / "work" / f"{name}-out").rglob("*.png"))
        assert len(written) == r["images"]
        for key in ("e2e_img_s", "model_img_s", "gpu_stage_img_s", "decode_busy_s", "compute_s",
                    "encode_busy_s"):
            assert r[key] > 0, (name, key)
        assert 0 < r["gpu_busy"] <= 1.0 + 1e-6
        assert r["e2e_over_compute"] == pytest.approx(r["e2e_img_s"] / r["model_img_s"])
    for words in ("end to end", "compute only", "decode", "H2D", "compute", "D2H", "encode",
                  "no GPU: CPU only"):
        assert words in proc.stdout


def test_finds_rtkit_without_an_install():
    code = textwrap.dedent(f"""
        import importlib, runpy, sys
        # drop the editable install's finder: the repository must be found from the script's folder
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
        sys.path[:] = [p for p in sys.path if "editable" not in p]
        sys.path_importer_cache.clear()
        for name in [m for m in sys.modules if m == "rtkit" or m.startswith("rtkit.")]:
            del sys.modules[name]
        try:
            import rtkit.runtime
            raise SystemExit("rtkit still importable")
        except ImportError:
            pass
        ns = runpy.run_path({str(SCRIPT)!r}, run_name="gpu_convert")
        ns["bootstrap_rtkit"]()
        import rtkit.runtime.gpu_image, rtkit.engines.registry
        print(rtkit.runtime.gpu_image.__file__)
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("gpu_image.py") and "rtkit-shim" in proc.stdout


@pytest.mark.gpu
def test_short_gpu_run(tmp_path):
    assert torch.cuda.is_available()
    out = tmp_path / "figures.json"
    run("--images", "4096", "--codeformer-images", "256", "--unique", "1024", "--seconds", "1",
        "--work", str(tmp_path / "work"), "--json", str(out), timeout=600)
    for r in json.loads(out.read_text()):
        assert r["failed"] == 0 and r["pinned"] and r["e2e_img_s"] > 0
