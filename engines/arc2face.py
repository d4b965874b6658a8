"""Arc2Face: an ID-conditioned face generator (SD-1.5 UNet + fine-tuned CLIP text encoder).

Facts (shared/reference/arc2face.md, A2-A5): the conditioning is the CLIP text encoder run on the
fixed prompt "photo of a id person" (77 tokens), where the token embedding of the word "id" is
replaced by the L2-normalised ArcFace vector zero-padded to the hidden size (512 -> 768); then
position embeddings, the causal CLIP encoder and the final layer norm give (N, 77, 768). The
unconditional branch is the same encoder on the empty prompt. Sampling: DPMSolverMultistep from
SD-1.5's scheduler config, 25 steps, guidance 3.0, 512x512 output.

The projection is written on transformers' public API only (the embeddings, encoder and final
layer norm submodules' forwards, with our own causal mask), because the official wrapper imports
private attention-mask helpers and breaks on transformers upgrades.

The pieces, loosely coupled:
- ``IdEncoder``, ``UNetPart``, ``VaeDecoderPart``: the three parts as nn.Modules with named
  tensor inputs (what export turns into one engine each).
- ``arc2face_loop(parts, ...)``: the sampler as a plain function of part callables, so the same
  loop runs over torch modules (``Arc2Face.loop_parts()``) or ONNX / TensorRT runners.
- ``Arc2Face``: holds encoder, UNet and VAE; ``load_arc2face(models, base)`` reads the official
  folder layout; registered as ``arc2face`` (full size) and ``arc2face_tiny`` (tests).

diffusers and transformers are optional (extra ``gen``) and imported only when a model is built
or the loop runs.
"""
from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rtkit.engines.checkpoint import load_state_dict_strict, read_checkpoint
from rtkit.engines.errors import CheckpointError, RtkitError, optional_import
from rtkit.engines.registry import Pipeline, register_model
from rtkit.engines.sampling import SeededNoise, per_sample_seeds, register_loop
from rtkit.engines.spec import ModelSpec, TensorSpec

PROMPT = "photo of a id person"
ID_WORD = "id"
MAX_LENGTH = 77
ID_DIM = 512
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 3.0
DEFAULT_SCHEDULER = "DPMSolverMultistepScheduler"
IMAGE_SIZE = 512

# SD-1.5's scheduler/scheduler_config.json (PNDM base); every other scheduler is built from it,
# as the official demo does with DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config).
SD15_SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000,
                         "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                         "trained_betas": None, "skip_prk_steps": True, "set_alpha_to_one": False,
                         "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon"}

# Published SD-1.5 unet/config.json (Arc2Face's arc2face/ UNet has the same architecture).
SD15_UNET_CONFIG = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                        block_out_channels=(320, 640, 1280, 1280),
                        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                          "CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                        "CrossAttnUpBlock2D"),
                        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                        norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
                        downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False)

# CLIP ViT-L/14 text tower (SD-1.5 text_encoder/config.json; Arc2Face's encoder/ fine-tunes it).
CLIP_L14_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
                            bos_token_id=0, eos_token_id=2, pad_token_id=1)

# SD-1.5 vae/config.json.
SD15_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                       block_out_channels=(128, 256, 512, 512),
                       down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
                       act_fn="silu", sample_size=512, scaling_factor=0.18215)

# Tiny variant (tests, CPU CI): the same classes at widths 16-32, 2 CLIP layers. Its ID vectors
# are 64-d (iresnet_tiny's embedding size) and the CLIP hidden size is 128, so the zero-padding
# path of the real model (512 -> 768) is exercised (64 -> 128). 32x32 images, 8x8 latents.
TINY_ID_DIM = 64
TINY_UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
                        attention_head_dim=8, norm_num_groups=8)
TINY_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                       block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                       up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, sample_size=32,
                       scaling_factor=0.18215)
TINY_WORDS = ("photo", "of", "a", "id", "person")
TINY_TEXT_CONFIG = dict(vocab_size=0, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5, projection_dim=128)  # vocab_size set from the tiny vocab

# Loop settings a card carries (and --set overrides); the frame settings come from the model.
LOOP_SETTINGS = {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "scheduler": DEFAULT_SCHEDULER, "seed": 0}
SPEC = ModelSpec(task="generate", input_size=(IMAGE_SIZE, IMAGE_SIZE), value_range=(-1.0, 1.0),
                 channels="RGB", alignment="arcface112", resize="native", settings=dict(LOOP_SETTINGS))
TINY_SPEC = ModelSpec(task="generate", input_size=(32, 32), value_range=(-1.0, 1.0), channels="RGB",
                      alignment="arcface112", resize="native", settings=dict(LOOP_SETTINGS))

