"""IJB-C and IJB-B 1:1 template verification (insightface eval_ijbc.py conventions).

Layout of a benchmark folder ROOT (as insightface distributes it; IJB-B files are ``ijbb_*``):

    ROOT/meta/ijbc_face_tid_mid.txt         "image template_id media_id" per image
    ROOT/meta/ijbc_template_pair_label.txt  "template1 template2 label" per pair (1 = same)
    ROOT/meta/ijbc_name_5pts_score.txt      "image x1 y1 ... x5 y5 faceness" per image
    ROOT/loose_crop/<image>

Each image is aligned from its five landmarks to the ArcFace 112x112 template (least-squares
similarity transform, bilinear warp, black border), embedded with its horizontal flip
(features summed), optionally scaled by the detector's faceness score, and - unless
``norm_weight`` is off - left unnormalised so its norm weights it. Images are averaged within
each media (video or photo) of a template, media are summed, and the template vector is
L2-normalised; a pair's score is the dot product. Like the official script, image and media
features are aggregated in float32 and only the template vectors are float64.
"""
from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from rtkit.engines.align import ARCFACE_112, similarity_transform
from rtkit.eval.results import new_result
from rtkit.eval.roc import FMR_TARGETS, evaluate_scores
from rtkit.eval.verification import BenchmarkError, l2_normalize

DATASETS = ("IJBC", "IJBB")

# The ArcFace 112x112 template as eval_ijbc.py holds it: the 96x112 template in float32 with x
# shifted by 8 px in float32. Rebuilt that way from the one template in rtkit.engines.align,
# so every coordinate has insightface's last bit (a plain float32 cast differs in one of them).
_SHIFT = np.array([8.0, 0.0])
ARCFACE_TEMPLATE = (ARCFACE_112 - _SHIFT).astype(np.float32) + _SHIFT.astype(np.float32)
ALIGNED_SIZE = 112

EMBED_PIPELINE = "ijb-align5-arcface112-v1"  # part of the cache key: bump when alignment changes


# -- meta files --------------------------------------------------------------------------------

def meta_paths(root: str | Path, dataset: str = "IJBC") -> dict[str, Path]:
    d = _check_dataset(dataset).lower()
    meta = Path(root) / "meta"
    return {"face_tid_mid": meta / f"{d}_face_tid_mid.txt",
            "template_pairs": meta / f"{d}_template_pair_label.txt",
            "landmarks": meta / f"{d}_name_5pts_score.txt"}


def _check_dataset(dataset: str) -> str:
    ds = dataset.upper().replace("-", "")
    if ds not in DATASETS:
        raise BenchmarkError(f"dataset must be IJBC or IJBB, got {dataset!r}")
    return ds


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise BenchmarkError(f"missing IJB meta file {path} ({what}); expected ROOT/meta/ and "
                             f"ROOT/loose_crop/ as insightface distributes the benchmark")
    return path


def _rows(path: Path, ncols: int, what: str) -> list[list[str]]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != ncols:
                raise BenchmarkError(f"{path}:{n}: expected {ncols} fields ({what}), got "
                                     f"{len(parts)}")
            rows.append(parts)
    if not rows:
        raise BenchmarkError(f"{path} is empty")
    return rows


def read_face_tid_mid(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image names, template ids, media ids) from ``*_face_tid_mid.txt``."""
    path = _need(Path(path), "image template_id media_id")
    rows = _rows(path, 3, "image template_id media_id")
    try:
        tids = np.array([r[1] for r in rows], dtype=np.int64)
        mids = np.array([r[2] for r in rows], dtype=np.int64)
    except ValueError as e:
        raise BenchmarkError(f"{path}: template and media ids must be integers ({e})") from None
    return [r[0] for r in rows], tids, mids


def read_template_pairs(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(template1, template2, label) from ``*_template_pair_label.txt`` (15.7 M lines for
    IJB-C: parsed by numpy's C reader, not line by line)."""
    path = _need(Path(path), "template1 template2 label")
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise BenchmarkError(f"{path}: expected integer lines 'template1 template2 label' "
                             f"({str(e).splitlines()[0]})") from None
    if table.size == 0:
        raise BenchmarkError(f"{path} is empty")
    if table.shape[1] != 3:
        raise BenchmarkError(f"{path}: expected 3 columns, got {table.shape[1]}")
    labels = table[:, 2]
    if not np.isin(labels, (0, 1)).all():
        raise BenchmarkError(f"{path}: labels must be 0 or 1")
    return table[:, 0].copy(), table[:, 1].copy(), labels.copy()


