"""rtkit.eval: verification .bin protocol, IJB-C 1:1, ROC/TAR@FMR, reports, embedding cache.

Numbers are checked against independent computations: sklearn's roc_curve and KFold, a
brute-force threshold scan, a per-template loop, and the tiny recognizer called directly.
"""
from __future__ import annotations

import csv
import json
import pickle
import warnings

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rtkit.engines import create
from rtkit.engines.errors import RtkitError
from rtkit.engines import align
from rtkit.eval import ijbc, report, results, roc, verification
from rtkit.eval.embed import Embedder, to_model_input

sklearn_metrics = pytest.importorskip("sklearn.metrics")
from sklearn.model_selection import KFold  # noqa: E402
from sklearn.preprocessing import normalize  # noqa: E402

RECOGNIZER = "iresnet_tiny"


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Weights of the tiny recognizer in a file, so every Embedder sees the same engine."""
    torch.manual_seed(0)
    model = create(RECOGNIZER, pretrained=False)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def identity_face(identity: int, size: int = 112) -> np.ndarray:
    """A smooth random RGB pattern per identity (a stand-in for an aligned face)."""
    rng = np.random.default_rng(1000 + identity)
    low = rng.uniform(0, 255, (7, 7, 3)).astype(np.float32)
    return cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)


def noisy(img: np.ndarray, seed: int, sigma: float = 12.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def bin_file(tmp_path_factory):
    """A 20-pair .bin built with build_bin from JPEG/PNG files and a pairs list."""
    root = tmp_path_factory.mktemp("bin")
    images = root / "images"
    for ident in range(5):
        (images / f"id{ident}").mkdir(parents=True)
        for k in range(3):
            ext = "png" if k == 2 else "jpg"
            cv2.imwrite(str(images / f"id{ident}" / f"{k}.{ext}"),
                        noisy(identity_face(ident), 10 * ident + k)[:, :, ::-1])
    rng = np.random.default_rng(0)
    lines = ["# relpath1 relpath2 same"]
    for n in range(20):
        a = int(rng.integers(5))
        b = a if n % 2 == 0 else (a + 1 + int(rng.integers(4))) % 5
        ka, kb = rng.choice(3, 2, replace=a != b)
        ea, eb = ("png" if ka == 2 else "jpg"), ("png" if kb == 2 else "jpg")
        lines.append(f"id{a}/{ka}.{ea} id{b}/{kb}.{eb} {int(a == b)}")
    pairs = root / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    out = root / "lfw.bin"
    assert verification.build_bin(images, pairs, out) == 20
    return out, images, pairs


def _run_model(ckpt, rgb_images: np.ndarray) -> np.ndarray:
    """Reference embeddings: the registered model called directly, insightface normalisation."""
    model = create(RECOGNIZER, checkpoint=ckpt)
    x = torch.from_numpy(rgb_images).permute(0, 3, 1, 2).float()
    x = ((x / 255) - 0.5) / 0.5
    with torch.no_grad():
        return model(x).numpy()


# -- ROC and TAR@FMR ---------------------------------------------------------------------------

def _random_scores(rng, n, decimals):
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.normal(size=n) + 1.5 * labels, decimals)  # rounding makes ties
    return labels, scores


@pytest.mark.parametrize("drop", [True, False])
def test_roc_curve_matches_sklearn(drop):
    rng = np.random.default_rng(0)
    for trial in range(40):
        labels, scores = _random_scores(rng, int(rng.integers(3, 2000)), int(rng.integers(0, 3)))
        if labels.min() == labels.max():
            continue
        fpr, tpr, thr = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=drop)
        curve = roc.roc_curve(labels, scores, drop_intermediate=drop)
        np.testing.assert_array_equal(curve.fpr, fpr)
        np.testing.assert_array_equal(curve.tpr, tpr)
        np.testing.assert_array_equal(curve.thresholds, thr)
        assert roc.auc(curve.fpr, curve.tpr) == pytest.approx(sklearn_metrics.auc(fpr, tpr), abs=1e-14)


def test_tar_at_fmr_conventions_against_references():
    rng = np.random.default_rng(1)
    labels = (rng.random(40_000) < 0.05).astype(int)
    scores = np.round(rng.normal(size=labels.size) + 2.5 * labels, 2)
    doc = roc.evaluate_scores(labels, scores)
    # insightface: flip sklearn's curve, take the first (= largest TPR) point nearest in FPR.
    fpr, tpr, _ = sklearn_metrics.roc_curve(labels, scores)
    fpr_f, tpr_f = fpr[::-1], tpr[::-1]
    for t in roc.FMR_TARGETS:
        expected = tpr_f[int(np.argmin(np.abs(fpr_f - t)))]
        assert doc["tar_at_fmr"]["insightface"][roc.fmr_key(t)] == expected
    for t in roc.FMR_TARGETS:  # the point insightface read is recorded with its index
        p = doc["operating_points"]["insightface"][roc.fmr_key(t)]
        assert (fpr[p["roc_index"]], tpr[p["roc_index"]]) == (p["fmr"], p["tar"])
        assert len(fpr) - 1 - p["roc_index"] == int(np.argmin(np.abs(fpr_f - t)))
    # bob.measure: brute force over the impostor scores (and just above the highest one).
    gen, imp = scores[labels == 1], scores[labels == 0]
    cand = np.r_[np.nextafter(imp.max(), np.inf), np.unique(imp)[::-1]]
    far = np.array([np.count_nonzero(imp >= c) / imp.size for c in cand])
    for t in roc.FMR_TARGETS:
        thr = cand[np.flatnonzero(far <= t)[-1]]
        p = doc["operating_points"]["bob_measure"][roc.fmr_key(t)]
        assert p["threshold"] == thr and p["fmr"] <= t
        assert doc["tar_at_fmr"]["bob_measure"][roc.fmr_key(t)] == 1 - np.count_nonzero(gen < thr) / gen.size
    assert doc["auc"] == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)
    assert doc["n_genuine"] == labels.sum() and doc["n_impostor"] == (labels == 0).sum()
    assert set(doc["conventions"]) == {"insightface", "bob_measure"}


# -- the 10-fold verification protocol ---------------------------------------------------------

@pytest.mark.parametrize("n", [10, 57, 600, 6000, 6001])
def test_kfold_splits_match_sklearn(n):
    ours = verification.kfold_splits(n, 10)
    theirs = list(KFold(n_splits=10, shuffle=False).split(np.arange(n)))
    assert len(ours) == len(theirs)
    for (a_train, a_test), (b_train, b_test) in zip(ours, theirs):
        np.testing.assert_array_equal(a_train, b_train)
        np.testing.assert_array_equal(a_test, b_test)


def _reference_accuracy(embeddings, issame):
    """The protocol spelled out with sklearn's KFold and a loop over thresholds."""
    thresholds = np.arange(0, 4, 0.01)
    dist = np.sum(np.square(embeddings[0::2] - embeddings[1::2]), 1)

    def acc(th, d, same):
        pred = np.less(d, th)
        tp = np.sum(pred & same)
        tn = np.sum(~pred & ~same)
        return float(tp + tn) / d.size

    accs = []
    for train, test in KFold(n_splits=10, shuffle=False).split(np.arange(len(issame))):
        train_acc = [acc(t, dist[train], issame[train]) for t in thresholds]
        accs.append(acc(thresholds[int(np.argmax(train_acc))], dist[test], issame[test]))
    return np.mean(accs), np.std(accs)


