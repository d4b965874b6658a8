"""The DALI source on CPU (device_id=None): same pixels as the CPU source, and a tree with bad
files yields every good file and records each bad one.

Measured here (DALI 2.4, OpenCV 4.11): PNG and JPEG (quality 95 and 75) decode to exactly the
pixels ``decode_bytes`` gives (max difference 0; both use libpng / libjpeg-turbo on the CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("nvidia.dali")

from rtkit.runtime.dali_source import DaliSource  # noqa: E402
from rtkit.runtime.sources import decode_image, walk_files  # noqa: E402

from rtkit.datasets.sample import make_sample_dataset


@dataclass
class Work:
    relpath: str


def _run(source: DaliSource, relpaths: list[str]):
    """(relpath -> frame, [(relpath, reason)], [batch image containers])."""
    frames, failures, containers = {}, [], []
    for items, images, failed in source.batches([Work(r) for r in relpaths], None, None):
        assert len(items) == len(images)
        containers.append(images)
        for it, img in zip(items, images):
            assert it.relpath not in frames
            frames[it.relpath] = np.asarray(img)
        failures += failed
    return frames, failures, containers


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faces")
    make_sample_dataset(root, identities=3, per_identity=5, seed=1)
    return root


def test_png_pixels_equal_the_cpu_source(sample_root):
    rels = walk_files(sample_root)[0]
    frames, failures, containers = _run(DaliSource(sample_root, batch_size=4), rels)
    assert failures == [] and sorted(frames) == rels
    for rel in rels:
        np.testing.assert_array_equal(frames[rel], decode_image(sample_root / rel))
    # all faces share a size: each batch comes as one NHWC array
    assert all(isinstance(c, np.ndarray) and c.ndim == 4 for c in containers)


@pytest.mark.parametrize("quality", [95, 75])
def test_jpeg_pixels_equal_the_cpu_source(sample_root, tmp_path, quality):
    rels = walk_files(sample_root)[0][:8]
    for rel in rels:
        target = tmp_path / Path(rel).with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), cv2.imread(str(sample_root / rel)), [cv2.IMWRITE_JPEG_QUALITY, quality])
    jpgs = walk_files(tmp_path)[0]
    frames, failures, _ = _run(DaliSource(tmp_path, batch_size=8), jpgs)
    assert failures == []
    for rel in jpgs:
        diff = np.abs(frames[rel].astype(int) - decode_image(tmp_path / rel).astype(int))
        assert diff.max() == 0, f"{rel}: max {diff.max()}"


def test_mixed_sizes_come_as_a_list(tmp_path):
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(112, 112), (64, 80), (112, 112)]):
        cv2.imwrite(str(tmp_path / f"{i}.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    rels = walk_files(tmp_path)[0]
    frames, failures, containers = _run(DaliSource(tmp_path, batch_size=3), rels)
    assert failures == [] and isinstance(containers[0], list)
    assert frames["1.png"].shape == (64, 80, 3)
    for rel in rels:
        np.testing.assert_array_equal(frames[rel], decode_image(tmp_path / rel))


def test_bad_files_are_recorded_and_every_good_file_is_decoded(sample_root, tmp_path):
    good = walk_files(sample_root)[0]
    for rel in good:
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((sample_root / rel).read_bytes())
    png = (sample_root / good[0]).read_bytes()
    jpg = cv2.imencode(".jpg", cv2.imread(str(sample_root / good[1])))[1].tobytes()
    corrupt = bytearray(png)  # sound container (signature, IEND), garbage inside: only decoding tells
    mid = len(corrupt) // 2
    corrupt[mid:mid + 40] = bytes(b ^ 0x5A for b in corrupt[mid:mid + 40])
    bad = {
        "0/zero.png": b"",
        "0/truncated.png": png[: len(png) // 2],
        "1/truncated.jpg": jpg[: len(jpg) // 2],
        "1/corrupt.png": bytes(corrupt),
        "2/not_an_image.png": b"this is a text file, not a PNG\n" * 20,
    }
    for rel, data in bad.items():
        (tmp_path / rel).write_bytes(data)
    rels = walk_files(tmp_path)[0]
    # corrupt.png lands in a DALI batch with good files: the batch fails, the pipeline is rebuilt
    source = DaliSource(tmp_path, batch_size=4)
    frames, failures, _ = _run(source, rels)
    assert sorted(frames) == good
    for rel in good:
        np.testing.assert_array_equal(frames[rel], decode_image(sample_root / rel))
    reasons = dict(failures)
    assert sorted(reasons) == sorted(bad) and len(failures) == len(bad)
    assert reasons["0/zero.png"] == "empty file (0 bytes)"
    assert "truncated PNG" in reasons["0/truncated.png"]
    assert "truncated JPEG" in reasons["1/truncated.jpg"]
    assert "corrupt image data" in reasons["1/corrupt.png"]
    assert "not an image" in reasons["2/not_an_image.png"]
    assert source.rebuilds == 1


def test_a_missing_file_is_recorded(sample_root):
    rels = walk_files(sample_root)[0][:2] + ["0/gone.png"]
    frames, failures, _ = _run(DaliSource(sample_root, batch_size=8), rels)
    assert len(frames) == 2
    assert failures == [("0/gone.png", "unreadable: No such file or directory")]


@pytest.mark.gpu
def test_mixed_decoder_on_a_gpu(sample_root):
    import torch

    rels = walk_files(sample_root)[0]
    source = DaliSource(sample_root, device="cuda", batch_size=8)
    for items, images, failures in source.batches([Work(r) for r in rels]):
        assert failures == [] and isinstance(images, torch.Tensor) and images.device.type == "cuda"
        for it, img in zip(items, images):
            np.testing.assert_array_equal(img.cpu().numpy(), decode_image(sample_root / it.relpath))
