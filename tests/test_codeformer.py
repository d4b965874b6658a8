"""CodeFormer: official structure and names, loader, runtime w, batching, golden output.

The golden file tests/golden/codeformer_tiny.pt holds an input and the output of the tiny
model built at a fixed seed (``golden_model``). Regenerate it, only after an intended change of
the forward math or of the initialisation, with
    python tests/test_codeformer.py
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rtkit.engines import CheckpointError, create, get_entry, num_params
from rtkit.engines.align import arcface112_to_ffhq512, ffhq512_to_arcface112
from rtkit.engines.codeformer import FULL_CONFIG, CodeFormer, VQEncoder, VQGenerator

TINY = "codeformer_tiny"
TINY_ARCFACE = "codeformer_arcface112_tiny"
GOLDEN = Path(__file__).parent / "golden" / "codeformer_tiny.pt"
KEYS_JSON = Path(__file__).parent / "golden" / "keys_codeformer.json"  # copy of shared/reference/keys/
GOLDEN_SEED = 0


def golden_model() -> torch.nn.Module:
    """The tiny model at GOLDEN_SEED, position embedding and codebook made non-trivial."""
    torch.manual_seed(GOLDEN_SEED)
    model = create(TINY, pretrained=False)
    with torch.no_grad():
        model.position_emb.normal_(0.0, 0.5)
        model.quantize.embedding.weight.normal_(0.0, 1.0)
    return model


def make_golden() -> dict:
    model = golden_model()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(GOLDEN_SEED)) * 2 - 1
    with torch.no_grad():
        out = model(x, w=0.5, adain=True)
    return {"seed": GOLDEN_SEED, "input": x, "w": 0.5, "output": out}


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    model = create(TINY, pretrained=False, **overrides)
    with torch.no_grad():
        model.position_emb.normal_(0.0, 0.5)
    return model


def images(n, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_tiny_forward_backward_every_used_parameter_gets_a_gradient():
    model = tiny().train()
    out = model.forward_official(images(2), w=0.7, adain=True)
    assert out.image.shape == (2, 3, 32, 32)
    assert out.logits.shape == (2, 16, 16)  # 4x4 tokens, 16 codes
    (out.image.square().mean() + out.logits.square().mean()).backward()
    # The official forward detaches the looked-up codes, so the codebook alone gets no gradient.
    assert model.quantize.embedding.weight.grad is None
    for name, p in model.named_parameters():
        if name == "quantize.embedding.weight":
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0])
def test_output_is_an_image_in_range(w):
    model = tiny().eval()
    with torch.no_grad():
        y = model(images(2), w=w)
    assert y.shape == (2, 3, 32, 32)
    assert torch.isfinite(y).all()
    assert y.min() >= -1 and y.max() <= 1


def test_w_changes_the_output_and_tensor_w_matches_float_w():
    model = tiny().eval()
    x = images(2)
    with torch.no_grad():
        y0, y5, y1 = (model(x, w=w) for w in (0.0, 0.5, 1.0))
        assert (y0 - y1).abs().max() > 1e-3
        assert (y5 - y1).abs().max() > 1e-4
        # A graph input w (tensor) always runs the fusion; at w <= 0 it adds exactly nothing.
        for w, ref in ((0.0, y0), (0.5, y5), (-1.0, y0)):
            torch.testing.assert_close(model(x, w=torch.tensor(w)), ref, atol=1e-6, rtol=0)
            torch.testing.assert_close(model(x, w=torch.tensor([w])), ref, atol=1e-6, rtol=0)
        # One w per sample.
        mixed = model(x, w=torch.tensor([0.0, 1.0]))
        torch.testing.assert_close(mixed[:1], y0[:1], atol=1e-6, rtol=0)
        torch.testing.assert_close(mixed[1:], y1[1:], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="elements"):
        model(x, w=torch.tensor([0.1, 0.2, 0.3]))


def test_batch_of_three_equals_three_single_runs():
    model = tiny().eval()
    x = images(3, seed=5)
    with torch.no_grad():
        together = model(x, w=0.5)
        one_by_one = torch.cat([model(x[i:i + 1], w=0.5) for i in range(3)])
    # fp32 kernels round differently per batch size (seen: 1.06e-5); the zoo's fp32 bound is 1e-4.
    torch.testing.assert_close(together, one_by_one, atol=1e-4, rtol=0)


def test_input_size_is_enforced():
    with pytest.raises(ValueError, match="32x32"):
        tiny()(images(1, size=64))


@pytest.mark.parametrize("container", ["params_ema", "params", None])
def test_strict_reload_of_saved_state_dict(tmp_path, container):
    model = tiny().eval()
    sd = model.state_dict()
    path = tmp_path / "codeformer_tiny.pth"
    torch.save({container: sd} if container else sd, path)
    loaded = create(TINY, checkpoint=path)
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_official_container_prefers_params_ema(tmp_path):
    ema, raw = tiny(seed=0), tiny(seed=1)
    path = tmp_path / "both.pth"
    torch.save({"params_ema": ema.state_dict(), "params": raw.state_dict()}, path)
    loaded = create(TINY, checkpoint=path)
    torch.testing.assert_close(loaded.position_emb, ema.position_emb)


def test_wrong_checkpoint_names_missing_keys(tmp_path):
    sd = tiny().state_dict()
    sd.pop("idx_pred_layer.1.weight")
    sd["not_codeformer.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pth"
    torch.save({"params_ema": sd}, path)
    with pytest.raises(CheckpointError, match=r"missing keys: idx_pred_layer\.1\.weight") as err:
        create(TINY, checkpoint=path)
    assert "not_codeformer.weight" in str(err.value)
    # A checkpoint of another size reports shape mismatches.
    torch.save({"params_ema": tiny(dim_embd=64, n_head=4).state_dict()}, path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        create(TINY, checkpoint=path)


def test_truncated_checkpoint_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"params_ema": tiny().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CheckpointError):
        create(TINY, checkpoint=path)


def test_golden_output():
    golden = torch.load(GOLDEN, weights_only=True)
    model = golden_model()
    with torch.no_grad():
        out = model(golden["input"], w=golden["w"], adain=True)
    torch.testing.assert_close(out, golden["output"], atol=1e-5, rtol=0)


def test_specs():
    full = get_entry("codeformer").spec
    assert (full.task, full.input_size, full.value_range, full.channels) == ("translate", (512, 512), (-1.0, 1.0), "RGB")
    assert (full.alignment, full.resize, full.extra_inputs) == ("ffhq512", "warp", {"w": 0.5})
    t = get_entry(TINY)
    assert t.tiny and t.spec.input_size == (32, 32) and t.spec.extra_inputs == {"w": 0.5}
    for name in ("codeformer_arcface112", TINY_ARCFACE):
        s = get_entry(name).spec
        assert (s.input_size, s.alignment, s.resize, s.extra_inputs) == ((112, 112), "arcface112", "native", {"w": 0.5})
    assert get_entry(TINY_ARCFACE).tiny and not get_entry("codeformer_arcface112").tiny


def test_arcface112_wrapper_shares_weights_and_matches_the_functional_pipeline(tmp_path):
    base = tiny().eval()
    path = tmp_path / "tiny.pth"
    torch.save({"params_ema": base.state_dict()}, path)
    wrapped = create(TINY_ARCFACE, checkpoint=path)  # the same file loads strictly
    assert wrapped.state_dict().keys() == base.state_dict().keys()
    x = images(3, size=112, seed=7)
    with torch.no_grad():
        y = wrapped(x, w=0.5)
        ref = ffhq512_to_arcface112(base(arcface112_to_ffhq512(x, out_size=32), w=0.5), out_size=112)
        singles = torch.cat([wrapped(x[i:i + 1], w=0.5) for i in range(3)])
    assert y.shape == (3, 3, 112, 112)
    torch.testing.assert_close(y, ref.clamp(-1, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(y, singles, atol=1e-5, rtol=0)


def test_onnx_export_with_runtime_w_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = tiny().eval()
    x = images(2)
    path = tmp_path / "tiny.onnx"
    w_example = torch.tensor([0.5])
    kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    torch.onnx.export(model, (x, w_example), str(path), input_names=["input", "w"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17, **kwargs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = images(3, seed=9)
    for w in (0.0, 0.5, 1.0):
        got = session.run(None, {"input": x3.numpy(), "w": np.array([w], np.float32)})[0]
        with torch.no_grad():
            ref = model(x3, w=w).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_fusion_taps_reproduce_the_official_tables():
    with torch.device("meta"):
        enc, gen = VQEncoder(FULL_CONFIG), VQGenerator(FULL_CONFIG)
    assert enc.taps == {"512": 2, "256": 5, "128": 8, "64": 11, "32": 14, "16": 18}
    assert gen.taps == {"16": 6, "32": 9, "64": 12, "128": 15, "256": 18, "512": 21}


def _assert_matches_official_keys(model):
    ref = json.loads(KEYS_JSON.read_text())["state_dict"]
    sd = model.state_dict()
    assert list(sd) == list(ref)
    assert {k: list(v.shape) for k, v in sd.items()} == {k: v["shape"] for k, v in ref.items()}
    assert len(sd) == 515
    assert round(num_params(model) / 1e6, 2) == 94.11


def test_full_model_structure_on_meta_device():
    # The released layout without allocating 94 M parameters.
    with torch.device("meta"):
        model = CodeFormer(FULL_CONFIG)
    _assert_matches_official_keys(model)


@pytest.mark.slow
def test_full_model_keys_shapes_and_strict_load(tmp_path):
    model = create("codeformer", pretrained=False)
    _assert_matches_official_keys(model)
    path = tmp_path / "codeformer.pth"
    torch.save({"params_ema": model.state_dict()}, path)
    again = create("codeformer_arcface112", checkpoint=path)
    torch.testing.assert_close(again.position_emb, model.position_emb)


if __name__ == "__main__":
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    torch.save(make_golden(), GOLDEN)
    print(f"wrote {GOLDEN}")
