"""rt-eval make-pairs (the .bin fold layout from an identity-folder tree), the report's
"only the columns that exist" rule, and one-line refusals of the verify options."""
from __future__ import annotations

import json
from collections import Counter

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rtkit.cli.eval import main
from rtkit.engines import create
from rtkit.eval import pairs, report, verification

RECOGNIZER = "iresnet_tiny"


def _tree(root, n_ids=24, per_id=4, size=32, seed=0):
    """``root/id<k>/<j>.png``: a smooth colour pattern per identity, with noise per image."""
    rng = np.random.default_rng(seed)
    for k in range(n_ids):
        base = cv2.resize(rng.uniform(0, 255, (4, 4, 3)).astype(np.float32), (size, size))
        d = root / f"id{k:02d}"
        d.mkdir(parents=True)
        for j in range(per_id if k % 5 else 1):  # every fifth identity has a single image
            img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(d / f"{j}.png"), img)
    (root / "stray.png").write_bytes(b"not part of any identity")
    return root


def _read(path):
    return verification.read_pairs(path)


def test_make_pairs_layout(tmp_path):
    root = _tree(tmp_path / "faces")
    out = tmp_path / "pairs.txt"
    res = pairs.make_pairs(root, out, folds=4, pairs_per_fold=10, seed=3)
    assert (res.pairs, res.identities) == (40, 24)
    listed = _read(out)
    assert len(listed) == 40
    identity = {}
    for f in range(4):
        block = listed[10 * f: 10 * (f + 1)]
        assert [same for _, _, same in block] == [True] * 5 + [False] * 5  # genuine half first
        people = set()
        for a, b, same in block:
            ia, ib = a.split("/")[0], b.split("/")[0]
            assert (ia == ib) == same and a != b
            people |= {ia, ib}
        for p in people:  # every identity belongs to one fold only
            assert identity.setdefault(p, f) == f
    assert max(Counter(frozenset((a, b)) for a, b, _ in listed).values()) == 1  # no pair twice
    assert all((root / a).is_file() and (root / b).is_file() for a, b, _ in listed)
    # The folds are exactly the contiguous folds of the protocol.
    for f, (_, test) in enumerate(verification.kfold_splits(40, 4)):
        assert test.tolist() == list(range(10 * f, 10 * (f + 1)))
    # Seeded: the same seed gives the same file, another seed another draw.
    again = tmp_path / "again.txt"
    pairs.make_pairs(root, again, folds=4, pairs_per_fold=10, seed=3)
    assert again.read_text() == out.read_text()
    pairs.make_pairs(root, again, folds=4, pairs_per_fold=10, seed=4)
    assert _read(again) != listed


def test_make_pairs_refuses_what_the_tree_cannot_hold(tmp_path):
    root = _tree(tmp_path / "faces", n_ids=10, per_id=2)
    out = tmp_path / "p.txt"
    with pytest.raises(verification.BenchmarkError, match="at least 20"):
        pairs.make_pairs(root, out, folds=10, pairs_per_fold=2)
    with pytest.raises(verification.BenchmarkError, match="genuine pairs"):
        pairs.make_pairs(root, out, folds=2, pairs_per_fold=20)
    with pytest.raises(verification.BenchmarkError, match="even"):
        pairs.make_pairs(root, out, folds=2, pairs_per_fold=3)
    with pytest.raises(verification.BenchmarkError, match="2 or more folds"):
        pairs.make_pairs(root, out, folds=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "loose.png").write_bytes(b"x")  # an image outside any identity folder
    with pytest.raises(verification.BenchmarkError, match="no identity folders"):
        pairs.make_pairs(empty, out)
    assert not out.exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(create(RECOGNIZER, pretrained=False).state_dict(), path)
    return path


