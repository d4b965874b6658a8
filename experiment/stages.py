"""What each kind of stage does: one function per kind, ``fn(ctx) -> outputs``.

Outputs are JSON: numbers the report shows and paths (OUT-relative for files inside OUT) that
later stages reopen; ``files`` lists the paths that must still exist for the stage to count as
finished. Every step is a library call (no subprocesses): rtkit.datasets.sample,
rtkit.eval.pairs / verification / quality / embed, rtkit.train.translator / recognizer,
rtkit.runtime.convert and contact_sheet.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rtkit.engines.errors import RtkitError
from rtkit.experiment.plan import StageContext, arm_data_stage

STAT_IMAGES = 256        # images per set for the conversion statistics


def _images(root: Path) -> list[str]:
    from rtkit.runtime.sources import walk_files

    return walk_files(root)[0]


def _spread(items: list, count: int) -> list:
    """``count`` items evenly spread over a sorted list (over identities, not the first few)."""
    if len(items) <= count:
        return list(items)
    idx = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in idx]


def _frames(root: Path, rels: list[str], size: tuple[int, int] | None = None) -> np.ndarray:
    import cv2

    from rtkit.runtime.sources import decode_image

    out = []
    for r in rels:
        img = decode_image(root / r)
        if size is not None and img.shape[:2] != size:
            img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        out.append(img)
    return np.stack(out)


# -- data -----------------------------------------------------------------------------------------

def run_sample(ctx: StageContext) -> dict:
    from rtkit.datasets.sample import make_sample_dataset

    p = ctx.stage.params
    paths = make_sample_dataset(ctx.folder, style=p["style"], identities=p["identities"],
                                per_identity=p["per_identity"], seed=p["seed"], size=p["size"],
                                first_identity=p["first_identity"])
    first = p["first_identity"]
    ctx.log(f"{len(paths)} {p['style']} images of identities {first}..{first + p['identities'] - 1}")
    return {"path": ctx.rel(ctx.folder), "images": len(paths), "files": [ctx.rel(ctx.folder)]}


def run_folder(ctx: StageContext) -> dict:
    from rtkit.eval.pairs import identity_images

    p = Path(ctx.stage.params["path"])
    by_id = identity_images(p)  # refuses a folder without <identity>/<image> images
    ctx.log(f"{sum(map(len, by_id.values()))} images of {len(by_id)} identities in {p}")
    return {"path": str(p), "images": sum(map(len, by_id.values())), "identities": len(by_id),
            "files": [str(p)]}


# -- benchmarks -----------------------------------------------------------------------------------

def run_benchmark(ctx: StageContext) -> dict:
    from rtkit.eval.pairs import make_pairs
    from rtkit.eval.verification import build_bin

    p = ctx.stage.params
    root = ctx.input_path(ctx.stage.inputs[0])
    pairs = make_pairs(root, ctx.folder / "pairs.txt", folds=p["folds"], pairs_per_fold=p["pairs_per_fold"],
                       seed=p["seed"])
    out = ctx.folder / f"{p['name']}.bin"
    n = build_bin(root, pairs.path, out)
    ctx.log(f"{out.name}: {n} pairs in {pairs.folds} identity-disjoint folds, {pairs.identities} identities")
    return {"bin": ctx.rel(out), "pairs": n, "identities": pairs.identities, "files": [ctx.rel(out)]}


def run_bin(ctx: StageContext) -> dict:
    from rtkit.eval.verification import load_bin

    p = Path(ctx.stage.params["path"])
    vset = load_bin(p)
    return {"bin": str(p), "pairs": vset.n_pairs, "files": [str(p)]}


# -- translators ----------------------------------------------------------------------------------

def translator_config(ctx: StageContext):
    from rtkit.train.translator_config import TranslatorConfig

    p = ctx.stage.params
    fields = dict(tensorboard=False, precision="fp32" if p["device"] == "cpu" else "auto")
    fields.update(p["fields"])
    common = dict(source=str(ctx.input_path("data/train")), target=str(ctx.input_path("data/target")),
                  val_source=str(ctx.input_path("data/val_source")),
                  val_target=str(ctx.input_path("data/val_target")), device=p["device"])
    if p["preset"] and p["preset"] != "none":
        return TranslatorConfig.from_preset(p["method"], preset=p["preset"], options=dict(p["options"]),
                                            **common, **fields)
    return TranslatorConfig(method=p["method"], options=dict(p["options"]), **common, **fields)


def run_translator(ctx: StageContext) -> dict:
    from rtkit.train.checkpointing import CheckpointDir
    from rtkit.train.translator import train_translator

    cfg = translator_config(ctx)
    resume = "latest" if ctx.resume and CheckpointDir(ctx.folder / "checkpoints").latest() is not None else None
    s = train_translator(cfg, ctx.folder, resume=resume, log=ctx.log)
    weights = Path(s["best_weights"] or s["weights"])
    val = _translator_val(ctx.folder)
    return {"weights": ctx.rel(weights), "method": cfg.method, "steps": s["final_step"],
            "best": s["best"], "held_out": val, "img_per_s": s["img_per_s"], "files": [ctx.rel(weights)]}


def _translator_val(folder: Path) -> dict:
    """The held-out style gap rows of log.csv (step -> gap, content), untranslated gap."""
    import csv

    rows = {}
    untranslated = None
    with open(folder / "log.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r.get("val_style_gap"):
                rows[int(r["step"])] = [round(float(r["val_style_gap"]), 4), round(float(r["val_content_corr"]), 4)]
                untranslated = round(float(r["val_style_gap_source"]), 4)
    return {"untranslated": untranslated, "by_step": {str(k): v for k, v in sorted(rows.items())}}


def run_engine(ctx: StageContext) -> dict:
    from rtkit.runtime.runners import open_engine

    p = Path(ctx.stage.params["path"])
    with open_engine(p) as r:  # fails here, with one line, if the file is not a translator engine
        if r.spec.task != "translate":
            raise RtkitError(f"[translators] engine {p} is a '{r.spec.task}' model, not a translator")
    return {"weights": str(p), "method": ctx.stage.name.split("/", 1)[1], "given": True, "files": [str(p)]}


# -- conversion -----------------------------------------------------------------------------------

def run_convert(ctx: StageContext) -> dict:
    from rtkit.eval.quality import content_correlation, style_distance
    from rtkit.runtime.contact_sheet import contact_sheet
    from rtkit.runtime.converter import convert
    from rtkit.runtime.job import output_relpath

    p = ctx.stage.params
    tr = ctx.inputs[ctx.stage.inputs[0]]
    src = ctx.input_path("data/train")
    images = ctx.folder / "images"
    s = convert(ctx.path(tr["weights"]), src, images, device=p["device"], batch_size=p["batch_size"],
                progress=False)
    if s.failed or s.failed_before:
        raise RtkitError(f"conversion of {src} failed for {s.failed + s.failed_before} file(s), e.g. "
                         f"{(s.failures or [('?', '?')])[0]}; see {s.manifest}")
    ctx.log(f"{s.converted} converted ({s.already_done} already done) at {s.img_per_s:.0f} img/s")
    rels = _spread(_images(src), STAT_IMAGES)
    outs = [output_relpath(r, "png") for r in rels]
    before = _frames(src, rels)
    size = before.shape[1:3]
    after = _frames(images, outs, size)
    ref_root = ctx.input_path("data/val_target")
    ref = _frames(ref_root, _spread(_images(ref_root), STAT_IMAGES), size)
    same = content_correlation(before, after)
    other = content_correlation(before, np.roll(after, len(after) // 2, axis=0))  # another face
    gap_before, gap_after = style_distance(before, ref), style_distance(after, ref)
    sheet_rels = _first_per_identity(rels, p["sheet_count"])
    sheet = contact_sheet([(src / r, images / output_relpath(r, "png")) for r in sheet_rels],
                          ctx.folder / "sheet.png", tile=int(size[0]), labels=("render", tr["method"]))
    ctx.log(f"style gap to held-out photos {gap_before:.2f} -> {gap_after:.2f}, content kept "
            f"{same.mean():.3f} (another face {other.mean():.3f})")
    return {"images": ctx.rel(images), "converted_total": s.total, "style_gap_before": round(gap_before, 4),
            "style_gap_after": round(gap_after, 4), "content_corr": round(float(same.mean()), 4),
            "content_corr_other": round(float(other.mean()), 4), "stat_images": len(rels),
            "img_per_s": s.img_per_s, "sheet": ctx.rel(sheet), "files": [ctx.rel(images), ctx.rel(sheet)]}


def _first_per_identity(rels: list[str], count: int) -> list[str]:
    firsts: dict[str, str] = {}
    for r in rels:
        firsts.setdefault(r.split("/", 1)[0], r)
    return _spread(list(firsts.values()), count)


# -- recognizers and verification -----------------------------------------------------------------

def run_recognizer(ctx: StageContext) -> dict:
    from rtkit.train.checkpointing import CheckpointDir
    from rtkit.train.recognizer import RecognizerConfig, train_recognizer

    p = ctx.stage.params
    data_stage, key = arm_data_stage(ctx.cfg, p["arm"])
    d = dict(p["config"], data=[str(ctx.input_path(data_stage, key))], seed=p["seed"], device=p["device"],
             progress=False)
    cfg = RecognizerConfig.from_dict(d)
    resume = "latest" if ctx.resume and CheckpointDir(ctx.folder / "checkpoints").latest() is not None else None
    s = train_recognizer(cfg, ctx.folder, resume=resume, log=ctx.log)
    if not s.get("weights"):
        raise RuntimeError(f"recognizer training in {ctx.folder} ended without its final model")
    ctx.log(f"{s['steps']} steps, loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}" if s["first_loss"]
            is not None else f"{s['steps']} steps")
    w = Path(s["weights"])
    return {"weights": ctx.rel(w), "card": ctx.rel(w.with_suffix(".json")), "steps": s["steps"],
            "first_loss": s["first_loss"], "last_loss": s["last_loss"], "files": [ctx.rel(w)]}


def _embedder(ctx: StageContext, weights: Path):
    from rtkit.eval.embed import Embedder

    return Embedder(weights, device=ctx.stage.params["device"], batch_size=256, cache_dir=False, progress=False)


def run_verify(ctx: StageContext) -> dict:
    from rtkit.eval.results import write_result
    from rtkit.eval.verification import run_verification

    p = ctx.stage.params
    rec = ctx.inputs[ctx.stage.inputs[0]]
    bins = [ctx.input_path(b, "bin") for b in ctx.stage.inputs[1:]]
    with _embedder(ctx, ctx.path(rec["weights"])) as emb:
        doc = run_verification(emb, bins, flip=p["flip"], n_folds=p["folds"], label=p["arm"],
                               run=f"seed{p['seed']}")
    path = write_result(doc, ctx.folder / "result.json")
    acc = {b: round(v["accuracy"], 6) for b, v in doc["benchmarks"].items()}
    ctx.log(", ".join(f"{b} {100 * a:.2f}%" for b, a in acc.items()))
    return {"result": ctx.rel(path), "accuracy": acc, "files": [ctx.rel(path)]}


def run_identity(ctx: StageContext) -> dict:
    """How much identity a conversion kept, as the raw-render recognizer (first seed) sees it:
    cosine of each image's embedding to its source's, to other identities' sources, and rank-1
    identification of the converted image among the source identities' mean embeddings."""
    from rtkit.eval.verification import l2_normalize
    from rtkit.runtime.job import output_relpath

    images_stage, src_stage, rec_stage = ctx.stage.inputs
    key = arm_data_stage(ctx.cfg, ctx.stage.name.split("/", 1)[1])[1]
    src = ctx.input_path(src_stage)
    conv = ctx.input_path(images_stage, key)
    have = set(_images(conv))
    pairs = []
    for r in _spread(_images(src), ctx.stage.params["count"]):
        # a converted tree holds r as .png; a photo twin tree holds r itself
        o = r if r in have else output_relpath(r, "png")
        if o in have:
            pairs.append((r, o))
    if len(pairs) < 2:
        return {"pairs": len(pairs), "files": []}
    a = _frames(src, [r for r, _ in pairs])
    b = _frames(conv, [o for _, o in pairs], a.shape[1:3])
    with _embedder(ctx, ctx.path(ctx.inputs[rec_stage]["weights"])) as emb:
        ea = l2_normalize(emb.embed(len(a), lambda i: a[i], flip=False)[0].astype(np.float64))
        eb = l2_normalize(emb.embed(len(b), lambda i: b[i], flip=False)[0].astype(np.float64))
    ids = np.array([r.split("/", 1)[0] for r, _ in pairs])
    cos = eb @ ea.T
    same_id = ids[:, None] == ids[None, :]
    names = sorted(set(ids))
    centres = l2_normalize(np.stack([ea[ids == n].mean(0) for n in names]))
    rank1 = float(np.mean(np.array(names)[(eb @ centres.T).argmax(1)] == ids))
    res = {"pairs": len(pairs), "identities": len(names), "cos_own_source": round(float(np.diag(cos).mean()), 4),
           "cos_other_identity": round(float(cos[~same_id].mean()), 4), "rank1": round(rank1, 4), "files": []}
    ctx.log(f"cosine to own source {res['cos_own_source']:.3f} (other identities {res['cos_other_identity']:.3f}), "
            f"rank-1 {100 * rank1:.1f}% of {len(names)} identities")
    return res


