"""The streaming converter: outputs, resume after SIGKILL, bad inputs, sharding, CLI."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from rtkit.cli.convert import main as convert_cli
from rtkit.engines import create
from rtkit.engines.card import EngineCard, write_card
from rtkit.runtime import open_engine
from rtkit.runtime.converter import convert
from rtkit.runtime.image import postprocess, preprocess
from rtkit.runtime.job import EXIT_ABORTED, EXIT_OK, EXIT_SOME_FAILED
from rtkit.runtime.manifest import Manifest, manifest_path
from rtkit.datasets.sample import make_sample_dataset


def _checkpoint(tmp: Path, name: str) -> Path:
    """A seeded random checkpoint with its sidecar, so subprocesses open the same engine."""
    torch.manual_seed(0)
    model = create(name, pretrained=False)
    path = tmp / f"{name}.safetensors"
    save_file(model.state_dict(), str(path))
    write_card(path, EngineCard(model=name, spec=model.spec))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "render"
    make_sample_dataset(root, style="render", identities=6, per_identity=4, seed=3)
    return root


@pytest.fixture(scope="module", params=["torch", "onnx"])
def tiny_engine(request, tmp_path_factory) -> Path:
    """The same tiny translator as a checkpoint (threaded pipeline) and as an ONNX engine (on CPU:
    one conversion process per core), so every behaviour below is checked in both modes."""
    tmp = tmp_path_factory.mktemp("engine")
    ckpt = _checkpoint(tmp, "render2photo_tiny")
    if request.param == "torch":
        return ckpt
    from rtkit.export import to_onnx

    return to_onnx(create("render2photo_tiny", checkpoint=ckpt), tmp / "render2photo_tiny.onnx",
                   checkpoint=ckpt, log=None)


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.rglob("*")) if p.is_file() and ".rtkit" not in p.parts}


def test_converts_tree_mirrored_with_model_output(dataset, tiny_engine, tmp_path):
    out = tmp_path / "out"
    s = convert(tiny_engine, dataset, out, progress=False, batch_size=5)
    assert s.exit_code == EXIT_OK and s.converted == 24 and s.failed == 0
    files = _outputs(out)
    src_files = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*.png"))
    assert sorted(files) == src_files
    # Each output is the engine applied to its source, not a copy.
    rel = src_files[5]
    rgb = cv2.cvtColor(cv2.imread(str(dataset / rel)), cv2.COLOR_BGR2RGB)
    with open_engine(tiny_engine) as r:
        expect = postprocess(r.infer(preprocess(rgb, r.spec)[None])[0], r.spec, rgb.shape[:2])
    got = cv2.cvtColor(cv2.imread(str(out / rel)), cv2.COLOR_BGR2RGB)
    assert np.array_equal(got, expect)
    with Manifest(manifest_path(out)) as m:
        rows = m.rows()
    assert {r.status for r in rows} == {"done"} and all(r.conversions == 1 for r in rows)


@pytest.mark.parametrize("tiny_engine", ["onnx"], indirect=True)  # processes run ONNX engines
def test_cpu_processes_equal_the_threaded_pipeline(dataset, tiny_engine, tmp_path):
    a = convert(tiny_engine, dataset, tmp_path / "processes", progress=False, processes=2, batch_size=3)
    b = convert(tiny_engine, dataset, tmp_path / "threads", progress=False, processes=0, batch_size=3)
    assert a.workers == {"processes": 2} and "processes" not in b.workers
    assert a.converted == b.converted == 24 and set(a.stage_s) == {"decode", "infer", "encode"}
    assert _outputs(tmp_path / "processes") == _outputs(tmp_path / "threads")
    with Manifest(manifest_path(tmp_path / "processes")) as m:
        assert {(r.status, r.conversions) for r in m.rows()} == {("done", 1)}


def test_second_run_redoes_nothing(dataset, tiny_engine, tmp_path):
    out = tmp_path / "out"
    convert(tiny_engine, dataset, out, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    s = convert(tiny_engine, dataset, out, progress=False)
    assert s.converted == 0 and s.already_done == 24
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before


def test_output_format_and_size(dataset, tiny_engine, tmp_path):
    out = tmp_path / "out"
    s = convert(tiny_engine, dataset, out, progress=False, fmt="jpg", quality=80, size=(64, 96))
    assert s.converted == 24
    jpgs = sorted(out.rglob("*.jpg"))
    assert len(jpgs) == 24 and not list(out.rglob("*.png"))
    assert cv2.imread(str(jpgs[0])).shape == (64, 96, 3)


def test_changed_settings_are_refused_then_restart(dataset, tiny_engine, tmp_path):
    from rtkit.engines.errors import RtkitError

    out = tmp_path / "out"
    convert(tiny_engine, dataset, out, progress=False)
    with pytest.raises(RtkitError, match="other settings"):
        convert(tiny_engine, dataset, out, progress=False, fmt="webp")
    s = convert(tiny_engine, dataset, out, progress=False, fmt="webp", restart=True)
    assert s.converted == 24


def _bad_tree(root: Path, dataset: Path) -> dict[str, str]:
    import shutil
    shutil.copytree(dataset, root)
    good = (root / "0" / "0.png").read_bytes()
    jpg = cv2.imencode(".jpg", cv2.imread(str(root / "0" / "1.png")))[1].tobytes()
    (root / "bad").mkdir()
    (root / "bad" / "zero.png").write_bytes(b"")
    (root / "bad" / "trunc.png").write_bytes(good[: len(good) // 2])
    (root / "bad" / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "bad" / "text.png").write_text("this is not an image")
    (root / "bad" / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(500) + b"\xff\xd9")
    (root / "bad" / "notes.txt").write_text("labels")
    return {"bad/zero.png": "empty", "bad/trunc.png": "truncated PNG", "bad/cut.jpg": "truncated JPEG",
            "bad/text.png": "not an image", "bad/garbage.jpg": "corrupt"}


def test_bad_files_recorded_and_skipped(dataset, tiny_engine, tmp_path):
    src = tmp_path / "src"
    bad = _bad_tree(src, dataset)
    out = tmp_path / "out"
    s = convert(tiny_engine, src, out, progress=False, batch_size=4)
    assert s.converted == 24 and s.failed == len(bad) and s.skipped == 1
    assert s.exit_code == EXIT_SOME_FAILED
    table = s.table()
    with Manifest(manifest_path(out)) as m:
        rows = {r.relpath: r for r in m.rows()}
    for rel, reason in bad.items():
        assert rows[rel].status == "failed" and reason in rows[rel].error
        assert rel in table
    assert rows["bad/notes.txt"].status == "skipped"
    assert not (out / "bad").exists() or not list((out / "bad").iterdir())


def test_max_failures_stops_early(dataset, tiny_engine, tmp_path):
    src = tmp_path / "src"
    _bad_tree(src, dataset)
    s = convert(tiny_engine, src, tmp_path / "out", progress=False, max_failures=1, decode_workers=1)
    assert s.aborted and s.exit_code == EXIT_ABORTED


def test_shards_partition_the_full_run(dataset, tiny_engine, tmp_path):
    full = _outputs(_run(convert, tiny_engine, dataset, tmp_path / "full"))
    union: dict[str, bytes] = {}
    for i in range(3):
        out = tmp_path / f"shard{i}"
        convert(tiny_engine, dataset, out, progress=False, shard=(i, 3))
        part = _outputs(out)
        assert part and not set(part) & set(union)
        union.update(part)
        assert manifest_path(out, (i, 3)).is_file()
    assert union == full


def _run(fn, engine, src, out):
    fn(engine, src, out, progress=False)
    return out


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_sigkill_then_resume_is_exactly_once(kind, tmp_path):
    """torch: the threaded pipeline; onnx: conversion processes, which must die with the run."""
    from rtkit.engines.render2photo import BUNDLED_ONNX

    src = tmp_path / "src"
    ids = 12 if kind == "torch" else 40  # the ONNX processes are fast: more images to kill mid-way
    make_sample_dataset(src, style="render", identities=ids, per_identity=8, seed=1)
    total = ids * 8
    engine = _checkpoint(tmp_path, "render2photo") if kind == "torch" else BUNDLED_ONNX
    ref = tmp_path / "ref"
    convert(engine, src, ref, progress=False, batch_size=4)

    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "from rtkit.cli.convert import main; main()", "--engine", str(engine),
           "-q", "--batch-size", "2", "--decode-workers", "1", "--encode-workers", "1", str(src), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.rglob("*.png"))) < 16:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.3)
    written = sorted(out.rglob("*.png"))
    assert 16 <= len(written) < total, "the run must be killed mid-way"
    time.sleep(0.3)
    assert sorted(out.rglob("*.png")) == written, "no process may go on writing after the run is killed"

    res = subprocess.run(cmd, capture_output=True, env=env, text=True)
    assert res.returncode == 0, res.stderr
    assert "converted" in res.stdout
    assert _outputs(out) == _outputs(ref)
    assert not list(out.rglob("*.part"))
    db = sqlite3.connect(manifest_path(out))
    assert db.execute("SELECT count(*), min(conversions), max(conversions) FROM files "
                      "WHERE status='done'").fetchone() == (total, 1, 1)
    runs = db.execute("SELECT state FROM runs ORDER BY id").fetchall()
    assert runs[-1] == ("finished",) and len(runs) == 2


def test_cli_help_and_user_errors(tmp_path, tiny_engine, dataset):
    runner = CliRunner()
    r = runner.invoke(convert_cli, ["--help"])
    assert r.exit_code == 0
    for word in ("--shard", "--max-failures", "manifest", "Resume", "Exit codes", "--format", "--size",
                 "--processes"):
        assert word in r.output
    r = runner.invoke(convert_cli, ["--engine", str(tmp_path / "missing.onnx"), str(dataset), str(tmp_path / "o")])
    assert r.exit_code == 1 and "engine not found" in r.output and "Traceback" not in r.output
    r = runner.invoke(convert_cli, ["--engine", "no_such_model", str(dataset), str(tmp_path / "o")])
    assert r.exit_code == 1 and "registered model" in r.output
    r = runner.invoke(convert_cli, ["--engine", "render2photo_tiny", "--processes", "2", str(dataset),
                                    str(tmp_path / "o")])
    assert r.exit_code == 1 and "ONNX engines on CPU" in r.output and "Traceback" not in r.output
    r = runner.invoke(convert_cli, ["--engine", str(tiny_engine), "-q", "--shard", "1/2", str(dataset),
                                    str(tmp_path / "o2"), "--sheet", str(tmp_path / "sheet.png")])
    assert r.exit_code == 0, r.output
    assert "converted 12" in r.output and (tmp_path / "sheet.png").is_file()


def test_warp_policy_realigns_arcface_crops_to_the_model_template():
    """An FFHQ-512 model sees ArcFace-112 landmarks where its own template has them (a plain
    resize would put the mouth ~50 px too low), and the output is warped back onto the crop."""
    from rtkit.engines.align import template_points
    from rtkit.engines.spec import ModelSpec
    from rtkit.datasets.sample import render_face

    spec = ModelSpec(input_size=(512, 512), alignment="ffhq512", resize="warp")
    dots = np.full((112, 112, 3), 255, np.uint8)
    for x, y in template_points("arcface112", 112):
        cv2.circle(dots, (int(round(x)), int(round(y))), 2, (0, 0, 0), -1)
    gray = preprocess(dots, spec).mean(0)
    assert gray.shape == (512, 512)
    for x, y in template_points("ffhq512", 512):
        x0, y0 = int(x) - 20, int(y) - 20
        win = gray[y0:y0 + 40, x0:x0 + 40]
        ys, xs = np.nonzero(win < 0)
        assert len(xs), "landmark dot not found near its FFHQ template position"
        # Least-squares similarity fit of two 5-point templates: residuals of a few pixels.
        assert np.hypot(x0 + xs.mean() - x, y0 + ys.mean() - y) < 10

    rgb = render_face(2, 1, "render", 0, 112)
    back = postprocess(preprocess(rgb, spec), spec, (112, 112))
    inner = (slice(30, 100), slice(25, 88))  # the face; the border is filled by reflection
    assert np.abs(back[inner].astype(int) - rgb[inner].astype(int)).mean() < 6


@pytest.mark.parametrize("name,extra", [("unsb_tiny", {}), ("ddim_tiny", {"steps": 4, "depth": 0.5})])
def test_step_engine_converts_like_the_torch_sampler(name, extra, dataset, tmp_path):
    """An exported sampler step (UNSB G(x, t, z), DDIM eps(x, t)) runs its seeded multi-step loop
    in the runtime, so the ONNX engine gives the torch model's images."""
    from rtkit.export import to_onnx
    from rtkit.runtime.runners import TorchRunner

    torch.manual_seed(0)
    model = create(name, pretrained=False)
    onnx_path = to_onnx(model, tmp_path / f"{name}.onnx", log=None)
    with open_engine(onnx_path, extra=extra) as r:
        assert r.backend == "onnxruntime" and r.meta.model == name
        a = convert(r, dataset, tmp_path / "onnx", progress=False, batch_size=4)
    with TorchRunner(model, extra=extra) as r:
        b = convert(r, dataset, tmp_path / "torch", progress=False, batch_size=3)
    # The same engine by path runs in conversion processes: the same seeds per image, the same bytes.
    c = convert(onnx_path, dataset, tmp_path / "processes", progress=False, batch_size=4, extra=extra)
    assert "processes" in c.workers and _outputs(tmp_path / "processes") == _outputs(tmp_path / "onnx")
    assert a.converted == b.converted == 24
    for rel in _outputs(tmp_path / "torch"):
        x = cv2.imread(str(tmp_path / "onnx" / rel)).astype(int)
        y = cv2.imread(str(tmp_path / "torch" / rel)).astype(int)
        assert np.abs(x - y).max() <= 2


