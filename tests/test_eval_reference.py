"""rtkit.eval numbers against the references that define them, on the same scores/embeddings.

- bob.measure itself (far_threshold, farfrr, eer_threshold, eer): score sets with ties across
  and within classes, duplicated top impostors, targets below 1/#impostors, tiny sets.
- insightface's verification (calculate_roc) spelled out: mean TPR/FPR over folds, the
  training accuracy at each chosen threshold.
- insightface's eval_ijbc.py arithmetic for image features, template pooling and pair scores,
  bit for bit, and the IJB-C scoring benchmark's own check at a small scale.
"""
from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rtkit.eval import ijbc, roc, verification

bm = pytest.importorskip("bob.measure")

REPO = Path(__file__).resolve().parents[1]


def _score_sets():
    rng = np.random.default_rng(7)
    sets = {
        "continuous": (rng.normal(size=3000), rng.normal(size=200) + 2.0),
        "ties across classes": (np.round(rng.normal(size=2000), 1),
                                np.round(rng.normal(size=300) + 1.0, 1)),
        "integer scores": (rng.integers(0, 6, 500).astype(float),
                           rng.integers(3, 9, 80).astype(float)),
        "duplicated top impostors": (np.r_[rng.normal(size=997), [4.0, 4.0, 4.0]],
                                     rng.normal(size=50) + 3.0),
        "genuine below impostors": (rng.normal(size=400) + 5.0, rng.normal(size=40)),
        "tiny": (np.array([0.3, 0.1]), np.array([0.2])),
        "all equal": (np.full(20, 0.5), np.full(5, 0.5)),
    }
    return sets


SETS = _score_sets()


def _targets(n_neg: int) -> list[float]:
    # IJB-C's targets, exact multiples of 1/n, between them, below 1/n, and the ends.
    targets = [*roc.FMR_TARGETS, 0.0, 1 / n_neg, 0.5 / n_neg, 1.5 / n_neg, 3 / n_neg, 0.5,
               1 - 1e-17, 1 - 2.3e-16, 1 - 1e-15, 1.0]
    return [t for t in targets if t <= 1.0]


@pytest.mark.parametrize("name", list(SETS))
def test_far_threshold_and_farfrr_equal_bob_measure(name):
    neg, pos = SETS[name]
    for t in _targets(neg.size):
        thr = roc.far_threshold(neg, t)
        assert thr == bm.far_threshold(neg, pos, t), (name, t)
        assert roc.farfrr(neg, pos, thr) == tuple(bm.farfrr(neg, pos, thr)), (name, t)
    for thr in (-np.inf, np.inf, float(np.median(neg)), float(pos[0])):
        assert roc.farfrr(neg, pos, thr) == tuple(bm.farfrr(neg, pos, thr))


@pytest.mark.parametrize("name", list(SETS))
def test_eer_equals_bob_measure(name):
    neg, pos = SETS[name]
    assert roc.eer_threshold(neg, pos) == bm.eer_threshold(neg, pos)
    e = roc.eer(neg, pos)
    assert (e.eer, e.fmr, e.fnmr) == tuple(bm.eer(neg, pos, also_farfrr=True))
    assert e.threshold == bm.eer_threshold(neg, pos)


def test_evaluate_scores_bob_convention_equals_bob_measure():
    """Through the one-sort path the ROC evaluation uses, on IJB-C-like imbalance."""
    rng = np.random.default_rng(3)
    neg = np.round(rng.normal(size=200_000), 3)
    pos = np.round(rng.normal(size=400) + 3.0, 3)
    labels = np.r_[np.zeros(neg.size, int), np.ones(pos.size, int)]
    doc = roc.evaluate_scores(labels, np.r_[neg, pos])
    for t in roc.FMR_TARGETS:
        p = doc["operating_points"]["bob_measure"][roc.fmr_key(t)]
        thr = bm.far_threshold(neg, pos, t)
        far, frr = bm.farfrr(neg, pos, thr)
        assert (p["threshold"], p["fmr"], p["fnmr"], p["tar"]) == (thr, far, frr, 1 - frr)
        assert doc["tar_at_fmr"]["bob_measure"][roc.fmr_key(t)] == 1 - frr
    e, far, frr = bm.eer(neg, pos, also_farfrr=True)
    assert doc["eer"] == {"eer": e, "threshold": bm.eer_threshold(neg, pos), "fmr": far,
                          "fnmr": frr}