def read_landmarks(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image names, landmarks (N, 5, 2) float32, faceness (N,) float32) from
    ``*_name_5pts_score.txt``."""
    path = _need(Path(path), "image x1 y1 ... x5 y5 faceness")
    rows = _rows(path, 12, "image x1 y1 ... x5 y5 faceness")
    try:
        values = np.array([r[1:] for r in rows], dtype=np.float64).astype(np.float32)
    except ValueError as e:
        raise BenchmarkError(f"{path}: landmarks and score must be numbers ({e})") from None
    return [r[0] for r in rows], values[:, :10].reshape(-1, 5, 2), values[:, 10].copy()


@dataclass
class IJBMeta:
    root: Path
    dataset: str
    image_dir: Path
    images: list[str]            # in the order of the landmark file
    landmarks: np.ndarray        # (N, 5, 2) float32
    faceness: np.ndarray         # (N,) float32
    templates: np.ndarray        # (N,) template id of each image
    medias: np.ndarray           # (N,) media id of each image
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    labels: np.ndarray
    landmarks_sha256: str

    @property
    def n_images(self) -> int:
        return len(self.images)


def read_meta(root: str | Path, dataset: str = "IJBC") -> IJBMeta:
    """Read and cross-check the three meta files of an IJB-C/IJB-B folder."""
    dataset = _check_dataset(dataset)
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkError(f"IJB folder not found: {root}")
    paths = meta_paths(root, dataset)
    for key, what in (("face_tid_mid", "image template_id media_id"),
                      ("template_pairs", "template1 template2 label"),
                      ("landmarks", "image x1 y1 ... x5 y5 faceness")):
        _need(paths[key], what)
    image_dir = root / "loose_crop"
    if not image_dir.is_dir():
        raise BenchmarkError(f"missing IJB image folder {image_dir}")
    names, landmarks, faceness = read_landmarks(paths["landmarks"])
    tm_names, tids, mids = read_face_tid_mid(paths["face_tid_mid"])
    if tm_names != names:
        # The official script pairs the two files line by line; accept another order only
        # when both list the same images.
        index = {n: i for i, n in enumerate(tm_names)}
        if len(index) != len(tm_names) or set(index) != set(names) or len(names) != len(tm_names):
            raise BenchmarkError(f"{paths['face_tid_mid']} and {paths['landmarks']} do not list "
                                 f"the same images")
        order = np.array([index[n] for n in names])
        tids, mids = tids[order], mids[order]
    t1, t2, labels = read_template_pairs(paths["template_pairs"])
    known = np.unique(tids)
    for t in (t1, t2):
        missing = ~np.isin(t, known)
        if missing.any():
            raise BenchmarkError(f"{paths['template_pairs']} names template "
                                 f"{int(t[missing][0])}, which has no image in "
                                 f"{paths['face_tid_mid']}")
    sha = hashlib.sha256(paths["landmarks"].read_bytes()).hexdigest()
    return IJBMeta(root, dataset, image_dir, names, landmarks, faceness, tids, mids, t1, t2,
                   labels, sha)


# -- alignment ---------------------------------------------------------------------------------

def align_face(bgr: np.ndarray, landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """Warp a BGR image so its five landmarks land on the ArcFace template; returns RGB.

    The least-squares similarity (Umeyama) of rtkit.engines.align, as skimage's estimate in
    the official script. Landmarks all at one point leave nothing to align: a black face.
    """
    with np.errstate(invalid="ignore", divide="ignore"):  # coincident points: 0 / 0
        m = similarity_transform(landmarks, ARCFACE_TEMPLATE * (size / ALIGNED_SIZE))
    if not np.isfinite(m).all():
        return np.zeros((size, size, 3), dtype=np.uint8)
    img = cv2.warpAffine(bgr, m, (size, size), borderValue=0.0)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def load_aligned(meta: IJBMeta, i: int) -> np.ndarray:
    path = meta.image_dir / meta.images[i]
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise BenchmarkError(f"IJB image missing or unreadable: {path}")
    return align_face(bgr, meta.landmarks[i])


# -- features, templates, scores ---------------------------------------------------------------

def image_features(views: np.ndarray, faceness: np.ndarray | None = None, *,
                   norm_weight: bool = True, faceness_weight: bool = True,
                   out: np.ndarray | None = None) -> np.ndarray:
    """(V, N, D) per-view embeddings -> (N, D) float32 image features.

    Views are summed (flip fusion). ``norm_weight`` keeps the feature norm as the image's
    weight in its template (insightface's default); off, features are unit vectors.
    ``faceness_weight`` multiplies by the detector score. ``out`` (float32, (N, D)) receives
    the features and may be ``views[0]`` when the views are not needed afterwards.
    """
    views = np.asarray(views, dtype=np.float32)
    if faceness_weight:
        if faceness is None:
            raise ValueError("faceness_weight needs the faceness scores")
        weight = np.asarray(faceness, dtype=np.float32)[:, np.newaxis]
    n = views.shape[1]
    feats = np.empty(views.shape[1:], dtype=np.float32) if out is None else out
    # Blocks of rows keep the temporaries small and in cache; each row gets the official
    # float32 operations (views summed, optionally / its norm, then * faceness).
    for lo in range(0, n, 8192):
        hi = min(lo + 8192, n)
        f = feats[lo:hi]
        if views.shape[0] == 2:
            np.add(views[0, lo:hi], views[1, lo:hi], out=f)
        else:
            np.sum(views[:, lo:hi], axis=0, dtype=np.float32, out=f)
        if not norm_weight:
            f /= np.sqrt(np.sum(f ** 2, -1, keepdims=True))
        if faceness_weight:
            f *= weight[lo:hi]
    return feats


def _sequential_group_sum(values: np.ndarray, group: np.ndarray, n_groups: int,
                          block: int = 4096) -> np.ndarray:
    """Sum the rows of each group in row order, in the dtype of ``values``.

    Adds the k-th member of every group in step k, so the order of additions (and thus every
    float32 rounding) is that of a plain loop over each group, while each step is vectorised.
    Steps go through reused buffers of ``block`` rows: large fresh temporaries cost more in
    page faults than the additions themselves.
    """
    order = np.argsort(group, kind="stable")
    g = group[order]
    starts = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
    rank = np.arange(g.size) - np.repeat(starts, np.diff(np.r_[starts, g.size]))
    by_rank = np.argsort(rank, kind="stable")
    rows, targets = order[by_rank], g[by_rank]   # step by step: source row, its group
    bounds = np.r_[0, np.cumsum(np.bincount(rank))]
    out = np.zeros((n_groups, values.shape[1]), dtype=values.dtype)
    new = np.empty((min(block, g.size), values.shape[1]), dtype=values.dtype)
    acc = np.empty_like(new)
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # a step's groups are distinct
        for s in range(lo, hi, block):
            e = min(s + block, hi)
            m = e - s
            np.take(values, rows[s:e], axis=0, out=new[:m], mode="clip")
            np.take(out, targets[s:e], axis=0, out=acc[:m], mode="clip")
            np.add(acc[:m], new[:m], out=acc[:m])
            out[targets[s:e]] = acc[:m]
    return out


def template_features(feats: np.ndarray, templates: np.ndarray,
                      medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique template ids, (T, D) float64 unit template vectors).

    Mean over the images of each media, sum over the media of a template, L2 norm. Sums run
    in float32, images in file order and media in ascending id order, so the result equals the
    official per-template loop bit for bit.
    """
    feats = np.asarray(feats, dtype=np.float32)
    uniq_t, t_idx = np.unique(templates, return_inverse=True)
    _, m_rank = np.unique(medias, return_inverse=True)
    n_media_ids = int(m_rank.max()) + 1
    group_key = t_idx.astype(np.int64) * n_media_ids + m_rank
    groups, g_idx, g_count = np.unique(group_key, return_inverse=True, return_counts=True)
    media_feat = _sequential_group_sum(feats, g_idx, groups.size)
    # np.mean: the float32 sum divided by the count. Dividing in float64 and rounding to
    # float32 gives the same bits as a float32 division (53 >= 2 * 24 + 2 bits: double
    # rounding of a quotient is exact), whichever of the two a numpy version does. In blocks:
    # fresh 100 MB temporaries cost more in page faults than the division.
    multi = np.flatnonzero(g_count > 1)
    for lo in range(0, multi.size, 4096):
        idx = multi[lo:lo + 4096]
        block = media_feat[idx].astype(np.float64)
        block /= g_count[idx, None]
        media_feat[idx] = block
    template_sum = _sequential_group_sum(media_feat, groups // n_media_ids, uniq_t.size)
    return uniq_t, l2_normalize(template_sum)  # float64 from here on


def template_index(template_ids: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Row of each template id ``t`` in the sorted ``template_ids``; BenchmarkError for an id
    without images."""
    t = np.asarray(t)
    lo, hi = int(template_ids[0]), int(template_ids[-1])
    if t.size == 0:
        return np.zeros(0, dtype=np.int64)
    if lo >= 0 and hi < 8 * template_ids.size + (1 << 20):  # small ids: a direct table
        table = np.full(hi + 1, -1, dtype=np.int64)
        table[template_ids] = np.arange(template_ids.size)
        if t.min() >= 0 and t.max() <= hi:  # two reductions instead of masks over all pairs
            idx = table[t]
            if idx.min() >= 0:
                return idx
        bad = (t < 0) | (t > hi)
        bad[~bad] = table[t[~bad]] < 0
        idx = None
    else:
        idx = np.searchsorted(template_ids, t)
        found = template_ids[np.minimum(idx, template_ids.size - 1)]
        bad = (idx >= template_ids.size) | (found != t)
    if bad.any():
        raise BenchmarkError(f"pair list names template {int(t[bad][0])}, which has no images")
    return idx


def pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, t1: np.ndarray,
                t2: np.ndarray, batch: int = 128, workers: int | None = None) -> np.ndarray:
    """Dot product of the template vectors of each pair, with the official arithmetic:
    ``np.sum(a * b, -1)`` over contiguous rows, so every score has the same bits.

    Fast without changing a bit: pairs are visited in order of their first template (its row
    then stays in cache for the next pairs), rows are gathered into small reused buffers with
    ``take(mode="clip")`` (indices are checked first; mode "raise" copies through a temporary),
    and worker threads share the pairs (numpy releases the GIL in each step).
    """
    i1 = template_index(template_ids, t1)
    i2 = template_index(template_ids, t2)
    n = i1.size
    scores = np.empty(n, dtype=np.float64)
    if n == 0:
        return scores
    # A 16-bit key sorts by radix; the stable order keeps equal first templates in file order.
    key = i1.astype(np.uint16) if template_ids.size <= 1 << 16 else i1
    order = np.argsort(key, kind="stable")
    del key
    dim = template_feats.shape[1]
    workers = max(1, min(workers or os.cpu_count() or 1, 8))

    def run(lo: int, hi: int) -> None:
        a = np.empty((batch, dim), dtype=template_feats.dtype)
        b = np.empty_like(a)
        s = np.empty(batch, dtype=np.float64)
        for start in range(lo, hi, batch):
            stop = min(start + batch, hi)
            m = stop - start
            sel = order[start:stop]
            np.take(template_feats, i1[sel], axis=0, out=a[:m], mode="clip")
            np.take(template_feats, i2[sel], axis=0, out=b[:m], mode="clip")
            np.multiply(a[:m], b[:m], out=a[:m])
            np.sum(a[:m], -1, out=s[:m])
            scores[sel] = s[:m]

    bounds = np.linspace(0, n, 4 * workers + 1).astype(np.int64)  # a few chunks per worker
    if workers == 1:
        run(0, n)
    else:
        with ThreadPoolExecutor(workers) as ex:
            for f in [ex.submit(run, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]:
                f.result()
    return scores


def score_pairs(views: np.ndarray, faceness: np.ndarray, templates: np.ndarray,
                medias: np.ndarray, t1: np.ndarray, t2: np.ndarray, *, norm_weight: bool = True,
                faceness_weight: bool = True, reuse_views: bool = False,
                timings: dict | None = None):
    """Cached per-view embeddings -> (template ids, template vectors, pair scores): what
    ``run_ijb`` computes between embedding and the ROC. With ``reuse_views`` the image
    features are written over ``views[0]`` (when writable float32), sparing a copy of the
    largest array. ``timings``, if given, receives the seconds of each stage."""
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        if timings is not None:
            now = time.perf_counter()
            timings[stage] = now - clock
            clock = now

    views = np.asarray(views)
    reuse = (reuse_views and views.dtype == np.float32 and views.flags.writeable
             and views.flags.c_contiguous)
    feats = image_features(views, faceness, norm_weight=norm_weight,
                           faceness_weight=faceness_weight, out=views[0] if reuse else None)
    lap("image features")
    template_ids, template_feats = template_features(feats, templates, medias)
    del feats
    lap("template pooling")
    scores = pair_scores(template_ids, template_feats, t1, t2)
    lap("pair scores")
    return template_ids, template_feats, scores


def evaluate_ijb_scores(labels, scores, targets=FMR_TARGETS):
    """(result dict, ROC curve for plotting): TAR@FMR under both conventions, AUC, ROC grid."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        raise BenchmarkError("the pair list needs both genuine (1) and impostor (0) pairs")
    return evaluate_scores(labels, scores, targets, return_curve=True)


# -- running a recognizer ----------------------------------------------------------------------

def embed_ijb(embedder, meta: IJBMeta, *, flip: bool = True) -> np.ndarray:
    """Per-view embeddings (V, N, D) of every aligned IJB image, through the cache."""
    key = f"{EMBED_PIPELINE}:{meta.dataset}:{meta.landmarks_sha256}"
    return embedder.embed_cached(key, meta.n_images, lambda i: load_aligned(meta, i), flip=flip,
                                 desc=meta.dataset)


def run_ijb(embedder, root: str | Path, dataset: str = "IJBC", *, flip: bool = True,
            norm_weight: bool = True, faceness_weight: bool = True, label: str | None = None,
            run: str | None = None, scores_out: str | Path | None = None):
    """Evaluate ``embedder`` on IJB-C/IJB-B 1:1; returns (result document, ROC curve).

    ``scores_out``: also save the pair scores (.npy), as the official script does.
    """
    meta = read_meta(root, dataset)
    views = embed_ijb(embedder, meta, flip=flip)  # a fresh array: its memory may be reused
    template_ids, _, scores = score_pairs(views, meta.faceness, meta.templates, meta.medias,
                                          meta.pair_t1, meta.pair_t2, norm_weight=norm_weight,
                                          faceness_weight=faceness_weight, reuse_views=True)
    del views
    if scores_out is not None:
        np.save(scores_out, scores)
    metrics, curve = evaluate_ijb_scores(meta.labels, scores)
    doc = new_result("ijb", embedder, label=label, run=run)
    doc["dataset"] = meta.dataset
    doc["root"] = str(meta.root)
    doc["options"] = {"flip": flip, "norm_weight": norm_weight, "faceness_weight": faceness_weight}
    doc["n_images"] = meta.n_images
    doc["n_templates"] = int(template_ids.size)
    doc["landmarks_sha256"] = meta.landmarks_sha256
    doc.update(metrics)
    return doc, curve


def format_ijb(doc: dict) -> str:
    """A small text table of an IJB result document."""
    keys = list(doc["tar_at_fmr"]["insightface"])
    head = f"{doc['dataset']} TAR (%) at FMR   " + " ".join(f"{k:>7}" for k in keys)
    rows = [head]
    for conv, vals in doc["tar_at_fmr"].items():
        rows.append(f"{conv:<24}" + " ".join(f"{100 * vals[k]:7.2f}" for k in keys))
    if "eer" in doc:
        e = doc["eer"]
        rows.append(f"EER {100 * e['eer']:.4f} % at threshold {e['threshold']:.6f} "
                    f"(bob.measure: FMR {100 * e['fmr']:.4f} %, FNMR {100 * e['fnmr']:.4f} %)")
    rows.append(f"AUC {100 * doc['auc']:.4f} %   pairs {doc['n_pairs']} "
                f"({doc['n_genuine']} genuine), templates {doc['n_templates']}")
    return "\n".join(rows)


__all__ = ["DATASETS", "ARCFACE_TEMPLATE", "meta_paths", "read_face_tid_mid", "read_template_pairs",
           "read_landmarks", "IJBMeta", "read_meta", "align_face",
           "load_aligned", "image_features", "template_features", "template_index", "pair_scores",
           "score_pairs",
           "evaluate_ijb_scores", "embed_ijb", "run_ijb", "format_ijb"]
