"""The experiment as a chain of stages run once each: plan, ledger, resume.

    from rtkit.experiment import load_config, run_experiment
    result = run_experiment(load_config("experiment.toml"))
    print(result.report)

``plan(cfg)`` lists the stages in the order they run; each has a kind, settings, the stages it
reads and a folder ``OUT/<name>``. ``run_experiment`` walks them: a stage that the ledger
(rtkit.experiment.ledger) holds as done under the key it has now is skipped and its outputs are
reopened by path; any other stage runs. A stage that was interrupted under the same key keeps
its folder when its step resumes by itself (translator and recognizer training continue from
their last checkpoint, a conversion from its manifest); every other unfinished stage starts over
in an emptied folder. The steps are the library's: rtkit.datasets.sample, rtkit.eval.pairs and
verification, rtkit.train.translator and recognizer, rtkit.runtime.convert, rtkit.eval.quality.

Stages (names are also folders under OUT):

    data/<set>                  the world's sets (rt-sample) or the user's folders
    benchmarks/<name>           pairs + .bin of a test set (make-pairs + make-bin), or a user .bin
    translators/<method>        unpaired training (source = train renders, target = photo-style
                                images of other identities); best weights by held-out style gap
    converted/<method>          the training renders through that translator, style gap,
                                content kept, before/after sheet
    recognizers/<arm>/seed<s>   one recognizer per arm and seed, identical settings
    results/<arm>/seed<s>       verification on every benchmark (an rt-eval result file)
    identity/<arm>              identity kept by a conversion (the seed-0 raw recognizer's view)
    report                      Table 2 with deltas, per-seed table, ROC figure, conversions
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rtkit.experiment import stages as kinds
from rtkit.experiment.config import ExperimentConfig
from rtkit.experiment.ledger import Ledger, RunLock, stage_key
from rtkit.experiment.plan import Log, StageContext, plan


@dataclass
class StageRun:
    name: str
    status: str                      # "ran" or "skipped"
    seconds: float                   # this run's time (skipped: the time it took when it ran)


@dataclass
class RunResult:
    out: Path
    report: Path
    stages: list[StageRun]
    wall_s: float

    @property
    def ran(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "ran"]


# -- running ------------------------------------------------------------------------------------

def run_experiment(cfg: ExperimentConfig, out: str | Path | None = None, *, log: Log | None = print) -> RunResult:
    """Run every stage not yet finished (OUT: ``out``, else the config's); returns what ran and
    where the report is."""
    log = log or (lambda msg: None)
    out = (Path(out) if out is not None else cfg.path(cfg.out)).resolve()
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        _set_threads(cfg.threads)
        steps = plan(cfg, out)
        ledger = Ledger(out)
        keys: dict[str, str] = {}
        outputs: dict[str, dict] = {}
        runs: list[StageRun] = []
        n = len(steps)
        for i, st in enumerate(steps, 1):
            key = stage_key(st.kind, st.params, {d: keys[d] for d in st.inputs})
            keys[st.name] = key
            done = ledger.finished(st.name, key)
            if done is not None and _outputs_present(out, done["outputs"]):
                outputs[st.name] = done["outputs"]
                runs.append(StageRun(st.name, "skipped", float(done.get("seconds", 0.0))))
                log(f"[{i}/{n}] {st.name}: finished earlier, kept")
                continue
            resume = st.resumable and ledger.interrupted(st.name, key)
            folder = out / st.name
            if st.writes and folder.exists() and not resume:
                shutil.rmtree(folder)   # another key's or a non-resumable attempt's files
            log(f"[{i}/{n}] {st.name}: {'resuming' if resume and folder.exists() else 'running'}")
            ledger.start(st.name, key)
            ts = time.perf_counter()
            ctx = StageContext(cfg, out, st, {d: outputs[d] for d in st.inputs}, resume,
                               lambda msg, _n=st.name: log(f"    {msg}"))
            if st.writes:
                folder.mkdir(parents=True, exist_ok=True)
            result = kinds.KINDS[st.kind](ctx)
            seconds = time.perf_counter() - ts
            ledger.finish(st.name, key, result, seconds)
            outputs[st.name] = result
            runs.append(StageRun(st.name, "ran", seconds))
            log(f"[{i}/{n}] {st.name}: done in {seconds:.1f} s")
        wall = time.perf_counter() - t0
        report = out / outputs.get("report", {}).get("report", "report/report.md")
        kinds.write_timings(out, ledger, runs, wall)
    return RunResult(out, report, runs, wall)


def stage_status(cfg: ExperimentConfig, out: str | Path | None = None) -> list[tuple[str, str]]:
    """(stage, "done" | "changed" | "stopped" | "pending") for each stage of the plan, from the ledger."""
    out = (Path(out) if out is not None else cfg.path(cfg.out)).resolve()
    ledger = Ledger(out) if (out / "ledger.json").is_file() else None
    keys: dict[str, str] = {}
    rows = []
    for st in plan(cfg, out):
        key = keys[st.name] = stage_key(st.kind, st.params, {d: keys[d] for d in st.inputs})
        e = ledger.entry(st.name) if ledger else None
        if e is None:
            status = "pending"
        elif e.get("key") != key:
            status = "changed"
        elif e.get("status") == "done" and _outputs_present(out, e.get("outputs", {})):
            status = "done"
        else:
            status = "stopped"
        rows.append((st.name, status))
    return rows


def _outputs_present(out: Path, outputs: dict) -> bool:
    """Every file a finished stage listed under "files" is still there (else it runs again)."""
    for f in outputs.get("files", []):
        p = Path(f)
        if not (p if p.is_absolute() else out / p).exists():
            return False
    return True


def _set_threads(threads: int):
    import torch

    torch.set_num_threads(threads)


__all__ = ["StageRun", "RunResult", "run_experiment", "stage_status"]
