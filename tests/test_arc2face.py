"""Arc2Face generator and Digi2Real math: the ID projection against transformers' own CLIP forward,
SLERP and Delta against direct formulas, the tiny pipeline's seeding and batching, the official
folder layout and its errors, the 512 -> 112 frame warp and ID embeddings through real runners."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from rtkit.engines import RtkitError, create  # noqa: E402
from rtkit.engines.align import template_points  # noqa: E402
from rtkit.engines.arc2face import (DEFAULT_SCHEDULER, TINY_ID_DIM, arc2face_loop, load_arc2face,  # noqa: E402
                                    make_scheduler, prompt_token_ids, save_layout, tiny_token_ids,
                                    write_tiny_tokenizer)
from rtkit.engines.digi2real import (ArcFaceOnnx, Delta, compute_delta, delta_features, draw_t,  # noqa: E402
                                     embed_aligned, load_delta, prototype, slerp, to_arcface112, variations)

STEPS = 3


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create("arc2face_tiny", pretrained=False)


@pytest.fixture(scope="module")
def layout(tiny, tmp_path_factory):
    """The tiny model written in the official layout (models/, base/), with the tiny tokenizer."""
    root = tmp_path_factory.mktemp("a2f")
    tok = write_tiny_tokenizer(root / "tok")
    save_layout(tiny, root / "models", root / "base", tokenizer_dir=tok)
    return root


def _ids(n, seed=0, dim=TINY_ID_DIM):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- projection

def test_tokenizer_gives_the_prompt_ids_the_model_holds(layout, tiny):
    tok = transformers.CLIPTokenizer.from_pretrained(str(layout / "base" / "tokenizer"))
    ids, index, uncond = prompt_token_ids(tok)
    assert (ids, index, uncond) == tiny_token_ids()
    assert tiny.encoder.prompt_ids[0].tolist() == ids and tiny.encoder.id_index == index == 4
    assert ids[index] == tok.encode("id", add_special_tokens=False)[0]


def test_projection_equals_clip_text_model_forward(tiny):
    """Reference: transformers' whole CLIPTextModel.forward on input_ids, with each padded ID vector
    as an extra vocabulary row placed at the "id" position (so the official forward itself builds
    positions, causal mask and final norm)."""
    enc = tiny.encoder
    text = enc.text_model
    ids = _ids(3)
    ours = enc(ids)
    vocab = text.config.vocab_size
    cfg = transformers.CLIPTextConfig(**{**text.config.to_dict(), "vocab_size": vocab + 3})
    ref_model = transformers.CLIPTextModel(cfg).eval()
    sd = dict(text.state_dict())
    padded = F.pad(F.normalize(ids, dim=-1), (0, cfg.hidden_size - TINY_ID_DIM))
    sd["embeddings.token_embedding.weight"] = torch.cat([sd["embeddings.token_embedding.weight"], padded])
    ref_model.load_state_dict(sd)
    input_ids = enc.prompt_ids.repeat(3, 1).clone()
    input_ids[:, enc.id_index] = torch.arange(vocab, vocab + 3)
    with torch.no_grad():
        ref = ref_model(input_ids=input_ids).last_hidden_state
    assert ours.shape == (3, 77, cfg.hidden_size)
    assert (ours - ref).abs().max().item() < 1e-5
    # Unnormalised IDs project the same: the encoder normalises (the official caller does it by hand).
    assert (enc(ids * 7.0) - ours).abs().max().item() < 1e-5


def test_id_lands_at_the_id_token_only(tiny):
    enc = tiny.encoder
    a, b = _ids(1, 1), _ids(1, 2)
    tok_a, tok_b = enc.token_embeddings(a), enc.token_embeddings(b)
    plain = enc.text_model.embeddings.token_embedding(enc.prompt_ids)
    differs = (tok_a != plain).any(-1)[0]
    assert differs.nonzero().flatten().tolist() == [enc.id_index]
    assert torch.allclose(tok_a[0, enc.id_index, :TINY_ID_DIM], F.normalize(a, dim=-1)[0])
    assert (tok_a[0, enc.id_index, TINY_ID_DIM:] == 0).all()     # zero-padded to the hidden size
    with torch.no_grad():
        out_a, out_b = enc(a), enc(b)
    k = enc.id_index                                              # causal: tokens before "id" never see it
    assert torch.equal(out_a[:, :k], out_b[:, :k])
    assert ((out_a[:, k:] - out_b[:, k:]).abs().amax(-1) > 1e-4).all()
    torch.testing.assert_close(tok_b[:, :k], tok_a[:, :k], rtol=0, atol=0)


def test_unconditional_branch_is_the_empty_prompt_cached(tiny):
    u = tiny.uncond()
    with torch.no_grad():
        ref = tiny.encoder.text_model(input_ids=tiny.encoder.uncond_ids).last_hidden_state
    assert u.shape == (1, 77, 128) and torch.equal(u, ref)
    assert tiny.uncond() is u                                     # computed once


# ----------------------------------------------------------------------------------------------- SLERP, Delta

def test_prototype_is_normalised_mean_of_normalised():
    e = torch.randn(5, 16, dtype=torch.float64) * torch.arange(1, 6, dtype=torch.float64)[:, None]
    direct = (e / e.norm(dim=1, keepdim=True)).mean(0)
    assert torch.allclose(prototype(e), direct / direct.norm(), atol=1e-12)


def test_slerp_endpoints_norm_and_linear_angle():
    g = torch.Generator().manual_seed(0)
    p, e = torch.randn(32, dtype=torch.float64, generator=g), torch.randn(32, dtype=torch.float64, generator=g)
    pn, en = p / p.norm(), e / e.norm()
    assert torch.equal(slerp(p, e, 0.0), pn) and torch.equal(slerp(p, e, 1.0), en)
    ts = torch.linspace(0, 1, 11, dtype=torch.float64)
    path = slerp(p, e, ts)
    assert path.shape == (11, 32)
    assert torch.allclose(path.norm(dim=-1), torch.ones(11, dtype=torch.float64), atol=1e-12)
    omega = torch.arccos(pn @ en)
    angles = torch.arccos((path @ pn).clamp(-1, 1))
    assert torch.allclose(angles, ts * omega, atol=1e-7)
    # Rows: N pairs with N weights; and a nearly parallel pair stays finite and on the sphere.
    P, E = torch.randn(4, 8, dtype=torch.float64, generator=g), torch.randn(4, 8, dtype=torch.float64, generator=g)
    rows = slerp(P, E, torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64))
    assert torch.equal(rows[0], P[0] / P[0].norm()) and torch.equal(rows[3], E[3] / E[3].norm())
    near = slerp(pn, pn + 1e-12, 0.5)
    assert torch.isfinite(near).all() and abs(near.norm().item() - 1) < 1e-12


def test_slerp_range_draws_per_output_seed():
    t1, t2 = draw_t((0.1, 0.3), 5), draw_t((0.1, 0.3), 5)
    assert t1 == t2 and 0.1 <= t1 <= 0.3 and draw_t((0.1, 0.3), 6) != t1 and draw_t(0.2, 9) == 0.2
    with pytest.raises(RtkitError):
        draw_t((0.5, 0.2))
    p, e = torch.randn(16, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    v = variations(p, e, (0.0, 0.5), seeds=[10, 11, 12])
    single = variations(p, e[1:2], (0.0, 0.5), seeds=[11])           # independent of the batch
    assert torch.equal(v[1:2], single)


def test_delta_is_direct_mean_difference_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(3)
    real, synth = torch.randn(7, 77, 8, generator=g), torch.randn(5, 77, 8, generator=g) + 0.5
    d = compute_delta(real, synth, scale=0.7, provenance={"real": "ffhq/", "synthetic": "digiface/"})
    direct = real.double().mean(0) - synth.double().mean(0)
    assert torch.allclose(d.vector.double(), direct, atol=1e-6)
    streamed = compute_delta(iter(real.split(3)), iter(synth.split(2)))   # batch by batch
    assert torch.allclose(streamed.vector, d.vector, atol=1e-6)
    path = d.save(tmp_path / "delta.safetensors")
    back = load_delta(path)
    assert torch.equal(back.vector, d.vector) and back.scale == 0.7 and back.space == "conditioning"
    assert back.provenance == {"real": "ffhq/", "synthetic": "digiface/", "n_real": 7, "n_synthetic": 5}
    assert torch.allclose(back.apply(torch.zeros(2, 77, 8)), (0.7 * direct).float().expand(2, -1, -1), atol=1e-6)
    # The "id" space renormalises onto the sphere.
    ids = compute_delta(torch.randn(4, 16), torch.randn(4, 16), space="id")
    assert torch.allclose(ids.apply(torch.randn(3, 16)).norm(dim=-1), torch.ones(3), atol=1e-6)
    (tmp_path / "bad.safetensors").write_bytes(b"not a delta")
    for bad in (tmp_path / "bad.safetensors", tmp_path / "missing.safetensors"):
        with pytest.raises(RtkitError) as info:
            load_delta(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(RtkitError):
        Delta(torch.zeros(3), space="clip_image")


def test_delta_features_in_conditioning_space(tiny):
    ids = _ids(4, 7)
    feats = delta_features("conditioning", ids, tiny.encoder)
    assert torch.allclose(feats, tiny.encoder(ids), atol=1e-6)
    assert torch.allclose(delta_features("id", ids).norm(dim=-1), torch.ones(4), atol=1e-6)


# ----------------------------------------------------------------------------------------------- pipeline

def test_tiny_pipeline_deterministic_and_batch_independent(tiny):
    ids = _ids(8, 11)
    seeds = list(range(100, 108))
    with torch.no_grad():
        full = tiny(ids, seed=seeds, steps=STEPS)
        again = tiny(ids, seed=seeds, steps=STEPS)
        fours = torch.cat([tiny(ids[i:i + 4], seed=seeds[i:i + 4], steps=STEPS) for i in (0, 4)])
        ones = torch.cat([tiny(ids[i:i + 1], seed=seeds[i:i + 1], steps=STEPS) for i in range(8)])
        other = tiny(ids[:1], seed=[999], steps=STEPS)
    assert full.shape == (8, 3, 32, 32) and torch.isfinite(full).all()
    assert full.min() >= -1 and full.max() <= 1
    assert torch.equal(full, again)
    # Batch composition changes only the BLAS blocking (measured max ~1e-6), far below one uint8 level.
    assert (fours - full).abs().max().item() < 1e-4
    assert (ones - full).abs().max().item() < 1e-4
    assert (other - full[:1]).abs().max().item() > 1e-2          # the seed matters
    assert (full[0] - full[1]).abs().max().item() > 1e-2


def test_stochastic_scheduler_noise_is_per_output(tiny):
    """Euler ancestral draws fresh noise every step: it too comes from each output's generator."""
    parts, cfg = tiny.loop_parts(), tiny.loop_config()
    ids = _ids(4, 5)
    kw = dict(uncond=tiny.uncond(), steps=STEPS, scheduler="EulerAncestralDiscreteScheduler", **cfg)
    both = arc2face_loop(parts, ids, seed=[1, 2, 3, 4], **kw)
    alone = arc2face_loop(parts, ids[2:3], seed=[3], **kw)
    assert (both[2:3] - alone).abs().max().item() < 1e-4
    dpm = arc2face_loop(parts, ids, seed=[1, 2, 3, 4], **{**kw, "scheduler": DEFAULT_SCHEDULER})
    assert (dpm - both).abs().max().item() > 1e-3               # the scheduler name is honoured
    with pytest.raises(RtkitError, match="unknown scheduler"):
        make_scheduler("NoSuchScheduler")


