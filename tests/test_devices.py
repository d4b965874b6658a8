"""rt-convert --devices: one worker process per device over one job and one manifest (CPU devices
stand in for GPUs here; the code path is the same)."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rtkit.cli.convert import main as convert_cli
from rtkit.datasets.sample import make_sample_dataset
from rtkit.engines.render2photo import BUNDLED_ONNX
from rtkit.runtime.converter import convert
from rtkit.runtime.manifest import manifest_path

CLI = [sys.executable, "-c", "from rtkit.cli.convert import main; main()"]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("devices") / "render"
    make_sample_dataset(root, style="render", identities=40, per_identity=8, seed=5)
    return root


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> Path:
    """The same job through the default local executor (one conversion process per core)."""
    out = tmp_path_factory.mktemp("devices_ref") / "out"
    s = convert(BUNDLED_ONNX, src, out, progress=False)
    assert s.converted == 320
    return out


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.rglob("*")) if p.is_file() and ".rtkit" not in p.parts}


def _conversions(out: Path) -> tuple:
    db = sqlite3.connect(manifest_path(out))
    try:
        return db.execute("SELECT count(*), min(conversions), max(conversions) FROM files "
                          "WHERE status='done'").fetchone()
    finally:
        db.close()


def test_two_cpu_devices_equal_one_device_byte_for_byte(src, reference, tmp_path):
    results = {}
    for devices in ("cpu", "cpu,cpu"):
        out = tmp_path / devices.replace(",", "_")
        r = CliRunner().invoke(convert_cli, ["--engine", str(BUNDLED_ONNX), "-q", "--devices", devices,
                                             "--batch-size", "4", str(src), str(out)])
        assert r.exit_code == 0, r.output
        n = devices.count(",") + 1
        assert f"processes ({n} on {devices.replace(',', ', ')})" in r.output
        assert _conversions(out) == (320, 1, 1)
        results[devices] = _outputs(out)
    assert len(results["cpu"]) == 320
    assert results["cpu,cpu"] == results["cpu"] == _outputs(reference)


def test_devices_all_without_cuda_is_one_line(src, tmp_path):
    if torch.cuda.device_count():
        pytest.skip("CUDA devices are present")
    r = CliRunner().invoke(convert_cli, ["--engine", str(BUNDLED_ONNX), "--devices", "all", str(src),
                                         str(tmp_path / "out")])
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0 and "no CUDA device is visible" in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, words", [("gpu0", "is not a device"), ("cuda:x", "is not a device"),
                                          (",", "comma-separated")])
def test_malformed_devices_are_refused(src, tmp_path, value, words):
    r = CliRunner().invoke(convert_cli, ["--engine", str(BUNDLED_ONNX), "--devices", value, str(src),
                                         str(tmp_path / "out")])
    assert r.exit_code == 1 and words in r.output


def test_devices_and_processes_are_exclusive(src, tmp_path):
    r = CliRunner().invoke(convert_cli, ["--engine", str(BUNDLED_ONNX), "--devices", "cpu,cpu",
                                         "--processes", "2", str(src), str(tmp_path / "out")])
    assert r.exit_code == 1 and "exclusive" in r.output


def _descendants(pid: int) -> dict[int, int]:
    """{descendant pid: depth below ``pid``} from /proc."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    depth, frontier = {}, [pid]
    level = 0
    while frontier:
        level += 1
        frontier = [c for c, p in parent.items() if p in frontier]
        depth.update({c: level for c in frontier})
    return depth


def test_killed_device_worker_ends_the_run_and_a_rerun_finishes_exactly_once(src, reference, tmp_path):
    """A device worker killed from outside (OOM killer, a driver crash) ends the run with one
    line; its batches stay 'running' and the next run converts them, each file once."""
    out = tmp_path / "out"
    cmd = CLI + ["--engine", str(BUNDLED_ONNX), "-q", "--devices", "cpu,cpu", "--batch-size", "2",
                 str(src), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.rglob("*.png"))) < 16:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    # Workers fork from the fork server, a child of the run: they are its grandchildren.
    workers = [p for p, depth in _descendants(proc.pid).items() if depth == 2]
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().count("\n") == 0 and "conversion process died" in err and "redone" in err
    assert len(list(out.rglob("*.png"))) < 320, "the worker must be killed mid-run"

    res = subprocess.run(cmd, capture_output=True, env=env, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert _outputs(out) == _outputs(reference)
    assert _conversions(out) == (320, 1, 1)
    db = sqlite3.connect(manifest_path(out))
    assert [r[0] for r in db.execute("SELECT state FROM runs ORDER BY id")] == ["failed", "finished"]
    db.close()


@pytest.mark.gpu
def test_devices_all_runs_one_worker_per_gpu(src, tmp_path):
    n = torch.cuda.device_count()
    r = CliRunner().invoke(convert_cli, ["--engine", "render2photo", "-q", "--devices", "all",
                                         str(src), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert f"processes ({n} on {', '.join(f'cuda:{i}' for i in range(n))})" in r.output
    assert _conversions(tmp_path / "out") == (320, 1, 1)