def test_fold_accuracy_matches_sklearn_reference_to_the_last_digit():
    rng = np.random.default_rng(3)
    for n, d, noise in ((600, 32, 0.8), (1003, 64, 1.5), (250, 8, 0.3)):
        base = rng.normal(size=(n, d))
        same = rng.random(n) < 0.5
        first = base + noise * rng.normal(size=(n, d))
        second = np.where(same[:, None], base + noise * rng.normal(size=(n, d)), rng.normal(size=(n, d)))
        view = np.empty((2 * n, d), np.float32)
        view[0::2], view[1::2] = first, second
        flipped = (view + 0.1 * rng.normal(size=view.shape)).astype(np.float32)
        # insightface: float64 sum of both views, sklearn normalize.
        expected_emb = normalize(view.astype(np.float64) + flipped.astype(np.float64))
        emb = verification.fuse_flip(np.stack([view, flipped]))
        np.testing.assert_array_equal(emb, expected_emb)
        mean, std = _reference_accuracy(expected_emb, same)
        res = verification.fold_accuracy(emb, same)
        assert (res.accuracy, res.std) == (mean, std)
        assert len(res.fold_accuracies) == len(res.fold_thresholds) == 10


# -- .bin files ---------------------------------------------------------------------------------

def test_build_bin_roundtrip(bin_file):
    path, images, pairs = bin_file
    vset = verification.load_bin(path)
    listed = verification.read_pairs(pairs)
    assert vset.n_pairs == 20 and len(vset.images) == 40
    assert vset.issame.tolist() == [same for _, _, same in listed]
    assert vset.images[0] == (images / listed[0][0]).read_bytes()  # stored as is
    assert vset.images[3] == (images / listed[1][1]).read_bytes()
    rgb = verification.decode_image(vset.images[0])
    assert rgb.shape == (112, 112, 3) and rgb.dtype == np.uint8
    # Python-2 style files (str images, encoding='bytes') load too.
    with open(path, "rb") as f:
        bins, issame = pickle.load(f)
    py2 = path.with_name("py2.bin")
    py2.write_bytes(pickle.dumps((list(bins), list(issame)), protocol=2))
    assert verification.load_bin(py2).images == vset.images


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo should-not-run",))


