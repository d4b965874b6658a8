"""The engine card: one file beside every weights file, old formats still read, pipelines by path."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rtkit.engines import create
from rtkit.engines.card import EngineCard, Part, card_for_module, read_card, write_card
from rtkit.engines.checkpoint import file_sha256
from rtkit.engines.spec import ModelSpec, TensorSpec
from rtkit.runtime.runners import PipelineRunner, open_engine


def test_card_round_trips_overrides_inputs_settings_parts_and_training(tmp_path):
    spec = ModelSpec(task="translate", input_size=None, size_multiple=4,
                     inputs=(TensorSpec("t", "int64", ("batch",), 0), TensorSpec("z", "float32", ("batch", 32))),
                     settings={"nfe": 3, "seed": 7})
    card = EngineCard(model="unsb_tiny", spec=spec, overrides={"ngf": 4}, loop="unsb",
                      parts={"step": Part("x.onnx", inputs=spec.inputs)}, training={"step": 12, "config": {"lr": 1e-3}})
    path = write_card(tmp_path / "x.onnx", card)
    assert path == tmp_path / "x.json"
    again = read_card(tmp_path / "x.onnx")
    assert again.to_dict() == card.to_dict()
    assert again.spec.input("z").concrete_shape(5) == (5, 32) and again.settings == {"nfe": 3, "seed": 7}
    assert read_card(path).to_dict() == card.to_dict()  # the card itself opens too


def test_tensor_spec_feed_is_the_one_decoder():
    t = TensorSpec("t", "int64", ("batch",), 0)
    np.testing.assert_array_equal(t.feed(None, 3), np.zeros(3, np.int64))
    np.testing.assert_array_equal(t.feed(2, 3), np.full(3, 2, np.int64))
    w = TensorSpec("w", "float32", (1,), 0.5)
    assert w.feed(None, 4).tolist() == [0.5] and w.feed(torch.tensor(0.7), 4).dtype == np.float32
    assert TensorSpec("z", "float32", ("batch", 8)).feed(None, 2) is None  # no default: per call
    with pytest.raises(ValueError, match="dtype"):
        TensorSpec("x", "complex64")


def test_format_1_step_sidecar_still_runs_as_its_pipeline(tmp_path):
    """An UNSB step engine exported before the card (format 1, t/z as descriptor dicts in
    extra_inputs) opens as the UNSB pipeline and gives the torch model's images."""
    from rtkit.export import to_onnx

    torch.manual_seed(0)
    model = create("unsb_tiny", pretrained=False)
    onnx_path = to_onnx(model, tmp_path / "step.onnx", log=None)
    new = json.loads((tmp_path / "step.json").read_text())
    v1 = {"format_version": 1, "model": "unsb_tiny", "task": "translate",
          "input": {**new["input"], "size": None},
          "extra_inputs": {"t": {"dtype": "int64", "shape": ["batch"], "default": 0},
                           "z": {"dtype": "float32", "shape": ["batch", 32]}},
          "outputs": ["output"], "alignment": "arcface112", "resize": "native", "precision": "fp32",
          "batch": {"min": 1, "opt": 8, "max": 64}, "checkpoint_sha256": None, "built_with": {}}
    (tmp_path / "step.json").write_text(json.dumps(v1))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with open_engine(onnx_path) as r:
        assert isinstance(r, PipelineRunner) and r.spec.settings["nfe"] == 5
        y_onnx = r.infer(x, keys=["a.png", "b.png"])
    with open_engine("unsb_tiny") as r_torch:
        r_torch.model.load_state_dict(model.state_dict())
        y_torch = r_torch.infer(x, keys=["a.png", "b.png"])
    assert np.abs(y_onnx - y_torch).max() < 1e-4


def test_legacy_recognizer_model_card_still_opens(tmp_path):
    model = create("iresnet_tiny", pretrained=False)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    legacy = {"format": "rtkit-recognizer-v1", "model": "iresnet_tiny", "overrides": {},
              "checkpoint": "model.pth", "layout": "state_dict", "spec": model.spec.to_dict() | {"extra_inputs": {}},
              "head": {"kind": "arcface"}, "num_classes": 5, "step": 3, "epoch": 1.0, "train_config": {},
              "built_with": {}}
    legacy["spec"].pop("inputs", None)
    legacy["spec"].pop("settings", None)
    (tmp_path / "model.json").write_text(json.dumps(legacy))
    with open_engine(tmp_path / "model.pth") as r:
        assert r.spec.task == "embed" and r.card.training["num_classes"] == 5
        y = r.infer(np.zeros((2, 3, *model.spec.input_size), np.float32))
    assert y.shape[0] == 2


def test_builder_overrides_reopen_by_path(tmp_path):
    """A module built with non-default options reopens from its weights file alone."""
    model = create("cut_tiny", pretrained=False, ngf=4)
    path = tmp_path / "net_G.pth"
    torch.save(model.state_dict(), path)
    write_card(path, card_for_module(model, checkpoint_sha256=file_sha256(path)))
    assert read_card(path).overrides == {"ngf": 4}
    with open_engine(path) as r:
        y = r.infer(np.zeros((1, 3, 32, 32), np.float32))
    assert y.shape == (1, 3, 32, 32)


def test_a_model_card_for_an_unknown_model_is_one_line(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"x" * 10)
    (tmp_path / "w.json").write_text(json.dumps({"format_version": 2, "model": "nope", "task": "translate",
                                                  "input": {"size": [8, 8], "range": [-1, 1], "channels": "RGB"}}))
    with pytest.raises(Exception, match="nope"):
        open_engine(tmp_path / "w.pth")


def test_torch_runner_pads_the_last_batch_without_changing_results():
    """Padding to a fixed batch (what a compiled or graph-captured runner needs) changes nothing."""
    from rtkit.runtime.runners import TorchRunner

    torch.manual_seed(0)
    model = create("cut_tiny", pretrained=False)
    x = np.random.default_rng(1).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
    plain = TorchRunner(model).infer(x)
    padded = TorchRunner(model, pad_to=8).infer(x)
    assert padded.shape == plain.shape and np.abs(padded - plain).max() < 1e-5
