"""The bundled demo engine: the shipped ONNX is the shipped weights, it moves renders toward the
photo style on identities it never saw, and its training command reproduces the files."""
from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file

from rtkit.engines import create
from rtkit.engines.checkpoint import file_sha256
from rtkit.engines.render2photo import BUNDLED_ONNX, BUNDLED_WEIGHTS
from rtkit.engines.card import read_card
from rtkit.runtime import open_engine
from rtkit.train.demo_translator import DemoTranslatorConfig, render_pairs, style_gap, train_demo_translator

HELD_OUT = range(200, 206)  # far from the 56 identities the recipe trains and validates on


def test_shipped_onnx_is_the_shipped_weights():
    meta = read_card(BUNDLED_ONNX)
    assert meta.model == "render2photo" and meta.spec.alignment == "arcface112"
    assert meta.checkpoint_sha256 == file_sha256(BUNDLED_WEIGHTS)
    src, _ = render_pairs(HELD_OUT[:2], 4, seed=0)
    with open_engine(BUNDLED_ONNX) as onnx_runner, open_engine("render2photo") as torch_runner:
        a = onnx_runner.infer(src.numpy())
        b = torch_runner.infer(src.numpy())
    assert np.abs(a - b).max() < 1e-4


def test_bundled_engine_moves_unseen_renders_toward_photos():
    src, photo = render_pairs(HELD_OUT, 4, seed=0)
    with torch.no_grad():
        out = create("render2photo")(src)
    before, after = style_gap(src, photo), style_gap(out, photo)
    assert after < 0.7 * before, (before, after)
    # Geometry is kept: the translation of an image is closer to its own photo than to another's.
    assert style_gap(out, photo) < style_gap(out, photo.roll(1, 0)) - 5


def test_training_command_is_deterministic_and_writes_a_loadable_engine(tmp_path):
    cfg = DemoTranslatorConfig(steps=6, identities=4, per_identity=2, heldout_identities=1, batch_size=2)
    a = train_demo_translator(tmp_path / "a", cfg, log=lambda m: None)
    b = train_demo_translator(tmp_path / "b", cfg, log=lambda m: None)
    wa, wb = load_file(a["weights"]), load_file(b["weights"])
    assert wa.keys() == load_file(str(BUNDLED_WEIGHTS)).keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_card(a["onnx"]).checkpoint_sha256 == file_sha256(a["weights"])
    with open_engine(a["onnx"]) as r:
        y = r.infer(np.zeros((2, 3, 112, 112), np.float32))
    assert y.shape == (2, 3, 112, 112) and np.isfinite(y).all()
