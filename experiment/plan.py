"""The plan of an experiment: its stages, their settings, inputs and folders (see rtkit.experiment.chain)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rtkit.engines.errors import RtkitError
from rtkit.experiment.config import ARM_RAW, ARM_UPPER, ExperimentConfig

Log = Callable[[str], None]
# bumped when the report's layout changes, so a finished experiment's report is written again
REPORT_LAYOUT = 1


@dataclass
class Stage:
    name: str
    kind: str
    params: dict
    inputs: list[str] = field(default_factory=list)
    resumable: bool = False          # an interrupted attempt's folder is kept: the step resumes itself
    writes: bool = True              # has a folder under OUT (user folders and files have none)


@dataclass
class StageContext:
    cfg: ExperimentConfig
    out: Path
    stage: Stage
    inputs: dict[str, dict]          # input stage name -> its outputs
    resume: bool                     # an interrupted attempt under the same key left this folder
    log: Log

    @property
    def folder(self) -> Path:
        return self.out / self.stage.name

    def rel(self, path: str | Path) -> str:
        """A path inside OUT as OUT-relative text (outputs stay valid if OUT moves)."""
        p = Path(path)
        try:
            return p.resolve().relative_to(self.out.resolve()).as_posix()
        except ValueError:
            return str(p)

    def path(self, text: str) -> Path:
        p = Path(text)
        return p if p.is_absolute() else self.out / p

    def input_path(self, stage: str, key: str = "path") -> Path:
        return self.path(self.inputs[stage][key])


# -- the plan -----------------------------------------------------------------------------------

def arm_data_stage(cfg: ExperimentConfig, arm: str) -> tuple[str, str]:
    """(stage, output key) holding the training images of ``arm``."""
    if arm == ARM_RAW:
        return "data/train", "path"
    if arm == ARM_UPPER:
        return "data/upper", "path"
    return f"converted/{arm}", "images"


def _fingerprint(path: Path) -> dict:
    """Cheap identity of a user folder or file (count, bytes, newest mtime): a changed dataset
    changes the keys of the stages that read it."""
    if path.is_file():
        st = path.stat()
        return {"files": 1, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    n = size = newest = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if f.startswith("."):
                continue
            st = os.stat(os.path.join(root, f))
            n, size, newest = n + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    return {"files": n, "bytes": size, "mtime_ns": newest}


def _world_sets(cfg: ExperimentConfig) -> dict[str, dict]:
    r = cfg.world.ranges()
    sets = {"train": ("render", r["train"]), "target": ("photo", r["target"]),
            "val_source": ("render", r["val"]), "val_target": ("photo", r["val"]),
            "test_photo": ("photo", r["test"]), "test_render": ("render", r["test"])}
    if cfg.upper_bound:
        sets["upper"] = ("photo", r["train"])
    return {name: {"style": style, "first_identity": first, "identities": n, "per_identity": k,
                   "seed": cfg.world.seed, "size": cfg.world.size}
            for name, (style, (first, n, k)) in sets.items()}


def plan(cfg: ExperimentConfig, out: Path | None = None) -> list[Stage]:
    """The stages of ``cfg`` in the order they run."""
    out = Path(out) if out is not None else cfg.path(cfg.out)
    stages: list[Stage] = []
    for name, params in _world_sets(cfg).items():
        if name in cfg.data:
            p = cfg.path(cfg.data[name]).resolve()
            _check_outside(p, out, f"[data] {name}")
            stages.append(Stage(f"data/{name}", "folder", {"path": str(p), "fingerprint": _fingerprint(p)},
                                writes=False))
        else:
            stages.append(Stage(f"data/{name}", "sample", params))
    bench = dict(folds=cfg.folds, pairs_per_fold=cfg.pairs_per_fold, seed=cfg.pairs_seed)
    bench_names = ["photo", "render"]
    for name in bench_names:
        stages.append(Stage(f"benchmarks/{name}", "benchmark", dict(bench, name=name), [f"data/test_{name}"]))
    for b in cfg.bins:
        p = cfg.path(b).resolve()
        name = p.stem.lower()
        if name in bench_names:
            raise RtkitError(f"[benchmarks] bins: {p.name} has the name of a benchmark the experiment makes "
                             f"({name}); rename the file")
        bench_names.append(name)
        stages.append(Stage(f"benchmarks/{name}", "bin", {"path": str(p), "fingerprint": _fingerprint(p)
                                                          if p.exists() else None}, writes=False))
    for t in cfg.translators:
        if t.engine is not None:
            p = cfg.path(t.engine).resolve()
            stages.append(Stage(f"translators/{t.method}", "engine",
                                {"path": str(p), "fingerprint": _fingerprint(p) if p.exists() else None},
                                writes=False))
        else:
            fields = dict(cfg.translator_defaults)
            opts = dict(fields.pop("options", {}) or {})
            fields.update(t.fields)
            opts.update(fields.pop("options", {}) or {})
            opts.update(t.options)
            stages.append(Stage(f"translators/{t.method}", "translator",
                                {"method": t.method, "preset": cfg.translator_preset, "fields": fields,
                                 "options": opts, "device": cfg.device},
                                ["data/train", "data/target", "data/val_source", "data/val_target"],
                                resumable=True))
        stages.append(Stage(f"converted/{t.method}", "convert",
                            {"batch_size": cfg.convert_batch_size, "device": cfg.device,
                             "sheet_count": cfg.sheet_count},
                            [f"translators/{t.method}", "data/train", "data/val_target"], resumable=True))
    verify_inputs = [f"benchmarks/{b}" for b in bench_names]
    first_seed = cfg.seeds[0]
    for seed in cfg.seeds:
        for arm in cfg.arms:
            data_stage, _ = arm_data_stage(cfg, arm)
            rec = f"recognizers/{arm}/seed{seed}"
            stages.append(Stage(rec, "recognizer", {"arm": arm, "seed": seed, "config": cfg.recognizer,
                                                    "device": cfg.device}, [data_stage], resumable=True))
            stages.append(Stage(f"results/{arm}/seed{seed}", "verify",
                                {"arm": arm, "seed": seed, "folds": cfg.folds, "flip": cfg.flip,
                                 "device": cfg.device}, [rec] + verify_inputs))
            if arm == ARM_RAW and seed == first_seed and cfg.identity_check:
                for other in cfg.arms[1:]:
                    stages.append(Stage(f"identity/{other}", "identity", {"count": 256, "device": cfg.device},
                                        [arm_data_stage(cfg, other)[0], "data/train", rec]))
    inputs = [s.name for s in stages if s.kind in ("verify", "convert", "translator", "engine", "identity")]
    stages.append(Stage("report", "report", {"layout": REPORT_LAYOUT, "arms": cfg.arms, "seeds": list(cfg.seeds),
                                             "benchmarks": bench_names, "design": _design(cfg)}, inputs))
    return stages


def _design(cfg: ExperimentConfig) -> dict:
    """What the report states about the set-up (no paths that differ between machines or runs)."""
    world = {} if all(s in cfg.data for s in ("train", "target", "test_photo")) else {
        "seed": cfg.world.seed, "size": cfg.world.size, "ranges": cfg.world.ranges()}
    return {"name": cfg.name, "world": world, "user_sets": sorted(cfg.data),
            "recognizer": cfg.recognizer, "translator_preset": cfg.translator_preset,
            "translators": [t.method for t in cfg.translators],
            "given_engines": [t.method for t in cfg.translators if t.engine is not None],
            "folds": cfg.folds, "pairs_per_fold": cfg.pairs_per_fold, "flip": cfg.flip}


def _check_outside(path: Path, out: Path, what: str):
    o = out.resolve()
    if path == o or o in path.parents or path in o.parents:
        raise RtkitError(f"{what} ({path}) and the experiment folder ({o}) overlap; keep them apart")



__all__ = ["Stage", "StageContext", "plan", "arm_data_stage", "Log"]