@pytest.mark.parametrize("name", [n for n in __import__("rtkit.engines", fromlist=["x"]).list_models(
    tiny=True, task="translate")])
def test_every_tiny_translator_converts_sample_images(name, dataset, tmp_path):
    """Each registered translator runs through the streaming converter with the torch runner
    and writes source-sized images that differ from the sources."""
    torch.manual_seed(0)
    model = create(name, pretrained=False)
    from rtkit.runtime.runners import TorchRunner

    src = tmp_path / "src"
    (src / "0").mkdir(parents=True)
    for rel in ("0/0.png", "0/1.png"):
        (src / rel).write_bytes((dataset / rel).read_bytes())
    with TorchRunner(model) as runner:
        s = convert(runner, src, tmp_path / "out", progress=False, batch_size=2)
    assert s.converted == 2 and s.failed == 0, s.table()
    for rel in ("0/0.png", "0/1.png"):
        a, b = cv2.imread(str(src / rel)), cv2.imread(str(tmp_path / "out" / rel))
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() > 0.5


def test_libspng_decodes_plain_pngs_exactly_like_opencv(dataset, tmp_path):
    """Conversion processes decode 8-bit RGB PNGs with libspng: same pixels, same rejections."""
    from rtkit.runtime.sources import DecodeError, decode_bytes

    pytest.importorskip("pyspng")
    for p in sorted(dataset.rglob("*.png"))[:6]:
        data = p.read_bytes()
        assert np.array_equal(decode_bytes(data, ".png", spng=True), decode_bytes(data, ".png"))
        broken = bytearray(data)
        broken[len(data) // 2] ^= 0xFF  # inside the compressed pixels: the IDAT CRC no longer matches
        for spng in (True, False):
            with pytest.raises(DecodeError, match="corrupt"):
                decode_bytes(bytes(broken), ".png", spng=spng)
    grey = cv2.imencode(".png", np.arange(64, dtype=np.uint8).reshape(8, 8))[1].tobytes()
    assert decode_bytes(grey, ".png", spng=True).shape == (8, 8, 3)  # other PNG kinds: OpenCV


def test_png_writer_is_lossless_standard_and_compact(tmp_path):
    import io

    from PIL import Image

    from rtkit.runtime.sinks import encode_png

    rng = np.random.default_rng(0)
    for shape in [(112, 112, 3), (1, 1, 3), (7, 5, 3), (9, 20), (9, 20, 1), (6, 4, 2), (33, 17, 4)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        data = encode_png(img)
        decoded = np.asarray(Image.open(io.BytesIO(data)))  # Pillow checks every chunk's CRC
        assert np.array_equal(decoded.reshape(img.shape), img), shape
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), np.float32))
    # With both at their defaults it compresses faces as well as OpenCV/libpng (which the
    # converter's PNGs used to come from): nobody pays for the speed in disk space.
    make_sample_dataset(tmp_path, style="photo", identities=3, per_identity=4, seed=1)
    ours = theirs = 0
    for p in sorted(tmp_path.rglob("*.png")):
        bgr = cv2.imread(str(p))
        data = encode_png(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), bgr)
        ours += len(data)
        theirs += len(cv2.imencode(".png", bgr)[1])
    print(f"PNG bytes, rtkit / OpenCV defaults: {ours / theirs:.3f}")
    assert ours <= 1.02 * theirs, (ours, theirs)


