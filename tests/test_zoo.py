"""Every registered tiny model, through one parametrised test (timm test_models style): forward,
backward reaches every trainable parameter the official forward uses, no NaN, and a strict reload
of its own weights through the model's checkpoint loader."""
from __future__ import annotations

import re

import pytest
import torch

from rtkit.engines import create, get_entry, list_models

# Parameters the official forward never uses (kept so official files load strictly).
UNUSED = {
    "unsb_tiny": r"generator\.(time_embed|model_res\.\d+\.(Dense_time|conv_block\.1|style))\.",
    "codeformer_tiny": r"quantize\.embedding\.weight",          # codes are looked up detached
    "codeformer_arcface112_tiny": r"quantize\.embedding\.weight",
    "arc2face_tiny": r"vae\.(encoder|quant_conv)\.",             # generation decodes only
}
RUNTIME = {"ddim_tiny": {"steps": 2, "depth": 0.5},            # keep the sampler loops short
           "arc2face_tiny": {"steps": 2}}


def _input(spec, batch=2):
    h, w = spec.input_size or (32, 32)
    lo, hi = spec.value_range
    return torch.rand(batch, 3, h, w) * (hi - lo) + lo


@pytest.mark.parametrize("name", list_models(tiny=True))
def test_tiny_model_forward_backward_reload(name, tmp_path):
    torch.manual_seed(0)
    model = create(name, pretrained=False).train()
    # A generator takes ID embeddings; every other model an image batch.
    x = torch.randn(2, model.id_dim) if model.spec.task == "generate" else _input(model.spec)
    y = model(x, **RUNTIME.get(name, {}))
    y = y[0] if isinstance(y, (tuple, list)) else y
    assert torch.isfinite(y).all()
    if model.spec.task == "generate":
        assert y.shape == (2, 3, *model.spec.input_size)
    elif model.spec.task == "translate":
        assert y.shape == x.shape
    else:
        assert y.shape == (2, model.spec.output_dim)
    loss = y.float().square().mean()
    if hasattr(model, "forward_official"):
        # CodeFormer's transformer reaches the image only through a top-1 code index; its
        # training signal is the code logits, which the official forward also returns.
        core_in = model.to_ffhq(x) if hasattr(model, "to_ffhq") else x  # the ArcFace-112 wrapper
        loss = loss + sum(t.float().square().mean() for t in model.forward_official(core_in)
                          if isinstance(t, torch.Tensor))
    loss.backward()
    unused = re.compile(UNUSED.get(name, r"(?!)"))
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and not unused.search(n) and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"no finite gradient for {missing[:5]}"

    if name.startswith("ddim"):
        return  # its checkpoint is a diffusers UNet folder, covered in test_unsb_ddim.py
    path = tmp_path / "weights.pth"
    sd = model.state_dict()
    torch.save(sd, path)
    again = create(name, checkpoint=path)
    for k, v in again.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert get_entry(name).tiny
