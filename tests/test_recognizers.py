"""Face recognizers (IResNet, AdaFace IR) and margin heads (AdaFace, ArcFace, CosFace).

Parity with the official code (insightface arcface_torch, mk-minchul/AdaFace) was checked
outside the repo on random weights; here: the official key layouts, loading the official
containers, training-readiness of the tiny variants, the head formulas against independent
computations, and golden outputs that pin the forward passes.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rtkit.engines import CheckpointError, create, list_models
from rtkit.train.heads import (HEADS, AdaFaceHead, ArcFaceHead, CombinedMarginHead, CosFaceHead,
                               build_head, combined_margin, split_norm)

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN = GOLDEN_DIR / "recognizers_tiny.json"
TINY = ["iresnet_tiny", "adaface_tiny"]


def _reference(name: str) -> dict:
    """Key layout recorded from the official checkpoint (copied from the project references)."""
    return json.loads((GOLDEN_DIR / f"keys_{name}.json").read_text())


def _layout(module: torch.nn.Module) -> dict:
    """{key: (shape, dtype, kind)} like the reference key files."""
    params = dict(module.named_parameters())
    return {k: (list(v.shape), str(v.dtype).replace("torch.", ""), "param" if k in params else "buffer")
            for k, v in module.state_dict().items()}


def _reference_layout(ref: dict) -> dict:
    return {k: (v["shape"], v["dtype"], v["kind"]) for k, v in ref["state_dict"].items()}


# ------------------------------------------------------------------ official layouts

@pytest.mark.parametrize("model_name, reference", [("iresnet50", "arcface_iresnet50"),
                                                   ("adaface_ir50", "adaface_ir50")])
def test_full_model_keys_match_official_checkpoints(model_name, reference):
    ref = _reference(reference)
    model = create(model_name, pretrained=False)
    assert _layout(model) == _reference_layout(ref)
    # Same order as well, so files saved here diff cleanly against the official ones.
    assert list(model.state_dict()) == list(ref["state_dict"])


def test_adaface_head_keys_match_official_checkpoint():
    ref = _reference("adaface_head")
    classes = ref["state_dict"]["kernel"]["shape"][1]
    head = AdaFaceHead(512, classes)
    assert _layout(head) == _reference_layout(ref)


def test_specs_state_channel_order_and_range():
    assert set(TINY) <= set(list_models(tiny=True, task="embed"))
    assert {"iresnet18", "iresnet50", "iresnet100", "adaface_ir18", "adaface_ir50"} <= set(
        list_models(tiny=False, task="embed"))
    ires, ada = create("iresnet_tiny"), create("adaface_tiny")
    assert ires.spec.channels == "RGB" and ada.spec.channels == "BGR"
    for m in (ires, ada):
        assert m.spec.task == "embed" and m.spec.input_size == (112, 112)
        assert m.spec.value_range == (-1.0, 1.0) and m.spec.alignment == "arcface112"
    assert create("iresnet_tiny", num_features=32).spec.output_dim == 32


# ------------------------------------------------------------------ tiny variants train

@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward_every_parameter_gets_gradient(name):
    torch.manual_seed(0)
    model = create(name).train()
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    out = model(x)
    assert out.shape == (4, model.spec.output_dim)
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # arcface_torch fixes the embedding BN scale at 1; nothing else is frozen.
    assert frozen == ({"features.weight"} if name.startswith("iresnet") else set())
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{n} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{n} got an all-zero gradient"


def test_adaface_returns_unit_embedding_and_norm():
    model = create("adaface_tiny")
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        unit = model(x)
        unit2, norm = model(x, return_norm=True)
        raw = model.embed(x)
    assert torch.equal(unit, unit2)
    assert norm.shape == (3, 1)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(unit * norm, raw)


def test_iresnet_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = create("iresnet_tiny", grad_checkpointing=ckpt).train()
        model(x).sum().backward()
        grads.append(model.conv1.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


# ------------------------------------------------------------------ checkpoints

def _perturbed(name, **kw):
    """A tiny model whose weights and BN statistics differ from a fresh build."""
    torch.manual_seed(123)
    model = create(name, **kw)
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                t.add_(torch.rand_like(t) * 0.1)
    return model.eval()


def test_iresnet_loads_plain_state_dict_and_resume_file(tmp_path):
    src = _perturbed("iresnet_tiny")
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    plain = tmp_path / "backbone.pth"
    torch.save(src.state_dict(), plain)
    resume = tmp_path / "checkpoint_gpu_0.pt"  # arcface_torch's resume container
    torch.save({"epoch": 3, "global_step": 100, "state_dict_backbone": src.state_dict(),
                "state_dict_softmax_fc": {"weight": torch.zeros(10, 64)}}, resume)
    with torch.no_grad():
        expected = src(x)
        for path in (plain, resume):
            torch.testing.assert_close(create("iresnet_tiny", checkpoint=path)(x), expected,
                                       rtol=0, atol=0)


def test_adaface_loads_lightning_checkpoint_and_plain_state_dict(tmp_path):
    src = _perturbed("adaface_tiny")
    head = AdaFaceHead(64, 10)
    with torch.no_grad():
        head.batch_mean.fill_(31.0)
    lightning = {"epoch": 25, "global_step": 1234, "pytorch-lightning_version": "1.8.6",
                 "hyper_parameters": {"arch": "ir_50", "head": "adaface", "m": 0.4},
                 "state_dict": {**{f"model.{k}": v for k, v in src.state_dict().items()},
                                **{f"head.{k}": v for k, v in head.state_dict().items()}}}
    ckpt = tmp_path / "adaface_ir_tiny.ckpt"
    torch.save(lightning, ckpt)
    plain = tmp_path / "backbone.pth"
    torch.save(src.state_dict(), plain)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        expected = src(x)
        for path in (ckpt, plain):
            torch.testing.assert_close(create("adaface_tiny", checkpoint=path)(x), expected,
                                       rtol=0, atol=0)
    # The head half of the same file rebuilds the head.
    loaded = AdaFaceHead.from_checkpoint(ckpt, m=0.4)
    assert loaded.kernel.shape == (64, 10) and loaded.batch_mean.item() == 31.0
    torch.testing.assert_close(loaded.kernel, head.kernel, rtol=0, atol=0)


def test_wrong_checkpoints_raise_checkpoint_error(tmp_path):
    ada = tmp_path / "adaface.pth"
    torch.save(create("adaface_tiny").state_dict(), ada)
    ires = tmp_path / "iresnet.pth"
    torch.save(create("iresnet_tiny").state_dict(), ires)
    with pytest.raises(CheckpointError, match="missing keys"):
        create("iresnet_tiny", checkpoint=ada)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        create("adaface_tiny", checkpoint=ires)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        create("iresnet_tiny", checkpoint=ires, num_features=32)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(ires.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        create("iresnet_tiny", checkpoint=truncated)
    with pytest.raises(CheckpointError, match="kernel"):
        AdaFaceHead.from_checkpoint(ires)


# ------------------------------------------------------------------ AdaFace head formula

def _adaface_reference(emb, kernel, norms, labels, mean, std, m, h, s, eps=1e-3):
    """AdaFace logits from the paper's formula, in float64 NumPy."""
    emb, kernel, norms = (np.asarray(a, dtype=np.float64) for a in (emb, kernel, norms))
    cos = np.clip(emb @ (kernel / np.linalg.norm(kernel, axis=0, keepdims=True)), -1 + eps, 1 - eps)
    n = np.clip(norms.reshape(-1), 0.001, 100)
    z = np.clip(h * (n - mean) / (std + eps), -1, 1)
    logits = cos.copy()
    for i, y in enumerate(labels):
        theta = np.clip(np.arccos(cos[i, y]) - m * z[i], eps, math.pi - eps)
        logits[i, y] = np.cos(theta) - (m + m * z[i])
    return s * logits


