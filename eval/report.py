"""The reports built from rt-eval result files (rtkit.eval.results): the paper's Tables 2 and 3
as Markdown and CSV, and ROC figures.

Across runs sharing a label the std is the sample std (ddof = 1); a single run has none.
Table 2 shows only the benchmarks some result holds. Its average is the paper's five-benchmark
average when LFW, CFP-FP, CPLFW, CALFW and AgeDB-30 are all there; otherwise it is the mean
over the benchmarks present, and its title says which.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from rtkit.engines.errors import MissingDependency
from rtkit.eval.results import load_results
from rtkit.eval.roc import CONVENTIONS, FMR_TARGETS, fmr_key
from rtkit.eval.verification import BENCHMARK_TITLES, BENCHMARKS

DATASET_TITLES = {"IJBC": "IJB-C", "IJBB": "IJB-B"}


# -- aggregation -------------------------------------------------------------------------------

def mean_std(values) -> tuple[float, float | None, int]:
    """(mean, sample std or None for one value, count)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return float("nan"), None, 0
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None), int(v.size)


def _labels_in_order(docs) -> list[str]:
    seen: dict[str, None] = {}
    for d in docs:
        seen.setdefault(d["label"], None)
    return list(seen)


def verification_runs(docs) -> dict[str, dict[str, dict[str, float]]]:
    """label -> run -> benchmark -> accuracy; later files override earlier ones."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for d in docs:
        if d["kind"] != "verification":
            continue
        runs = out.setdefault(d["label"], {})
        accs = runs.setdefault(str(d["run"]), {})
        for name, b in d["benchmarks"].items():
            accs[name] = float(b["accuracy"])
    return out


def verification_benchmarks(docs) -> tuple[list[str], list[str]]:
    """(benchmarks some verification result holds, standard ones first in their usual order
    then the others sorted; the benchmarks the avg column averages)."""
    present = {b for d in docs if d["kind"] == "verification" for b in d["benchmarks"]}
    columns = [b for b in BENCHMARKS if b in present] + sorted(present - set(BENCHMARKS))
    averaged = list(BENCHMARKS) if all(b in present for b in BENCHMARKS) else columns
    return columns, averaged


def verification_table(docs) -> list[dict]:
    """Rows of Table 2: per label, mean/std/n over runs for each benchmark present and the avg.

    A run's avg is the mean over the averaged benchmarks (``verification_benchmarks``); runs
    missing one of them are left out of the avg column.
    """
    runs_by_label = verification_runs(docs)
    columns, averaged = verification_benchmarks(docs)
    rows = []
    for label in _labels_in_order([d for d in docs if d["kind"] == "verification"]):
        runs = runs_by_label[label]
        row = {"label": label, "runs": len(runs), "columns": {}}
        for b in columns:
            row["columns"][b] = mean_std(a[b] for a in runs.values() if b in a)
        row["columns"]["avg"] = mean_std(np.mean([a[b] for b in averaged])
                                         for a in runs.values() if all(b in a for b in averaged))
        rows.append(row)
    return rows


def ijb_table(docs, dataset: str, convention: str) -> list[dict]:
    """Rows of Table 3 for one dataset and TAR convention: mean/std/n of TAR at each FMR."""
    rows = []
    selected = [d for d in docs if d["kind"] == "ijb" and d["dataset"] == dataset]
    for label in _labels_in_order(selected):
        by_run = {str(d["run"]): d for d in selected if d["label"] == label}  # last one wins
        row = {"label": label, "runs": len(by_run), "columns": {}}
        for t in FMR_TARGETS:
            k = fmr_key(t)
            row["columns"][k] = mean_std(d["tar_at_fmr"][convention][k] for d in by_run.values()
                                         if k in d["tar_at_fmr"].get(convention, {}))
        row["columns"]["auc"] = mean_std(d["auc"] for d in by_run.values())
        row["columns"]["eer"] = mean_std(d["eer"]["eer"] for d in by_run.values() if "eer" in d)
        rows.append(row)
    return rows


def ijb_mean_roc(docs, dataset: str) -> list[tuple[str, np.ndarray, np.ndarray, int]]:
    """(label, fpr grid, mean TPR over runs, runs) per label, from the ROCs in the files."""
    curves = []
    selected = [d for d in docs if d["kind"] == "ijb" and d["dataset"] == dataset]
    for label in _labels_in_order(selected):
        by_run = {str(d["run"]): d for d in selected if d["label"] == label}
        fpr = np.asarray(next(iter(by_run.values()))["roc"]["fpr"])
        tprs = [np.interp(fpr, d["roc"]["fpr"], d["roc"]["tpr"]) for d in by_run.values()]
        curves.append((label, fpr, np.mean(tprs, axis=0), len(by_run)))
    return curves


# -- formatting --------------------------------------------------------------------------------

def _cell(stat, scale: float = 100.0, digits: int = 2) -> str:
    mean, std, n = stat
    if n == 0:
        return "-"
    if std is None:
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def markdown_table(rows: list[dict], columns: list[tuple[str, str]], first: str) -> str:
    """``columns``: (key, title) pairs; cells are percentages, mean ± std over runs."""
    head = [first, "runs", *[t for _, t in columns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["label"], str(r["runs"]),
                                         *[_cell(r["columns"][k]) for k, _ in columns]]) + " |")
    return "\n".join(lines)


def csv_table(rows: list[dict], columns: list[tuple[str, str]], first: str) -> str:
    """One row per label: mean, std and n of each column (percentages, 4 decimals)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([first, "runs", *[f"{k}_{s}" for k, _ in columns for s in ("mean", "std", "n")]])
    for r in rows:
        cells = []
        for k, _ in columns:
            mean, std, n = r["columns"][k]
            cells += ["" if n == 0 else f"{100 * mean:.4f}",
                      "" if std is None else f"{100 * std:.4f}", n]
        w.writerow([r["label"], r["runs"], *cells])
    return buf.getvalue()


