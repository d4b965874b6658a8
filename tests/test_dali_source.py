"""The DALI source on CPU (device_id=None): same pixels as the CPU source, and a tree with bad
files yields every good file and records each bad one.

Measured here (DALI 2.4): PNG decodes to exactly the pixels of ``decode_bytes``; JPEG through
DALI's own decoder (``strict_jpeg=False``), quality 95 and 75, also exactly (max difference 0: both
are libjpeg-turbo on the CPU; nvJPEG on a GPU may differ by a level, not measured here).
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("nvidia.dali")

from rtkit.datasets.sample import make_sample_dataset  # noqa: E402
from rtkit.runtime.dali_source import DaliSource  # noqa: E402
from rtkit.runtime.sources import decode_image, walk_files  # noqa: E402


@dataclass
class Work:
    relpath: str
    src_sha256: str | None = None


def _run(source: DaliSource, relpaths: list[str]):
    """(relpath -> frame, [(relpath, reason)], [batch image containers], items yielded)."""
    frames, failures, containers, items_seen = {}, [], [], []
    for items, images, failed in source.batches([Work(r) for r in relpaths], None, None):
        assert len(items) == len(images)
        containers.append(images)
        for it, img in zip(items, images):
            assert it.relpath not in frames
            frames[it.relpath] = np.asarray(img)
            items_seen.append(it)
        failures += failed
    return frames, failures, containers, items_seen


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faces")
    make_sample_dataset(root, identities=3, per_identity=5, seed=1)
    return root


def test_png_pixels_equal_the_cpu_source(sample_root):
    import hashlib

    rels = walk_files(sample_root)[0]
    frames, failures, containers, items = _run(DaliSource(sample_root, batch_size=4), rels)
    assert failures == [] and sorted(frames) == rels
    for rel in rels:
        np.testing.assert_array_equal(frames[rel], decode_image(sample_root / rel))
    # all faces share a size: each batch comes as one NHWC array
    assert all(isinstance(c, np.ndarray) and c.ndim == 4 for c in containers)
    for it in items:  # the manifest's source identity: the digest of the bytes decoded
        assert it.src_sha256 == hashlib.sha256((sample_root / it.relpath).read_bytes()).hexdigest()


@pytest.mark.parametrize("quality", [95, 75])
def test_jpeg_pixels_of_dalis_decoder_equal_the_cpu_source(sample_root, tmp_path, quality):
    rels = walk_files(sample_root)[0][:8]
    for rel in rels:
        target = tmp_path / Path(rel).with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), cv2.imread(str(sample_root / rel)), [cv2.IMWRITE_JPEG_QUALITY, quality])
    jpgs = walk_files(tmp_path)[0]
    source = DaliSource(tmp_path, batch_size=8, strict_jpeg=False)  # DALI decodes the JPEGs
    frames, failures, _, _ = _run(source, jpgs)
    assert failures == [] and source.rebuilds == 0
    for rel in jpgs:
        diff = np.abs(frames[rel].astype(int) - decode_image(tmp_path / rel).astype(int))
        assert diff.max() == 0, f"{rel}: max {diff.max()}"


def test_mixed_sizes_come_as_a_list(tmp_path):
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(112, 112), (64, 80), (112, 112)]):
        cv2.imwrite(str(tmp_path / f"{i}.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    rels = walk_files(tmp_path)[0]
    frames, failures, containers, _ = _run(DaliSource(tmp_path, batch_size=3), rels)
    assert failures == [] and isinstance(containers[0], list)
    assert frames["1.png"].shape == (64, 80, 3)
    for rel in rels:
        np.testing.assert_array_equal(frames[rel], decode_image(tmp_path / rel))


def _png_with_bad_deflate_data(png: bytes) -> bytes:
    """Scramble the IDAT payload and give it a correct CRC: a sound container, only decoding fails."""
    pos = 8
    while True:
        length = int.from_bytes(png[pos:pos + 4], "big")
        if png[pos + 4:pos + 8] == b"IDAT":
            payload = bytearray(png[pos + 8:pos + 8 + length])
            mid = len(payload) // 2
            payload[mid:mid + 40] = bytes(b ^ 0x5A for b in payload[mid:mid + 40])
            chunk = (struct.pack(">I", length) + b"IDAT" + bytes(payload)
                     + struct.pack(">I", zlib.crc32(b"IDAT" + bytes(payload))))
            return png[:pos] + chunk + png[pos + 12 + length:]
        pos += 12 + length


def _bad_tree(sample_root: Path, root: Path) -> tuple[list[str], dict[str, bytes]]:
    good = walk_files(sample_root)[0]
    for rel in good:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((sample_root / rel).read_bytes())
    png = (sample_root / good[0]).read_bytes()
    jpg = cv2.imencode(".jpg", cv2.imread(str(sample_root / good[1])))[1].tobytes()
    bad_crc = bytearray(png)
    mid = len(bad_crc) // 2
    bad_crc[mid:mid + 40] = bytes(b ^ 0x5A for b in bad_crc[mid:mid + 40])
    bad = {
        "0/zero.png": b"",
        "0/truncated.png": png[: len(png) // 2],
        "1/truncated.jpg": jpg[: len(jpg) // 2],
        "1/bad_crc.png": bytes(bad_crc),
        "1/bad_deflate.png": _png_with_bad_deflate_data(png),  # passes the container check
        "2/not_an_image.png": b"this is a text file, not a PNG\n" * 20,
    }
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    return good, bad


def test_bad_files_are_recorded_and_every_good_file_is_decoded(sample_root, tmp_path):
    good, bad = _bad_tree(sample_root, tmp_path)
    rels = walk_files(tmp_path)[0]
    # bad_deflate.png reaches a DALI batch with good files: the batch fails, the pipeline is rebuilt
    source = DaliSource(tmp_path, batch_size=4)
    frames, failures, _, _ = _run(source, rels)
    assert sorted(frames) == good
    for rel in good:
        np.testing.assert_array_equal(frames[rel], decode_image(sample_root / rel))
    reasons = dict(failures)
    assert sorted(reasons) == sorted(bad) and len(failures) == len(bad)
    assert reasons["0/zero.png"] == "empty file (0 bytes)"
    assert "truncated PNG" in reasons["0/truncated.png"]
    assert "truncated JPEG" in reasons["1/truncated.jpg"]
    assert "bad CRC" in reasons["1/bad_crc.png"]
    assert "corrupt image data" in reasons["1/bad_deflate.png"]
    assert "not an image" in reasons["2/not_an_image.png"]
    assert source.rebuilds == 1


def test_without_strict_jpeg_a_truncated_jpeg_fails_in_dali_and_is_isolated(sample_root, tmp_path):
    good, bad = _bad_tree(sample_root, tmp_path)
    rels = walk_files(tmp_path)[0]
    source = DaliSource(tmp_path, batch_size=2, strict_jpeg=False)
    frames, failures, _, _ = _run(source, rels)
    assert sorted(frames) == good and sorted(dict(failures)) == sorted(bad)
    assert "truncated JPEG" in dict(failures)["1/truncated.jpg"]
    assert source.rebuilds == 2  # the batch with bad_deflate.png and the one with truncated.jpg


def test_strict_jpeg_refuses_corrupt_scan_data_like_the_cpu_source(sample_root, tmp_path):
    jpg = bytearray(cv2.imencode(".jpg", cv2.imread(str(sample_root / walk_files(sample_root)[0][0])))[1])
    mid = len(jpg) // 2
    for i in range(mid, mid + 60):  # garbage that keeps every marker intact
        jpg[i] = 0xFF if i % 2 else 0x00
    (tmp_path / "scan.jpg").write_bytes(bytes(jpg))
    frames, failures, _, _ = _run(DaliSource(tmp_path), ["scan.jpg"])
    assert frames == {} and "corrupt JPEG" in failures[0][1]


def test_a_missing_file_is_recorded(sample_root):
    rels = walk_files(sample_root)[0][:2] + ["0/gone.png"]
    frames, failures, _, _ = _run(DaliSource(sample_root, batch_size=8), rels)
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


def test_rt_convert_with_the_dali_source_equals_the_cpu_source(sample_root, tmp_path):
    """The converter through DALI (CPU-only here) writes the CPU source's bytes, records bad files
    with their reasons and says which source ran."""
    import shutil

    from rtkit.engines.render2photo import BUNDLED_ONNX
    from rtkit.runtime.converter import convert

    src = tmp_path / "src"
    shutil.copytree(sample_root, src)
    (src / "0" / "empty.png").write_bytes(b"")
    (src / "0" / "cut.png").write_bytes((src / "0" / "0.png").read_bytes()[:300])
    a = convert(BUNDLED_ONNX, src, tmp_path / "cpu", progress=False, processes=0)
    b = convert(BUNDLED_ONNX, src, tmp_path / "dali", progress=False, source="dali")
    assert b.source == "dali" and a.source == "cpu"
    assert b.converted == a.converted > 0 and b.failed == a.failed == 2
    for p in (tmp_path / "cpu").rglob("*.png"):
        assert p.read_bytes() == (tmp_path / "dali" / p.relative_to(tmp_path / "cpu")).read_bytes()
