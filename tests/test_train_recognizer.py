"""Recognizer training: learning on the sample dataset, exact resume, official-format exports,
combined datasets, augmentation, DDP with two CPU processes, and the rt-train CLI.

One short training run (tiny AdaFace IR, 48x48 sample faces, 80 steps) is shared by the tests
that inspect its results; images are 48 pixels so the run stays within seconds on two cores.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner

from rtkit.engines import create
from rtkit.train.checkpointing import CheckpointDir, load_training_state
from rtkit.train.data import (AugmentConfig, EpochSampler, FaceFolderDataset, augment_face,
                              index_face_folders)
from rtkit.engines.card import read_card
from rtkit.engines.errors import RtkitError
from rtkit.train.distributed import init_distributed
from rtkit.train.heads import AdaFaceHead
from rtkit.train.images import to_model_input
from rtkit.train.optim import StepSchedule, decay_parameter_groups
from rtkit.train.recognizer import (BinVerifier, RecognizerConfig, RecognizerTrainer,
                                    load_trained_recognizer, official_backbone_file, trained_spec)

SIZE = 48
TRAIN_IDS, HELDOUT_IDS, PER_ID = 20, 10, 8
STEPS, RESUME_AT = 80, 37          # 5 steps per epoch: the resume point is mid-epoch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: as fast for these tiny networks on an idle machine, and 10-40x faster
    when other processes share the two cores (OpenMP threads then wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    """Sample faces: identities 0-19 for training, 20-29 held out for verification."""
    from rtkit.datasets.sample import make_sample_dataset

    base = tmp_path_factory.mktemp("faces")
    make_sample_dataset(base / "all", identities=TRAIN_IDS + HELDOUT_IDS, per_identity=PER_ID, size=SIZE)
    (base / "train").mkdir()
    (base / "heldout").mkdir()
    for i in range(TRAIN_IDS + HELDOUT_IDS):
        shutil.move(base / "all" / str(i), base / ("train" if i < TRAIN_IDS else "heldout") / str(i))
    return base


@pytest.fixture(scope="module")
def heldout_bin(sample_data):
    """A verification .bin of 250 genuine and 250 impostor pairs of held-out identities."""
    verification = pytest.importorskip("rtkit.eval.verification")
    root = sample_data / "heldout"
    images = sorted(f"{d.name}/{f.name}" for d in root.iterdir() for f in d.iterdir())
    ident = {p: p.split("/")[0] for p in images}
    pairs = list(itertools.combinations(images, 2))
    rng = random.Random(0)
    genuine = rng.sample([p for p in pairs if ident[p[0]] == ident[p[1]]], 250)
    impostor = rng.sample([p for p in pairs if ident[p[0]] != ident[p[1]]], 250)
    listed = [(a, b, 1) for a, b in genuine] + [(a, b, 0) for a, b in impostor]
    rng.shuffle(listed)
    pairs_file = sample_data / "pairs.txt"
    pairs_file.write_text("".join(f"{a} {b} {s}\n" for a, b, s in listed))
    out = sample_data / "heldout.bin"
    verification.build_bin(root, pairs_file, out)
    return out


def _config(data, **kw) -> RecognizerConfig:
    base = dict(data=[str(d) for d in data], backbone="adaface_tiny", image_size=SIZE, batch_size=32,
                epochs=16, milestones=(12,), workers=0, device="cpu", progress=False, log_every_steps=10,
                keep_checkpoints=0)
    base.update(kw)
    return RecognizerConfig(**base)


@pytest.fixture(scope="module")
def trained(sample_data, heldout_bin, tmp_path_factory):
    """80 steps of adaface_tiny + AdaFace head with a mid-epoch checkpoint and verification."""
    out = tmp_path_factory.mktemp("run")
    cfg = _config([sample_data / "train"], max_steps=STEPS, save_every_steps=RESUME_AT, workers=2,
                  val_bins=[str(heldout_bin)], val_every_steps=STEPS)
    losses = []
    trainer = RecognizerTrainer(cfg, out, on_step=lambda step, m: losses.append(m["loss"].item()), log=None)
    # Accuracy of the same network before training, through the same verification code.
    before = BinVerifier([heldout_bin], SIZE)(trainer.backbone, torch.device("cpu"), None, 64)
    summary = trainer.fit()
    return {"cfg": cfg, "out": out, "trainer": trainer, "losses": losses, "summary": summary,
            "before": before["val_heldout"], "after": summary["val_heldout"]}


def test_training_lowers_loss_and_verifies_heldout_identities(trained):
    losses = trained["losses"]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    before, after = trained["before"], trained["after"]
    print(f"\nloss {first:.3f} -> {last:.3f}; held-out verification {100 * before:.1f}% -> {100 * after:.1f}% "
          f"(chance 50%)")
    assert last < 0.5 * first
    # Chance is 50 %; the untrained network already separates some colours (about 77 % here).
    assert after >= 0.85
    assert after >= before + 0.05


def test_resume_gives_the_same_next_losses(trained, sample_data, tmp_path):
    """Resuming from the mid-epoch checkpoint reproduces the uninterrupted run's next losses,
    with a different number of decode workers (the data order and augmentation are keyed)."""
    ckpt = CheckpointDir(trained["out"] / "checkpoints").path(RESUME_AT)
    assert ckpt.is_file()
    cfg = _config([sample_data / "train"], max_steps=STEPS, val_bins=[])
    resumed = []
    trainer = RecognizerTrainer(cfg, tmp_path / "resumed", resume=ckpt,
                                on_step=lambda step, m: resumed.append((step, m["loss"].item())), log=None)
    assert trainer.step == RESUME_AT
    trainer.fit(until=RESUME_AT + 5)   # the same run (and schedule), stopped early
    steps = [s for s, _ in resumed]
    assert steps == list(range(RESUME_AT + 1, RESUME_AT + 6))
    expected = trained["losses"][RESUME_AT:RESUME_AT + 5]
    np.testing.assert_allclose([l for _, l in resumed], expected, rtol=0, atol=1e-6)


def test_checkpoint_holds_everything_for_resume(trained):
    state = load_training_state(CheckpointDir(trained["out"] / "checkpoints").path(RESUME_AT))
    assert state["step"] == RESUME_AT
    for key in ("backbone", "head", "optimizer", "scheduler", "scaler", "rng", "config"):
        assert key in state
    assert len(state["rng"]) == 1
    assert RecognizerConfig.from_dict(state["config"]) == trained["cfg"]


def test_official_adaface_checkpoint_round_trips_through_create(trained):
    out, trainer = trained["out"], trained["trainer"]
    card = read_card(out / "model.json")
    assert card.model == "adaface_tiny" and card.layout == "lightning" and card.weights == "model.ckpt"
    assert card.spec.input_size == (SIZE, SIZE) and card.overrides == {"input_size": SIZE}
    assert card.training["step"] == STEPS and card.training["head"]["name"] == "adaface"
    assert card.training["num_classes"] == TRAIN_IDS and card.training["config"]["image_size"] == SIZE
    raw = torch.load(out / "model.ckpt", weights_only=True)
    keys = raw["state_dict"].keys()
    assert all(k.startswith(("model.", "head.")) for k in keys) and "head.kernel" in keys

    x = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    reference = trainer.backbone.eval()(x)
    trainer.backbone.train()
    by_create = create(card.model, checkpoint=out / card.weights, **card.overrides)
    torch.testing.assert_close(by_create(x), reference, rtol=0, atol=0)
    for path in (out / "model.json", out / "model.ckpt"):
        by_card = load_trained_recognizer(path)
        torch.testing.assert_close(by_card(x), reference, rtol=0, atol=0)
        assert by_card.spec.channels == "BGR" and by_card.spec.input_size == (SIZE, SIZE)
    # The head part loads into the AdaFace head as AdaFace's own code would read it.
    head = AdaFaceHead.from_checkpoint(out / "model.ckpt")
    torch.testing.assert_close(head.kernel, trainer.head.kernel.detach())
    # Every checkpoint has its model card and official file beside it.
    ckdir = out / "checkpoints"
    assert (ckdir / f"{CheckpointDir.stem(RESUME_AT)}.json").is_file()
    assert (ckdir / f"{CheckpointDir.stem(RESUME_AT)}.ckpt").is_file()


@pytest.mark.parametrize("head", ["arcface", "cosface"])
def test_iresnet_with_margin_heads_exports_plain_state_dict(sample_data, tmp_path, head):
    cfg = _config([sample_data / "train"], backbone="iresnet_tiny", head=head, batch_size=16, max_steps=3)
    trainer = RecognizerTrainer(cfg, tmp_path, log=None)
    summary = trainer.fit()
    assert np.isfinite(summary["last_loss"])
    card = read_card(tmp_path / "model.json")
    assert card.layout == "state_dict" and card.weights == "model.pth" and summary["weights"].endswith("model.pth")
    assert card.training["head"]["name"] == head
    sd = torch.load(tmp_path / "model.pth", weights_only=True)
    assert set(sd) == set(trainer.backbone.state_dict())          # arcface_torch backbone.pth keys
    model = create("iresnet_tiny", checkpoint=tmp_path / "model.pth", input_size=SIZE)
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    torch.testing.assert_close(model(x), trainer.backbone.eval()(x), rtol=0, atol=0)


def test_official_backbone_file_layouts():
    from rtkit.train.heads import build_head

    ir = create("iresnet_tiny", pretrained=False)
    obj, suffix, layout = official_backbone_file(ir, build_head("arcface", 64, 5))
    assert (suffix, layout) == (".pth", "state_dict") and set(obj) == set(ir.state_dict())
    ada = create("adaface_tiny", pretrained=False)
    obj, suffix, layout = official_backbone_file(ada, build_head("adaface", 64, 5), epoch=2, step=10)
    assert (suffix, layout) == (".ckpt", "lightning") and obj["global_step"] == 10
    assert {k for k in obj["state_dict"] if k.startswith("model.")} == {f"model.{k}" for k in ada.state_dict()}


def test_log_csv_and_run_files(trained):
    out = trained["out"]
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for col in ("step", "epoch", "loss", "accuracy", "lr", "img_per_s", "val_heldout"):
        assert col in rows[0]
    train_rows = [r for r in rows if r["loss"]]
    assert [int(r["step"]) for r in train_rows][-1] == STEPS
    # lr of the logged step: 0.1 until the milestone at epoch 12 (step 60), then 0.01
    lr = {int(r["step"]): float(r["lr"]) for r in train_rows}
    assert lr[60] == pytest.approx(0.1) and lr[70] == pytest.approx(0.01)
    assert all(float(r["img_per_s"]) > 0 for r in train_rows)
    # accuracy: the nearest class centre (chance 1/20); it rises while the loss falls
    acc = [float(r["accuracy"]) for r in train_rows]
    assert acc[0] < 0.5 < acc[-1]
    run = json.loads((out / "config.json").read_text())
    assert RecognizerConfig.from_dict(run["config"]) == trained["cfg"]
    assert run["dataset"]["classes"] == TRAIN_IDS and run["dataset"]["images"] == TRAIN_IDS * PER_ID
    assert len((out / "classes.txt").read_text().splitlines()) == TRAIN_IDS
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["replicas_in_sync"]


def test_max_steps_scales_the_schedule_and_sizes_are_checked(sample_data, tmp_path):
    """A run cut to 40 of 80 steps by --max-steps puts its milestone (epoch 12 of 16) at step 30,
    as the full run puts it at 60; an image size that is not a multiple of 16 is refused in one line."""
    cfg = _config([sample_data / "train"], max_steps=40)
    trainer = RecognizerTrainer(cfg, tmp_path / "short", log=None)
    assert trainer.total_steps == STEPS and trainer.stop_step == 40
    assert trainer.schedule(29) == 1.0 and trainer.schedule(30) == pytest.approx(0.1)
    full = RecognizerTrainer(_config([sample_data / "train"]), tmp_path / "full", log=None)
    assert full.schedule(59) == 1.0 and full.schedule(60) == pytest.approx(0.1)
    with pytest.raises(RtkitError, match="multiple of 16"):
        RecognizerTrainer(_config([sample_data / "train"], image_size=56), tmp_path / "bad", log=None)
    res = CliRunner().invoke(__import__("rtkit.cli.train", fromlist=["main"]).main,
                             ["recognizer", "--data", str(sample_data / "train"), "--out", str(tmp_path / "c"),
                              "--image-size", "56", "--device", "cpu", "--threads", "1"])
    assert res.exit_code == 1 and "multiple of 16" in res.output and "Traceback" not in res.output


def test_truncated_jpeg_is_skipped_and_reported(sample_data, tmp_path):
    """A truncated JPEG in a training folder is never trained on: the dataset serves the next
    image (with that image's label) in its place, and rt-train names the file and lists it."""
    from rtkit.cli.train import main

    data = tmp_path / "data"
    for i in (0, 1):
        shutil.copytree(sample_data / "train" / str(i), data / str(i))
    good = cv2.imread(str(data / "0" / "0.png"))
    ok, jpg = cv2.imencode(".jpg", good)
    bad = data / "0" / "00_truncated.jpg"        # sorts first in identity 0
    bad.write_bytes(jpg.tobytes()[: len(jpg) // 2])
    index = index_face_folders([data])
    i_bad = [os.fsdecode(p) for p in index.paths].index(str(bad))
    ds = FaceFolderDataset(index, input_size=(SIZE, SIZE))
    img, label = ds[i_bad]
    nxt, nxt_label = ds[i_bad + 1]
    assert torch.equal(img, nxt) and label == nxt_label
    assert str(bad) in ds.skipped.skipped()

    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["recognizer", "--data", str(data), "--out", str(out), "--backbone", "adaface_tiny",
                                    "--image-size", str(SIZE), "--batch-size", "8", "--max-steps", "2",
                                    "--workers", "0", "--device", "cpu", "--no-progress", "--no-augment", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert f"skipping unreadable training image {bad}" in res.output and "truncated JPEG" in res.output
    assert "skipped 1 unreadable image(s)" in res.output
    assert (out / "skipped_images.txt").read_text().split("\t")[0] == str(bad)
    assert json.loads((out / "summary.json").read_text())["skipped_images"] == [str(bad)]


def test_ddp_with_two_cpu_processes(sample_data, tmp_path):
    """torchrun with 2 gloo processes through the CLI: shards, synced replicas, rank-0 files."""
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--no-python", sys.executable, "-c", "from rtkit.cli.train import main; main()",
           "recognizer", "--data", str(sample_data / "train"), "--out", str(out), "--backbone", "adaface_tiny",
           "--image-size", str(SIZE), "--batch-size", "8", "--max-steps", "4", "--save-every", "2",
           "--workers", "0", "--device", "cpu", "--no-progress", "--log-every", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_in_sync"] and summary["steps"] == 4
    run = json.loads((out / "config.json").read_text())
    assert run["dataset"]["global_batch"] == 16 and run["dataset"]["steps_per_epoch"] == 10
    state = load_training_state(CheckpointDir(out / "checkpoints").path(4))
    assert len(state["rng"]) == 2                                  # every rank's RNG for exact resume
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    create("adaface_tiny", checkpoint=out / "model.ckpt", input_size=SIZE)


def test_no_process_group_without_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed("cpu")
    assert not ctx.distributed and ctx.is_main and not dist.is_initialized()
    ctx.close()


# -- data ---------------------------------------------------------------------------------------

def _write_faces(root: Path, ids, per=2, value=0):
    for i in ids:
        (root / str(i)).mkdir(parents=True, exist_ok=True)
        for k in range(per):
            img = np.zeros((SIZE, SIZE, 3), np.uint8)
            img[..., 0], img[..., 1], img[..., 2] = 10 + value, 100, 200     # B, G, R as cv2 writes
            cv2.imwrite(str(root / str(i) / f"{k}.png"), img)


def test_datasets_combine_distinct_or_same_identities(tmp_path):
    _write_faces(tmp_path / "orig", [0, 1, 2, 10])
    _write_faces(tmp_path / "conv", [1, 2, 10, 11])
    roots = [tmp_path / "orig", tmp_path / "conv"]
    distinct = index_face_folders(roots)
    assert distinct.num_classes == 8 and len(distinct) == 16
    assert distinct.class_names[:4] == ["0/0", "0/1", "0/2", "0/10"]     # numeric order
    same = index_face_folders(roots, same_identities=True)
    assert same.class_names == ["0", "1", "2", "10", "11"]
    by_path = {os.fsdecode(p): int(l) for p, l in zip(same.paths, same.labels)}
    assert by_path[str(tmp_path / "orig" / "10" / "0.png")] == by_path[str(tmp_path / "conv" / "10" / "1.png")] == 3


def test_dataset_channel_order_range_and_keyed_augmentation(tmp_path):
    """Frames are RGB; the backbone's spec decides its input (AdaFace: BGR, IResNet: RGB, [-1, 1])."""
    _write_faces(tmp_path / "d", [0], per=1)
    index = index_face_folders([tmp_path / "d"])
    rgb, label = FaceFolderDataset(index, input_size=(SIZE, SIZE))[0]
    assert rgb.dtype == torch.uint8 and rgb.shape == (SIZE, SIZE, 3) and label == 0
    assert rgb[0, 0].tolist() == [200, 100, 10]
    batch = rgb[None]
    ada = to_model_input(batch, trained_spec(create("adaface_tiny", pretrained=False), SIZE))
    ir = to_model_input(batch, trained_spec(create("iresnet_tiny", pretrained=False), SIZE))
    expected = [v / 127.5 - 1 for v in (10, 100, 200)]
    assert ada.shape == (1, 3, SIZE, SIZE) and ada[0, :, 0, 0].tolist() == pytest.approx(expected)
    assert ir[0, :, 0, 0].tolist() == pytest.approx(expected[::-1])
    resized, _ = FaceFolderDataset(index, input_size=(32, 32))[0]
    assert resized.shape == (32, 32, 3)

    aug = FaceFolderDataset(index, input_size=(SIZE, SIZE), augment=AugmentConfig(crop_p=1, low_res_p=1, photometric_p=1),
                            seed=3)
    a, b, c = aug[(0, 5)][0], aug[(0, 5)][0], aug[(0, 6)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augmentations_each_do_their_part():
    rng = np.random.default_rng(0)
    img = (np.random.default_rng(1).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    off = AugmentConfig.none()
    assert np.array_equal(augment_face(img, rng, off), img)
    crop = augment_face(img, np.random.default_rng(2), AugmentConfig(crop_p=1, low_res_p=0, photometric_p=0, flip_p=0))
    kept = np.any(crop != 0, axis=2)
    assert 0 < kept.mean() < 1                                            # black outside a kept box
    assert np.array_equal(crop[kept], img[kept])
    low = augment_face(img, np.random.default_rng(3), AugmentConfig(crop_p=0, low_res_p=1, photometric_p=0, flip_p=0,
                                                                     low_res_side=(0.25, 0.25)))
    assert low.shape == img.shape and np.abs(np.diff(low.astype(float), axis=1)).mean() < \
        np.abs(np.diff(img.astype(float), axis=1)).mean()                 # detail lost
    flip = augment_face(img, rng, AugmentConfig(crop_p=0, low_res_p=0, photometric_p=0, flip_p=1))
    assert np.array_equal(flip, img[:, ::-1])
    grey = np.full((8, 8, 3), 128, np.uint8)
    photo = augment_face(grey, np.random.default_rng(4), AugmentConfig(crop_p=0, low_res_p=0, photometric_p=1, flip_p=0))
    assert photo.dtype == np.uint8 and photo.shape == grey.shape and not np.array_equal(photo, grey)


def test_epoch_sampler_shards_and_starts_mid_epoch():
    data = list(range(10))
    r0 = EpochSampler(data, num_replicas=2, rank=0, seed=1)
    r1 = EpochSampler(data, num_replicas=2, rank=1, seed=1)
    for s in (r0, r1):
        s.set_epoch(3)
    k0, k1 = list(r0), list(r1)
    assert {i for i, _ in k0} | {i for i, _ in k1} == set(data) and not {i for i, _ in k0} & {i for i, _ in k1}
    assert all(e == 3 for _, e in k0)
    r0.set_start(2)
    assert list(r0) == k0[2:] and len(r0) == 3
    r0.set_epoch(4)
    r0.set_start(0)
    assert list(r0) != k0                                                 # reshuffled per epoch


# -- optimisation pieces ----------------------------------------------------------------------------

def test_multistep_and_poly_schedules():
    ms = StepSchedule("multistep", steps_per_epoch=10, total_steps=300, milestones=(12, 20, 26))
    assert [ms(s) for s in (0, 119, 120, 199, 200, 260)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001])
    poly = StepSchedule("poly", steps_per_epoch=10, total_steps=100, warmup_steps=10, power=2)
    assert poly(0) == pytest.approx(0.1) and poly(9) == pytest.approx(1.0)
    assert poly(10) == pytest.approx(1.0) and poly(55) == pytest.approx(0.25) and poly(100) == 0


def test_weight_decay_skips_norm_layers_and_biases():
    from rtkit.train.heads import build_head

    backbone = create("adaface_tiny", pretrained=False)
    head = build_head("adaface", 64, 7)
    decay, no_decay = decay_parameter_groups([backbone, head], 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0
    decayed = {id(p) for p in decay["params"]}
    assert id(head.kernel) in decayed and id(backbone.input_layer[0].weight) in decayed
    assert id(backbone.input_layer[1].weight) not in decayed            # BatchNorm
    assert id(backbone.output_layer[3].bias) not in decayed              # Linear bias
    n = sum(1 for p in itertools.chain(backbone.parameters(), head.parameters()) if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == n


# -- CLI ----------------------------------------------------------------------------------------------

def test_cli_help_and_refusal_to_overwrite_a_run(trained, sample_data):
    from rtkit.cli.train import main

    runner = CliRunner()
    res = runner.invoke(main, ["recognizer", "--help"])
    assert res.exit_code == 0
    for opt in ("--data", "--same-identities", "--backbone", "--head", "--resume", "--val-bin", "--max-steps"):
        assert opt in res.output
    res = runner.invoke(main, ["recognizer", "--data", str(sample_data / "train"), "--out", str(trained["out"]),
                               "--backbone", "adaface_tiny", "--device", "cpu", "--threads", "1"])
    assert res.exit_code == 1 and "already has checkpoints" in res.output


@pytest.mark.slow
def test_paper_recipe_builds_and_steps_with_ir50(tmp_path):
    """The default config (AdaFace IR-50, AdaFace head, SGD groups, multistep) at 112 pixels."""
    _write_faces(tmp_path / "d", range(4), per=2)
    cfg = RecognizerConfig(data=[str(tmp_path / "d")], batch_size=4, workers=0, device="cpu", progress=False,
                           max_steps=1)
    assert (cfg.backbone, cfg.head, cfg.epochs, cfg.lr, cfg.milestones) == ("adaface_ir50", "adaface", 30, 0.1,
                                                                             (12, 20, 26))
    summary = RecognizerTrainer(cfg, tmp_path / "run", log=None).fit()
    assert np.isfinite(summary["last_loss"])
    create("adaface_ir50", checkpoint=tmp_path / "run" / "model.ckpt")