def test_bob_rule_is_not_the_any_score_rule():
    """The rule once mislabelled as bob.measure's took the lowest score of either class with
    FMR <= target, which can be a genuine score: here TAR 1/3 where bob.measure says 0."""
    neg = np.arange(1.0, 11.0)            # 10 impostors: 1 .. 10
    pos = np.array([9.5, 8.5, 7.5])
    labels = np.r_[np.zeros(10, int), np.ones(3, int)]
    doc = roc.evaluate_scores(labels, np.r_[neg, pos], targets=(0.1,))
    assert bm.far_threshold(neg, pos, 0.1) == 10.0
    assert doc["tar_at_fmr"]["bob_measure"]["1e-01"] == 0.0
    full = roc.roc_curve(labels, np.r_[neg, pos], drop_intermediate=False)
    assert roc.roc_on_grid(full, [0.1])[0] == pytest.approx(1 / 3)   # the envelope, for plots only
    # A target below 1 / #impostors: just above the highest impostor.
    above = np.nextafter(10.0, 11.0)
    assert roc.far_threshold(neg, 0.05) == above == bm.far_threshold(neg, pos, 0.05)


def test_roc_grid_from_points_equals_full_curve():
    rng = np.random.default_rng(1)
    for decimals in (0, 2, 8):
        labels = (rng.random(30_000) < 0.05).astype(int)
        scores = np.round(rng.normal(size=labels.size) + 2.0 * labels, decimals)
        doc = roc.evaluate_scores(labels, scores)
        full = roc.roc_curve(labels, scores, drop_intermediate=False)
        np.testing.assert_array_equal(doc["roc"]["tpr"], roc.roc_on_grid(full, roc.ROC_GRID))