def test_corrupt_bin_gives_one_line_error(bin_file, tmp_path):
    good = bin_file[0].read_bytes()
    cases = {
        "truncated.bin": good[: len(good) // 2],
        "garbage.bin": b"this is not a pickle at all",
        "empty.bin": b"",
        "evil.bin": pickle.dumps(([_Evil()], [True])),
        "shape.bin": pickle.dumps(([b"x"] * 3, [True, False])),
        "type.bin": pickle.dumps({"a": 1}),
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(verification.BenchmarkError) as e:
            verification.load_bin(p)
        msg = str(e.value)
        assert str(p) in msg and "\n" not in msg, msg
    with pytest.raises(RtkitError, match="not found"):
        verification.load_bin(tmp_path / "missing.bin")
    # An image that is not decodable is reported with its index when embedding.
    bad = tmp_path / "badimg.bin"
    bad.write_bytes(pickle.dumps(([b"\xff\xd8junk", b"junk"], [True])))
    with pytest.raises(verification.BenchmarkError, match="image 0"):
        verification.decode_image(verification.load_bin(bad).images[0], what=f"{bad} image 0")


def test_pairs_file_errors(tmp_path):
    p = tmp_path / "pairs.txt"
    p.write_text("a.jpg b.jpg yes\n")
    with pytest.raises(verification.BenchmarkError, match=r"pairs.txt:1"):
        verification.read_pairs(p)
    (tmp_path / "img").mkdir()
    p.write_text("a.jpg b.jpg 1\n")
    with pytest.raises(verification.BenchmarkError, match="not found"):
        verification.build_bin(tmp_path / "img", p, tmp_path / "x.bin")


# -- model input contract -----------------------------------------------------------------------

def test_to_model_input_matches_insightface_and_swaps_bgr():
    from rtkit.engines import model_spec

    rgb = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    spec = model_spec(RECOGNIZER)
    x = to_model_input(rgb, spec)
    expected = ((torch.from_numpy(rgb).permute(2, 0, 1).float() / 255) - 0.5) / 0.5
    np.testing.assert_array_equal(x, expected.numpy())  # bit for bit
    bgr_spec = model_spec("adaface_tiny")
    assert bgr_spec.channels == "BGR"
    np.testing.assert_array_equal(to_model_input(rgb, bgr_spec), x[::-1])
    small = to_model_input(cv2.resize(rgb, (96, 96)), spec)  # resized to the spec's size
    assert small.shape == (3, 112, 112)


# -- end to end: verification -------------------------------------------------------------------

def test_verification_end_to_end_and_cache(bin_file, checkpoint, tmp_path):
    path = bin_file[0]
    cache = tmp_path / "cache"
    emb = Embedder(RECOGNIZER, checkpoint=checkpoint, cache_dir=cache, batch_size=16, workers=2,
                   progress=False)
    doc = verification.run_verification(emb, [path], label="synthetic", run="r1")
    assert emb.images_embedded == 40 and emb.cache_hits == 0
    b = doc["benchmarks"]["lfw"]
    assert doc["label"] == "synthetic" and doc["run"] == "r1" and doc["model"] == RECOGNIZER
    assert doc["checkpoint"] == str(checkpoint) and len(doc["engine_identity"]) == 64
    assert doc["average"] is None  # only one of the five benchmarks

    # The embeddings equal the model called directly on the decoded images (+ flips).
    vset = verification.load_bin(path)
    rgb = np.stack([verification.decode_image(d) for d in vset.images])
    ref0 = _run_model(checkpoint, rgb)
    ref1 = _run_model(checkpoint, np.ascontiguousarray(rgb[:, :, ::-1]))
    views = verification.embed_bin(emb, vset)
    np.testing.assert_allclose(views[0], ref0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(views[1], ref1, rtol=1e-4, atol=1e-5)
    mean, std = _reference_accuracy(normalize(views[0].astype(np.float64) + views[1]), vset.issame)
    assert (b["accuracy"], b["std"]) == (mean, std)
    assert b["pairs"] == 20 and b["sha256"] == vset.sha256

    # A fresh embedder for the same engine reads the cache: nothing is embedded again.
    again = Embedder(RECOGNIZER, checkpoint=checkpoint, cache_dir=cache, progress=False)
    doc2 = verification.run_verification(again, [path], label="synthetic", run="r1")
    assert again.images_embedded == 0 and again.cache_hits == 1
    assert doc2["benchmarks"] == doc["benchmarks"]
    assert len(list(cache.glob("*.npy"))) == 1
    # Without flip is another cache entry.
    verification.run_verification(again, [path], flip=False)
    assert again.images_embedded == 40 and len(list(cache.glob("*.npy"))) == 2


def test_plain_insightface_onnx_is_a_recognizer(checkpoint, bin_file, tmp_path):
    """An .onnx without rtkit metadata (insightface model zoo style) runs with the
    insightface input contract and gives the torch model's embeddings."""
    model = create(RECOGNIZER, checkpoint=checkpoint)
    onnx_path = tmp_path / "w600k_like.onnx"
    kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, 112, 112), str(onnx_path), input_names=["data"],
                          output_names=["fc1"], dynamic_axes={"data": {0: "n"}, "fc1": {0: "n"}},
                          opset_version=17, **kwargs)
    emb = Embedder(onnx_path, cache_dir=False, progress=False, batch_size=8)
    assert emb.spec.value_range == (-1.0, 1.0) and emb.spec.channels == "RGB"
    assert emb.runner.backend == "onnxruntime"
    vset = verification.load_bin(bin_file[0])
    views = emb.embed(8, lambda i: verification.decode_image(vset.images[i]), flip=False)
    rgb = np.stack([verification.decode_image(d) for d in vset.images[:8]])
    np.testing.assert_allclose(views[0], _run_model(checkpoint, rgb), rtol=1e-4, atol=1e-4)


def test_insightface_onnx_contract_from_graph():
    """Model-zoo graphs that normalise themselves (Sub and Mul first) take raw [0, 255]."""
    import onnx
    from onnx import TensorProto, helper

    from rtkit.eval.embed import insightface_onnx_spec

    def graph(first_ops):
        nodes, prev = [], "data"
        for i, op in enumerate(first_ops):
            nodes.append(helper.make_node(op, [prev, f"c{i}"], [f"t{i}"], name=f"{op}_{i}"))
            prev = f"t{i}"
        nodes.append(helper.make_node("Flatten", [prev], ["fc1"], name="flatten"))
        consts = [helper.make_tensor(f"c{i}", TensorProto.FLOAT, [], [1.0]) for i in range(len(first_ops))]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["n", 3, 112, 112])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["n", 37632])], consts)
        return helper.make_model(g)

    spec, name = insightface_onnx_spec(graph(["Sub", "Mul"]))
    assert spec.value_range == (0.0, 255.0) and name == "data" and spec.input_size == (112, 112)
    spec, _ = insightface_onnx_spec(graph(["Add"]))
    assert spec.value_range == (-1.0, 1.0) and spec.channels == "RGB" and spec.task == "embed"
    assert spec.output_dim == 37632
    onnx.checker.check_model(graph(["Sub", "Mul"]))


