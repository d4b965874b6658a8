"""IJB-C 1:1 scoring from cached embeddings at the benchmark's real size, on synthetic data.

What ``rt-eval ijbc`` does once the embeddings are cached: image features (flip sum, faceness
weight), template pooling (mean within each media, sum over media, L2 norm), 15.66 M
template-pair scores, and the ROC with TAR@FMR under both conventions (insightface, bob.measure)
and the EER. The synthetic benchmark has IJB-C's sizes: 469,375 images, 23,124 templates,
15,658,489 pairs of which 19,557 genuine, 512-d features; identities are clusters, templates
are heavy-tailed in size and hold stills and multi-frame videos (media).

    python benchmarks/ijbc_scoring.py                 # full size
    python benchmarks/ijbc_scoring.py --scale 0.01 --check

The embeddings are written to a temporary folder as the embedding cache holds them (.npy) and
scored in a fresh process, so the wall time and peak memory (ru_maxrss) printed are those of
the scoring alone, from loading the cache to the TAR table. ``--check`` compares every stage
with the official arithmetic (insightface eval_ijbc.py: per-template loop with np.mean / np.sum,
sklearn.preprocessing.normalize, np.sum(feat1 * feat2, -1) in batches of 100,000, sklearn's
roc_curve, bob.measure when installed) and fails unless the numbers are bit-identical; at
full size the template loop and the pair scores are checked on a random sample.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FULL = {"images": 469_375, "templates": 23_124, "pairs": 15_658_489, "genuine": 19_557,
        "subjects": 3_531}
DIM = 512


def synthesize(scale: float, seed: int, out: Path) -> dict:
    """Write views.npy (2, N, 512) float32, meta.npz and return the sizes."""
    rng = np.random.default_rng(seed)
    n_img = max(8, round(FULL["images"] * scale))
    n_tpl = max(4, min(n_img, round(FULL["templates"] * scale)))
    n_subj = max(2, min(n_tpl // 2, round(FULL["subjects"] * scale)))
    n_pairs = max(8, round(FULL["pairs"] * scale))
    n_gen = max(2, min(n_pairs // 2, round(FULL["genuine"] * scale)))

    # Templates: each subject has at least two (genuine pairs need them), the rest at random.
    subj_of_tpl = np.r_[np.repeat(np.arange(n_subj), 2),
                        rng.integers(0, n_subj, n_tpl - 2 * n_subj)]
    rng.shuffle(subj_of_tpl)
    tpl_ids = np.sort(rng.choice(np.arange(1, 20 * n_tpl), n_tpl, replace=False))
    # Images: one per template, the rest spread with heavy-tailed weights (long videos).
    weights = rng.lognormal(0.0, 1.2, n_tpl)
    tpl_of_img = np.r_[np.arange(n_tpl),
                       rng.choice(n_tpl, n_img - n_tpl, p=weights / weights.sum())]
    rng.shuffle(tpl_of_img)
    # Media: within a template about a third of the images are stills, the rest video frames.
    counts = np.bincount(tpl_of_img, minlength=n_tpl)
    n_media = np.maximum(1, (counts + 2) // 3)
    offset = np.r_[0, np.cumsum(n_media)[:-1]]
    local = (rng.random(n_img) * n_media[tpl_of_img]).astype(np.int64)
    media = offset[tpl_of_img] + local + 1000

    views = np.lib.format.open_memmap(out / "views.npy", mode="w+", dtype=np.float32,
                                      shape=(2, n_img, DIM))
    # Feature = identity centre + a per-template nuisance (pose, quality: what makes IJB-C
    # hard, of varying strength) + per-image noise, at a varying norm; genuine and impostor
    # scores then overlap as a real recognizer's do.
    centres = rng.standard_normal((n_subj, DIM), dtype=np.float32)
    nuisance = rng.standard_normal((n_tpl, DIM), dtype=np.float32)
    nuisance *= rng.uniform(0.5, 3.0, (n_tpl, 1)).astype(np.float32)
    step = 65536
    for lo in range(0, n_img, step):
        hi = min(n_img, lo + step)
        tpl = tpl_of_img[lo:hi]
        c = centres[subj_of_tpl[tpl]] + nuisance[tpl]
        scale_img = rng.uniform(5, 25, (hi - lo, 1)).astype(np.float32)  # feature norms vary
        for v in range(2):
            noise = rng.standard_normal((hi - lo, DIM), dtype=np.float32)
            views[v, lo:hi] = (c + 2.0 * noise) * scale_img
    views.flush()
    del views
    faceness = rng.uniform(0.3, 1.0, n_img).astype(np.float32)

    # Pairs: genuine between two templates of a subject, impostor between different subjects.
    by_subj = np.argsort(subj_of_tpl, kind="stable")
    starts = np.searchsorted(subj_of_tpl[by_subj], np.arange(n_subj))
    sizes = np.bincount(subj_of_tpl, minlength=n_subj)
    gs = rng.integers(0, n_subj, n_gen)
    a = rng.integers(0, sizes[gs])
    b = (a + 1 + rng.integers(0, sizes[gs] - 1)) % sizes[gs]
    g1, g2 = by_subj[starts[gs] + a], by_subj[starts[gs] + b]
    n_imp = n_pairs - n_gen
    i1, i2 = rng.integers(0, n_tpl, n_imp), rng.integers(0, n_tpl, n_imp)
    while True:
        same = np.flatnonzero(subj_of_tpl[i1] == subj_of_tpl[i2])
        if same.size == 0:
            break
        i2[same] = rng.integers(0, n_tpl, same.size)
    p1, p2 = np.r_[g1, i1], np.r_[g2, i2]
    labels = np.r_[np.ones(n_gen, np.int64), np.zeros(n_imp, np.int64)]
    order = rng.permutation(n_pairs)
    np.savez(out / "meta.npz", templates=tpl_ids[tpl_of_img], medias=media, faceness=faceness,
             t1=tpl_ids[p1[order]], t2=tpl_ids[p2[order]], labels=labels[order])
    return {"images": n_img, "templates": n_tpl, "pairs": n_pairs, "genuine": n_gen,
            "subjects": n_subj, "media": int(n_media.sum())}


def score(folder: Path, check: bool, seed: int, bob: bool = True) -> dict:
    """The scoring path of rt-eval ijbc on the cached embeddings in ``folder``."""
    from rtkit.eval import ijbc

    t = {}
    start = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    views = np.load(folder / "views.npy")
    meta = dict(np.load(folder / "meta.npz"))
    t["load"] = time.perf_counter() - t0
    # rt-eval ijbc's path (run_ijb): features written over the cached views, pooled, scored.
    ids, tfeats, scores = ijbc.score_pairs(views, meta["faceness"], meta["templates"],
                                           meta["medias"], meta["t1"], meta["t2"],
                                           reuse_views=not check, timings=t)
    s = time.perf_counter()
    doc, curve = ijbc.evaluate_ijb_scores(meta["labels"], scores)
    t["ROC, TAR@FMR, EER"] = time.perf_counter() - s
    t["total"] = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {"seconds": t, "peak_rss_mib": usage.ru_maxrss / 1024,
           "cpu_seconds": (usage.ru_utime - start.ru_utime) + (usage.ru_stime - start.ru_stime),
           "load_average": os.getloadavg()[0],
           "tar_at_fmr": doc["tar_at_fmr"], "eer": doc["eer"], "auc": doc["auc"],
           "n_pairs": doc["n_pairs"], "n_genuine": doc["n_genuine"], "n_templates": int(ids.size)}
    if check:
        feats = ijbc.image_features(views, meta["faceness"])
        out["check"] = check_official(views, meta, feats, ids, tfeats, scores, doc, curve, seed,
                                      bob)
    return out


def check_official(views, meta, feats, ids, tfeats, scores, doc, curve, seed, bob) -> dict:
    """Recompute with the official arithmetic and assert bit equality (sampled at full size)."""
    from sklearn.metrics import roc_curve
    from sklearn.preprocessing import normalize

    from rtkit.eval import roc

    rng = np.random.default_rng(seed + 1)
    done = {}
    # Image features: the flip halves summed, times faceness, in float32.
    ref = views[0] + views[1]
    ref = ref * meta["faceness"][:, np.newaxis]
    assert np.array_equal(ref, feats), "image features differ"
    done["image features"] = "all"
    # Templates: the official loop (np.where per template, np.mean per media, np.sum, normalize).
    templates, medias = meta["templates"], meta["medias"]
    sample = ids if ids.size <= 300 else np.sort(rng.choice(ids, 300, replace=False))
    rows = []
    for uqt in sample:
        (ind_t,) = np.where(templates == uqt)
        face_feats, face_medias = feats[ind_t], medias[ind_t]
        parts = []
        for u, ct in zip(*np.unique(face_medias, return_counts=True)):
            (ind_m,) = np.where(face_medias == u)
            parts.append(face_feats[ind_m] if ct == 1 else
                         np.mean(face_feats[ind_m], axis=0, keepdims=True))
        rows.append(np.sum(np.array(parts), axis=0))
    ref_t = np.zeros((sample.size, feats.shape[1]))
    ref_t[:] = np.array(rows).reshape(sample.size, -1)
    ours = tfeats[np.searchsorted(ids, sample)]
    # normalize works row by row, so the sampled rows alone give the official numbers.
    assert np.array_equal(normalize(ref_t), ours), "template features differ"
    done["template features"] = f"{sample.size} of {ids.size} templates"
    # Pair scores: feat1 * feat2 summed over the last axis, (B, 1, D) batches of 100,000.
    template2id = np.zeros((ids.max() + 1, 1), dtype=int)
    template2id[ids, 0] = np.arange(ids.size)
    n = scores.size
    pick = np.arange(n) if n <= 200_000 else np.sort(rng.choice(n, 200_000, replace=False))
    ref_s = np.zeros(pick.size)
    for lo in range(0, pick.size, 100_000):
        s = pick[lo:lo + 100_000]
        f1 = tfeats[template2id[meta["t1"][s]]]
        f2 = tfeats[template2id[meta["t2"][s]]]
        ref_s[lo:lo + s.size] = np.sum(f1 * f2, -1).flatten()
    assert np.array_equal(ref_s, scores[pick]), "pair scores differ"
    done["pair scores"] = f"{pick.size} of {n} pairs"
    # ROC and the nearest-point TAR of eval_ijbc.py on all scores.
    fpr, tpr, _ = roc_curve(meta["labels"], scores)
    assert np.array_equal(fpr, curve.fpr) and np.array_equal(tpr, curve.tpr), "ROC differs"
    ffpr, ftpr = np.flipud(fpr), np.flipud(tpr)
    for t in roc.FMR_TARGETS:
        _, i = min(zip(np.abs(ffpr - t), range(len(ffpr))))
        assert doc["tar_at_fmr"]["insightface"][roc.fmr_key(t)] == ftpr[i], t
    done["insightface TAR"] = "all pairs (sklearn roc_curve, nearest point)"
    if not bob:
        return done
    try:
        import bob.measure as bm
    except ImportError:
        done["bob.measure"] = "not installed: not checked"
        return done
    neg = scores[meta["labels"] == 0]
    pos = scores[meta["labels"] == 1]
    for t in roc.FMR_TARGETS:
        thr = bm.far_threshold(neg, pos, t)
        p = doc["operating_points"]["bob_measure"][roc.fmr_key(t)]
        assert p["threshold"] == thr and p["tar"] == 1 - bm.farfrr(neg, pos, thr)[1], t
    e, far, frr = bm.eer(neg, pos, also_farfrr=True)
    assert doc["eer"]["threshold"] == bm.eer_threshold(neg, pos) and doc["eer"]["eer"] == e
    done["bob.measure"] = "far_threshold, farfrr, eer_threshold, eer on all pairs"
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0,
                    help="Fraction of IJB-C's sizes (1 = 469,375 images, 15.66 M pairs).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true",
                    help="Also compare every stage with the official arithmetic (bit for bit).")
    ap.add_argument("--skip-bob", action="store_true",
                    help="With --check, leave out the comparison with bob.measure.")
    ap.add_argument("--json", type=Path, help="Also write the measured figures here.")
    ap.add_argument("--score-only", type=Path, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.score_only:
        res = score(args.score_only, args.check, args.seed, bob=not args.skip_bob)
        print(json.dumps(res))
        return 0
    with tempfile.TemporaryDirectory(prefix="ijbc_scoring_") as tmp:
        s = time.perf_counter()
        sizes = synthesize(args.scale, args.seed, Path(tmp))
        gen_s = time.perf_counter() - s
        print(f"synthetic IJB-C x{args.scale:g}: {sizes['images']:,} images, "
              f"{sizes['templates']:,} templates ({sizes['media']:,} media), "
              f"{sizes['pairs']:,} pairs ({sizes['genuine']:,} genuine), {DIM}-d "
              f"[generated in {gen_s:.1f} s]", flush=True)
        cmd = [sys.executable, __file__, "--score-only", tmp, "--seed", str(args.seed)]
        cmd += ["--check"] * args.check + ["--skip-bob"] * args.skip_bob
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            return proc.returncode
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["sizes"] = sizes
    res["cpu_count"] = os.cpu_count()
    for stage, sec in res["seconds"].items():
        print(f"  {stage:<20} {sec:8.2f} s")
    print(f"scoring wall time {res['seconds']['total']:.1f} s, peak RSS "
          f"{res['peak_rss_mib']:.0f} MiB ({os.cpu_count()} CPUs; CPU time "
          f"{res['cpu_seconds']:.1f} s; load average {res['load_average']:.1f} at the end)")
    keys = list(res["tar_at_fmr"]["insightface"])
    print("TAR (%) at FMR         " + " ".join(f"{k:>7}" for k in keys))
    for conv, vals in res["tar_at_fmr"].items():
        print(f"{conv:<22} " + " ".join(f"{100 * vals[k]:7.2f}" for k in keys))
    print(f"EER {100 * res['eer']['eer']:.3f} %, AUC {100 * res['auc']:.4f} %")
    for stage, what in res.get("check", {}).items():
        print(f"check {stage}: bit-identical ({what})" if "not" not in what
              else f"check {stage}: {what}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