def test_roc_input_errors():
    with pytest.raises(ValueError, match="NaN"):
        roc.evaluate_scores([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        roc.far_threshold([0.1, 0.2], 1.5)
    with pytest.raises(ValueError, match="at least 2"):
        roc.far_threshold([0.1], 0.1)
    with pytest.raises(ValueError):
        roc.eer([], [0.3])


# -- insightface verification: the fold quantities --------------------------------------------

def _calculate_roc_reference(dist, issame, n_folds=10):
    """insightface's calculate_roc spelled out: per fold, accuracy of every threshold on the
    training folds, TPR/FPR of every threshold on the test fold."""
    from sklearn.model_selection import KFold

    thresholds = np.arange(0, 4, 0.01)

    def rates(th, d, same):
        pred = np.less(d, th)
        tp = np.sum(pred & same)
        fp = np.sum(pred & ~same)
        tn = np.sum(~pred & ~same)
        fn = np.sum(~pred & same)
        tpr = 0 if tp + fn == 0 else float(tp) / float(tp + fn)
        fpr = 0 if fp + tn == 0 else float(fp) / float(fp + tn)
        return tpr, fpr, float(tp + tn) / d.size

    tprs = np.zeros((n_folds, thresholds.size))
    fprs = np.zeros((n_folds, thresholds.size))
    acc, train_best = np.zeros(n_folds), []
    for f, (train, test) in enumerate(KFold(n_splits=n_folds, shuffle=False).split(dist)):
        acc_train = np.array([rates(t, dist[train], issame[train])[2] for t in thresholds])
        best = int(np.argmax(acc_train))
        train_best.append(acc_train[best])
        for i, t in enumerate(thresholds):
            tprs[f, i], fprs[f, i], _ = rates(t, dist[test], issame[test])
        acc[f] = rates(thresholds[best], dist[test], issame[test])[2]
    return np.mean(tprs, 0), np.mean(fprs, 0), acc, train_best


def test_fold_tpr_fpr_means_and_train_accuracies_match_insightface():
    rng = np.random.default_rng(4)
    n, d = 400, 16
    same = rng.random(n) < 0.5
    same[:40] = False  # the first fold has no genuine pair: insightface counts its TPR as 0
    base = rng.normal(size=(n, d))
    emb = np.empty((2 * n, d))
    emb[0::2] = base + 0.6 * rng.normal(size=(n, d))
    other = rng.normal(size=(n, d))
    emb[1::2] = np.where(same[:, None], base + 0.6 * rng.normal(size=(n, d)), other)
    emb = verification.l2_normalize(emb)
    dist = verification.pair_distances(emb)
    tpr, fpr, acc, train_best = _calculate_roc_reference(dist, same)
    res = verification.fold_accuracy(emb, same)
    np.testing.assert_array_equal(res.tpr, tpr)
    np.testing.assert_array_equal(res.fpr, fpr)
    assert res.fold_accuracies == acc.tolist() and res.fold_train_accuracies == train_best
    assert (res.accuracy, res.std) == (np.mean(acc), np.std(acc))


def test_one_fold_is_refused():
    emb = verification.l2_normalize(np.random.default_rng(0).normal(size=(40, 4)))
    for folds in (1, 0, -3):
        with pytest.raises(verification.BenchmarkError, match="2 or more folds"):
            verification.fold_accuracy(emb, np.ones(20, bool), n_folds=folds)
    with pytest.raises(verification.BenchmarkError, match="cannot be split"):
        verification.fold_accuracy(emb[:8], np.ones(4, bool), n_folds=10)


# -- IJB-C arithmetic ---------------------------------------------------------------------------

def test_image_features_bit_identical_to_eval_ijbc():
    rng = np.random.default_rng(5)
    n, d = 20_000, 8  # more rows than one block
    img_feats = (rng.normal(size=(n, 2 * d)) * rng.uniform(1, 30, (n, 1))).astype(np.float32)
    faceness = rng.uniform(0.2, 1.0, n).astype(np.float32)
    views = np.stack([img_feats[:, :d], img_feats[:, d:]])
    for norm_score in (True, False):
        for detector in (True, False):
            # eval_ijbc.py step 3, as written there.
            x = img_feats[:, 0:d] + img_feats[:, d:]
            if not norm_score:
                x = x / np.sqrt(np.sum(x ** 2, -1, keepdims=True))
            if detector:
                x = x * faceness[:, np.newaxis]
            ours = ijbc.image_features(views, faceness, norm_weight=norm_score,
                                       faceness_weight=detector)
            assert ours.dtype == np.float32 and np.array_equal(ours, x)
    np.testing.assert_array_equal(ijbc.image_features(views[:1], faceness, faceness_weight=False),
                                  img_feats[:, :d])


def test_template_pooling_bit_identical_to_eval_ijbc_in_blocks():
    """More media than one pooling block holds, long videos: the official per-template loop."""
    from sklearn.preprocessing import normalize

    rng = np.random.default_rng(8)
    n = 14_000
    templates = rng.integers(0, 150, n) * 7 + 3
    medias = rng.integers(0, 6000, n)
    medias[:900] = 77  # one long video, its frames spread through the file
    feats = (rng.normal(size=(n, 8)) * rng.uniform(1, 40, (n, 1))).astype(np.float32)
    ids, ours = ijbc.template_features(feats, templates, medias)
    expected = np.zeros((ids.size, 8))
    for k, uqt in enumerate(ids):  # eval_ijbc.py image2template_feature
        (ind_t,) = np.where(templates == uqt)
        face, face_medias = feats[ind_t], medias[ind_t]
        parts = []
        for u, ct in zip(*np.unique(face_medias, return_counts=True)):
            (ind_m,) = np.where(face_medias == u)
            parts.append(face[ind_m] if ct == 1 else np.mean(face[ind_m], axis=0, keepdims=True))
        expected[k] = np.sum(np.array(parts), axis=0)
    assert np.array_equal(ours, normalize(expected))


def test_pair_scores_bit_identical_to_eval_ijbc():
    rng = np.random.default_rng(6)
    ids = np.sort(rng.choice(np.arange(1, 5000), 300, replace=False))
    feats = verification.l2_normalize(rng.normal(size=(300, 64)))
    t1, t2 = rng.choice(ids, 20_000), rng.choice(ids, 20_000)
    # eval_ijbc.py verification(): template2id table, (B, 1, D) gathers, sum over -1.
    template2id = np.zeros((max(ids) + 1, 1), dtype=int)
    template2id[ids, 0] = np.arange(ids.size)
    expected = np.zeros(t1.size)
    for lo in range(0, t1.size, 7000):
        s = np.arange(lo, min(lo + 7000, t1.size))
        expected[s] = np.sum(feats[template2id[t1[s]]] * feats[template2id[t2[s]]], -1).flatten()
    for workers, batch in ((1, 128), (2, 37), (3, 5000)):
        scores = ijbc.pair_scores(ids, feats, t1, t2, batch=batch, workers=workers)
        assert np.array_equal(scores, expected), (workers, batch)
    far_ids = ids * 10**9  # ids too large for a lookup table take the binary-search path
    assert np.array_equal(ijbc.pair_scores(far_ids, feats, t1 * 10**9, t2 * 10**9), expected)
    for bad in (-1, 5001, int(np.setdiff1d(np.arange(1, 5000), ids)[0])):
        with pytest.raises(verification.BenchmarkError, match=f"template {bad}"):
            ijbc.pair_scores(ids, feats, np.r_[t1[:5], bad], np.r_[t2[:5], ids[0]])


def test_arcface_template_is_insightfaces_float32():
    t96 = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                    [33.5493, 92.3655], [62.7299, 92.2041]], dtype=np.float32)
    t96[:, 0] += 8.0  # eval_ijbc.py's construction
    assert ijbc.ARCFACE_TEMPLATE.dtype == np.float32 and np.array_equal(ijbc.ARCFACE_TEMPLATE, t96)


