"""rt-generate digi2real: the tiny Arc2Face pipeline end to end on CPU over a tiny DigiFace-layout
source, with a tiny recognizer exported to ONNX. Determinism under a seed, batch size 1 vs 4,
3 shards vs one run, kill -9 + resume vs uninterrupted (byte-identical), corrupt inputs recorded,
a wrong models folder in one line, the ONNX parts through the runtime loop vs torch, and the
Delta command against a direct mean difference."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from rtkit.cli.generate import main as cli  # noqa: E402
from rtkit.datasets.sample import make_sample_dataset  # noqa: E402
from rtkit.engines import RtkitError, create  # noqa: E402
from rtkit.engines.arc2face import save_layout, write_tiny_tokenizer  # noqa: E402
from rtkit.engines.digi2real import delta_features, embed_aligned, load_delta  # noqa: E402
from rtkit.export.onnx import to_onnx  # noqa: E402
from rtkit.runtime.generate import (SOURCE_KEY, GenerateOptions, digi2real, open_generator,  # noqa: E402
                                    open_recognizer, time_generator)
from rtkit.runtime.manifest import Manifest, manifest_path  # noqa: E402
from rtkit.runtime.runners import PartFn  # noqa: E402

IDS, PER_SOURCE, N = 6, 3, 3      # 6 identities x 3 source images; 3 outputs each
STEPS = 3
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the CLI subprocesses below run (OMP_NUM_THREADS=1): the same
    kernels in both, and no oversubscription on a shared CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2r")
    torch.manual_seed(0)
    model = create("arc2face_tiny", pretrained=False)
    save_layout(model, root / "models", root / "base", tokenizer_dir=write_tiny_tokenizer(root / "tok"))
    torch.manual_seed(1)
    to_onnx(create("iresnet_tiny"), root / "rec.onnx", log=None)
    make_sample_dataset(root / "src", identities=IDS, per_identity=PER_SOURCE)
    gen = open_generator(models=root / "models", base=root / "base", model="arc2face_tiny",
                         settings={"steps": STEPS})
    rec = open_recognizer(root / "rec.onnx")
    yield {"root": root, "model": model, "gen": gen, "rec": rec, "src": root / "src"}
    gen.close()
    rec.close()


def _run(world, out, gen=None, src=None, **kw):
    opts = GenerateOptions(**{"per_identity": N, "batch_size": 4, "progress": False, **kw})
    return digi2real(gen or world["gen"], world["rec"], src or world["src"], out, opts)


def _images(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))
            if ".rtkit" not in p.parts}


def _pixels(files: dict[str, bytes]) -> np.ndarray:
    return np.stack([cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for _, b in sorted(files.items())])


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    summary = _run(world, out)
    return out, summary, _images(out)


# ----------------------------------------------------------------------------------------------- the job

def test_outputs_in_digiface_layout_and_deterministic(world, reference, tmp_path):
    out, summary, files = reference
    assert sorted(files) == [f"{i}/{k}.png" for i in range(IDS) for k in range(N)]  # source names kept
    img = cv2.imread(str(out / "0" / "0.png"))
    assert img.shape == (112, 112, 3) and img.std() > 1.0
    assert (summary.total, summary.converted, summary.failed, summary.exit_code) == (IDS * N, IDS * N, 0, 0)
    with Manifest(manifest_path(out)) as man:
        rows = man.rows()
    assert len(rows) == IDS * N and {r.status for r in rows} == {"done"}   # one row per output image
    assert all(r.conversions == 1 for r in rows)
    assert len(list((out / ".rtkit" / "embeddings").rglob("*.npy"))) == IDS * PER_SOURCE  # cached per file
    assert "rt-generate digi2real summary" in summary.table() and "s/img" in summary.table()

    again = tmp_path / "again"
    _run(world, again)
    assert _images(again) == files                                      # same seed, same bytes
    other = tmp_path / "seed"
    gen = open_generator(models=world["root"] / "models", base=world["root"] / "base", model="arc2face_tiny",
                         settings={"steps": STEPS, "seed": 7})
    _run(world, other, gen=gen)
    gen.close()
    differ = sum(files[k] != v for k, v in _images(other).items())
    assert differ == len(files)                                         # the seed matters

    second = _run(world, out)                                           # resume of a finished job
    assert (second.converted, second.already_done) == (0, IDS * N)


def test_batch_size_1_and_4_agree(world, reference, tmp_path):
    """Tolerance: batch composition changes only BLAS blocking (~1e-6 in [-1, 1]), so at most one
    8-bit level on at most 0.1 % of the pixels (measured: 0 to a handful of the 56 k here)."""
    _, _, files = reference
    _run(world, tmp_path / "b1", batch_size=1)
    a, b = _pixels(files).astype(int), _pixels(_images(tmp_path / "b1")).astype(int)
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3


def test_three_shards_equal_one_run(world, reference, tmp_path):
    _, _, files = reference
    out = tmp_path / "sharded"
    seen = []
    for i in range(3):
        s = _run(world, out, shard=(i, 3))
        seen.append(s.identities)
    assert sum(seen) == IDS
    assert _images(out) == files                                        # byte-identical
    with pytest.raises(RtkitError, match="shard"):
        _run(world, out, shard=(0, 2))                                  # another split would overlap


def test_changed_settings_are_refused_until_restart(world, reference, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(reference[0], out)
    with pytest.raises(RtkitError, match="per_identity"):
        _run(world, out, per_identity=N + 1)
    s = _run(world, out, per_identity=N + 1, restart=True)
    assert s.converted == IDS * (N + 1)


def test_kill_9_and_resume_equals_uninterrupted(world, tmp_path):
    root = world["root"]
    n, steps, batch = 4, 6, 1
    ref = tmp_path / "ref"
    gen = open_generator(models=root / "models", base=root / "base", model="arc2face_tiny",
                         settings={"steps": steps})
    _run(world, ref, gen=gen, per_identity=n, batch_size=batch)
    gen.close()
    expected = _images(ref)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rtkit.cli.generate", "digi2real", "--models", str(root / "models"),
           "--base", str(root / "base"), "--generator", "arc2face_tiny", "-r", str(root / "rec.onnx"),
           "-n", str(n), "--steps", str(steps), "-b", str(batch), "-q", str(world["src"]), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and (not out.exists() or len(_images(out)) < 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(_images(out))
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert 0 < partial < len(expected)                                   # killed mid-run
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _images(out) == expected                                      # byte-identical
    with Manifest(manifest_path(out)) as man:
        rows = man.rows()
        runs = [r[0] for r in man.db.execute("SELECT state FROM runs ORDER BY id")]
    assert {r.status for r in rows} == {"done"} and all(r.conversions == 1 for r in rows)  # exactly once
    assert runs == ["killed", "finished"]
    assert not [p for p in out.rglob(".*.part")]                         # no half-written file left


def test_corrupt_inputs_recorded_and_identity_reported(world, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(world["src"], src)
    good = (src / "1" / "0.png").read_bytes()
    (src / "1" / "0.png").write_bytes(good[: len(good) // 2])           # truncated
    for p in (src / "2").iterdir():
        p.write_bytes(b"not a png")
    out = tmp_path / "out"
    s = _run(world, out, src=src)
    assert s.failed_identities == ["2"] and s.failed == N and s.exit_code == 2
    assert all((out / "1" / f"{k}.png").is_file() for k in range(N))    # from its two good images
    with Manifest(manifest_path(out)) as man:
        rows = {r.relpath: r for r in man.rows()}
    assert rows[f"{SOURCE_KEY}1/0.png"].status == "skipped" and "PNG" in rows[f"{SOURCE_KEY}1/0.png"].error
    assert all(rows[f"2/{k}.png"].status == "failed" and "no usable source" in rows[f"2/{k}.png"].error
               for k in range(N))
    assert "FAILED IDENTITIES (1" in s.table()
    again = _run(world, out, src=src)                                   # still reported on resume
    assert again.failed_before == N and any(k == f"{SOURCE_KEY}1/0.png" for k, _ in again.failures)

    shutil.rmtree(src)
    shutil.copytree(world["src"], src)                                  # sources repaired
    fixed = _run(world, out, src=src)
    assert fixed.converted == 2 * N and fixed.exit_code == 0 and not fixed.failed_identities
    assert not any(k.startswith(SOURCE_KEY) for k, _ in fixed.failures)


def test_wrong_models_folder_is_one_line(world, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(world["root"] / "models", models)
    shutil.rmtree(models / "encoder")
    r = CliRunner().invoke(cli, ["digi2real", "--models", str(models), "--base", str(world["root"] / "base"),
                                 "--generator", "arc2face_tiny", "-r", str(world["root"] / "rec.onnx"), "-q",
                                 str(world["src"]), str(tmp_path / "out")])
    assert r.exit_code == 1
    line = r.output.strip()
    assert "\n" not in line and "encoder" in line and "expected <models>/arc2face/" in line
    r = CliRunner().invoke(cli, ["digi2real", "-r", str(world["root"] / "rec.onnx"), str(world["src"]),
                                 str(tmp_path / "out")])
    assert r.exit_code == 1 and "no generator" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["digi2real", "--models", str(models), "--base", str(world["root"] / "base"),
                                 "-r", str(world["root"] / "rec.onnx"), str(world["src"]), str(world["src"])])
    assert r.exit_code == 1 and "OUT is the source folder" in r.output    # refused before any model loads


# ----------------------------------------------------------------------------------------------- ONNX parts

def test_onnx_parts_through_the_runtime_loop_match_torch(world, reference, tmp_path):
    """Tolerance: the images within 1e-4 in [-1, 1] before quantisation (measured ~2e-6), so
    the PNGs within one 8-bit level on at most 0.1 % of the pixels."""
    card = to_onnx(world["model"], tmp_path / "a2f.onnx", log=None)
    assert card.name == "a2f.json"
    d = json.loads(card.read_text())
    assert d["loop"] == "arc2face" and sorted(d["parts"]) == ["encoder", "uncond", "unet", "vae_decoder"]
    assert all((tmp_path / p["file"]).is_file() for p in d["parts"].values())
    gen = open_generator(engine=card, settings={"steps": STEPS})
    assert gen.backend == "onnxruntime"
    ids = torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(3)), dim=-1)
    keys = ["a/0.png", "a/1.png", "b/0.png"]
    y_onnx = torch.as_tensor(gen.infer(ids, keys=keys))
    y_torch = torch.as_tensor(world["gen"].infer(ids, keys=keys))
    assert (y_onnx - y_torch).abs().max().item() < 1e-4
    _run(world, tmp_path / "out", gen=gen)
    gen.close()
    diff = np.abs(_pixels(_images(tmp_path / "out")).astype(int) - _pixels(reference[2]).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3


# ----------------------------------------------------------------------------------------------- Delta

def test_delta_command_is_the_direct_mean_difference(world, tmp_path):
    real = tmp_path / "real"
    make_sample_dataset(real, style="photo", identities=3, per_identity=2)
    delta_file = tmp_path / "delta.safetensors"
    root = world["root"]
    r = CliRunner().invoke(cli, ["digi2real-delta", "--models", str(root / "models"), "--base", str(root / "base"),
                                 "--generator", "arc2face_tiny", "-r", str(root / "rec.onnx"), "--real", str(real),
                                 "--synthetic", str(world["src"]), "-o", str(delta_file), "--scale", "0.5"])
    assert r.exit_code == 0, r.output
    delta = load_delta(delta_file)
    assert delta.space == "conditioning" and delta.scale == 0.5 and delta.vector.shape == (77, 128)
    assert delta.provenance["n_real"] == 6 and delta.provenance["n_synthetic"] == IDS * PER_SOURCE

    def mean_feature(folder):
        crops = np.stack([cv2.imread(str(p))[..., ::-1] for p in sorted(Path(folder).rglob("*.png"))])
        emb = torch.from_numpy(embed_aligned(crops, world["rec"]))
        with torch.inference_mode():
            return delta_features("conditioning", emb, PartFn(world["gen"].parts["encoder"])).double().mean(0)

    direct = (mean_feature(real) - mean_feature(world["src"])).float()
    assert (delta.vector - direct).abs().max().item() < 1e-5

    shifted = tmp_path / "shifted"
    r = CliRunner().invoke(cli, ["digi2real", "--models", str(root / "models"), "--base", str(root / "base"),
                                 "--generator", "arc2face_tiny", "-r", str(root / "rec.onnx"), "-n", "1",
                                 "--steps", str(STEPS), "-b", "4", "--delta", str(delta_file), "-q",
                                 str(world["src"]), str(shifted)])
    assert r.exit_code == 0, r.output
    plain = tmp_path / "plain"
    _run(world, plain, per_identity=1)
    assert _images(shifted).keys() == _images(plain).keys()
    assert all(a != b for a, b in zip(_images(shifted).values(), _images(plain).values()))


def test_time_generator_reports_per_batch_and_steps(world):
    rows = time_generator(world["gen"], batch_sizes=(1, 2), steps=(2,), repeats=1)
    assert [(r["batch"], r["steps"]) for r in rows] == [(1, 2), (2, 2)]
    assert all(r["s_per_img"] > 0 and abs(r["img_per_s"] * r["s_per_img"] - 1) < 1e-9 for r in rows)
