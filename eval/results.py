"""Result documents of rt-eval: one JSON file per evaluation, read back by the report.

A result file is written by ``rt-eval verify`` or ``rt-eval ijbc``:

    {
      "format": "rtkit-eval", "format_version": 2,
      "kind": "verification" | "ijb",
      "label": "DigiFace1M",          # row of the report: training data / transfer method
      "run": "seed1",                 # runs with the same label are aggregated (mean +- std)
      "model": "iresnet50", "engine": "...", "checkpoint": "...", "engine_identity": "sha256",
      "backend": "torch", "precision": "fp32", "device": "cpu", "input": {...},
      "created": "2025-01-01T00:00:00+00:00", "rtkit_version": "0.1.0",
      # kind "verification":
      "benchmarks": {"lfw": {"accuracy": 0.9929, "std": 0.0031, "pairs": 6000, ...}, ...},
      "average": 0.8032 | null,       # mean accuracy of the five benchmarks when all are there
      # kind "ijb":
      "dataset": "IJBC", "options": {"flip": true, "norm_weight": true, "faceness_weight": true},
      "tar_at_fmr": {"insightface": {"1e-06": 0.41, ...}, "bob_measure": {...}},
      "operating_points": {...}, "eer": {...},
      "auc": 0.99, "roc": {"fpr": [...], "tpr": [...]}, "n_pairs": ..., ...
    }

Accuracies and TARs are fractions in files and percentages in reports.

Format 1 files still load. Their IJB documents hold ``tar_at_fmr["fmr_le_target"]``, which was
the best TAR over every score used as a threshold (a genuine score may set it), not
bob.measure's rule; the report does not show it as bob.measure's.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from rtkit.engines.errors import RtkitError

RESULT_FORMAT = "rtkit-eval"
RESULT_FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
KINDS = ("verification", "ijb")


class ResultFileError(RtkitError, ValueError):
    """A file given to the report that is not an rt-eval result."""


def _rtkit_version() -> str:
    try:
        from importlib.metadata import version
        return version("rtkit")
    except Exception:
        return "unknown"


def new_result(kind: str, embedder, *, label: str | None = None, run: str | None = None) -> dict:
    """The common head of a result document for ``embedder`` (an rtkit.eval.embed.Embedder).

    Defaults: label = the checkpoint's file stem, else the model name; run = the first 12
    hex digits of the engine identity.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    info = embedder.describe()
    default_label = Path(info["checkpoint"]).stem if info.get("checkpoint") else info["model"]
    return {"format": RESULT_FORMAT, "format_version": RESULT_FORMAT_VERSION, "kind": kind,
            "label": label or default_label, "run": run or info["engine_identity"][:12],
            **info,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "rtkit_version": _rtkit_version()}


def write_result(doc: dict, path: str | Path) -> Path:
    """Write ``doc`` as JSON through a temporary name, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path


def load_results(paths) -> list[dict]:
    """Result documents from files, or from the rt-eval result files among the *.json under a
    folder (sorted; other JSON files there are skipped). A file named twice is read once."""
    files: list[tuple[Path, bool]] = []  # (file, named explicitly)
    for p in map(Path, paths):
        if p.is_dir():
            files.extend((f, False) for f in sorted(p.rglob("*.json")))
        elif p.is_file():
            files.append((p, True))
        else:
            raise ResultFileError(f"result file not found: {p}")
    docs = []
    seen: set[Path] = set()
    for f, explicit in files:
        if f.resolve() in seen:  # named twice (e.g. a file and its folder)
            continue
        seen.add(f.resolve())
        try:
            doc = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            if not explicit:
                continue  # other JSON files in a results folder are not ours to judge
            raise ResultFileError(f"{f} is not an rt-eval result file (invalid JSON: {e})") from None
        if not isinstance(doc, dict) or doc.get("format") != RESULT_FORMAT:
            if not explicit:
                continue
            raise ResultFileError(f"{f} is not an rt-eval result file (no \"format\": "
                                  f"\"{RESULT_FORMAT}\")")
        if doc.get("format_version") not in READABLE_VERSIONS or doc.get("kind") not in KINDS:
            raise ResultFileError(f"{f}: unsupported result format version "
                                  f"{doc.get('format_version')!r} or kind {doc.get('kind')!r}")
        doc["_path"] = str(f)
        docs.append(doc)
    if not docs:
        raise ResultFileError(f"no rt-eval result files in {', '.join(map(str, paths))}")
    return docs


__all__ = ["RESULT_FORMAT", "RESULT_FORMAT_VERSION", "READABLE_VERSIONS", "KINDS",
           "ResultFileError", "new_result", "write_result", "load_results"]