def test_coincident_landmarks_give_a_blank_face():
    img = np.full((60, 60, 3), 200, np.uint8)
    out = ijbc.align_face(img, np.full((5, 2), 30.0, np.float32))
    assert out.shape == (112, 112, 3) and not out.any()


def test_ijbc_scoring_benchmark_is_bit_identical_at_small_scale():
    """The benchmark's synthetic IJB-C at 1/500 of the real size, with its --check."""
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ijbc_scoring.py"),
                          "--scale", "0.002", "--check", "--skip-bob"], capture_output=True,
                         text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "939 images, 46 templates" in out and "31,317 pairs" in out
    # bob.measure is compared in-process above (its numba compile would cost a second time).
    for stage in ("image features", "template features", "pair scores", "insightface TAR"):
        assert f"check {stage}: bit-identical" in out, out
    assert "peak RSS" in out and "scoring wall time" in out


# -- the .bin unpickler -------------------------------------------------------------------------

def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


BOMBS = {
    # bytearray(10**9) in 33 bytes: protocol 2, __builtin__.bytearray, an int, REDUCE.
    "bytearray": b"\x80\x02c__builtin__\nbytearray\nJ\x00\xca\x9a;\x85R.",
    "builtins bytearray": b"\x80\x04cbuiltins\nbytearray\nJ\x00\xca\x9a;\x85R.",
    # numpy's _reconstruct asked for a 10**9-element array.
    "array shape": (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
                    b"J\x00\xca\x9a;\x85c_codecs\nencode\nX\x01\x00\x00\x00bX\x06\x00\x00\x00"
                    b"latin1\x86R\x87R."),
    # numpy.ndarray itself called with a shape.
    "ndarray call": b"\x80\x02cnumpy\nndarray\nJ\x00\xca\x9a;\x85\x85R.",
}


def _object_array_bomb() -> bytes:
    """A genuine pickled object array whose state claims 10**9 elements for 2 items."""
    import pickle

    good = pickle.dumps(np.array([b"ab", b"cd"], dtype=object), protocol=2)
    bomb = good.replace(b"K\x01K\x02\x85", b"K\x01J\x00\xca\x9a;\x85")
    assert bomb != good
    return bomb


@pytest.mark.parametrize("name", [*BOMBS, "object array state"])
def test_allocation_bombs_are_refused_quickly_with_one_line(name, tmp_path):
    data = BOMBS[name] if name in BOMBS else _object_array_bomb()
    path = tmp_path / "bomb.bin"
    path.write_bytes(data)
    before, start = _rss_mib(), time.perf_counter()
    with pytest.raises(verification.BenchmarkError) as e:
        verification.load_bin(path)
    assert time.perf_counter() - start < 1.0
    assert _rss_mib() - before < 200  # nothing near 1 GB was allocated
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg and "refused" in msg, msg


def test_unpickler_keeps_loading_real_files_and_refusing_other_globals(tmp_path):
    import pickle

    images = [b"\xff\xd8first", b"\x89PNGsecond"]
    payloads = {
        "bytes p2": ((images, [True]), 2),
        "bytearray p2": (([bytearray(images[0]), images[1]], [True]), 2),
        "bytearray p5": (([bytearray(images[0]), images[1]], [True]), 5),
        "numpy p2": (([np.frombuffer(images[0], np.uint8), images[1]], np.array([True])), 2),
        "numpy p5": (([np.frombuffer(images[0], np.uint8).copy(), images[1]], np.array([True])), 5),
        "numpy bools": ((images, [np.bool_(True)]), 2),
    }
    for name, (obj, proto) in payloads.items():
        p = tmp_path / "ok.bin"
        p.write_bytes(pickle.dumps(obj, protocol=proto))
        vset = verification.load_bin(p)
        assert vset.images == images and vset.issame.tolist() == [True], name
    for module, name in (("builtins", "eval"), ("os", "system"), ("numpy", "load"),
                         ("numpy.core.multiarray", "frombuffer")):
        p = tmp_path / "global.bin"
        p.write_bytes(b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n.")
        with pytest.raises(verification.BenchmarkError, match=f"{module}.{name}"):
            verification.load_bin(p)