def test_guidance_is_one_batched_unet_call_per_step(tiny):
    parts, cfg = dict(tiny.loop_parts()), tiny.loop_config()
    unet, calls = parts["unet"], []

    def counted(x, t, c):
        calls.append((x.shape[0], t.shape, c.shape[0]))
        return unet(x, t, c)

    parts["unet"] = counted
    ids = _ids(3, 9)
    guided = arc2face_loop(parts, ids, uncond=tiny.uncond(), seed=0, steps=STEPS, guidance=3.0, **cfg)
    assert calls == [(6, torch.Size([6]), 6)] * STEPS
    calls.clear()
    plain = arc2face_loop(parts, ids, uncond=tiny.uncond(), seed=0, steps=STEPS, guidance=1.0, **cfg)
    assert calls == [(3, torch.Size([3]), 3)] * STEPS
    assert (guided - plain).abs().max().item() > 1e-3
    # A conditioning-space Delta shifts the images; a zero Delta changes nothing.
    zero = arc2face_loop(parts, ids, uncond=tiny.uncond(), seed=0, steps=STEPS, guidance=3.0,
                         delta=torch.zeros(77, 128), **cfg)
    assert torch.equal(zero, guided)


def test_low_precision_unet_with_fp32_vae(tiny):
    model = create("arc2face_tiny", pretrained=False)
    model.load_state_dict(tiny.state_dict())
    ids = _ids(2, 4)
    with torch.no_grad():
        ref = model(ids, seed=[1, 2], steps=STEPS)
        model.place("cpu", torch.bfloat16, vae_dtype=torch.float32)
        assert model.vae.dtype == torch.float32 and model.unet.dtype == torch.bfloat16
        low = model(ids, seed=[1, 2], steps=STEPS)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - ref).abs().mean().item() < 0.1