def test_translator_is_refused_as_recognizer():
    with pytest.raises(RtkitError, match="not a recognizer"):
        Embedder("render2photo_tiny", cache_dir=False).runner


# -- IJB-C --------------------------------------------------------------------------------------

N_IDS, PER_ID = 4, 5


@pytest.fixture(scope="module")
def ijbc_root(tmp_path_factory):
    """An IJB-C-format folder: loose crops at random similarity poses with their landmarks,
    two templates per identity (one with a 2-frame video media), all template pairs."""
    root = tmp_path_factory.mktemp("ijbc")
    (root / "meta").mkdir()
    (root / "loose_crop").mkdir()
    rng = np.random.default_rng(5)
    lm_lines, tm_lines, truth = [], [], {}
    for ident in range(N_IDS):
        for k in range(PER_ID):
            name = f"{ident * PER_ID + k + 1}.jpg"
            aligned = noisy(identity_face(ident), 100 * ident + k)
            angle, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.9, 1.4)
            m = np.array([[scale * np.cos(angle), -scale * np.sin(angle), rng.uniform(10, 30)],
                          [scale * np.sin(angle), scale * np.cos(angle), rng.uniform(10, 30)]])
            img = cv2.warpAffine(aligned, m, (180, 180), flags=cv2.INTER_CUBIC)
            cv2.imwrite(str(root / "loose_crop" / name), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 98])
            pts = ijbc.ARCFACE_TEMPLATE.astype(np.float64) @ m[:, :2].T + m[:, 2]
            score = rng.uniform(0.5, 1.0)
            lm_lines.append(name + " " + " ".join(f"{v:.4f}" for v in pts.ravel()) + f" {score:.4f}")
            template = ident * 10 + (1 if k < 3 else 2)
            media = ident * 100 + (0 if k < 2 else k)  # frames 0 and 1 share a media (video)
            tm_lines.append(f"{name} {template} {media}")
            truth[name] = identity_face(ident).astype(int)
    templates = sorted({int(line.split()[1]) for line in tm_lines})
    pairs = [f"{a} {b} {int(a // 10 == b // 10)}" for i, a in enumerate(templates)
             for b in templates[i + 1:]]
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(lm_lines) + "\n")
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(tm_lines) + "\n")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return root, truth


