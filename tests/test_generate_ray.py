"""rt-generate digi2real --executor ray: generator actors on a local Ray cluster (num_cpus=2), the
manifest and the ID embeddings kept by the driver, on the tiny Arc2Face pipeline. Outputs are the
local executor's bytes, and an actor killed mid-run still leaves every output written once."""
from __future__ import annotations

import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
ray = pytest.importorskip("ray")

from click.testing import CliRunner  # noqa: E402

from rtkit.cli.generate import main as cli  # noqa: E402
from rtkit.datasets.sample import make_sample_dataset  # noqa: E402
from rtkit.engines import create  # noqa: E402
from rtkit.engines.arc2face import save_layout, write_tiny_tokenizer  # noqa: E402
from rtkit.export.onnx import to_onnx  # noqa: E402
from rtkit.runtime.generate import GenerateOptions, digi2real, open_generator, open_recognizer  # noqa: E402
from rtkit.runtime.manifest import manifest_path  # noqa: E402

IDS, PER_SOURCE, N = 6, 2, 4      # 24 outputs
STEPS, BATCH = 3, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2r_ray")
    torch.manual_seed(0)
    save_layout(create("arc2face_tiny", pretrained=False), root / "models", root / "base",
                tokenizer_dir=write_tiny_tokenizer(root / "tok"))
    torch.manual_seed(1)
    to_onnx(create("iresnet_tiny"), root / "rec.onnx", log=None)
    make_sample_dataset(root / "src", identities=IDS, per_identity=PER_SOURCE)
    gen_args = dict(models=str(root / "models"), base=str(root / "base"), model="arc2face_tiny",
                    settings={"steps": STEPS})
    gen = open_generator(**gen_args)
    rec = open_recognizer(root / "rec.onnx")
    yield {"root": root, "gen": gen, "rec": rec, "src": root / "src", "gen_args": gen_args}
    gen.close()
    rec.close()


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _run(world, out, **kw):
    opts = GenerateOptions(per_identity=N, batch_size=BATCH, progress=False)
    return digi2real(world["gen"], world["rec"], world["src"], out, opts, **kw)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """The local executor, at one torch thread as each CPU actor runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("d2r_ref") / "out"
        s = _run(world, out)
    finally:
        torch.set_num_threads(before)
    assert s.converted == IDS * N and s.executor == "main thread"
    return _images(out)


def _images(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))
            if ".rtkit" not in p.parts}


def _conversions(out: Path) -> tuple:
    db = sqlite3.connect(manifest_path(out))
    try:
        return db.execute("SELECT count(*), min(conversions), max(conversions) FROM files "
                          "WHERE status='done'").fetchone()
    finally:
        db.close()


def test_cli_ray_outputs_are_byte_identical_to_the_local_executor(cluster, world, reference, tmp_path):
    out = tmp_path / "out"
    root = world["root"]
    args = ["digi2real", "--models", str(root / "models"), "--base", str(root / "base"),
            "--generator", "arc2face_tiny", "-r", str(root / "rec.onnx"), "--steps", str(STEPS),
            "-n", str(N), "-b", str(BATCH), "--executor", "ray", "-q", str(world["src"]), str(out)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "ray (2 actors" in r.output
    assert _images(out) == reference
    assert _conversions(out) == (IDS * N, 1, 1)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "generated 0" in again.output, again.output


def test_a_killed_actor_s_batches_are_redone_and_every_output_written_once(cluster, world, reference,
                                                                          tmp_path, caplog):
    out = tmp_path / "out"
    result = {}

    def run():
        try:
            result["summary"] = _run(world, out, executor="ray", generator_args=world["gen_args"])
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.rglob("*.png"))) < 2 and t.is_alive():
        time.sleep(0.002)
    victims = [a for a in ray.util.list_named_actors() if a.startswith("rt-generate-")]
    assert victims and t.is_alive(), result
    ray.kill(ray.get_actor(victims[0]))
    t.join(timeout=120)
    assert "error" not in result, result.get("error")
    s = result["summary"]
    assert "Ray actor" in caplog.text and "resubmitted" in caplog.text, "the kill must land mid-run"
    assert s.converted == IDS * N and s.failed == 0
    assert _images(out) == reference
    assert _conversions(out) == (IDS * N, 1, 1), "every output recorded exactly once"


def test_without_ray_the_option_fails_with_one_line_naming_the_extra(world, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does where it is not installed
    root = world["root"]
    r = CliRunner().invoke(cli, ["digi2real", "--models", str(root / "models"), "--base", str(root / "base"),
                                 "--generator", "arc2face_tiny", "-r", str(root / "rec.onnx"),
                                 "--executor", "ray", str(world["src"]), str(tmp_path / "out")])
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0 and "pip install 'rtkit[ray]'" in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, words", [
    (["--ray-actors", "2"], "need --executor ray"),
    (["--executor", "ray", "--align", "detect"], "with --executor ray use --align warp"),
    (["--executor", "ray", "--ray-address", "127.0.0.1:1", "--ray-cpus", "2"], "sizes a local Ray cluster"),
])
def test_option_mixes_are_refused_with_one_line(world, tmp_path, args, words):
    root = world["root"]
    r = CliRunner().invoke(cli, ["digi2real", "--models", str(root / "models"), "--base", str(root / "base"),
                                 "--generator", "arc2face_tiny", "-r", str(root / "rec.onnx"), *args,
                                 str(world["src"]), str(tmp_path / "out")])
    assert r.exit_code == 1 and words in r.output and r.output.strip().count("\n") == 0, r.output
    assert not (tmp_path / "out").exists()