def test_registered_pipeline_runs_the_module_loop(tiny):
    """The registry's pipeline (encoder, uncond, unet, vae_decoder + loop "arc2face") through the
    runtime's PipelineRunner gives the module's own images; each key seeds its sample."""
    from rtkit.engines.registry import get_entry
    from rtkit.engines.sampling import is_seeded, path_seed
    from rtkit.runtime import TorchRunner

    entry = get_entry("arc2face_tiny")
    assert sorted(entry.pipeline.parts) == ["encoder", "uncond", "unet", "vae_decoder"]
    assert entry.pipeline.loop == "arc2face" and is_seeded("arc2face")
    ids, keys = _ids(3, 8), ["a/0.png", "a/1.png", "b/0.png"]
    with TorchRunner(tiny) as runner:
        assert runner.card.spec.settings["steps"] == 25                 # the card carries the defaults
        y = runner.infer(ids, keys=keys, steps=STEPS)
    with torch.no_grad():
        ref = tiny(ids, seed=[path_seed(k) for k in keys], steps=STEPS)
    assert torch.equal(y, ref)


def test_export_with_external_data_runs_the_same_loop(tiny, tmp_path):
    """Weights in X.<part>.onnx.data (forced here; automatic past 2 GB) load and give the same images."""
    from rtkit.export.onnx import to_onnx
    from rtkit.runtime import open_engine

    card = to_onnx(tiny, tmp_path / "a2f.onnx", external_data=True, parity=False, log=None)
    parts = json.loads(card.read_text())["parts"]
    for p in parts.values():
        assert (tmp_path / (p["file"] + ".data")).stat().st_size > (tmp_path / p["file"]).stat().st_size
    ids, keys = _ids(2, 12), ["x/0.png", "x/1.png"]
    with open_engine(card) as runner:
        assert set(runner.parts) == set(parts) and runner.backend == "onnxruntime"
        y = runner.infer(ids, keys=keys, steps=STEPS)
    with torch.no_grad():
        from rtkit.engines.sampling import path_seed

        ref = tiny(ids, seed=[path_seed(k) for k in keys], steps=STEPS)
    assert (y - ref).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------------------------- layout