def test_similarity_transform_and_alignment(ijbc_root):
    root, truth = ijbc_root
    rng = np.random.default_rng(0)
    for _ in range(20):  # a known similarity is recovered exactly
        a, s, t = rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 5), rng.uniform(-200, 200, 2)
        m = np.array([[s * np.cos(a), -s * np.sin(a)], [s * np.sin(a), s * np.cos(a)]])
        src = rng.uniform(0, 300, (5, 2))
        est = align.similarity_transform(src, src @ m.T + t)
        np.testing.assert_allclose(est[:, :2], m, atol=1e-9)
        np.testing.assert_allclose(est[:, 2], t, atol=1e-7)
    skimage_transform = pytest.importorskip("skimage.transform")
    for _ in range(10):  # least squares on noisy points, as skimage's Umeyama estimate
        src = rng.uniform(0, 200, (5, 2))
        dst = ijbc.ARCFACE_TEMPLATE.astype(np.float64)
        tf = skimage_transform.SimilarityTransform()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # estimate() is deprecated in new skimage
            tf.estimate(src, dst)
        np.testing.assert_allclose(align.similarity_transform(src, dst), tf.params[:2], atol=1e-9)
    meta = ijbc.read_meta(root)
    for i in (0, 7):  # aligning a loose crop gives back the identity's aligned face
        m = align.similarity_transform(meta.landmarks[i], ijbc.ARCFACE_TEMPLATE)
        moved = meta.landmarks[i].astype(np.float64) @ m[:, :2].T + m[:, 2]
        np.testing.assert_allclose(moved, ijbc.ARCFACE_TEMPLATE, atol=1e-3)
        aligned = ijbc.load_aligned(meta, i).astype(int)[10:102, 10:102]
        own = np.abs(aligned - truth[meta.images[i]][10:102, 10:102]).mean()
        other = np.abs(aligned - identity_face(3 - i // PER_ID).astype(int)[10:102, 10:102]).mean()
        assert own < 8 and own < other / 4, (own, other)


def _reference_templates(feats, templates, medias):
    """Per-template loop: mean within each media id, sum over media, normalise."""
    ids = np.unique(templates)
    out = np.zeros((ids.size, feats.shape[1]))
    for n, t in enumerate(ids):
        rows = np.flatnonzero(templates == t)
        parts = [np.mean(feats[rows[medias[rows] == m]], axis=0) for m in np.unique(medias[rows])]
        out[n] = np.sum(np.array(parts), axis=0)
    return ids, normalize(out)


def test_template_pooling_matches_loop():
    rng = np.random.default_rng(2)
    n = 3000
    templates = rng.integers(0, 120, n) * 3 + 7
    medias = rng.integers(0, 200, n)
    feats = (rng.normal(size=(n, 32)) * rng.uniform(1, 40, (n, 1))).astype(np.float32)
    ids, tf = ijbc.template_features(feats, templates, medias)
    ref_ids, ref = _reference_templates(feats, templates, medias)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(tf, ref)  # float32 aggregation order reproduced exactly
    t1, t2 = rng.choice(ids, 5000), rng.choice(ids, 5000)
    scores = ijbc.pair_scores(ids, tf, t1, t2, batch=777)
    lookup = {t: i for i, t in enumerate(ids)}
    brute = np.array([tf[lookup[a]] @ tf[lookup[b]] for a, b in zip(t1, t2)])
    np.testing.assert_allclose(scores, brute, atol=1e-12)


def test_ijbc_end_to_end(ijbc_root, checkpoint, tmp_path):
    root, _ = ijbc_root
    emb = Embedder(RECOGNIZER, checkpoint=checkpoint, cache_dir=tmp_path / "cache", batch_size=8,
                   workers=2, progress=False)
    doc, curve = ijbc.run_ijb(emb, root, "IJBC", label="synthetic", run="a",
                              scores_out=tmp_path / "scores.npy")
    assert doc["kind"] == "ijb" and doc["dataset"] == "IJBC"
    assert doc["n_images"] == N_IDS * PER_ID and doc["n_templates"] == 2 * N_IDS
    assert doc["n_pairs"] == 28 and doc["n_genuine"] == N_IDS
    assert emb.images_embedded == N_IDS * PER_ID

    # Independent recomputation from the (cached) embeddings: official feature recipe,
    # per-template loop, dot products, sklearn's ROC and the nearest-FPR rule.
    meta = ijbc.read_meta(root)
    views = ijbc.embed_ijb(emb, meta)
    assert emb.images_embedded == N_IDS * PER_ID and emb.cache_hits == 1
    aligned = np.stack([ijbc.load_aligned(meta, i) for i in range(meta.n_images)])
    np.testing.assert_allclose(views[0], _run_model(checkpoint, aligned), rtol=1e-4, atol=1e-5)
    feats = (views[0] + views[1]) * meta.faceness[:, None]
    ids, tf = _reference_templates(feats, meta.templates, meta.medias)
    lookup = {t: i for i, t in enumerate(ids)}
    scores = np.array([tf[lookup[a]] @ tf[lookup[b]] for a, b in zip(meta.pair_t1, meta.pair_t2)])
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), scores, atol=1e-12)
    fpr, tpr, _ = sklearn_metrics.roc_curve(meta.labels, scores)
    assert doc["auc"] == pytest.approx(sklearn_metrics.auc(fpr, tpr), abs=1e-12)
    for t in roc.FMR_TARGETS:
        expected = tpr[::-1][int(np.argmin(np.abs(fpr[::-1] - t)))]
        assert doc["tar_at_fmr"]["insightface"][roc.fmr_key(t)] == pytest.approx(expected)
    np.testing.assert_array_equal(curve.fpr, fpr)

    # Options: unit-normalised image features, no faceness weighting.
    doc2, _ = ijbc.run_ijb(emb, root, norm_weight=False, faceness_weight=False)
    assert emb.images_embedded == N_IDS * PER_ID  # still cached
    f2 = views[0] + views[1]
    f2 = f2 / np.linalg.norm(f2, axis=1, keepdims=True)
    ids, tf = _reference_templates(f2, meta.templates, meta.medias)
    s2 = np.array([tf[lookup[a]] @ tf[lookup[b]] for a, b in zip(meta.pair_t1, meta.pair_t2)])
    assert doc2["auc"] == pytest.approx(sklearn_metrics.roc_auc_score(meta.labels, s2), abs=1e-12)
    assert doc2["options"] == {"flip": True, "norm_weight": False, "faceness_weight": False}