EXPECTED_LAYOUT = ("expected <models>/arc2face/{config.json, diffusion_pytorch_model.safetensors}, "
                   "<models>/encoder/{config.json, pytorch_model.bin or model.safetensors} and an SD-1.5 "
                   "base folder with vae/{config.json, diffusion_pytorch_model.safetensors}, "
                   "tokenizer/{vocab.json, merges.txt}, scheduler/scheduler_config.json")


def _diffusers():
    return optional_import("diffusers", extra="gen", purpose="the Arc2Face generator")


def _transformers():
    return optional_import("transformers", extra="gen", purpose="the Arc2Face ID encoder")


# ----------------------------------------------------------------------------------------------
# Parts


def causal_mask(length: int, *, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Additive causal mask (1, 1, L, L): 0 on and below the diagonal, dtype-min above (CLIP's
    text tower attends left to right)."""
    m = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.triu(m, diagonal=1)[None, None]


def _part_spec(inputs: tuple = ()) -> ModelSpec:
    # Parts take tensors, not images: no input size or alignment of their own.
    return ModelSpec(task="generate", input_size=None, alignment="none", resize="native", inputs=inputs)


class IdEncoder(nn.Module):
    """ID vector (N, id_dim) -> conditioning (N, 77, hidden): the Arc2Face projection.

    ``text_model`` is a transformers CLIPTextModel; ``prompt_ids`` (77,) are the token ids of
    "photo of a id person" (max_length padding), ``id_index`` the position of the "id" token,
    ``uncond_ids`` (77,) those of the empty prompt.
    """

    def __init__(self, text_model, prompt_ids: Sequence[int], id_index: int, uncond_ids: Sequence[int],
                 id_dim: int = ID_DIM):
        super().__init__()
        self.text_model = text_model
        hidden = int(text_model.config.hidden_size)
        if id_dim > hidden:
            raise CheckpointError(f"ID vectors of {id_dim} dims do not fit a text encoder of hidden size {hidden}")
        prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long)
        if prompt.shape != (MAX_LENGTH,) or not 0 < int(id_index) < MAX_LENGTH:
            raise ValueError(f"prompt ids must be {MAX_LENGTH} long with the id token inside, "
                             f"got {tuple(prompt.shape)} and index {id_index}")
        self.id_dim, self.hidden_size, self.id_index = int(id_dim), hidden, int(id_index)
        # Non-persistent: token ids come from the tokenizer, not from the weights files.
        self.register_buffer("prompt_ids", prompt[None], persistent=False)
        self.register_buffer("uncond_ids", torch.as_tensor(list(uncond_ids), dtype=torch.long)[None],
                             persistent=False)
        self.spec = _part_spec()

    def export_inputs(self, batch: int) -> dict:
        return {"input": torch.randn(batch, self.id_dim)}

    def _core(self):
        # transformers 5 has the tower's submodules on CLIPTextModel itself, 4.x under .text_model.
        return getattr(self.text_model, "text_model", self.text_model)

    def token_embeddings(self, id_embeddings: torch.Tensor) -> torch.Tensor:
        """(N, 77, hidden) token embeddings of the prompt with the normalised, zero-padded ID
        vector in place of the "id" token (before position embeddings)."""
        core = self._core()
        table = core.embeddings.token_embedding
        ids = F.normalize(id_embeddings.to(table.weight.dtype), dim=-1)
        ids = F.pad(ids, (0, self.hidden_size - ids.shape[-1]))
        base = table(self.prompt_ids).expand(ids.shape[0], -1, -1)
        # One-hot select instead of in-place indexing: the same graph traces to ONNX.
        at_id = (torch.arange(MAX_LENGTH, device=ids.device) == self.id_index).to(ids.dtype)[None, :, None]
        return base * (1 - at_id) + ids[:, None, :] * at_id

    def encode_embeddings(self, token_embs: torch.Tensor) -> torch.Tensor:
        """CLIP text tower from token embeddings: + positions, causal encoder, final layer norm."""
        core = self._core()
        h = core.embeddings(inputs_embeds=token_embs)
        mask = causal_mask(h.shape[1], dtype=h.dtype, device=h.device)
        params = inspect.signature(core.encoder.forward).parameters
        if "causal_attention_mask" in params:  # transformers 4.x
            out = core.encoder(inputs_embeds=h, attention_mask=None, causal_attention_mask=mask)
        else:  # 5.x: one additive mask; is_causal for kernels that read the flag instead
            out = core.encoder(inputs_embeds=h, attention_mask=mask, is_causal=True)
        last = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return core.final_layer_norm(last)

    def forward(self, id_embedding: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (id_embedding.ndim != 2 or id_embedding.shape[-1] != self.id_dim):
            raise ValueError(f"ID embeddings must be (N, {self.id_dim}), got {tuple(id_embedding.shape)}")
        return self.encode_embeddings(self.token_embeddings(id_embedding))

    def uncond(self) -> torch.Tensor:
        """(1, 77, hidden): the encoder on the empty prompt (the unconditional branch)."""
        return self.text_model(input_ids=self.uncond_ids).last_hidden_state


class UNetPart(nn.Module):
    """eps = unet(sample, timestep, encoder_hidden_states); timestep (B,) float, one per row."""

    def __init__(self, unet, context_dim: int | None = None):
        super().__init__()
        self.unet = unet
        self.context_dim = int(context_dim or unet.config.cross_attention_dim)
        self.spec = _part_spec((TensorSpec("timestep", "float32", ("batch",), None),
                                TensorSpec("encoder_hidden_states", "float32", ("batch", MAX_LENGTH, self.context_dim),
                                           None)))

    def export_inputs(self, batch: int) -> dict:
        c, s = int(self.unet.config.in_channels), int(self.unet.config.sample_size)
        return {"input": torch.randn(batch, c, s, s), "timestep": torch.rand(batch) * 999,
                "encoder_hidden_states": torch.randn(batch, MAX_LENGTH, self.context_dim)}

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        # A runner casts the first input to its precision only; the context follows it (no-op in fp32).
        return self.unet(sample, timestep, encoder_hidden_states.to(sample.dtype), return_dict=False)[0]


class VaeDecoderPart(nn.Module):
    """latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1] (unscaled by the VAE's factor)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.spec = _part_spec()

    def export_inputs(self, batch: int, latent_size: int = 8) -> dict:
        return {"input": torch.randn(batch, int(self.vae.config.latent_channels), latent_size, latent_size)}

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # The VAE may sit in another precision than the UNet (fp32 or bf16: an fp16 VAE overflows).
        latents = latents.to(next(self.vae.parameters()).dtype)
        return self.vae.decode(latents / self.scaling_factor, return_dict=False)[0].clamp(-1.0, 1.0)


class UncondPart(nn.Module):
    """The unconditional conditioning as a part: (N, id_dim) -> encoder("") (N, 77, hidden).

    A constant computed once from the encoder; only the batch size is read from the input. As
    its own (tiny) engine it travels with the exported parts, so the loop over ONNX Runtime or
    TensorRT parts has the unconditional branch without the torch encoder."""

    def __init__(self, value: torch.Tensor, id_dim: int):
        super().__init__()
        self.register_buffer("value", value.detach().float().reshape(1, MAX_LENGTH, -1).clone())
        self.id_dim = int(id_dim)
        self.spec = _part_spec()

    def export_inputs(self, batch: int) -> dict:
        return {"input": torch.randn(batch, self.id_dim)}

    def forward(self, id_embedding: torch.Tensor) -> torch.Tensor:
        return self.value.expand(id_embedding.shape[0], -1, -1).to(id_embedding.dtype)


# ----------------------------------------------------------------------------------------------
# The loop


def make_scheduler(name: str = DEFAULT_SCHEDULER, config: Mapping | None = None, **overrides):
    """A diffusers scheduler by class name, from a training config (SD-1.5's by default)."""
    d = _diffusers()
    cls = getattr(d, str(name), None)
    if not (inspect.isclass(cls) and issubclass(cls, d.SchedulerMixin)):
        known = sorted(n for n in dir(d) if n.endswith("Scheduler"))
        raise RtkitError(f"unknown scheduler {name!r}; diffusers has: {', '.join(known)}")
    cfg = {k: v for k, v in dict(config or SD15_SCHEDULER_CONFIG).items() if not k.startswith("_")}
    cfg.update(overrides)
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls.from_config({k: v for k, v in cfg.items() if k in accepted})


def _call(fn, *args):
    out = fn(*args)
    return torch.as_tensor(out[0] if isinstance(out, (tuple, list)) else out)


def arc2face_loop(parts: Mapping[str, Callable], id_embeddings: torch.Tensor | None = None, *,
                  seed: int | Sequence[int] = 0, uncond=None, steps: int = DEFAULT_STEPS,
                  guidance: float = DEFAULT_GUIDANCE, scheduler: str = DEFAULT_SCHEDULER,
                  scheduler_config: Mapping | None = None, size: int = IMAGE_SIZE,
                  latent_channels: int = 4, vae_scale: int = 8, delta: torch.Tensor | None = None,
                  conditioning: torch.Tensor | None = None, device=None,
                  callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Generate N images (N, 3, size, size) in [-1, 1], float32, from N ID vectors.

    parts: {"encoder": f(id_embeddings (N, D)) -> (N, 77, H),
            "unet": f(sample (B, C, h, w), timestep (B,) float32, encoder_hidden_states (B, 77, H)) -> eps,
            "vae_decoder": f(latents (N, C, h, w)) -> images}; torch modules or runners, each
            handling its own device and precision (inputs arrive float32; outputs are cast back).
    uncond: (1, 77, H), the encoder on the empty prompt (``Arc2Face.uncond()``, computed once), or
        a zero-argument callable giving it; if None, ``parts["uncond"]`` (tensor or callable).
    seed: one per output (an int s means s, s+1, ...). Each output's initial noise and any
        scheduler step noise come from its own CPU generator, so an image depends only on its ID
        vector and its seed, never on the batch it was generated in.
    guidance: classifier-free guidance scale; above 1 the UNet runs once per step on the 2N batch
        [uncond; cond]. conditioning: precomputed (N, 77, H) instead of ``id_embeddings``.
    delta: an offset (77, H) or (1, 77, H) added to the conditional branch (Digi2Real's shift).
    scheduler / scheduler_config: any diffusers scheduler by class name, built from the training
        config (SD-1.5's by default). size / latent_channels / vae_scale: the output frame
        (``Arc2Face.loop_config()`` gives them for a model).
    """
    if conditioning is None:
        if id_embeddings is None:
            raise ValueError("pass id_embeddings or conditioning")
        conditioning = _call(parts["encoder"], torch.as_tensor(id_embeddings).float())
    cond = conditioning.float()
    device = torch.device(device) if device is not None else cond.device
    cond = cond.to(device)
    n = cond.shape[0]
    if delta is not None:
        cond = cond + torch.as_tensor(delta, dtype=cond.dtype, device=device).reshape(1, *cond.shape[1:])
    steps, guidance = int(steps), float(guidance)
    if steps < 1:
        raise RtkitError(f"steps must be >= 1, got {steps}")
    if size % vae_scale:
        raise RtkitError(f"size {size} is not a multiple of the VAE factor {vae_scale}")
    noise = SeededNoise(per_sample_seeds(seed, n))
    sched = make_scheduler(scheduler, scheduler_config)
    sched.set_timesteps(steps, device=device)
    hw = size // vae_scale
    latents = noise.normal((latent_channels, hw, hw), device=device, dtype=torch.float32)
    latents = latents * sched.init_noise_sigma
    cfg = guidance > 1.0
    if cfg:
        u = uncond if uncond is not None else parts.get("uncond")
        if u is None:
            raise ValueError("guidance > 1 needs the unconditional embedding (uncond= or parts['uncond'])")
        u = torch.as_tensor(u() if callable(u) else u).float().to(device)
        context = torch.cat([u.reshape(1, *cond.shape[1:]).expand(n, -1, -1), cond])
    else:
        context = cond
    step_kwargs = {}
    if "generator" in inspect.signature(sched.step).parameters:
        step_kwargs["generator"] = noise.generators  # diffusers draws row i from generator i
    for i, t in enumerate(sched.timesteps):
        x = sched.scale_model_input(latents, t)
        x = torch.cat([x, x]) if cfg else x
        tt = torch.as_tensor(t, device=device).float().reshape(1).expand(x.shape[0])
        eps = _call(parts["unet"], x, tt, context).float().to(device)
        if cfg:
            e_u, e_c = eps.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        latents = sched.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
        if callback is not None:
            callback(i + 1, steps)
    return _call(parts["vae_decoder"], latents).float().to(device)


# ----------------------------------------------------------------------------------------------
# The module


def _module_dtype_device(m: nn.Module):
    p = next(m.parameters())
    return p.dtype, p.device


def _cast_callable(module: nn.Module):
    """The module as a loop part: float32 tensors in, cast to the module's device and dtype.
    Gradients flow (the caller picks no_grad / inference_mode, as TorchRunner does)."""

    def run(*args):
        dtype, dev = _module_dtype_device(module)
        return module(*(a.to(dev, dtype) for a in args)).float()

    return run


class Arc2Face(nn.Module):
    """Encoder (CLIP text, with the ID projection), UNet and VAE of Arc2Face.

    ``forward(id_embeddings, seed=..., steps=..., ...)`` runs ``arc2face_loop`` over the torch
    parts. Precision and device are the caller's: ``place(device, dtype, vae_dtype)`` (e.g. fp16
    or bf16 UNet and encoder with the VAE in fp32, since an fp16 VAE overflows to black images).
    """

    def __init__(self, encoder: IdEncoder, unet, vae, scheduler_config: Mapping | None = None,
                 spec: ModelSpec = SPEC):
        super().__init__()
        self.encoder, self.unet, self.vae = encoder, unet, vae
        self.scheduler_config = dict(scheduler_config or SD15_SCHEDULER_CONFIG)
        self.spec = spec
        self._uncond_cache: dict = {}
        if int(unet.config.cross_attention_dim) != encoder.hidden_size:
            raise CheckpointError(f"UNet cross_attention_dim {unet.config.cross_attention_dim} != "
                                  f"encoder hidden size {encoder.hidden_size}")

    @property
    def id_dim(self) -> int:
        return self.encoder.id_dim

    def loop_config(self) -> dict:
        """The frame and schedule settings ``arc2face_loop`` needs besides the parts."""
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return {"size": int(self.unet.config.sample_size) * vae_scale,
                "latent_channels": int(self.unet.config.in_channels), "vae_scale": vae_scale,
                "scheduler_config": dict(self.scheduler_config)}

    def parts(self) -> dict[str, nn.Module]:
        """The exportable parts: encoder(id_embedding), unet(sample, timestep,
        encoder_hidden_states), vae_decoder(latents)."""
        return {"encoder": self.encoder, "unet": UNetPart(self.unet), "vae_decoder": VaeDecoderPart(self.vae)}

    def loop_parts(self) -> dict[str, Callable]:
        """The parts as ``arc2face_loop`` callables over wherever the modules were placed."""
        return {k: _cast_callable(m) for k, m in self.parts().items()}

    def place(self, device="cpu", dtype: torch.dtype = torch.float32,
              vae_dtype: torch.dtype | None = None) -> "Arc2Face":
        """Move encoder and UNet to ``device``/``dtype`` and the VAE to ``vae_dtype`` (fp32 unless
        given; bf16 is safe too)."""
        self.encoder.to(device, dtype)
        self.unet.to(device, dtype)
        self.vae.to(device, vae_dtype or torch.float32)
        self._uncond_cache.clear()
        return self

    def uncond(self) -> torch.Tensor:
        """encoder("") (1, 77, H) float32, computed once per placement and cached (``place`` and
        ``load_whole`` drop the cache; weights changed another way need ``drop_cache()``)."""
        dtype, dev = _module_dtype_device(self.encoder)
        key = (str(dev), dtype)
        if key not in self._uncond_cache:
            self._uncond_cache.clear()
            with torch.no_grad():  # a constant of the loop; no_grad (not inference mode) so it can
                self._uncond_cache[key] = self.encoder.uncond().float()  # join a graph that trains
        return self._uncond_cache[key]

    def drop_cache(self) -> None:
        self._uncond_cache.clear()

    def forward(self, id_embeddings: torch.Tensor, seed: int | Sequence[int] = 0, steps: int = DEFAULT_STEPS,
                guidance: float = DEFAULT_GUIDANCE, scheduler: str = DEFAULT_SCHEDULER,
                delta: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.loop_config()
        return arc2face_loop(self.loop_parts(), id_embeddings, uncond=self.uncond(), seed=seed,
                             steps=steps, guidance=guidance, scheduler=scheduler, delta=delta,
                             device=_module_dtype_device(self.unet)[1], **cfg)

    # Whole-module weights (rtkit's own save, e.g. create(name, checkpoint=file)).
    def load_whole(self, path: str | Path) -> None:
        load_state_dict_strict(self, read_checkpoint(path), name="arc2face", path=path)
        self._uncond_cache.clear()


# ----------------------------------------------------------------------------------------------
# The pipeline: parts + loop, so exported engines run the same sampler


@register_loop("arc2face", seeded=True)
def arc2face_pipeline_loop(parts: Mapping[str, Callable], x, *, seed: int | Sequence[int] = 0,
                           steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                           scheduler: str = DEFAULT_SCHEDULER, scheduler_config: Mapping | None = None,
                           size: int = IMAGE_SIZE, latent_channels: int = 4, vae_scale: int = 8,
                           delta=None, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The registered loop: ID vectors ``x`` (N, D) -> images (N, 3, size, size) in [-1, 1].

    parts: "encoder", "unet", "vae_decoder" and "uncond" (``UncondPart``: the empty-prompt
    conditioning, read once per call) as callables of tensors, e.g. the part runners of an
    exported card (rtkit.runtime.PipelineRunner) or TorchRunners over ``Arc2Face.parts()``.
    Settings as in ``arc2face_loop``; ``delta`` a conditioning-space offset (77, H)."""
    ids = torch.as_tensor(x).float()
    uncond = None
    if float(guidance) > 1.0:
        uncond = _call(parts["uncond"], ids[:1])[:1] if "uncond" in parts else None
    if delta is not None:
        delta = torch.as_tensor(delta).float()
    return arc2face_loop(parts, ids, seed=seed, uncond=uncond, steps=steps, guidance=guidance,
                         scheduler=scheduler, scheduler_config=scheduler_config, size=size,
                         latent_channels=latent_channels, vae_scale=vae_scale, delta=delta,
                         callback=callback)


def _pipeline_settings(model: "Arc2Face") -> dict:
    return model.loop_config()


PIPELINE = Pipeline(parts={"encoder": lambda m: m.encoder,
                           "uncond": lambda m: UncondPart(m.uncond(), m.id_dim),
                           "unet": lambda m: UNetPart(m.unet),
                           "vae_decoder": lambda m: VaeDecoderPart(m.vae)},
                    loop="arc2face", settings=_pipeline_settings)


# ----------------------------------------------------------------------------------------------
# Building and loading


def _text_model(config: Mapping):
    t = _transformers()
    return t.CLIPTextModel(t.CLIPTextConfig(**dict(config)))


def prompt_token_ids(tokenizer) -> tuple[list[int], int, list[int]]:
    """(prompt ids (77,), index of the "id" token, empty-prompt ids (77,)) from a CLIP tokenizer,
    tokenised as the official pipeline does (max_length padding, truncation)."""
    kw = dict(padding="max_length", max_length=MAX_LENGTH, truncation=True)
    ids = list(tokenizer(PROMPT, **kw)["input_ids"])
    uncond = list(tokenizer("", **kw)["input_ids"])
    word = tokenizer.encode(ID_WORD, add_special_tokens=False)
    if len(word) != 1 or ids.count(word[0]) != 1 or len(ids) != MAX_LENGTH:
        raise CheckpointError(f"the tokenizer does not make {ID_WORD!r} one token occurring once in "
                              f"{PROMPT!r} ({MAX_LENGTH} tokens); is it SD-1.5's CLIP tokenizer?")
    return ids, ids.index(word[0]), uncond


def placeholder_token_ids(vocab_size: int) -> tuple[list[int], int, list[int]]:
    """Token ids for a model built without a tokenizer (random weights, e.g. speed benchmarks):
    BOS = vocab-2, the five prompt words as ids 1..5, EOS/padding = vocab-1. Speed does not
    depend on them; a model loaded from folders takes them from its tokenizer."""
    bos, eos = vocab_size - 2, vocab_size - 1
    ids = [bos, 1, 2, 3, 4, 5] + [eos] * (MAX_LENGTH - 6)
    return ids, TINY_WORDS.index(ID_WORD) + 1, [bos] + [eos] * (MAX_LENGTH - 1)


def tiny_vocab() -> dict[str, int]:
    """The tiny CLIP BPE vocabulary: characters, the merges' intermediates, the prompt's words
    (with CLIP's end-of-word marker) and the two special tokens, numbered in that order."""
    vocab: dict[str, int] = {}
    for w in TINY_WORDS:
        for c in w[:-1]:
            vocab.setdefault(c, len(vocab))
        vocab.setdefault(w[-1] + "</w>", len(vocab))
    for piece in _tiny_merges_pieces():
        vocab.setdefault(piece, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def _tiny_merges() -> list[tuple[str, str]]:
    merges = []
    for w in TINY_WORDS:
        if len(w) == 1:
            continue
        left = w[0]
        for k in range(1, len(w)):
            right = w[k] + ("</w>" if k == len(w) - 1 else "")
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
    return merges


def _tiny_merges_pieces() -> list[str]:
    return [a + b for a, b in _tiny_merges()]


def tiny_token_ids() -> tuple[list[int], int, list[int]]:
    """What the tiny tokenizer (``write_tiny_tokenizer``) gives for the prompt and the empty one."""
    v = tiny_vocab()
    bos, eos = v["<|startoftext|>"], v["<|endoftext|>"]
    words = [v[w + "</w>"] for w in TINY_WORDS]
    ids = [bos, *words, eos] + [eos] * (MAX_LENGTH - len(words) - 2)
    return ids, 1 + TINY_WORDS.index(ID_WORD), [bos, eos] + [eos] * (MAX_LENGTH - 2)


def write_tiny_tokenizer(folder: str | Path) -> Path:
    """Write a CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json) whose
    vocabulary covers the Arc2Face prompt; loads with transformers' CLIPTokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tiny_vocab(), indent=1))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _tiny_merges()))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}, indent=1))
    return folder


def build_arc2face(unet_config: Mapping, text_config: Mapping, vae_config: Mapping, *,
                   token_ids: tuple[list[int], int, list[int]], id_dim: int,
                   scheduler_config: Mapping | None = None, spec: ModelSpec = SPEC) -> Arc2Face:
    """Random-weight Arc2Face from configs (the real diffusers / transformers classes)."""
    d = _diffusers()
    unet = d.UNet2DConditionModel(**dict(unet_config))
    vae = d.AutoencoderKL(**dict(vae_config))
    encoder = IdEncoder(_text_model(text_config), token_ids[0], token_ids[1], token_ids[2], id_dim=id_dim)
    return Arc2Face(encoder, unet, vae, scheduler_config, spec=spec)


def tiny_text_config() -> dict:
    v = tiny_vocab()
    return {**TINY_TEXT_CONFIG, "vocab_size": len(v), "bos_token_id": v["<|startoftext|>"],
            "eos_token_id": v["<|endoftext|>"], "pad_token_id": v["<|endoftext|>"]}


def _layout_error(what: str) -> RtkitError:
    return RtkitError(f"{what}; {EXPECTED_LAYOUT}")


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _layout_error(f"{path}: unreadable config ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise _layout_error(f"{path}: not a JSON object")
    return cfg


def _weights(folder: Path, names: Sequence[str]) -> Path:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    raise _layout_error(f"{folder}: no weights ({' or '.join(names)}) found")


def _need_dir(path: Path, what: str, required: str | None = "config.json") -> Path:
    if not path.is_dir():
        raise _layout_error(f"missing {what} folder {path}")
    if required and not (path / required).is_file():
        raise _layout_error(f"missing {path / required}")
    return path


def _diffusers_model(cls, folder: Path, class_name: str, what: str):
    cfg = _read_json(folder / "config.json")
    if cfg.get("_class_name", class_name) != class_name:
        raise _layout_error(f"{folder / 'config.json'} describes a {cfg.get('_class_name')}, {what} "
                            f"must be a {class_name}")
    try:
        model = cls.from_config(cfg)
    except Exception as e:  # diffusers raises plain ValueError/TypeError on bad configs
        raise _layout_error(f"{folder / 'config.json'}: cannot build a {class_name} ({e})") from None
    path = _weights(folder, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"))
    load_state_dict_strict(model, read_checkpoint(path), name=f"arc2face {what}", path=path)
    return model


def _load_text_encoder(folder: Path):
    t = _transformers()
    cfg = _read_json(folder / "config.json")
    if cfg.get("model_type") != "clip_text_model" or "hidden_size" not in cfg:
        raise _layout_error(f"{folder / 'config.json'} is not a CLIP text model config "
                            f"(model_type {cfg.get('model_type')!r})")
    known = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    model = t.CLIPTextModel(t.CLIPTextConfig(**known))
    path = _weights(folder, ("model.safetensors", "pytorch_model.bin"))
    sd = read_checkpoint(path)
    own = model.state_dict()
    # Published files (transformers 4.x) prefix "text_model."; 5.x holds the tower directly.
    fixed = {}
    for k, v in sd.items():
        k2 = k if k in own else (k[len("text_model."):] if k.startswith("text_model.") else "text_model." + k)
        if k2 not in own and k2.endswith("position_ids"):
            continue  # a buffer older versions saved; rebuilt here
        fixed[k2 if k2 in own else k] = v
    load_state_dict_strict(model, fixed, name="arc2face encoder (CLIPTextModel)", path=path)
    return model


def load_arc2face(models: str | Path, base: str | Path, *, id_dim: int = ID_DIM) -> Arc2Face:
    """Arc2Face from the official folders: ``models``/arc2face (UNet), ``models``/encoder (CLIP
    text encoder), and the SD-1.5 ``base`` folder's vae/, tokenizer/, scheduler/. Any missing or
    wrong piece raises one RtkitError naming it and the expected layout."""
    d, t = _diffusers(), _transformers()
    models, base = Path(models), Path(base)
    for p, what in ((models, "models"), (base, "SD-1.5 base")):
        if not p.is_dir():
            raise _layout_error(f"{what} folder {p} does not exist")
    unet = _diffusers_model(d.UNet2DConditionModel, _need_dir(models / "arc2face", "arc2face (UNet)"),
                            "UNet2DConditionModel", "the arc2face/ UNet")
    text = _load_text_encoder(_need_dir(models / "encoder", "encoder (CLIP text encoder)"))
    vae = _diffusers_model(d.AutoencoderKL, _need_dir(base / "vae", "vae"), "AutoencoderKL", "the base vae/")
    tok_dir = _need_dir(base / "tokenizer", "tokenizer", None)
    if not ((tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file()) \
            and not (tok_dir / "tokenizer.json").is_file():
        raise _layout_error(f"{tok_dir}: no vocab.json + merges.txt (or tokenizer.json)")
    try:
        tokenizer = t.CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as e:  # tokenizers raise assorted exception types on bad files
        raise _layout_error(f"{tok_dir}: cannot load a CLIP tokenizer ({type(e).__name__}: {e})".split("\n")[0]) from None
    sched_cfg = _read_json(_need_dir(base / "scheduler", "scheduler", "scheduler_config.json") / "scheduler_config.json")
    encoder = IdEncoder(text, *prompt_token_ids(tokenizer), id_dim=id_dim)
    return Arc2Face(encoder, unet.eval(), vae.eval(), sched_cfg)


def save_layout(model: Arc2Face, models: str | Path, base: str | Path, *, tokenizer_dir: str | Path | None = None) -> None:
    """Write ``model`` in the official layout (the files ``load_arc2face`` reads): UNet and VAE as
    diffusers folders, the encoder as the published ``pytorch_model.bin`` ("text_model."-prefixed
    keys), SD-1.5-style scheduler config; ``tokenizer_dir`` is copied to base/tokenizer."""
    from safetensors.torch import save_file

    models, base = Path(models), Path(base)
    for folder, m in ((models / "arc2face", model.unet), (base / "vae", model.vae)):
        folder.mkdir(parents=True, exist_ok=True)
        m.save_config(folder)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()},
                  str(folder / "diffusion_pytorch_model.safetensors"))
    enc = models / "encoder"
    enc.mkdir(parents=True, exist_ok=True)
    text = model.encoder.text_model
    cfg = text.config.to_dict()
    cfg["architectures"] = ["CLIPTextModel"]
    (enc / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
    prefix = "" if hasattr(text, "text_model") else "text_model."
    torch.save({prefix + k: v for k, v in text.state_dict().items()}, enc / "pytorch_model.bin")
    (base / "scheduler").mkdir(parents=True, exist_ok=True)
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=1))
    if tokenizer_dir is not None:
        dst = base / "tokenizer"
        dst.mkdir(parents=True, exist_ok=True)
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                (dst / f.name).write_bytes(f.read_bytes())


def load_checkpoint(model: Arc2Face, path: str | Path) -> None:
    """Registry loader: a whole-module state dict (rtkit's own save). Official weights come as
    folders: ``create("arc2face", models=<models>, base=<sd15>)``."""
    model.load_whole(path)


@register_model("arc2face", spec=SPEC, loader=load_checkpoint, pipeline=PIPELINE,
                description="Arc2Face ID-conditioned generator (SD-1.5 UNet + CLIP text encoder), 512x512")
def arc2face(models: str | Path | None = None, base: str | Path | None = None, id_dim: int = ID_DIM) -> nn.Module:
    """Official weights with ``models`` and ``base``; random full-size weights without (benchmarks)."""
    if models is not None or base is not None:
        if models is None or base is None:
            raise _layout_error("Arc2Face needs both the models folder and the SD-1.5 base folder")
        return load_arc2face(models, base, id_dim=id_dim)
    return build_arc2face(SD15_UNET_CONFIG, CLIP_L14_TEXT_CONFIG, SD15_VAE_CONFIG,
                          token_ids=placeholder_token_ids(CLIP_L14_TEXT_CONFIG["vocab_size"]), id_dim=id_dim)


@register_model("arc2face_tiny", spec=TINY_SPEC, loader=load_checkpoint, tiny=True, pipeline=PIPELINE,
                description="Arc2Face at tiny widths (32x32 images, 64-d IDs, 2-layer CLIP), for tests")
def arc2face_tiny(models: str | Path | None = None, base: str | Path | None = None,
                  id_dim: int = TINY_ID_DIM) -> nn.Module:
    if models is not None or base is not None:
        if models is None or base is None:
            raise _layout_error("Arc2Face needs both the models folder and the SD-1.5 base folder")
        model = load_arc2face(models, base, id_dim=id_dim)
        model.spec = TINY_SPEC
        return model
    return build_arc2face(TINY_UNET_CONFIG, tiny_text_config(), TINY_VAE_CONFIG, token_ids=tiny_token_ids(),
                          id_dim=id_dim, spec=TINY_SPEC)


__all__ = ["Arc2Face", "IdEncoder", "UNetPart", "VaeDecoderPart", "UncondPart", "arc2face_loop",
           "arc2face_pipeline_loop", "PIPELINE", "LOOP_SETTINGS", "make_scheduler",
           "load_arc2face", "save_layout", "build_arc2face", "causal_mask", "prompt_token_ids",
           "placeholder_token_ids", "tiny_token_ids", "tiny_vocab", "tiny_text_config",
           "write_tiny_tokenizer", "PROMPT", "ID_DIM", "TINY_ID_DIM", "DEFAULT_STEPS", "DEFAULT_GUIDANCE",
           "DEFAULT_SCHEDULER", "IMAGE_SIZE", "SD15_SCHEDULER_CONFIG", "SD15_UNET_CONFIG",
           "CLIP_L14_TEXT_CONFIG", "SD15_VAE_CONFIG", "TINY_UNET_CONFIG", "TINY_VAE_CONFIG",
           "SPEC", "TINY_SPEC", "EXPECTED_LAYOUT"]