def test_adaface_head_logits_and_norm_statistics_follow_the_formula():
    torch.manual_seed(0)
    B, C, D = 16, 12, 32
    head = AdaFaceHead(D, C, m=0.4, h=0.333, s=64.0, t_alpha=0.01)
    emb, _ = split_norm(torch.randn(B, D))
    norms = torch.rand(B, 1) * 60 + 1
    norms[0] = 500.0  # clipped to 100 before use
    labels = torch.randint(0, C, (B,))

    logits = head(emb, norms, labels)

    n = np.clip(norms.numpy().reshape(-1).astype(np.float64), 0.001, 100)
    mean = 0.01 * n.mean() + 0.99 * 20.0
    std = 0.01 * n.std(ddof=1) + 0.99 * 100.0  # unbiased, as the official head
    assert head.batch_mean.item() == pytest.approx(mean, rel=1e-6)
    assert head.batch_std.item() == pytest.approx(std, rel=1e-6)
    expected = _adaface_reference(emb, head.kernel.detach(), norms, labels.numpy(), mean, std,
                                  0.4, 0.333, 64.0)
    np.testing.assert_allclose(logits.detach().numpy(), expected, rtol=1e-5, atol=1e-4)

    # Official quirk kept: statistics move in eval mode too (and t is never used).
    head.eval()
    with torch.no_grad():
        head(emb, norms, labels)
    assert head.batch_mean.item() == pytest.approx(0.01 * n.mean() + 0.99 * mean, rel=1e-6)
    assert head.t.item() == 0.0