def test_ijbc_missing_meta_and_images(ijbc_root, tmp_path):
    root, _ = ijbc_root
    with pytest.raises(RtkitError) as e:  # IJB-B files are not there
        ijbc.read_meta(root, "IJBB")
    assert "ijbb_" in str(e.value) and "\n" not in str(e.value)
    broken = tmp_path / "broken"
    (broken / "meta").mkdir(parents=True)
    (broken / "loose_crop").mkdir()
    for name in ("ijbc_face_tid_mid.txt", "ijbc_name_5pts_score.txt"):
        (broken / "meta" / name).write_text((root / "meta" / name).read_text())
    with pytest.raises(RtkitError, match="ijbc_template_pair_label.txt"):
        ijbc.read_meta(broken)
    (broken / "meta" / "ijbc_template_pair_label.txt").write_text("11 999 0\n")
    with pytest.raises(RtkitError, match="template 999"):
        ijbc.read_meta(broken)
    (broken / "meta" / "ijbc_template_pair_label.txt").write_text("11 12 0\n")
    meta = ijbc.read_meta(broken)
    with pytest.raises(RtkitError, match="unreadable"):
        ijbc.load_aligned(meta, 0)  # loose_crop/ is empty


# -- reports ------------------------------------------------------------------------------------

def _fake_result(tmp_path, kind, label, run, values, dataset="IJBC"):
    doc = {"format": "rtkit-eval", "format_version": 1, "kind": kind, "label": label, "run": run,
           "model": "adaface_ir50", "engine": "adaface_ir50", "checkpoint": f"{label}/{run}.pt",
           "engine_identity": "0" * 64}
    if kind == "verification":
        doc["benchmarks"] = {b: {"accuracy": v, "std": 0.01} for b, v in values.items()}
        doc["average"] = None
    else:
        fpr = roc.ROC_GRID
        doc.update(dataset=dataset, auc=values["auc"],
                   tar_at_fmr={c: {roc.fmr_key(t): values[t] for t in roc.FMR_TARGETS}
                               for c in roc.CONVENTIONS},
                   roc={"fpr": fpr.tolist(), "tpr": np.clip(0.5 + 0.05 * np.log10(fpr) + 0.35, 0, 1).tolist()})
    p = tmp_path / f"{kind}_{label}_{run}.json"
    p.write_text(json.dumps(doc))
    return p