def run_report(ctx: StageContext) -> dict:
    from rtkit.experiment.report import write_experiment_report

    paths = write_experiment_report(ctx)
    return {"report": ctx.rel(paths[0]), "written": [ctx.rel(p) for p in paths],
            "files": [ctx.rel(p) for p in paths]}


KINDS = {"sample": run_sample, "folder": run_folder, "benchmark": run_benchmark, "bin": run_bin,
         "translator": run_translator, "engine": run_engine, "convert": run_convert,
         "recognizer": run_recognizer, "verify": run_verify, "identity": run_identity, "report": run_report}


def write_timings(out: Path, ledger, runs, wall: float) -> Path:
    """OUT/timings.json: seconds per stage (when it ran) and this run's wall time; kept apart from
    the report, which must not change when a run is resumed."""
    from rtkit.experiment.ledger import write_json_durable

    doc = {"this_run_wall_s": round(wall, 3),
           "stages": {r.name: {"status": r.status,
                               "seconds": (ledger.entry(r.name) or {}).get("seconds", r.seconds),
                               "attempts": (ledger.entry(r.name) or {}).get("attempts")} for r in runs}}
    doc["sum_of_stage_s"] = round(sum(v["seconds"] or 0 for v in doc["stages"].values()), 3)
    path = out / "timings.json"
    write_json_durable(doc, path)
    return path


__all__ = ["KINDS", "write_timings", "translator_config"]