def test_adaface_head_single_sample_batch_keeps_statistics_finite():
    head = AdaFaceHead(8, 4)
    emb, norms = split_norm(torch.randn(1, 8))
    logits = head(emb, norms, torch.tensor([2]))
    assert torch.isfinite(logits).all()
    assert head.batch_mean.item() == 20.0 and head.batch_std.item() == 100.0


def test_adaface_head_trains_embeddings_and_kernel():
    torch.manual_seed(0)
    head = AdaFaceHead(16, 5)
    raw = torch.randn(8, 16, requires_grad=True)
    emb, norms = split_norm(raw)
    F.cross_entropy(head(emb, norms, torch.arange(8) % 5), torch.arange(8) % 5).backward()
    assert torch.isfinite(raw.grad).all() and raw.grad.abs().sum() > 0
    assert torch.isfinite(head.kernel.grad).all() and head.kernel.grad.abs().sum() > 0


# ------------------------------------------------------------------ ArcFace / CosFace

def _cosines(head, emb):
    return (F.normalize(emb.double()) @ F.normalize(head.weight.detach().double()).T).clamp(-1, 1)


@pytest.mark.parametrize("head_cls, margin", [(ArcFaceHead, 0.5), (CosFaceHead, 0.4)])
def test_margin_heads_target_and_other_logits(head_cls, margin):
    torch.manual_seed(0)
    B, C, D, s = 10, 7, 24, 64.0
    head = head_cls(D, C, s=s, margin=margin)
    emb = torch.randn(B, D) * 5
    labels = torch.randint(0, C, (B,))
    logits = head(emb, None, labels).detach().double()
    cos = _cosines(head, emb)
    target = labels.view(-1, 1)
    got_target = logits.gather(1, target).squeeze(1)
    cos_target = cos.gather(1, target).squeeze(1)
    if head_cls is ArcFaceHead:
        expected_target = s * torch.cos(torch.arccos(cos_target) + margin)
    else:
        expected_target = s * (cos_target - margin)
    torch.testing.assert_close(got_target, expected_target, rtol=1e-5, atol=1e-4)
    others = torch.ones_like(cos, dtype=torch.bool).scatter_(1, target, False)
    torch.testing.assert_close(logits[others], s * cos[others], rtol=1e-5, atol=1e-4)


def test_arcface_margin_is_not_differentiated_and_edits_logits_in_place():
    # arcface_torch behaviour: gradient w.r.t. the cosines is s x upstream, margin or not.
    cos = (torch.rand(6, 5) * 1.8 - 0.9).requires_grad_()
    work = cos * 1.0
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    out = combined_margin(work, labels, 64.0, 1.0, 0.5, 0.0)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    torch.testing.assert_close(cos.grad, 64.0 * upstream)
    torch.testing.assert_close(work.detach() * 64.0, out.detach())  # the input now holds the margins
    # CosFace's margin is a constant shift: gradient s x upstream too, input edited as well.
    cos.grad = None
    work = cos * 1.0
    out = combined_margin(work, labels, 64.0, 1.0, 0.0, 0.4)
    (out * upstream).sum().backward()
    torch.testing.assert_close(cos.grad, 64.0 * upstream)
    assert work[0, 0].item() == pytest.approx(cos[0, 0].item() - 0.4, abs=1e-6)