def test_report_tables_from_result_files(tmp_path):
    rng = np.random.default_rng(0)
    files, truth = [], {}
    for label in ("DigiFace1M", "CodeFormer-translated"):
        for run in ("s1", "s2", "s3"):
            accs = {b: float(rng.uniform(0.6, 0.95)) for b in verification.BENCHMARKS}
            truth.setdefault(label, []).append(accs)
            files.append(_fake_result(tmp_path, "verification", label, run, accs))
            tars = {t: float(rng.uniform(0.1, 0.9)) for t in roc.FMR_TARGETS}
            tars["auc"] = 0.99
            truth.setdefault(label + "/ijb", []).append(tars)
            files.append(_fake_result(tmp_path, "ijb", label, run, tars))
    out = tmp_path / "report"
    written = report.write_report(files, out)
    names = {p.name for p in written}
    assert {"report.md", "table2_verification.csv", "table3_ijbc_insightface.csv",
            "table3_ijbc_bob_measure.csv", "roc_ijbc.png", "roc_ijbc.pdf"} <= names
    assert (out / "roc_ijbc.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "roc_ijbc.pdf").read_bytes()[:4] == b"%PDF"

    rows = list(csv.DictReader(open(out / "table2_verification.csv")))
    assert [r["training data"] for r in rows] == ["DigiFace1M", "CodeFormer-translated"]
    for r in rows:
        runs = truth[r["training data"]]
        lfw = [100 * a["lfw"] for a in runs]
        assert float(r["lfw_mean"]) == pytest.approx(np.mean(lfw), abs=1e-4)
        assert float(r["lfw_std"]) == pytest.approx(np.std(lfw, ddof=1), abs=1e-4)
        avg = [100 * np.mean([a[b] for b in verification.BENCHMARKS]) for a in runs]
        assert float(r["avg_mean"]) == pytest.approx(np.mean(avg), abs=1e-4)
        assert r["runs"] == "3" and r["avg_n"] == "3"
    md = (out / "report.md").read_text()
    digi = truth["DigiFace1M"]
    cell = f"{np.mean([100 * a['cfp_fp'] for a in digi]):.2f} ± {np.std([100 * a['cfp_fp'] for a in digi], ddof=1):.2f}"
    assert cell in md
    assert "| training data | runs | LFW | CFP-FP | CPLFW | CALFW | AgeDB | avg |" in md
    assert "convention `insightface`" in md and "convention `bob_measure`" in md
    t3 = list(csv.DictReader(open(out / "table3_ijbc_insightface.csv")))
    ijb = [100 * r[1e-4] for r in truth["DigiFace1M/ijb"]]
    assert float(t3[0]["1e-04_mean"]) == pytest.approx(np.mean(ijb), abs=1e-4)


def test_report_rejects_other_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"hello": 1}))
    with pytest.raises(RtkitError, match="not an rt-eval result"):
        results.load_results([p])
    p.write_text("{not json")
    with pytest.raises(RtkitError, match="invalid JSON"):
        results.load_results([p])
    with pytest.raises(RtkitError, match="no rt-eval result files"):
        results.load_results([tmp_path])  # a folder: foreign JSON skipped, nothing left
    good = _fake_result(tmp_path, "verification", "x", "1", {"lfw": 0.9})
    docs = results.load_results([tmp_path, good])  # named twice: read once
    assert [d["label"] for d in docs] == ["x"]


