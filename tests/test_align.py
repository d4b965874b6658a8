"""Alignment templates and batched warps (rtkit.engines.align)."""
import numpy as np
import pytest
import torch
from rtkit.engines.align import (
    ARCFACE_112,
    FFHQ_512,
    AffineWarp,
    apply_transform,
    arcface112_to_ffhq512,
    ffhq512_to_arcface112,
    inverse_warp_batch,
    invert_affine,
    similarity_transform,
    template_points,
    template_transform,
    warp_batch,
)


def rotation(angle, scale):
    c, s = np.cos(angle), np.sin(angle)
    return scale * np.array([[c, -s], [s, c]])


def test_similarity_transform_recovers_a_known_similarity_single_and_batched():
    pts = np.random.default_rng(0).uniform(0, 100, (5, 2))
    a = rotation(0.3, 1.7)
    dst = pts @ a.T + [3.0, -4.0]
    expected = np.c_[a, [3.0, -4.0]]
    np.testing.assert_allclose(similarity_transform(pts, dst), expected, atol=1e-9)
    batched = similarity_transform(np.stack([pts, pts]), np.stack([dst, pts]))
    np.testing.assert_allclose(batched[0], expected, atol=1e-9)
    np.testing.assert_allclose(batched[1], np.c_[np.eye(2), [0.0, 0.0]], atol=1e-9)


def test_similarity_transform_never_reflects():
    pts = np.random.default_rng(1).uniform(0, 100, (5, 2))
    m = similarity_transform(pts, pts * [-1.0, 1.0])  # a mirror image: the best fit is a rotation
    assert np.linalg.det(m[:, :2]) > 0


def test_templates_encode_the_documented_face_geometry():
    # eye distance / width and mouth height / height of the two crops
    assert (ARCFACE_112[1, 0] - ARCFACE_112[0, 0]) / 112 == pytest.approx(0.315, abs=0.002)
    assert (FFHQ_512[1, 0] - FFHQ_512[0, 0]) / 512 == pytest.approx(0.246, abs=0.002)
    assert ARCFACE_112[3:, 1].mean() / 112 == pytest.approx(0.82, abs=0.01)
    assert FFHQ_512[3:, 1].mean() / 512 == pytest.approx(0.72, abs=0.01)
    np.testing.assert_allclose(template_points("ffhq512", 256), FFHQ_512 / 2)


def test_arcface_template_lands_on_ffhq_template():
    m = template_transform("arcface112", 112, "ffhq512", 512)
    mapped = apply_transform(m, ARCFACE_112)
    # The templates are not exactly similar: the least-squares fit leaves up to ~8 px at 512.
    assert np.linalg.norm(mapped - FFHQ_512, axis=1).max() < 0.02 * 512
    # The eye centre lands within 2 px, the mouth centre within 6 px.
    np.testing.assert_allclose(mapped[:2].mean(0), FFHQ_512[:2].mean(0), atol=2.0)
    np.testing.assert_allclose(mapped[3:].mean(0), FFHQ_512[3:].mean(0), atol=6.0)


def _dots_image(points, size, radius=1.5):
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.zeros((size, size), np.float32)
    for x, y in points:
        img[(xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2] = 1.0
    return torch.from_numpy(img)[None, None].repeat(1, 3, 1, 1)


def _blob_centres(img, approx_points, window):
    """Intensity centroid of each blob near its expected position (x, y)."""
    a = img[0, 0].numpy()
    yy, xx = np.mgrid[0:a.shape[0], 0:a.shape[1]]
    out = []
    for x, y in approx_points:
        mask = (np.abs(xx - x) <= window) & (np.abs(yy - y) <= window)
        wgt = a * mask
        out.append([(wgt * xx).sum() / wgt.sum(), (wgt * yy).sum() / wgt.sum()])
    return np.array(out)


def test_warping_an_image_moves_arcface_landmarks_onto_the_ffhq_template():
    # Checks the pixel convention end to end: dots drawn at the ArcFace landmarks of a 112 crop
    # end up, after the batched warp, where the transform says (within a fraction of a pixel).
    img = _dots_image(ARCFACE_112, 112)
    drawn = _blob_centres(img, ARCFACE_112, window=4)  # rasterised dots sit up to 0.5 px off
    out = arcface112_to_ffhq512(img)
    assert out.shape == (1, 3, 512, 512)
    expected = apply_transform(template_transform("arcface112", 112, "ffhq512", 512), drawn)
    found = _blob_centres(out, expected, window=12)
    np.testing.assert_allclose(found, expected, atol=0.25)
    assert np.abs(found - FFHQ_512).max() < 8.0


def test_warp_then_inverse_warp_round_trips_the_face_region():
    torch.manual_seed(0)
    # A smooth random image (what bilinear resampling can carry without loss).
    img = torch.nn.functional.interpolate(torch.rand(2, 3, 14, 14) * 2 - 1, size=112, mode="bicubic",
                                          align_corners=False).clamp(-1, 1)
    m = template_transform("arcface112", 112, "ffhq512", 512)
    there = warp_batch(img, m, 512)
    back = inverse_warp_batch(there, m, 112)
    face = (slice(None), slice(None), slice(8, 104), slice(8, 104))
    assert (back - img)[face].abs().mean() < 0.01
    assert (back - img)[face].abs().max() < 0.1
    # The named helpers do the same pair of warps.
    back2 = ffhq512_to_arcface112(arcface112_to_ffhq512(img))
    torch.testing.assert_close(back2, back, atol=1e-5, rtol=0)


def test_per_sample_matrices_match_single_warps():
    torch.manual_seed(1)
    img = torch.rand(3, 3, 40, 40)
    ms = np.stack([np.c_[rotation(a, s), [2.0, -1.0]] for a, s in [(0.0, 1.0), (0.2, 0.5), (-0.3, 1.4)]])
    together = warp_batch(img, ms, 48)
    for i in range(3):
        torch.testing.assert_close(together[i:i + 1], warp_batch(img[i:i + 1], ms[i], 48), atol=1e-5, rtol=0)


def test_affine_warp_module_matches_warp_batch_and_adds_no_state():
    torch.manual_seed(2)
    img = torch.rand(2, 3, 112, 112) * 2 - 1
    m = template_transform("ffhq512", 112, "arcface112", 64)  # a shrinking warp: blurred first
    module = AffineWarp(m, 112, 64)
    assert module.state_dict() == {}
    torch.testing.assert_close(module(img), warp_batch(img, m, 64), atol=1e-5, rtol=0)
    np.testing.assert_allclose(invert_affine(invert_affine(m)), m, atol=1e-12)


def test_gray_padding_fills_outside_with_the_constant():
    img = torch.full((1, 3, 16, 16), -1.0)
    out = warp_batch(img, np.c_[np.eye(2) * 0.5, [0.0, 0.0]], 32, padding_mode="gray", fill=(0.2, 0.3, 0.4))
    torch.testing.assert_close(out[0, :, -1, -1], torch.tensor([0.2, 0.3, 0.4]))
    torch.testing.assert_close(out[0, :, 2, 2], torch.full((3,), -1.0))