def _title(benchmark: str) -> str:
    return BENCHMARK_TITLES.get(benchmark, benchmark)


def verification_columns(docs) -> list[tuple[str, str]]:
    """(key, title) of Table 2's columns: the benchmarks present, then the avg."""
    columns, averaged = verification_benchmarks(docs)
    if averaged == list(BENCHMARKS):
        avg = "avg"
    elif len(averaged) == 1:
        avg = f"avg ({_title(averaged[0])} only)"
    else:
        avg = f"avg of {len(averaged)} present ({', '.join(map(_title, averaged))})"
    return [(b, _title(b)) for b in columns] + [("avg", avg)]


def ijb_columns() -> list[tuple[str, str]]:
    return ([(fmr_key(t), f"TAR@FMR={fmr_key(t)}") for t in FMR_TARGETS]
            + [("auc", "AUC"), ("eer", "EER")])


# -- plots -------------------------------------------------------------------------------------

def write_ijb_outputs(doc: dict, curve, out: str | Path) -> list[Path]:
    """An IJB result document at ``out`` and its ROC beside it (.png, .pdf): what rt-eval ijbc writes."""
    from rtkit.eval.results import write_result

    name = f"{doc['label']} (AUC {100 * doc['auc']:.2f} %)"
    return [write_result(doc, out), *plot_roc([(name, curve.fpr, curve.tpr)], Path(out).with_suffix(""),
                                              title=f"ROC on {doc['dataset']}")]