# -- CLI ----------------------------------------------------------------------------------------

def test_cli_help():
    from rtkit.cli.eval import main

    runner = CliRunner()
    for cmd in ([], ["verify"], ["ijbc"], ["report"], ["make-bin"], ["make-pairs"]):
        res = runner.invoke(main, [*cmd, "--help"])
        assert res.exit_code == 0, res.output
        assert "Usage" in res.output
    assert "bob_measure" in runner.invoke(main, ["ijbc", "--help"]).output


def test_cli_verify_make_bin_report(bin_file, checkpoint, tmp_path):
    from rtkit.cli.eval import main

    _, images, pairs = bin_file
    runner = CliRunner()
    bins = tmp_path / "bins"
    res = runner.invoke(main, ["make-bin", str(images), str(pairs), str(bins / "lfw.bin")])
    assert res.exit_code == 0 and "20 pairs" in res.output, res.output
    for name in verification.BENCHMARKS[1:]:  # same content: one embedding run, then cache hits
        (bins / f"{name}.bin").write_bytes((bins / "lfw.bin").read_bytes())
    result = tmp_path / "res.json"
    res = runner.invoke(main, ["verify", "-e", RECOGNIZER, "--checkpoint", str(checkpoint),
                               "--bin", str(bins), "--out", str(result), "--label", "demo",
                               "--run", "1", "--cache-dir", str(tmp_path / "c"), "-q"])
    assert res.exit_code == 0, res.output
    assert "agedb_30" in res.output and "five benchmarks" in res.output
    doc = json.loads(result.read_text())
    assert doc["label"] == "demo" and doc["run"] == "1"
    assert list(doc["benchmarks"]) == list(verification.BENCHMARKS)
    assert doc["average"] == pytest.approx(doc["benchmarks"]["lfw"]["accuracy"])
    assert len(list((tmp_path / "c").glob("*.npy"))) == 1
    res = runner.invoke(main, ["report", str(result), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    avg = f"{100 * doc['average']:.2f}"
    assert f"| demo | 1 | {avg} | {avg} | {avg} | {avg} | {avg} | {avg} |" in \
        (tmp_path / "rep" / "report.md").read_text()


def test_cli_user_errors_are_one_line(tmp_path, ijbc_root, checkpoint):
    from rtkit.cli.eval import main

    bad = tmp_path / "lfw.bin"
    bad.write_bytes(b"\x80\x04corrupt")
    runner = CliRunner()
    res = runner.invoke(main, ["verify", "-e", RECOGNIZER, "--checkpoint", str(checkpoint),
                               "--bin", str(bad), "--no-cache", "-q"])
    assert res.exit_code == 1
    assert "not a valid verification .bin" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(main, ["ijbc", "-e", RECOGNIZER, "--checkpoint", str(checkpoint),
                               "--root", str(ijbc_root[0]), "--dataset", "IJBB", "--no-cache"])
    assert res.exit_code == 1 and "ijbb_face_tid_mid.txt" in res.output
    res = runner.invoke(main, ["report", str(tmp_path / "nothing.json"), "--out", str(tmp_path)])
    assert res.exit_code == 1 and "not found" in res.output