def test_a_dead_conversion_process_stops_the_run_with_one_line(dataset, tmp_path):
    """A worker killed from outside (OOM killer, a crash in a decoder) ends the run with a clear
    error, and the batches it held stay 'running', so the next run converts them."""
    import threading

    from rtkit.engines.errors import RtkitError
    from rtkit.engines.render2photo import BUNDLED_ONNX
    from rtkit.runtime.job import ConvertOptions, Recorder, StageClock, Summary
    from rtkit.runtime.processes import ProcessExecutor
    from rtkit.runtime.stages import WorkItem

    opts = ConvertOptions(batch_size=2, progress=False)
    pool = ProcessExecutor(dict(engine=BUNDLED_ONNX, threads=1), 2, dataset, opts, str(tmp_path / "w.lock"))
    try:
        os.kill(pool.workers_[0].proc.pid, signal.SIGKILL)
        pool.workers_[0].proc.join()
        rels = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*.png"))
        with Manifest(tmp_path / "m.sqlite") as man:
            man.add_files([(r, r, (0, 0, 0)) for r in rels], [])
            man.start_run(os.getpid(), "host", 0)
            rec = Recorder(man, Summary("", "", "", ""), "e", len(rels), opts, threading.Event())
            todo = [WorkItem(r, str(tmp_path / "out" / r)) for r in rels]
            with pytest.raises(RtkitError, match="conversion process died .* redone"):
                pool.run(todo, rec, StageClock())
            rec.close()
            assert "running" in {r.status for r in man.rows()}
    finally:
        pool.close()
