"""The batched torch image contract (runtime/gpu_image.py) against the converter's OpenCV path.

On real sample faces (the procedural world's PNGs, decoded by the CPU source), for every resize
policy, shrinking and enlarging, RGB and BGR, both value ranges. Measured on this CPU with
OpenCV 4.11 (max over 16 faces; "levels" are 8-bit steps, 1/255 of the range):
- preprocess: bit-identical float32 where the geometry is the identity or an INTER_AREA shrink
  of both axes (x2, 112->80); elsewhere max 1 level, on 0.05-4 % of values (OpenCV's
  fixed-point bilinear weights and the warp's rounding ties);
- postprocess (to uint8, then back to the source frame): max 1 level, on 0-11 % of pixels
  (most where restoring means a bilinear enlarge, e.g. 56->112).
Without the 1/32-pixel coordinate rounding that warpAffine does, the template warp differs by up
to 5 levels at edges: the tests would catch a grid that drops it.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rtkit.engines.spec import ModelSpec
from rtkit.runtime.gpu_image import (as_frames, postprocess_batch, preprocess_batch, resize_mode,
                                     to_uint8_nhwc)
from rtkit.runtime.sources import DecodeError, decode_image

from rtkit.datasets.sample import make_sample_dataset

from rtkit.runtime.image import postprocess, preprocess


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> np.ndarray:
    paths = make_sample_dataset(tmp_path_factory.mktemp("faces"), identities=4, per_identity=4, seed=3)
    return np.stack([decode_image(p) for p in paths])


def _sources(faces: np.ndarray, kind: str) -> np.ndarray:
    if kind == "112":
        return faces
    if kind == "112x100":  # a narrower crop: the width grows, the height stays
        return np.ascontiguousarray(faces[:, :, 6:106])
    # 120 high, 100 wide: one axis shrinks and one grows (OpenCV's mixed INTER_AREA weights)
    return np.stack([cv2.resize(f, (100, 120), interpolation=cv2.INTER_LINEAR) for f in faces])


WARP512 = dict(input_size=(512, 512), alignment="ffhq512", resize="warp")
CASES = {  # name: (spec, source kind, requested output size or None for the source's)
    "resize-same": (ModelSpec(input_size=(112, 112)), "112", None),
    "resize-shrink-x2": (ModelSpec(input_size=(56, 56)), "112", None),
    "resize-shrink-112-80": (ModelSpec(input_size=(80, 80)), "112", None),
    "resize-enlarge-256-bgr": (ModelSpec(input_size=(256, 256), channels="BGR"), "112", None),
    "resize-enlarge-256-range01": (ModelSpec(input_size=(256, 256), value_range=(0.0, 1.0)), "112", None),
    "resize-mixed-120x100": (ModelSpec(input_size=(112, 112)), "120x100", None),
    "resize-enlarge-width": (ModelSpec(input_size=(112, 112)), "112x100", None),
    "resize-out-64": (ModelSpec(input_size=(112, 112)), "112", (64, 64)),
    "resize-256-out-200x160": (ModelSpec(input_size=(256, 256)), "112", (200, 160)),
    "native-multiple-3": (ModelSpec(input_size=None, resize="native", size_multiple=3), "112", None),
    "warp-ffhq512": (ModelSpec(**WARP512), "112", None),
    "warp-ffhq512-bgr-out-128": (ModelSpec(**WARP512, channels="BGR"), "112", (128, 128)),
    "warp-ffhq32-shrink": (ModelSpec(input_size=(32, 32), alignment="ffhq512", resize="warp"), "112", None),
}
BIT_IDENTICAL_PRE = {"resize-same", "resize-shrink-x2", "resize-shrink-112-80", "resize-out-64"}


def _levels(spec: ModelSpec) -> float:
    lo, hi = spec.value_range
    return 255.0 / (hi - lo)


@pytest.mark.parametrize("case", list(CASES))
def test_preprocess_matches_the_opencv_path_within_one_level(faces, case):
    spec, kind, _ = CASES[case]
    imgs = _sources(faces, kind)
    ref = np.stack([preprocess(im, spec) for im in imgs])
    x = preprocess_batch(as_frames(imgs), spec)
    assert x.dtype == torch.float32 and tuple(x.shape) == ref.shape
    diff = np.abs(x.numpy() - ref) * _levels(spec)
    assert diff.max() <= 1.0 + 1e-4, f"{case}: max {diff.max():.3f} levels"
    assert np.mean(diff > 1e-3) < 0.05, f"{case}: {np.mean(diff > 1e-3):.3%} of values differ"
    if case in BIT_IDENTICAL_PRE:
        np.testing.assert_array_equal(x.numpy(), ref)


@pytest.mark.parametrize("case", list(CASES))
def test_postprocess_matches_the_opencv_path_within_one_level(faces, case):
    spec, kind, size = CASES[case]
    imgs = _sources(faces, kind)
    x = np.stack([preprocess(im, spec) for im in imgs])
    lo, hi = spec.value_range
    # A model output with the faces' structure, noise, and values past the range (saturation).
    rng = np.random.default_rng(0)
    y = (x * 1.1 + rng.normal(0, 0.02 * (hi - lo), x.shape)).astype(np.float32)
    out_hw = size or imgs.shape[1:3]
    ref = np.stack([postprocess(v, spec, out_hw) for v in y])
    out = postprocess_batch(torch.from_numpy(y), spec, out_hw)
    assert out.dtype == torch.uint8 and tuple(out.shape) == ref.shape and out.is_contiguous()
    diff = np.abs(out.numpy().astype(int) - ref.astype(int))
    assert diff.max() <= 1, f"{case}: max {diff.max()} levels"
    assert np.mean(diff > 0) < 0.15, f"{case}: {np.mean(diff > 0):.3%} of pixels differ"


def test_resize_modes_follow_the_converter_choice():
    assert resize_mode((112, 112), (112, 112)) is None
    assert resize_mode((112, 112), (256, 256)) == "linear"
    assert resize_mode((112, 112), (56, 80)) == "area"
    assert resize_mode((120, 100), (112, 112)) == "area_mixed"


def test_to_uint8_rounds_half_to_even_saturates_and_maps_nan_to_zero():
    spec = ModelSpec(value_range=(0.0, 255.0))
    y = torch.tensor([0.5, 1.5, 2.5, -3.0, 300.0, float("nan")]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = to_uint8_nhwc(y.contiguous(), spec)
    assert out[0, 0, :, 0].tolist() == [0, 2, 2, 0, 255, 0]


def test_model_dtype_and_channels_last(faces):
    spec = ModelSpec(input_size=(112, 112))
    ref = preprocess_batch(as_frames(faces[:4]), spec)
    x = preprocess_batch(as_frames(faces[:4]), spec, dtype="fp16", channels_last=True)
    assert x.dtype == torch.float16
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.float(), ref, atol=1e-3, rtol=0)


def test_native_engine_rejects_another_size(faces):
    spec = ModelSpec(input_size=(128, 128), resize="native")
    with pytest.raises(DecodeError, match="native"):
        preprocess_batch(as_frames(faces[:2]), spec)


def test_frames_from_lists_arrays_and_bad_input(faces):
    a = as_frames(list(faces[:3]))
    b = as_frames(faces[:3])
    assert a.dtype == torch.uint8 and tuple(a.shape) == (3, 112, 112, 3)
    assert torch.equal(a, b)
    assert tuple(as_frames(faces[0]).shape) == (1, 112, 112, 3)
    with pytest.raises(ValueError, match="uint8 NHWC"):
        as_frames(faces[:2].astype(np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["resize-enlarge-256-bgr", "resize-shrink-112-80", "warp-ffhq512"])
def test_cuda_gives_the_cpu_results(faces, case):
    spec, kind, size = CASES[case]
    imgs = _sources(faces, kind)
    cpu = preprocess_batch(as_frames(imgs), spec)
    gpu = preprocess_batch(as_frames(imgs, "cuda"), spec)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max().item() * _levels(spec) <= 1.0 + 1e-4
    out_hw = size or imgs.shape[1:3]
    o_cpu = postprocess_batch(cpu, spec, out_hw)
    o_gpu = postprocess_batch(gpu, spec, out_hw)
    assert (o_gpu.cpu().int() - o_cpu.int()).abs().max().item() <= 1


def test_converter_with_torch_image_ops_matches_opencv_and_keeps_the_job_semantics(tmp_path):
    """rt-convert --image-ops torch (what runs on a GPU) on the CPU: outputs within one 8-bit level
    of the OpenCV path; sharded == unsharded; a kill -9 and a resume give the uninterrupted bytes."""
    import signal
    import subprocess
    import sys
    import time

    from rtkit.runtime.converter import convert

    src = tmp_path / "src"
    make_sample_dataset(src, identities=6, per_identity=6, seed=4)
    a = convert("render2photo", src, tmp_path / "cv2", progress=False, size=(96, 96), image_ops="cv2")
    b = convert("render2photo", src, tmp_path / "torch", progress=False, size=(96, 96), image_ops="torch")
    assert "torch" in b.source and a.converted == b.converted == 36
    worst = 0
    for p in (tmp_path / "cv2").rglob("*.png"):
        x = decode_image(p).astype(int)
        y = decode_image(tmp_path / "torch" / p.relative_to(tmp_path / "cv2")).astype(int)
        worst = max(worst, int(np.abs(x - y).max()))
    assert worst <= 1, worst
    for i in range(2):
        convert("render2photo", src, tmp_path / "sharded", progress=False, size=(96, 96), image_ops="torch",
                shard=(i, 2))
    reference = {p.relative_to(tmp_path / "torch"): p.read_bytes() for p in (tmp_path / "torch").rglob("*.png")}
    assert {p.relative_to(tmp_path / "sharded"): p.read_bytes()
            for p in (tmp_path / "sharded").rglob("*.png")} == reference
    cmd = [str(Path(sys.executable).parent / "rt-convert"), "--engine", "render2photo", str(src),
           str(tmp_path / "killed"), "--size", "96", "--image-ops", "torch", "--batch-size", "4", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((tmp_path / "killed").rglob("*.png"))) < 8:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert {p.relative_to(tmp_path / "killed"): p.read_bytes()
            for p in (tmp_path / "killed").rglob("*.png")} == reference