def test_official_layout_loads_and_reproduces(tiny, layout):
    loaded = create("arc2face_tiny", models=layout / "models", base=layout / "base")
    assert json.loads((layout / "models" / "encoder" / "config.json").read_text())["model_type"] == "clip_text_model"
    keys = torch.load(layout / "models" / "encoder" / "pytorch_model.bin", weights_only=True)
    assert all(k.startswith("text_model.") for k in keys)         # the published key names
    ids = _ids(2, 3)
    with torch.no_grad():
        assert torch.equal(loaded(ids, seed=[5, 6], steps=2), tiny(ids, seed=[5, 6], steps=2))


@pytest.mark.parametrize("breakage, names", [
    ("no_arc2face", "arc2face"), ("no_encoder", "encoder"), ("unet_config_class", "UNet2DConditionModel"),
    ("encoder_config_type", "CLIP text model"), ("no_vae", "vae"), ("no_models_dir", "does not exist"),
    ("unet_weights_shape", "shape mismatches"),
])
def test_wrong_models_folder_is_one_line(layout, tmp_path, breakage, names):
    root = tmp_path / "copy"
    shutil.copytree(layout, root)
    models, base = root / "models", root / "base"
    if breakage == "no_arc2face":
        shutil.rmtree(models / "arc2face")
    elif breakage == "no_encoder":
        shutil.rmtree(models / "encoder")
    elif breakage == "unet_config_class":
        cfg = json.loads((models / "arc2face" / "config.json").read_text())
        (models / "arc2face" / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DModel"}))
    elif breakage == "encoder_config_type":
        cfg = json.loads((models / "encoder" / "config.json").read_text())
        (models / "encoder" / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    elif breakage == "no_vae":
        shutil.rmtree(base / "vae")
    elif breakage == "no_models_dir":
        models = root / "nowhere"
    elif breakage == "unet_weights_shape":
        cfg = json.loads((models / "arc2face" / "config.json").read_text())
        (models / "arc2face" / "config.json").write_text(json.dumps({**cfg, "block_out_channels": [16, 64]}))
    with pytest.raises(RtkitError) as info:
        load_arc2face(models, base, id_dim=TINY_ID_DIM)
    msg = str(info.value)
    assert "\n" not in msg and names in msg
    if breakage != "unet_weights_shape":
        assert "expected <models>/arc2face/" in msg


def test_whole_module_checkpoint_reloads(tiny, tmp_path):
    path = tmp_path / "a2f.pth"
    torch.save(tiny.state_dict(), path)
    again = create("arc2face_tiny", checkpoint=path)
    for k, v in again.state_dict().items():
        assert torch.equal(v, tiny.state_dict()[k]), k


# ----------------------------------------------------------------------------------------------- frame, IDs

def test_generator_frame_warp_puts_template_points_on_arcface112():
    """Dots drawn at the ArcFace template scaled to 512 land on the 112 template after the warp."""
    img = torch.full((1, 3, 512, 512), -1.0)
    src = template_points("arcface112", 512)
    for x, y in src:
        xi, yi = int(round(x)), int(round(y))
        img[:, :, yi - 6:yi + 7, xi - 6:xi + 7] = 1.0
    out = to_arcface112(img)
    assert out.shape == (1, 3, 112, 112)
    heat = (out[0, 0] + 1) / 2
    for x, y in template_points("arcface112", 112):
        xi, yi = int(round(x)), int(round(y))
        win = heat[yi - 4:yi + 5, xi - 4:xi + 5]
        ys, xs = torch.meshgrid(torch.arange(yi - 4, yi + 5), torch.arange(xi - 4, xi + 5), indexing="ij")
        cx, cy = (win * xs).sum() / win.sum(), (win * ys).sum() / win.sum()
        assert math.hypot(cx - x, cy - y) < 0.6, (x, y, float(cx), float(cy))


def test_embed_aligned_through_a_runner_and_an_arcface_onnx(tmp_path):
    from rtkit.runtime import open_engine

    crops = np.random.default_rng(0).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    with open_engine("iresnet_tiny") as runner:
        emb = embed_aligned(crops, runner, batch_size=2)
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
        if runner.spec.channels == "BGR":
            x = x.flip(1)
        direct = F.normalize(torch.as_tensor(runner.infer(x.numpy())), dim=-1).numpy()
        assert emb.shape == (5, 64) and np.abs(emb - direct).max() < 1e-5
        # The same network as an insightface-style ONNX (fixed batch 1, (x - 127.5) / 127.5, RGB).
        model = runner.model.float().eval()
    path = tmp_path / "arcface.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 112, 112),), str(path), input_names=["input.1"],
                      output_names=["fc1"], dynamo=False)
    onnx_rec = ArcFaceOnnx(path)
    assert onnx_rec.spec.value_range == (-1.0, 1.0) and onnx_rec.fixed_batch == 1
    assert np.abs(embed_aligned(crops, onnx_rec) - direct).max() < 1e-4
    with pytest.raises(RtkitError):
        ArcFaceOnnx(tmp_path / "missing.onnx")


def test_detection_needs_its_file_and_insightface(tmp_path):
    from rtkit.engines.digi2real import FaceDetector

    with pytest.raises(RtkitError, match="not found"):
        FaceDetector(tmp_path / "scrfd_10g_bnkps.onnx")


# ----------------------------------------------------------------------------------------------- full size

@pytest.mark.slow
def test_full_size_configs_are_sd15_unet_and_clip_l14():
    """Built on the meta device (no memory): parameter counts and shapes of SD-1.5's UNet
    (859,520,964), VAE (83,653,863) and CLIP ViT-L/14's text tower (123,060,480)."""
    with torch.device("meta"):
        model = create("arc2face", pretrained=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.unet) == 859_520_964
    assert count(model.vae) == 83_653_863
    assert count(model.encoder.text_model) == 123_060_480
    unet = {k: tuple(v.shape) for k, v in model.unet.state_dict().items()}
    assert unet["conv_in.weight"] == (320, 4, 3, 3) and unet["conv_out.weight"] == (4, 320, 3, 3)
    assert unet["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert unet["mid_block.attentions.0.proj_in.weight"] == (1280, 1280, 1, 1)   # conv proj (SD-1.x)
    assert unet["time_embedding.linear_1.weight"] == (1280, 320)
    text = {k: tuple(v.shape) for k, v in model.encoder.text_model.state_dict().items()}
    assert text["embeddings.token_embedding.weight"] == (49408, 768)
    assert text["embeddings.position_embedding.weight"] == (77, 768)
    assert text["encoder.layers.11.mlp.fc1.weight"] == (3072, 768)
    assert not any(k.startswith("encoder.layers.12.") for k in text)
