"""Every training output reopens by its path alone (the engine card beside it).

For every method (VSAIT, DECENT, UNSB, the demo translator, a recognizer with each head) trained
a few steps with NON-default builder options (a generator at ngf 4, embeddings 32 wide, one
recognizer at 64 px and two at 32 px instead of 112), the weights file is reopened by its path
through ``rtkit.runtime.open_engine``, ``rt-convert --engine`` (translators), ``rt-eval verify
--engine`` (recognizers) and ``rt-export``. Without the card's overrides a ngf-4 generator does
not load into the default shape (the 23 shape mismatches of issue 12); without the card's input
size a 64 px recognizer gets 112 px images; so each step fails if the card is wrong.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rtkit.engines.card import read_card
from rtkit.runtime import open_engine
from rtkit.runtime.sources import decode_image, walk_files

SIZE = 32   # translator images; small so that every run takes a second or two

TRANSLATORS = {  # method -> (generator, weights file, non-default builder options)
    "vsait": ("vsait_tiny", "last.ckpt", ["ngf=4", "res_blocks=1"]),
    "decent": ("cut_tiny", "latest_net_G.pth", ["ngf=4", "n_blocks=1"]),
    "unsb": ("unsb_tiny", "latest_net_G.pth", ["ngf=4", "n_blocks=1"]),
}
RECOGNIZERS = {  # head -> (backbone, image size, builder option)
    "adaface": ("adaface_tiny", 64, "embedding_size=32"),
    "arcface": ("iresnet_tiny", 32, "num_features=32"),
    "cosface": ("iresnet_tiny", 32, "num_features=32"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: as fast for these tiny networks on an idle machine, and 10-40x faster
    when other processes share the two cores (OpenMP threads then wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sample(root: Path, **kw):
    try:
        from rtkit.datasets.sample import make_sample_dataset
    except ImportError:  # before the sample world moved to rtkit.datasets
        from rtkit.runtime.sample import make_sample_dataset
    make_sample_dataset(root, workers=1, **kw)
    return root


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    return (_sample(root / "render", style="render", identities=8, per_identity=1, size=SIZE, seed=0),
            _sample(root / "photo", style="photo", identities=8, per_identity=1, size=SIZE, seed=1))


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """6 identities x 4 images at 64 px, and a 20-pair .bin of them (built by rt-eval make-bin)."""
    from rtkit.cli.eval import main as rt_eval

    root = tmp_path_factory.mktemp("faces")
    data = _sample(root / "data", identities=6, per_identity=4, size=64)
    images = [f"{i}/{k}.png" for i in range(6) for k in range(4)]
    rng = random.Random(0)
    lines = [f"{a} {b} {int(a.split('/')[0] == b.split('/')[0])}"
             for a, b in (rng.sample(images, 2) for _ in range(10))]
    lines += [f"{i}/0.png {i}/{1 + j % 3}.png 1" for i, j in zip(range(6), range(10))] + \
             [f"{i}/1.png {i}/2.png 1" for i in range(4)]
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(rt_eval, ["make-bin", str(data), str(root / "pairs.txt"), str(root / "tiny.bin")])
    assert r.exit_code == 0, r.output
    return data, root / "tiny.bin"


def _invoke(module: str, args: list[str]):
    import importlib

    r = CliRunner().invoke(importlib.import_module(f"rtkit.cli.{module}").main, [str(a) for a in args])
    assert r.exit_code == 0, f"rt-{module} {' '.join(map(str, args))}\n{r.output}"
    return r


def _export(weights: Path, out: Path) -> Path:
    _invoke("export", [weights, "--to", "onnx", out])
    assert out.is_file() and read_card(out).model == read_card(weights).model
    return out


@pytest.mark.parametrize("method", sorted(TRANSLATORS))
def test_translator_outputs_reopen_by_path(method, domains, tmp_path):
    generator, weights_name, options = TRANSLATORS[method]
    out = tmp_path / "run"
    args = ["translator", "--method", method, "--preset", "tiny", "--source", domains[0], "--target", domains[1],
            "--out", out, "--steps", 2, "--crop", SIZE, "--workers", 0, "--device", "cpu",
            "--sample-every", 0, "--val-every", 0, "--log-every", 1, "--threads", 1]
    for opt in options:
        args += ["--generator-opt", opt]
    _invoke("train", args)
    weights = out / "weights" / weights_name
    card = read_card(weights)
    assert card.model == generator and card.overrides == {k: int(v) for k, v in (o.split("=") for o in options)}
    assert card.training["step"] == 2 and card.training["config"]["method"] == method
    assert card.training["data"]["source_images"] == 8

    src = np.stack([decode_image(domains[0] / f) for f in walk_files(domains[0])[0][:2]])
    x = src.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    with open_engine(weights) as runner:
        y = runner.infer(x)
    assert y.shape == x.shape and np.isfinite(y).all()

    _invoke("convert", ["--engine", weights, domains[0], tmp_path / "converted"])
    converted = walk_files(tmp_path / "converted")[0]
    assert converted == walk_files(domains[0])[0]
    assert decode_image(tmp_path / "converted" / converted[0]).shape == (SIZE, SIZE, 3)
    _export(weights, tmp_path / "exported.onnx")


def test_demo_translator_outputs_reopen_by_path(tmp_path):
    from rtkit.train.demo_translator import DemoTranslatorConfig, train_demo_translator

    cfg = DemoTranslatorConfig(identities=2, per_identity=1, heldout_identities=1, steps=2, batch_size=2, crop=32)
    report = train_demo_translator(tmp_path / "demo", cfg, log=lambda m: None)
    weights = Path(report["weights"])
    card = read_card(weights)
    assert card.model == "render2photo" and card.training["step"] == 2
    assert card.training["config"]["identities"] == 2
    src = _sample(tmp_path / "src", style="render", identities=2, per_identity=1, size=SIZE)
    for engine in (weights, Path(report["onnx"])):
        with open_engine(engine) as runner:
            h, w = runner.spec.input_size
            assert runner.infer(np.zeros((1, 3, h, w), np.float32)).shape == (1, 3, h, w)
        _invoke("convert", ["--engine", engine, src, tmp_path / f"converted_{engine.suffix[1:]}"])
    _export(weights, tmp_path / "exported.onnx")


@pytest.mark.parametrize("head", sorted(RECOGNIZERS))
def test_recognizer_outputs_reopen_by_path(head, faces, tmp_path):
    backbone, size, option = RECOGNIZERS[head]
    data, bin_file = faces
    out = tmp_path / "run"
    _invoke("train", ["recognizer", "--data", data, "--out", out, "--backbone", backbone, "--head", head,
                      "--backbone-opt", option, "--image-size", size, "--batch-size", 8, "--max-steps", 2,
                      "--workers", 0, "--device", "cpu", "--no-progress", "--threads", 1])
    weights = out / ("model.ckpt" if backbone.startswith("adaface") else "model.pth")
    card = read_card(weights)
    assert card.weights == weights.name and card.spec.input_size == (size, size)
    assert card.spec.output_dim == 32 and card.training["head"]["name"] == head

    with open_engine(weights) as runner:
        assert runner.spec.input_size == (size, size)
        emb = runner.infer(np.zeros((2, 3, size, size), np.float32))
    assert emb.shape == (2, 32)

    result = tmp_path / "verify.json"
    _invoke("eval", ["verify", "--engine", weights, "--bin", bin_file, "--folds", 2, "--out", result,
                     "--cache-dir", tmp_path / "cache", "--workers", 1])
    doc = json.loads(result.read_text())
    assert 0 <= doc["benchmarks"]["tiny"]["accuracy"] <= 1 and doc["benchmarks"]["tiny"]["pairs"] == 20
    onnx = _export(weights, tmp_path / "exported.onnx")
    assert read_card(onnx).spec.input_size == (size, size)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    with open_engine(weights) as runner:
        torch.testing.assert_close(sess.run(None, {sess.get_inputs()[0].name: x})[0], runner.infer(x),
                                   rtol=1e-3, atol=1e-4)