def test_make_pairs_make_bin_verify_report_chain(tmp_path, checkpoint):
    """Custom benchmarks only: the report shows their columns and labels its average."""
    runner = CliRunner()
    root = _tree(tmp_path / "faces", size=112)
    bins = tmp_path / "bins"
    for name, seed in (("photo", 0), ("render", 1)):
        res = runner.invoke(main, ["make-pairs", str(root), str(tmp_path / f"{name}.txt"),
                                   "--folds", "4", "--pairs-per-fold", "6", "--seed", str(seed)])
        assert res.exit_code == 0 and "24 pairs in 4 folds" in res.output, res.output
        res = runner.invoke(main, ["make-bin", str(root), str(tmp_path / f"{name}.txt"),
                                   str(bins / f"{name}.bin")])
        assert res.exit_code == 0 and "24 pairs" in res.output, res.output
    out = tmp_path / "res.json"
    res = runner.invoke(main, ["verify", "-e", RECOGNIZER, "--checkpoint", str(checkpoint),
                               "--bin", str(bins / "photo.bin"), "--bin", str(bins / "render.bin"),
                               "--folds", "4", "--label", "raw", "--run", "1", "--no-cache",
                               "-q", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "of the 2 given: photo, render" in res.output
    doc = json.loads(out.read_text())
    b = doc["benchmarks"]["photo"]
    assert len(b["fold_train_accuracies"]) == 4 and len(b["roc_mean_over_folds"]["tpr"]) == 400
    res = runner.invoke(main, ["report", str(out), "--out", str(tmp_path / "rep"), "--no-plots"])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| training data | runs | photo | render | avg of 2 present (photo, render) |" in md
    assert "LFW" not in md and "AgeDB" not in md
    assert "not the five-benchmark average" in md
    mean = 100 * np.mean([doc["benchmarks"][n]["accuracy"] for n in ("photo", "render")])
    assert f"| raw | 1 | {100 * b['accuracy']:.2f} |" in md and f"{mean:.2f} |" in md


def test_report_columns_present_and_average_rule():
    def doc(label, run, accs):
        return {"kind": "verification", "label": label, "run": run,
                "benchmarks": {k: {"accuracy": v} for k, v in accs.items()}}

    five = {b: 0.5 + 0.1 * i for i, b in enumerate(verification.BENCHMARKS)}
    docs = [doc("a", "1", {**five, "mine": 0.99}), doc("b", "1", {"lfw": 0.9, "mine": 0.7})]
    cols = report.verification_columns(docs)
    assert [k for k, _ in cols] == [*verification.BENCHMARKS, "mine", "avg"]
    assert cols[-1][1] == "avg"  # all five present somewhere: the paper's average
    rows = report.verification_table(docs)
    assert rows[0]["columns"]["avg"][0] == pytest.approx(np.mean(list(five.values())))
    assert rows[1]["columns"]["avg"][2] == 0  # b lacks four of the five: no average
    docs = [doc("a", "1", {"lfw": 0.9, "mine": 0.7}), doc("a", "2", {"lfw": 0.8, "mine": 0.6})]
    cols = report.verification_columns(docs)
    assert cols == [("lfw", "LFW"), ("mine", "mine"), ("avg", "avg of 2 present (LFW, mine)")]
    mean, std, n = report.verification_table(docs)[0]["columns"]["avg"]
    assert n == 2 and mean == pytest.approx(0.75)
    assert std == pytest.approx(np.std([0.8, 0.7], ddof=1))


def test_verify_folds_below_two_is_one_line(tmp_path):
    runner = CliRunner()
    for folds in ("1", "0"):
        res = runner.invoke(main, ["verify", "-e", RECOGNIZER, "--bin", str(tmp_path / "x.bin"),
                                   "--folds", folds, "--no-cache", "-q"])
        assert res.exit_code == 1, res.output
        assert "2 or more folds" in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1


def test_bomb_bin_via_cli_is_one_line(tmp_path):
    bomb = tmp_path / "lfw.bin"
    bomb.write_bytes(b"\x80\x02c__builtin__\nbytearray\nJ\x00\xca\x9a;\x85R.")
    res = CliRunner().invoke(main, ["verify", "-e", RECOGNIZER, "--bin", str(bomb), "--no-cache",
                                    "-q"])
    assert res.exit_code == 1 and "bytearray(int)" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
