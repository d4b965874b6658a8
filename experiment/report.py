"""The experiment's report: the paper's Table 2 over seeds with per-seed deltas against the raw arm,
the per-seed accuracies, one ROC figure, and each translator's conversion figures and sheet.

Written to OUT/report/: report.md, report.json (every number), table2.csv, roc.png, sheets/.
The report holds no wall times, dates or absolute paths inside OUT, so a run that was killed and
resumed writes the same bytes as one that was not (times are in OUT/timings.json).
Cells are percentages; mean ± sample std (ddof 1) over seeds; a delta is per seed (arm seed s
minus raw seed s), then mean ± std of those deltas, with how many seeds gained.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np

from rtkit.eval.report import mean_std, verification_runs
from rtkit.eval.results import load_results
from rtkit.eval.verification import BENCHMARK_TITLES
from rtkit.experiment.config import ARM_RAW, ARM_UPPER
from rtkit.experiment.plan import StageContext


def arm_title(arm: str) -> str:
    if arm == ARM_RAW:
        return "renders (raw)"
    if arm == ARM_UPPER:
        return "photo-style, same identities (upper bound)"
    return f"renders -> {arm}"


def bench_title(name: str) -> str:
    return {"photo": "photo-style", "render": "render-style (control)"}.get(name, BENCHMARK_TITLES.get(name, name))


def _pct(mean, std=None, sign=False) -> str:
    if mean is None or not np.isfinite(mean):
        return "-"
    f = "+.2f" if sign else ".2f"
    return f"{100 * mean:{f}}" + ("" if std is None else f" ± {100 * std:.2f}")


def summarise(accs: dict[str, dict[str, dict[str, float]]], arms: list[str], seeds: list[int],
              benchmarks: list[str]) -> dict:
    """Per arm and benchmark: per-seed accuracies, mean/std/n, per-seed deltas vs raw and their
    mean/std/n and the seeds that gained."""
    runs = [f"seed{s}" for s in seeds]
    out = {}
    for arm in arms:
        row = {}
        for b in benchmarks:
            per_seed = {r: accs.get(arm, {}).get(r, {}).get(b) for r in runs}
            vals = [v for v in per_seed.values() if v is not None]
            m, s, n = mean_std(vals)
            cell = {"per_seed": per_seed, "mean": m if n else None, "std": s, "n": n}
            if arm != ARM_RAW:
                deltas = {r: (per_seed[r] - accs[ARM_RAW][r][b]) for r in runs
                          if per_seed[r] is not None and accs.get(ARM_RAW, {}).get(r, {}).get(b) is not None}
                dm, ds, dn = mean_std(deltas.values())
                # a real gain is at least one pair of a benchmark; below that it is float noise
                cell["delta"] = {"per_seed": deltas, "mean": dm if dn else None, "std": ds, "n": dn,
                                 "gained": sum(d > 1e-9 for d in deltas.values())}
            row[b] = cell
        out[arm] = row
    return out


def table2_markdown(summary: dict, arms: list[str], benchmarks: list[str], seeds: int) -> str:
    head = ["training data", "seeds"]
    for b in benchmarks:
        head += [bench_title(b), f"Δ {b} vs raw (seeds gained)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        cells = [arm_title(arm), str(max((summary[arm][b]["n"] for b in benchmarks), default=0))]
        for b in benchmarks:
            c = summary[arm][b]
            cells.append(_pct(c["mean"], c["std"]))
            d = c.get("delta")
            cells.append("-" if d is None or not d["n"] else f"{_pct(d['mean'], d['std'], sign=True)} "
                                                              f"({d['gained']}/{d['n']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_markdown(summary: dict, arms: list[str], benchmarks: list[str], seeds: list[int]) -> str:
    head = ["training data", "seed"] + [bench_title(b) for b in benchmarks] + [f"Δ {b}" for b in benchmarks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        for s in seeds:
            r = f"seed{s}"
            cells = [arm_title(arm), str(s)]
            cells += [_pct(summary[arm][b]["per_seed"][r]) for b in benchmarks]
            cells += [_pct(summary[arm][b]["delta"]["per_seed"].get(r), sign=True) if "delta" in summary[arm][b]
                      else "-" for b in benchmarks]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table2_csv(summary: dict, arms: list[str], benchmarks: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["arm", "training data"]
    for b in benchmarks:
        head += [f"{b}_mean", f"{b}_std", f"{b}_n", f"{b}_delta_mean", f"{b}_delta_std", f"{b}_seeds_gained"]
    w.writerow(head)
    fmt = lambda v: "" if v is None else f"{100 * v:.4f}"
    for arm in arms:
        row = [arm, arm_title(arm)]
        for b in benchmarks:
            c = summary[arm][b]
            d = c.get("delta") or {}
            row += [fmt(c["mean"]), fmt(c["std"]), c["n"], fmt(d.get("mean")), fmt(d.get("std")),
                    d.get("gained", "")]
        w.writerow(row)
    return buf.getvalue()


def plot_rocs(docs: list[dict], arms: list[str], benchmarks: list[str], path: Path) -> Path:
    """One figure, a panel per benchmark: each arm's ROC (the verification protocol's mean over
    folds at each threshold), averaged over seeds at each threshold."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * len(benchmarks), 4.2))
    for k, b in enumerate(benchmarks):
        ax = fig.add_subplot(1, len(benchmarks), k + 1)
        lo = 1.0
        for arm in arms:
            curves = [d["benchmarks"][b]["roc_mean_over_folds"] for d in docs
                      if d["label"] == arm and b in d["benchmarks"]]
            if not curves:
                continue
            fpr = np.mean([c["fpr"] for c in curves], axis=0)
            tpr = np.mean([c["tpr"] for c in curves], axis=0)
            keep = fpr > 0
            ax.plot(fpr[keep], tpr[keep], lw=1.3, label=f"{arm_title(arm)} ({len(curves)})")
            pairs = next(d["benchmarks"][b]["pairs"] for d in docs if b in d["benchmarks"])
            lo = min(lo, 1.0 / max(1, pairs // 2))
        ax.set_xscale("log")
        ax.set_xlim(10 ** np.floor(np.log10(lo)), 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.grid(linestyle="--", linewidth=0.6)
        ax.set_xlabel("false match rate")
        ax.set_ylabel("true accept rate")
        ax.set_title(bench_title(b))
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return path


def _design_text(design: dict, seeds: list[int]) -> list[str]:
    rec = design["recognizer"]
    lines = [f"Recognizers: `{rec.get('backbone', 'adaface_ir50')}` + `{rec.get('head', 'adaface')}` head at "
             f"{rec.get('image_size', 112)} px, batch {rec.get('batch_size', 256)}, "
             f"{rec.get('max_steps') or str(rec.get('epochs', 30)) + ' epochs'}"
             f"{' steps' if rec.get('max_steps') else ''}, lr {rec.get('lr', 0.1)}; identical settings for "
             f"every arm; seeds {', '.join(map(str, seeds))} (the seed changes initialisation, data order and "
             f"augmentation; each translator is trained once)."]
    if design["world"]:
        r = design["world"]["ranges"]
        span = lambda k: f"{r[k][0]}..{r[k][0] + r[k][1] - 1} ({r[k][1]} x {r[k][2]} images)"
        lines.append(f"Sample world (seed {design['world']['seed']}, {design['world']['size']} px), disjoint "
                     f"identities: training renders {span('train')}; translator target (photo style) "
                     f"{span('target')}; translator held-out set {span('val')}; benchmarks {span('test')}.")
    if design["user_sets"]:
        lines.append(f"Sets from the user's folders: {', '.join(design['user_sets'])}.")
    trained = [m for m in design["translators"] if m not in design["given_engines"]]
    if trained:
        lines.append(f"Translators trained by rtkit, unpaired (source = training renders, target = photo-style "
                     f"images of other identities), preset `{design['translator_preset']}`: "
                     f"{', '.join(trained)}; weights with the lowest held-out style gap are used.")
    if design["given_engines"]:
        lines.append(f"Given translator engines: {', '.join(design['given_engines'])}.")
    lines.append(f"Benchmarks: {design['folds']} identity-disjoint folds x {design['pairs_per_fold']} pairs "
                 f"(half genuine), {'image + flip' if design['flip'] else 'no flip'}, the insightface k-fold "
                 f"protocol (each fold's threshold chosen on the other folds).")
    return lines


def conversion_markdown(conversions: dict, identity: dict) -> str:
    head = ["translator", "steps (step used)", "held-out gap: untranslated -> used",
            "train renders' gap to held-out photos: before -> after", "content kept (another face)",
            "identity: cos to own source (other ids)", "rank-1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, c in conversions.items():
        tr = c["translator"]
        best = tr.get("best") or {}
        held = tr.get("held_out") or {}
        by_step = held.get("by_step") or {}
        steps = (f"{tr.get('steps')} ({best.get('step', 'last: no step kept the content')})"
                 if not tr.get("given") else "given engine")
        used = best.get("val_style_gap")
        if used is None and by_step:
            used = by_step[max(by_step, key=int)][0]
        gap_held = (f"{held['untranslated']:.2f} -> {used:.2f}"
                    if held.get("untranslated") is not None and used is not None else "-")
        cv = c["convert"]
        ratio = cv["style_gap_after"] / cv["style_gap_before"] if cv["style_gap_before"] else float("nan")
        idn = identity.get(m) or {}
        lines.append("| " + " | ".join([
            m, steps, gap_held,
            f"{cv['style_gap_before']:.2f} -> {cv['style_gap_after']:.2f} (x{ratio:.2f})",
            f"{cv['content_corr']:.3f} ({cv['content_corr_other']:.3f})",
            f"{idn['cos_own_source']:.3f} ({idn['cos_other_identity']:.3f})" if "rank1" in idn else "-",
            f"{100 * idn['rank1']:.1f}%" if "rank1" in idn else "-"]) + " |")
    if ARM_UPPER in identity and "rank1" in identity[ARM_UPPER]:
        idn = identity[ARM_UPPER]
        lines.append(f"| photo twins (reference) | - | - | - | - | {idn['cos_own_source']:.3f} "
                     f"({idn['cos_other_identity']:.3f}) | {100 * idn['rank1']:.1f}% |")
    return "\n".join(lines)


def write_experiment_report(ctx: StageContext) -> list[Path]:
    p = ctx.stage.params
    arms, seeds, benchmarks = p["arms"], p["seeds"], p["benchmarks"]
    folder = ctx.folder
    results = [ctx.path(o["result"]) for n, o in ctx.inputs.items() if n.startswith("results/")]
    docs = load_results(results)
    summary = summarise(verification_runs(docs), arms, seeds, benchmarks)
    conversions = {}
    for n, o in ctx.inputs.items():
        if n.startswith("converted/"):
            m = n.split("/", 1)[1]
            conversions[m] = {"translator": ctx.inputs[f"translators/{m}"], "convert": o}
    identity = {n.split("/", 1)[1]: {k: v for k, v in o.items() if k != "files"}
                for n, o in ctx.inputs.items() if n.startswith("identity/")}

    written = []
    roc = plot_rocs(docs, arms, benchmarks, folder / "roc.png")
    sheets = {}
    for m, c in conversions.items():
        dst = folder / "sheets" / f"{m}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ctx.path(c["convert"]["sheet"]), dst)
        sheets[m] = dst
    csv_path = folder / "table2.csv"
    csv_path.write_text(table2_csv(summary, arms, benchmarks))

    design = p["design"]
    md = [f"# rt-experiment report: {design['name']}", ""] + _design_text(design, seeds) + [""]
    md += ["## Table 2: verification accuracy (%)", "",
           "Mean ± sample std over seeds; Δ = per-seed difference to the raw-render recognizer of the same "
           "seed, mean ± std over seeds (seeds with a gain / seeds). Only the benchmarks that exist are "
           "columns.", "", table2_markdown(summary, arms, benchmarks, len(seeds)), ""]
    if "photo" in benchmarks and "render" in benchmarks:
        md += [_reading(summary, arms), ""]
    md += ["## Per seed", "", per_seed_markdown(summary, arms, benchmarks, seeds), "",
           "## ROC", "", f"![ROC]({roc.name})", ""]
    if conversions:
        md += ["## Conversions", "",
               "Style gap: mean |difference| of colour/frequency statistics (rtkit.eval.quality, 0-255 scale) "
               "to held-out photo-style images; content kept: luma correlation of each converted image with "
               "its render (with another face in brackets); identity: the raw-render recognizer (first "
               "seed) embeds each converted image, cosine to its own render and rank-1 among the training "
               "identities' mean render embeddings.", "", conversion_markdown(conversions, identity), ""]
        for m, s in sheets.items():
            md += [f"### {m}: before / after", "", f"![{m}](sheets/{s.name})", ""]
    report = folder / "report.md"
    report.write_text("\n".join(md) + "\n")
    doc = {"format": "rtkit-experiment-report-v1", "design": design, "arms": arms, "seeds": seeds,
           "benchmarks": benchmarks, "table2": summary,
           "conversions": {m: {"translator": {k: v for k, v in c["translator"].items() if k not in ("files",
                                                                                               "img_per_s")},
                               "convert": {k: v for k, v in c["convert"].items() if k not in ("files", "img_per_s")}}
                           for m, c in conversions.items()},
           "identity": identity}
    js = folder / "report.json"
    js.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    written = [report, js, csv_path, roc, *sheets.values()]
    return written


def _reading(summary: dict, arms: list[str]) -> str:
    """One plain sentence per translated arm: gain on photos, and whether the control moved too."""
    out = []
    for arm in arms:
        if arm in (ARM_RAW, ARM_UPPER):
            continue
        dp, dr = summary[arm]["photo"].get("delta"), summary[arm]["render"].get("delta")
        if not dp or not dp["n"]:
            continue
        spread = f" ± {100 * dp['std']:.2f}" if dp["std"] is not None else ""
        s = (f"{arm}: {100 * dp['mean']:+.2f}{spread} points on the photo-style benchmark "
             f"({dp['gained']}/{dp['n']} seeds gained)")
        noisy = dp["std"] is None or abs(dp["mean"]) <= dp["std"]
        if dr and dr["n"]:
            s += f", {100 * dr['mean']:+.2f} on the render-style control"
        if noisy:
            s += "; within the seed spread (one seed, or |mean| <= std): no conclusion"
        elif dp["mean"] > 0 and dr and dr["n"]:
            s += ("; the control does not gain: the gain is specific to the photo domain (domain adaptation)"
                  if dr["mean"] <= 0 else "; the control gains too: not only domain adaptation")
        out.append(s + ".")
    if ARM_UPPER in summary and summary[ARM_UPPER]["photo"].get("delta", {}).get("n"):
        d = summary[ARM_UPPER]["photo"]["delta"]
        out.append(f"Upper bound (photo-style training images of the same identities): "
                   f"{100 * d['mean']:+.2f} points on the photo-style benchmark.")
    return " ".join(out)


__all__ = ["write_experiment_report", "summarise", "table2_markdown", "per_seed_markdown", "table2_csv",
           "plot_rocs", "arm_title", "bench_title", "conversion_markdown"]