def plot_roc(curves, out_stem: str | Path, title: str = "ROC") -> list[Path]:
    """Write ``out_stem``.png and .pdf: TPR against FPR (log axis) for each
    ``(label, fpr, tpr)``. matplotlib is imported here only."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter
    except ImportError:
        raise MissingDependency("plotting ROC curves needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(6.0, 4.5))
    ax = fig.add_subplot()
    lo = 1.0
    for label, fpr, tpr in curves:
        fpr, tpr = np.asarray(fpr), np.asarray(tpr)
        keep = fpr > 0  # log axis
        ax.plot(fpr[keep], tpr[keep], lw=1.2, label=label)
        in_range = tpr[(fpr >= FMR_TARGETS[0]) & (fpr <= FMR_TARGETS[-1])]
        if in_range.size:
            lo = min(lo, float(in_range.min()))
    ax.set_xscale("log")
    ax.set_xlim(FMR_TARGETS[0], FMR_TARGETS[-1])
    ax.set_ylim(max(0.0, min(0.9, np.floor(lo * 10) / 10)), 1.0)
    ax.set_xticks(FMR_TARGETS)
    ax.xaxis.set_minor_formatter(NullFormatter())  # unlabelled minor ticks: faster, cleaner
    ax.grid(linestyle="--", linewidth=0.6)
    ax.set_xlabel("False match rate")
    ax.set_ylabel("True accept rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.92)
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in ("png", "pdf"):
        p = out_stem.with_name(out_stem.name + "." + ext)
        fig.savefig(p, dpi=150)
        written.append(p)
    return written


# -- the report --------------------------------------------------------------------------------

def write_report(result_paths, out_dir: str | Path, *, plots: bool = True) -> list[Path]:
    """Tables 2 (verification) and 3 (IJB TAR@FMR, one per dataset and convention) as
    Markdown (report.md) and CSV, plus a combined ROC figure per IJB dataset."""
    docs = load_results(result_paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    md = ["# rt-eval report", "",
          f"{len(docs)} result files. Cells are percentages, mean ± sample std (ddof 1) over "
          f"runs sharing a label; a single run shows its value alone.", ""]

    vrows = verification_table(docs)
    if vrows:
        cols = verification_columns(docs)
        _, averaged = verification_benchmarks(docs)
        avg_note = ("avg = mean of the five benchmarks per run" if averaged == list(BENCHMARKS)
                    else f"avg = mean over the benchmarks present "
                         f"({', '.join(map(_title, averaged))}) per run, not the five-benchmark "
                         f"average of the paper")
        md += ["## Table 2: verification accuracy (%)", "",
               f"10-fold accuracy per benchmark (insightface protocol); {avg_note}.", "",
               markdown_table(vrows, cols, "training data"), ""]
        p = out_dir / "table2_verification.csv"
        p.write_text(csv_table(vrows, cols, "training data"))
        written.append(p)

    datasets = sorted({d["dataset"] for d in docs if d["kind"] == "ijb"})
    for ds in datasets:
        title = DATASET_TITLES.get(ds, ds)
        for conv, meaning in CONVENTIONS.items():
            rows = ijb_table(docs, ds, conv)
            md += [f"## Table 3: {title} 1:1 TAR (%) at FMR, convention `{conv}`", "",
                   f"Convention `{conv}`: {meaning}. AUC = area under the ROC curve; EER = "
                   f"equal error rate (bob.measure eer).", "",
                   markdown_table(rows, ijb_columns(), "training data"), ""]
            p = out_dir / f"table3_{ds.lower()}_{conv}.csv"
            p.write_text(csv_table(rows, ijb_columns(), "training data"))
            written.append(p)
        old = sorted({d["_path"] for d in docs if d["kind"] == "ijb" and d["dataset"] == ds
                      and d.get("format_version") == 1})
        if old:
            md += [f"{len(old)} {title} result file(s) of format 1 (e.g. `{old[0]}`) hold no "
                   f"bob.measure TAR or EER: their `fmr_le_target` numbers used another rule "
                   f"(any score as the threshold) and are not shown; evaluate again to fill "
                   f"those cells.", ""]
        if plots:
            curves = [(f"{label} ({n} run{'s' if n > 1 else ''})", fpr, tpr)
                      for label, fpr, tpr, n in ijb_mean_roc(docs, ds)]
            written += plot_roc(curves, out_dir / f"roc_{ds.lower()}",
                                title=f"{title} 1:1 verification (mean over runs)")
            md += [f"![{title} ROC](roc_{ds.lower()}.png)", ""]

    md += ["## Sources", ""] + [f"- `{d['_path']}`: {d['kind']} {d.get('dataset', '')} label "
                                f"`{d['label']}` run `{d['run']}` model `{d.get('model')}`"
                                for d in docs]
    p = out_dir / "report.md"
    p.write_text("\n".join(md) + "\n")
    written.insert(0, p)
    return written


__all__ = ["DATASET_TITLES", "mean_std", "verification_runs", "verification_benchmarks",
           "verification_table", "ijb_table", "ijb_mean_roc", "markdown_table", "csv_table",
           "verification_columns", "ijb_columns", "plot_roc", "write_report"]
