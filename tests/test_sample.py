"""The procedural sample dataset: layout, determinism, aligned styles, learnable identities, CLI."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from rtkit.cli.sample import main as sample_cli
from rtkit.engines.errors import RtkitError
from rtkit.datasets import sample
from rtkit.datasets.sample import (ARCFACE_112_LANDMARKS, face_landmarks, make_sample_dataset, render_face,
                                  render_pair)

N_IDS, N_SHOTS = 10, 8


@pytest.fixture(scope="module")
def pairs():
    """(render, photo) for 10 identities x 8 images, drawn once for the module."""
    return {(i, k): render_pair(i, k) for i in range(N_IDS) for k in range(N_SHOTS)}


def _read_rgb(path):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.dtype == np.uint8 and img.shape == (112, 112, 3), path
    return img[..., ::-1]


def test_layout_matches_digiface_and_files_equal_in_memory_images(tmp_path):
    paths = make_sample_dataset(tmp_path, identities=3, per_identity=2, seed=5)
    rel = sorted(p.relative_to(tmp_path).as_posix() for p in paths)
    assert rel == ["0/0.png", "0/1.png", "1/0.png", "1/1.png", "2/0.png", "2/1.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "2"]  # no stray temporary files
    np.testing.assert_array_equal(_read_rgb(tmp_path / "2" / "1.png"), render_face(2, 1, "render", seed=5))


def test_both_styles_write_two_trees_of_the_same_scenes(tmp_path):
    paths = make_sample_dataset(tmp_path, style="both", identities=2, per_identity=2)
    assert len(paths) == 8
    for style in ("render", "photo"):
        assert sorted(p.relative_to(tmp_path / style).as_posix()
                      for p in paths if p.parts[-3] == style) == ["0/0.png", "0/1.png", "1/0.png", "1/1.png"]
    render, photo = render_pair(1, 0)
    np.testing.assert_array_equal(_read_rgb(tmp_path / "render" / "1" / "0.png"), render)
    np.testing.assert_array_equal(_read_rgb(tmp_path / "photo" / "1" / "0.png"), photo)


def test_same_seed_gives_byte_identical_files_whatever_the_workers(tmp_path):
    a = make_sample_dataset(tmp_path / "a", style="both", identities=3, per_identity=2, seed=7, workers=1)
    sample.identity_traits.cache_clear()  # nothing may carry over between runs
    b = make_sample_dataset(tmp_path / "b", style="both", identities=3, per_identity=2, seed=7, workers=3)
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa
    c = make_sample_dataset(tmp_path / "c", identities=1, per_identity=1, seed=8)
    assert c[0].read_bytes() != (tmp_path / "a" / "render" / "0" / "0.png").read_bytes()


def test_render_face_shape_and_size_option():
    img = render_face(0, 0, "photo")
    assert img.shape == (112, 112, 3) and img.dtype == np.uint8
    big = render_face(0, 0, "render", size=224)
    assert big.shape == (224, 224, 3)
    # the geometry scales with the size: downsampled, the large image matches the small one
    small = cv2.resize(big, (112, 112), interpolation=cv2.INTER_AREA).astype(np.float32)
    assert np.abs(small - render_face(0, 0, "render")).mean() < 12


def test_landmarks_stay_near_the_arcface_template():
    for i in range(N_IDS):
        for k in range(N_SHOTS):
            lm = face_landmarks(i, k)
            assert lm.shape == (5, 2)
            assert np.abs(lm - ARCFACE_112_LANDMARKS).max() < 10, (i, k)


def test_eyes_and_mouth_are_drawn_at_the_landmarks(pairs):
    """In both styles the pupils are darker than the cheek and the mouth (lips, teeth or the
    open mouth) stands out from it."""
    hits = 0
    for (i, k), (render, photo) in pairs.items():
        lm = np.round(face_landmarks(i, k)).astype(int)
        for img in (render, photo):
            f = img.astype(np.float32)
            cheek = f[lm[0, 1] + 13:lm[0, 1] + 16, lm[0, 0] - 1:lm[0, 0] + 2].reshape(-1, 3).mean(0)
            pupils = [f[y - 1:y + 2, x - 1:x + 2].mean() for x, y in lm[:2]]
            mouth_y = (lm[3, 1] + lm[4, 1]) // 2
            mouth = f[mouth_y - 2:mouth_y + 3, lm[3, 0] + 4:lm[4, 0] - 3].reshape(-1, 3)
            hits += min(pupils) < cheek.mean() and np.abs(mouth - cheek).sum(1).mean() > 30
    assert hits >= 0.95 * 2 * len(pairs)


def _edges(img):
    g = cv2.GaussianBlur(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), 1.5)
    return np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))


def _ncc(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_styles_are_pixel_aligned_pairs(pairs):
    same, other, best_at_zero = [], [], 0
    for (i, k), (render, photo) in pairs.items():
        er, ep = _edges(render), _edges(photo)
        same.append(_ncc(er, ep))
        other.append(_ncc(er, _edges(pairs[(i, (k + 1) % N_SHOTS)][1])))
        crop = (slice(8, -8), slice(8, -8))
        shifted = [_ncc(er[crop], np.roll(ep, (dy, dx), (0, 1))[crop]) for dy in (-2, 0, 2) for dx in (-2, 0, 2)]
        best_at_zero += int(np.argmax(shifted) == 4)
    assert np.mean(same) > 0.75 and np.mean(other) < 0.5
    assert np.mean(np.array(same) > np.array(other)) > 0.95
    assert best_at_zero >= 0.95 * len(pairs)


def test_photo_style_has_texture_and_less_saturation(pairs):
    def median_abs_laplacian(img):
        return float(np.median(np.abs(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32),
                                                     cv2.CV_32F))))

    def saturation(img):
        return float(cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1].mean())

    render_hf = [median_abs_laplacian(r) for r, _ in pairs.values()]
    photo_hf = [median_abs_laplacian(p) for _, p in pairs.values()]
    assert max(render_hf) <= 1.0 < 2.0 <= min(photo_hf)  # flat regions stay flat only in renders
    sat_r = np.array([saturation(r) for r, _ in pairs.values()])
    sat_p = np.array([saturation(p) for _, p in pairs.values()])
    assert np.mean(sat_r > sat_p) > 0.9 and sat_r.mean() > sat_p.mean() + 15


def _features(img):
    """Downsampled face crop, standardised: what a nearest-centroid classifier sees."""
    x = cv2.resize(img[8:104, 16:96], (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    return x / 255.0


@pytest.mark.parametrize("style", [0, 1], ids=["render", "photo"])
def test_identities_are_learnable_from_single_images(pairs, style):
    """Nearest centroid on k < 6 classifies held-out k >= 6 of 10 identities far above chance (10%)."""
    feats = np.array([[_features(pairs[(i, k)][style]) for k in range(N_SHOTS)] for i in range(N_IDS)])
    centroids = feats[:, :6].mean(1)
    test = feats[:, 6:].reshape(-1, feats.shape[-1])
    labels = np.repeat(np.arange(N_IDS), N_SHOTS - 6)
    pred = ((test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    accuracy = float((pred == labels).mean())
    assert accuracy >= 0.6, accuracy


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(RtkitError, match="style"):
        render_face(0, 0, "cartoon")
    with pytest.raises(RtkitError, match="identity"):
        render_face(-1, 0)
    with pytest.raises(RtkitError, match="size"):
        render_face(0, 0, size=8)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RtkitError, match="not a folder"):
        make_sample_dataset(tmp_path / "file", identities=1, per_identity=1)
    with pytest.raises(RtkitError, match="style"):
        make_sample_dataset(tmp_path / "x", style="cartoon")


def test_cli_writes_both_styles_and_prints_one_line(tmp_path):
    result = CliRunner().invoke(sample_cli, [str(tmp_path / "out"), "--style", "both", "-n", "2", "-k", "3",
                                             "--seed", "4"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wrote 12 images")
    assert (tmp_path / "out" / "photo" / "1" / "2.png").is_file()
    np.testing.assert_array_equal(_read_rgb(tmp_path / "out" / "render" / "0" / "1.png"),
                                  render_face(0, 1, "render", seed=4))


def test_cli_help_and_usage_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(sample_cli, ["--help"])
    assert result.exit_code == 0
    for word in ("--style", "--identities", "--per-identity", "--seed", "DigiFace"):
        assert word in result.output
    assert runner.invoke(sample_cli, [str(tmp_path), "--style", "cartoon"]).exit_code == 1
    assert runner.invoke(sample_cli, [str(tmp_path), "--identities", "0"]).exit_code == 1
