"""rt-convert --executor ray: runner actors on a local Ray cluster (num_cpus=2), the manifest kept by
the driver. One cluster serves the whole module (starting one takes ~10 s on two cores); the
driver-kill test connects a second driver to it, as a user's job connects to a running cluster."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from rtkit.cli.convert import main as convert_cli
from rtkit.datasets.sample import make_sample_dataset
from rtkit.engines.render2photo import BUNDLED_ONNX
from rtkit.runtime.converter import convert
from rtkit.runtime.job import EXIT_SOME_FAILED
from rtkit.runtime.manifest import Manifest, manifest_path

ray = pytest.importorskip("ray")

TOTAL = 320
CLI = [sys.executable, "-c", "from rtkit.cli.convert import main; main()"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray") / "render"
    make_sample_dataset(root, style="render", identities=40, per_identity=8, seed=7)
    return root


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> Path:
    """The same job through the local executor (one conversion process per core)."""
    out = tmp_path_factory.mktemp("ray_ref") / "out"
    s = convert(BUNDLED_ONNX, src, out, progress=False)
    assert s.converted == TOTAL and s.executor.startswith("processes")
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


def _actors() -> list[str]:
    """The run's runner actors (named rt-convert-<run>-<slot>.<generation>)."""
    return [a for a in ray.util.list_named_actors() if a.startswith("rt-convert-")]


def test_outputs_are_byte_identical_to_the_local_executor(cluster, src, reference, tmp_path):
    out = tmp_path / "out"
    s = convert(BUNDLED_ONNX, src, out, executor="ray", progress=False)
    assert s.executor.startswith("ray (2 actors") and s.converted == TOTAL and s.failed == 0
    assert _outputs(out) == _outputs(reference)
    assert _conversions(out) == (TOTAL, 1, 1)
    again = convert(BUNDLED_ONNX, src, out, executor="ray", progress=False)
    assert again.converted == 0 and again.already_done == TOTAL


def test_a_killed_actor_s_batches_are_redone_and_recorded_once(cluster, src, reference, tmp_path, caplog):
    out = tmp_path / "out"
    result = {}

    def run():
        try:
            result["summary"] = convert(BUNDLED_ONNX, src, out, executor="ray", batch_size=2, progress=False)
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.rglob("*.png"))) < 8 and t.is_alive():
        time.sleep(0.002)
    victims = _actors()
    assert victims and t.is_alive(), result
    ray.kill(ray.get_actor(victims[0]))
    t.join(timeout=120)
    assert "error" not in result, result.get("error")
    s = result["summary"]
    assert "Ray actor" in caplog.text and "resubmitted" in caplog.text, "the kill must land mid-run"
    assert s.converted == TOTAL and s.failed == 0
    assert _outputs(out) == _outputs(reference)
    assert _conversions(out) == (TOTAL, 1, 1), "every output recorded exactly once"


def test_a_rerun_after_the_driver_is_killed_redoes_no_finished_file(cluster, src, reference, tmp_path):
    out = tmp_path / "out"
    cmd = CLI + ["--engine", str(BUNDLED_ONNX), "-q", "--batch-size", "2", "--executor", "ray",
                 "--ray-address", cluster, str(src), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 90
    while time.time() < deadline and len(list(out.rglob("*.png"))) < 16:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.png")}
    assert 16 <= len(before) < TOTAL, "the driver must be killed mid-run"
    time.sleep(0.5)
    assert set(out.rglob("*.png")) == set(before), "the actors must stop with their driver"

    res = subprocess.run(cmd, capture_output=True, env=env, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == v for p, v in before.items()), \
        "a file finished before the kill was written again"
    assert _outputs(out) == _outputs(reference)
    assert _conversions(out) == (TOTAL, 1, 1)
    db = sqlite3.connect(manifest_path(out))
    assert [r[0] for r in db.execute("SELECT state FROM runs ORDER BY id")] == ["killed", "finished"]
    db.close()


def test_bad_inputs_are_recorded_failed_and_the_run_goes_on(cluster, src, tmp_path):
    import shutil

    tree = tmp_path / "src"
    shutil.copytree(src / "0", tree / "0")
    good = (tree / "0" / "0.png").read_bytes()
    (tree / "bad").mkdir()
    (tree / "bad" / "trunc.png").write_bytes(good[: len(good) // 2])
    (tree / "bad" / "text.png").write_text("this is not an image")
    s = convert(BUNDLED_ONNX, tree, tmp_path / "out", executor="ray", progress=False)
    assert s.converted == 8 and s.failed == 2 and s.exit_code == EXIT_SOME_FAILED
    with Manifest(manifest_path(tmp_path / "out")) as m:
        rows = {r.relpath: r for r in m.rows()}
    assert rows["bad/trunc.png"].status == "failed" and "truncated PNG" in rows["bad/trunc.png"].error
    assert rows["bad/text.png"].status == "failed" and "not an image" in rows["bad/text.png"].error


def test_more_actors_than_the_cluster_holds_still_finishes(cluster, src, reference, tmp_path):
    """Batches go only to actors that have started, so an actor the cluster cannot place holds
    none and the run does not wait for it."""
    import shutil

    tree = tmp_path / "src"
    for ident in ("0", "1"):
        shutil.copytree(src / ident, tree / ident)
    s = convert(BUNDLED_ONNX, tree, tmp_path / "out", executor="ray", ray_actors=3, batch_size=2,
                progress=False)
    assert s.executor.startswith("ray (3 actors") and s.converted == 16
    assert _outputs(tmp_path / "out") == {k: v for k, v in _outputs(reference).items()
                                          if k.split("/")[0] in ("0", "1")}


@pytest.mark.gpu
def test_cuda_engine_runs_one_actor_per_gpu(cluster, src, tmp_path):
    import torch

    s = convert("render2photo", src, tmp_path / "out", executor="ray", device="cuda", progress=False)
    assert s.executor.startswith(f"ray ({torch.cuda.device_count()} actors on GPUs")
    assert s.converted == TOTAL and _conversions(tmp_path / "out") == (TOTAL, 1, 1)


def test_without_ray_the_option_fails_with_one_line_naming_the_extra(src, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does where it is not installed
    r = CliRunner().invoke(convert_cli, ["--engine", str(BUNDLED_ONNX), "--executor", "ray", str(src),
                                         str(tmp_path / "out")])
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0 and "pip install 'rtkit[ray]'" in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, words", [
    (["--ray-cpus", "2"], "need --executor ray"),
    (["--executor", "ray", "--devices", "cpu,cpu"], "Ray places one actor per GPU"),
    (["--executor", "ray", "--ray-address", "127.0.0.1:1", "--ray-cpus", "2"], "sizes a local Ray cluster"),
])
def test_option_mixes_are_refused_with_one_line(src, tmp_path, args, words):
    r = CliRunner().invoke(convert_cli, ["--engine", str(BUNDLED_ONNX), *args, str(src),
                                         str(tmp_path / "out")])
    assert r.exit_code == 1 and words in r.output and r.output.strip().count("\n") == 0
