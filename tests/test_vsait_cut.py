"""VSAIT and CUT/DECENT generators: official key layout, checkpoint containers, forward contract.

Golden outputs (tests/golden/vsait_cut_tiny.safetensors) pin the tiny variants' forward passes
with formula-made weights and input (no RNG). Regenerate after an intended change with
    RTKIT_REGEN_GOLDEN=1 python -m pytest tests/test_vsait_cut.py -k golden
Output parity with the official code (max abs diff within 1e-4) was checked outside the repo
by running the official generators with the same random weights through these loaders.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rtkit.engines import CheckpointError, create, model_spec, num_params
from rtkit.engines.cut import FEATURE_LAYERS
from rtkit.engines.vsait import lightning_checkpoint

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN = GOLDEN_DIR / "vsait_cut_tiny.safetensors"
# Official key/shape/kind lists (copies of reference/keys/*.json), kept beside the tests.
REFERENCE_KEYS = {"vsait": GOLDEN_DIR / "keys_vsait_generator.json",
                  "decent": GOLDEN_DIR / "keys_decent_netG.json",
                  "cut": GOLDEN_DIR / "keys_decent_netG.json"}
TINY = ["vsait_tiny", "cut_tiny"]
ALL = ["vsait", "vsait_tiny", "decent", "cut", "cut_tiny"]
OFFICIAL_PARAMS = 11_378_179  # 11.38 M for both official generators


def _image(n=1, h=32, w=32, phase=0.0):
    k = torch.arange(n * 3 * h * w, dtype=torch.float64)
    return torch.sin(k * 0.037 + phase).view(n, 3, h, w).float()


def _save_tiny_checkpoint(name, model, path):
    """Write ``model`` the way its official training code does."""
    if name.startswith("vsait"):
        torch.save(lightning_checkpoint(model), path)
    else:
        torch.save(model.state_dict(), path)


# ------------------------------------------------------------------ spec and official layout

@pytest.mark.parametrize("name", ALL)
def test_spec_is_fully_convolutional_in_minus_one_one(name):
    spec = model_spec(name)
    assert spec.task == "translate" and spec.input_size is None and spec.size_multiple == 4
    assert spec.value_range == (-1.0, 1.0) and spec.channels == "RGB"
    assert spec.alignment == "arcface112" and spec.resize == "native"


@pytest.mark.parametrize("name", ["vsait", "decent", "cut"])
def test_full_model_matches_official_keys_shapes_and_kinds(name):
    ref = json.loads(REFERENCE_KEYS[name].read_text())["state_dict"]
    model = create(name)
    buffers = {k for k, _ in model.named_buffers()}
    got = {k: {"shape": list(v.shape), "kind": "buffer" if k in buffers else "param"}
           for k, v in model.state_dict().items()}
    want = {k: {"shape": v["shape"], "kind": v["kind"]} for k, v in ref.items()}
    assert got == want
    assert num_params(model) == OFFICIAL_PARAMS


def test_decent_feature_layers_are_the_official_taps():
    model = create("decent")
    out, feats = model(_image(1, 16, 16), layers=list(FEATURE_LAYERS))
    # padded input, first two convs, residual blocks 1 and 5
    assert [tuple(f.shape[1:]) for f in feats] == [(3, 22, 22), (128, 16, 16), (256, 8, 8),
                                                   (256, 4, 4), (256, 4, 4)]
    assert out.shape == (1, 3, 16, 16)


# ------------------------------------------------------------------ forward / backward

@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward_every_parameter_gets_a_gradient(name):
    model = create(name).train()
    x = _image(2, 32, 48)
    y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().max() <= 1.0
    (y - x.flip(-1)).square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        if p.ndim > 1:  # biases right before an InstanceNorm get an exactly-zero gradient by design
            assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", TINY)
def test_batch_of_three_equals_single_images(name):
    model = create(name)
    x = torch.cat([_image(1, 32, 32, phase) for phase in (0.0, 1.0, 2.0)])
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    _assert_close(batched, single, 1e-5)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("hw", [(112, 112), (36, 60)])
def test_any_size_divisible_by_four_round_trips(name, hw):
    with torch.no_grad():
        assert create(name)(_image(1, *hw)).shape == (1, 3, *hw)


def test_cut_layers_return_output_and_features_like_the_official_forward():
    model = create("cut_tiny")
    x = _image(2, 32, 32)
    layers = [12, 0, 4, 8]
    with torch.no_grad():
        plain = model(x)
        out, feats = model(x, layers=layers)
        only = model(x, layers=layers, encode_only=True)
    assert layers == [12, 0, 4, 8]  # the caller's list is not modified
    assert torch.equal(out, plain)
    assert [tuple(f.shape[1:]) for f in feats] == [(3, 38, 38), (16, 32, 32), (32, 16, 16), (32, 8, 8)]
    assert len(only) == 4 and all(torch.equal(a, b) for a, b in zip(only, feats))
    # encode/decode split at any layer reproduces the full pass
    _assert_close(model.decode(model.encode(x, 11), 11), plain, 1e-6)
    with pytest.raises(ValueError, match="layers"):
        model(x, layers=[0, len(model.model)])


# ------------------------------------------------------------------ checkpoints

def test_vsait_loads_a_lightning_checkpoint_with_training_state(tmp_path):
    src = create("vsait_tiny")
    _perturb(src)
    ckpt = lightning_checkpoint(
        src,
        epoch=7, global_step=200000, **{"pytorch-lightning_version": "2.1.3"},
        hyper_parameters={"cfg": {"TASK_MODEL": {"NAME": "VSAIT", "RES_BLOCKS": 9, "LSH": {"kernel_size": [16, 8]}}},
                          "lr": 1e-4, "betas": (0.0, 0.9), "name": "gta2city"},
        optimizer_states=[{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                           "param_groups": [{"lr": 1e-4, "betas": (0.0, 0.9), "weight_decay": 1e-4,
                                             "amsgrad": False, "params": [0]}]}],
        lr_schedulers=[{"step_size": 100000, "gamma": 0.5, "base_lrs": [1e-4], "last_epoch": 7,
                        "_last_lr": [1e-4]}],
        callbacks={"ModelCheckpoint{'monitor': None, 'mode': 'min'}": {
            "best_model_score": None, "best_model_path": "/runs/x.ckpt", "best_k_models": {},
            "dirpath": "/runs", "last_model_path": ""}},
        loops={"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 8, "completed": 7}}}},
    )
    # the rest of the VSAIT system lives in the same state_dict and is ignored
    ckpt["state_dict"].update({"model.d_net.net.0.conv.weight": torch.zeros(4, 4, 1, 1),
                               "model.g_net_map.0.0.conv.weight": torch.zeros(4, 4, 1, 1),
                               "model.feature_extractor.features.0.weight": torch.zeros(4, 3, 3, 3),
                               "model.lsh_feat.0.weight": torch.zeros(8, 4, 2, 2)})
    path = tmp_path / "epoch=7-step=200000.ckpt"
    torch.save(ckpt, path)
    loaded = create("vsait_tiny", checkpoint=path)
    _assert_same_outputs(src, loaded)
    # a plain generator state_dict is accepted too
    torch.save(src.state_dict(), tmp_path / "g_net.pth")
    _assert_same_outputs(src, create("vsait_tiny", checkpoint=tmp_path / "g_net.pth"))


@pytest.mark.parametrize("prefix", ["", "module."])
def test_cut_loads_plain_net_g_strictly(tmp_path, prefix):
    src = create("cut_tiny")
    _perturb(src)
    sd = src.state_dict()  # an OrderedDict with _metadata, as torch.save(net.state_dict()) writes
    if prefix:
        sd = {prefix + k: v for k, v in sd.items()}
    torch.save(sd, tmp_path / "latest_net_G.pth")
    for name in ("cut_tiny",):
        _assert_same_outputs(src, create(name, checkpoint=tmp_path / "latest_net_G.pth"))


@pytest.mark.parametrize("name", TINY)
def test_truncated_file_gives_checkpoint_error(tmp_path, name):
    path = tmp_path / "ckpt.pth"
    _save_tiny_checkpoint(name, create(name), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        create(name, checkpoint=path)


@pytest.mark.parametrize("name, dropped", [("vsait_tiny", "encoder.net.2.weight"), ("cut_tiny", "model.7.filt")])
def test_missing_fixed_filter_buffer_is_refused_by_name(tmp_path, name, dropped):
    model = create(name)
    path = tmp_path / "ckpt.pth"
    _save_tiny_checkpoint(name, model, path)
    obj = torch.load(path, weights_only=True)
    sd = obj["state_dict"] if "state_dict" in obj else obj
    del sd[[k for k in sd if k.endswith(dropped)][0]]
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=f"1 missing keys: {dropped}"):
        create(name, checkpoint=path)


@pytest.mark.parametrize("name, other", [("vsait_tiny", "cut_tiny"), ("cut_tiny", "vsait_tiny")])
def test_wrong_model_file_names_missing_and_unexpected_keys(tmp_path, name, other):
    path = tmp_path / "other.pth"
    _save_tiny_checkpoint(other, create(other), path)
    with pytest.raises(CheckpointError) as err:
        create(name, checkpoint=path)
    msg = str(err.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "\n" not in msg
    missing, unexpected = msg.split("missing keys: ")[1].split("unexpected keys: ")
    own_key, foreign_key = (("decoder.net.", "model.1.") if name == "vsait_tiny"
                            else ("model.1.", "model.g_net.decoder.net."))
    assert own_key in missing and foreign_key in unexpected


def test_width_mismatch_is_reported_as_shape_mismatch(tmp_path):
    path = tmp_path / "net_G.pth"
    torch.save(create("cut_tiny", ngf=16).state_dict(), path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        create("cut_tiny", checkpoint=path)


# ------------------------------------------------------------------ golden outputs

def _formula_weights(model):
    """Parameters from a formula (not the RNG); the fixed blur buffers stay as built."""
    with torch.no_grad():
        for k, (name, p) in enumerate(model.named_parameters()):
            base = torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.61 + k * 1.3).view(p.shape)
            p.copy_(0.05 * base if p.ndim == 1 else base / math.sqrt(p[0].numel()))
    return model.eval()


def _golden_outputs() -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for name in TINY:
            out[name] = _formula_weights(create(name))(_image(1, 32, 32)).contiguous()
    return out


def test_golden_outputs_of_tiny_variants():
    if os.environ.get("RTKIT_REGEN_GOLDEN"):
        GOLDEN_DIR.mkdir(exist_ok=True)
        save_file(_golden_outputs(), str(GOLDEN))
    golden = load_file(str(GOLDEN))
    for name, got in _golden_outputs().items():
        _assert_close(got, golden[name], 1e-5, name)
        assert got.std() > 0.05, f"{name}: golden output is nearly constant"


# ------------------------------------------------------------------ helpers

def _perturb(model):
    """Make weights differ from any fresh init so a load that silently did nothing is caught."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _assert_same_outputs(a, b):
    x = _image(1, 32, 32)
    with torch.no_grad():
        assert torch.equal(b.eval()(x), a.eval()(x))


def _assert_close(got, want, atol, what=""):
    # Not torch.testing.assert_close: in torch 2.13 its first call imports torch.distributed.tensor,
    # which takes tens of seconds on a busy 2-core machine.
    assert got.shape == want.shape, f"{what} shape {tuple(got.shape)} vs {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    assert diff <= atol, f"{what} max abs diff {diff:.3g} > {atol}"