def test_ignored_rows_and_interclass_filter():
    cos = torch.tensor([[0.9, 0.5, 0.05], [0.2, 0.3, 0.4]])
    labels = torch.tensor([0, -1])
    out = combined_margin(cos.clone(), labels, 10.0, 1.0, 0.0, 0.4, interclass_filtering_threshold=0.3)
    # Row 0: target shifted by the margin; the non-target cosine above 0.3 is zeroed.
    torch.testing.assert_close(out[0], torch.tensor([5.0, 0.0, 0.5]))
    # Row 1 (label -1): no margin, every cosine above the threshold zeroed.
    torch.testing.assert_close(out[1], torch.tensor([2.0, 3.0, 0.0]))


def test_unsupported_margin_combinations_raise():
    with pytest.raises(ValueError):
        CombinedMarginHead(8, 4, m1=1.35, m2=0.0, m3=0.0)  # SphereFace: arcface_torch raises too
    with pytest.raises(ValueError):
        CombinedMarginHead(8, 4, m1=1.0, m2=0.3, m3=0.2)  # arcface_torch would drop m2 silently
    with pytest.raises(ValueError):
        build_head("sphereface", 8, 4)


def test_build_head_and_config_round_trip():
    assert set(HEADS) == {"adaface", "arcface", "cosface", "combined"}
    for name in HEADS:
        head = build_head(name, 16, 9)
        rebuilt = build_head(**head.config())
        assert type(rebuilt) is type(head) and rebuilt.config() == head.config()
        rebuilt.load_state_dict(head.state_dict(), strict=True)
    assert build_head("adaface", 16, 9, m=0.3).m == 0.3
    arc = build_head("combined", 16, 9, m1=1.0, m2=0.5, m3=0.0)
    assert arc.weight.shape == (9, 16)


# ------------------------------------------------------------------ golden outputs

def _deterministic_weights(model):
    """Weights from a formula (not the RNG), so the golden values survive RNG changes."""
    with torch.no_grad():
        for k, (name, t) in enumerate(model.state_dict().items()):
            if not t.dtype.is_floating_point:
                continue
            base = torch.sin(torch.arange(t.numel(), dtype=torch.float64) * 0.61 + k * 1.3).view(t.shape)
            if name.endswith("running_var"):
                v = 1 + 0.25 * base
            elif name.endswith("running_mean"):
                v = 0.1 * base
            elif t.ndim == 1:
                v = 0.05 * base if name.endswith("bias") else 1 + 0.1 * base
            else:
                v = base / math.sqrt(t[0].numel())
            t.copy_(v.to(t.dtype))
        # Slopes well away from 1, so the golden values notice a PReLU turned into identity.
        for k, m in enumerate(mod for mod in model.modules() if isinstance(mod, torch.nn.PReLU)):
            m.weight.copy_(0.25 + 0.1 * torch.sin(torch.arange(m.weight.numel()) * 0.37 + k))
    return model.eval()


def _golden_input():
    i = torch.arange(3 * 112 * 112, dtype=torch.float64)
    images = [torch.sin(i * 0.013), 0.8 * torch.cos(i * 0.0071 + 1.0) * torch.sin(i * 0.00037)]
    return torch.stack(images).view(2, 3, 112, 112).float()


def _golden_outputs(name) -> list[list[float]]:
    model = _deterministic_weights(create(name))
    with torch.no_grad():
        return model(_golden_input()).tolist()


def test_golden_outputs_of_tiny_variants():
    if os.environ.get("RTKIT_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({n: _golden_outputs(n) for n in TINY}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    for name in TINY:
        np.testing.assert_allclose(np.array(_golden_outputs(name)), np.array(golden[name]),
                                   rtol=1e-4, atol=1e-5, err_msg=name)
