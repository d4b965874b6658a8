"""rt-experiment: disjoint identity ranges of the sample world, the experiment file, the whole chain
on a tiny world (stages, report structure, numbers traced back to the result files), the ledger
(nothing finished is redone, a changed setting reruns only what it reaches) and kill -9 + rerun
(finished stages kept, interrupted training resumed, the same report byte for byte).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rtkit.cli.experiment import main as experiment_cli
from rtkit.cli.sample import main as sample_cli
from rtkit.datasets.sample import make_sample_dataset, render_face
from rtkit.engines.errors import RtkitError
from rtkit.experiment import TEMPLATE, load_config, parse_config
from rtkit.experiment.chain import run_experiment, stage_status
from rtkit.experiment.config import ConfigError
from rtkit.experiment.plan import plan

# A world of 8 identities per set at 32 px, translators of 12 steps, recognizers of 6 steps, two
# seeds: the chain runs in about 15-25 s on two loaded cores.
FAST = """
[experiment]
name = "fast"
out = "out"
seeds = [0, 1]
threads = 1

[world]
size = 32
per_identity = 4
train_identities = 8
target_identities = 8
target_per_identity = 2
val_identities = 4
val_per_identity = 2
test_identities = 8

[translators]
methods = ["decent"]
steps = 12
crop_size = 32
val_every = 4
save_every = 4
sample_every = 0
log_every = 4
workers = 0
num_samples = 2
val_count = 8
best_min_content = 0.0

[convert]
batch_size = 8

[recognizer]
backbone = "adaface_tiny"
image_size = 32
batch_size = 8
epochs = 2
milestones = [1]
max_steps = 6
workers = 0
log_every_steps = 3
keep_checkpoints = 1

[benchmarks]
folds = 2
pairs_per_fold = 20

[report]
sheet_count = 4
"""
ARMS = ["raw", "decent", "photo"]
SEEDS = [0, 1]
REPORT_FILES = ["report.md", "report.json", "table2.csv", "roc.png", "sheets/decent.png"]


@pytest.fixture(scope="module")
def fast_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "fast.toml"
    path.write_text(FAST)
    return path


@pytest.fixture(scope="module")
def finished(fast_config):
    """The fast experiment run once, uninterrupted, in this process; and its report's bytes."""
    res = run_experiment(load_config(fast_config), log=None)
    return res, _report_bytes(res.out)


def _ledger(out: Path) -> dict:
    return json.loads((out / "ledger.json").read_text())["stages"]


def _report_bytes(out: Path) -> dict[str, bytes]:
    return {f: (out / "report" / f).read_bytes() for f in REPORT_FILES}


# -- sampling: disjoint identity ranges ---------------------------------------------------------

def test_first_identity_offsets_identities_and_folder_names(tmp_path):
    a = make_sample_dataset(tmp_path / "a", identities=3, per_identity=2, size=32)
    b = make_sample_dataset(tmp_path / "b", identities=2, per_identity=2, size=32, first_identity=3)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["3", "4"]
    assert not {p.parent.name for p in a} & {p.parent.name for p in b}
    import cv2
    img = cv2.imread(str(tmp_path / "b" / "4" / "1.png"))[..., ::-1]
    np.testing.assert_array_equal(img, render_face(4, 1, "render", size=32))
    # the default is the range from 0, byte for byte
    c = make_sample_dataset(tmp_path / "c", identities=3, per_identity=2, size=32, first_identity=0)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in c]
    with pytest.raises(RtkitError, match="first_identity"):
        make_sample_dataset(tmp_path / "d", identities=1, per_identity=1, first_identity=-1)


def test_rt_sample_first_identity_option(tmp_path):
    r = CliRunner().invoke(sample_cli, [str(tmp_path / "t"), "-n", "2", "-k", "1", "--size", "32",
                                        "--style", "photo", "--first-identity", "100"])
    assert r.exit_code == 0, r.output
    assert "identities 100..101" in r.output
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["100", "101"]


# -- the experiment file -------------------------------------------------------------------------

def test_init_writes_the_template_and_it_plans_the_paper_design(tmp_path):
    r = CliRunner().invoke(experiment_cli, ["init", str(tmp_path / "e.toml")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "e.toml").read_text() == TEMPLATE
    again = CliRunner().invoke(experiment_cli, ["init", str(tmp_path / "e.toml")])
    assert again.exit_code == 1 and "--force" in again.output
    cfg = load_config(tmp_path / "e.toml")
    assert cfg.arms == ["raw", "decent", "photo"] and cfg.seeds == (0, 1, 2)
    names = [s.name for s in plan(cfg, tmp_path / "out")]
    assert names[:7] == ["data/train", "data/target", "data/val_source", "data/val_target", "data/test_photo",
                         "data/test_render", "data/upper"]
    assert {f"recognizers/{a}/seed{s}" for a in cfg.arms for s in (0, 1, 2)} <= set(names)
    assert names[-1] == "report"
    # identity ranges of the world never overlap
    spans = [range(f, f + n) for f, n, _ in cfg.world.ranges().values()]
    assert sum(len(s) for s in spans) == len(set().union(*map(set, spans)))


def test_bad_experiment_files_fail_with_one_line(tmp_path):
    for text, msg in [("[recognizer]\nbackbone_size = 3\n", "unknown recognizer config keys"),
                      ("[world]\nsize = 'big'\n", "expected int"),
                      ("[experiment]\nseeds = [1, 1]\n", "distinct"),
                      ("[translators]\nmethods = ['decent']\n[translators.vsait]\nsteps = 3\n", "not in methods"),
                      ("[recognizer]\nseed = 3\n", "set by the experiment"),
                      ("[recognizer]\nimage_size = 56\n", "multiple of 16"),
                      ("[nonsense]\n", "unknown section")]:
        p = tmp_path / "bad.toml"
        p.write_text(text)
        r = CliRunner().invoke(experiment_cli, ["run", str(p)])
        assert r.exit_code == 1, (text, r.output)
        assert msg in r.output and "Traceback" not in r.output, (text, r.output)
        assert len(r.output.strip().splitlines()) == 1
    cfg = parse_config({"data": {"train": str(tmp_path)}}, tmp_path)
    with pytest.raises(RtkitError, match="overlap"):
        plan(cfg, tmp_path / "out")
    with pytest.raises(ConfigError, match="upper_bound"):
        parse_config({"experiment": {"upper_bound": False}, "data": {"upper": "x"}})


def test_help_lists_the_commands_without_importing_torch():
    r = CliRunner().invoke(experiment_cli, ["--help"])
    assert r.exit_code == 0 and "init" in r.output and "run" in r.output
    code = ("import sys; from click.testing import CliRunner; from rtkit.cli.experiment import main; "
            "assert CliRunner().invoke(main, ['run', '--help']).exit_code == 0; "
            "import rtkit.experiment; print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120).stdout.strip() == "False"


# -- the chain ------------------------------------------------------------------------------------

def test_chain_runs_every_stage_and_the_sets_are_disjoint(finished, fast_config):
    res, _ = finished
    out = res.out
    cfg = load_config(fast_config)
    assert res.ran == [s.name for s in plan(cfg, out)]
    ids = {name: {p.name for p in (out / "data" / name).iterdir()}
           for name in ("train", "target", "val_source", "test_photo")}
    assert ids["train"] == {str(i) for i in range(8)}
    for a in ids:
        for b in ids:
            assert a == b or not ids[a] & ids[b], (a, b)
    assert ids["test_photo"] == {p.name for p in (out / "data" / "test_render").iterdir()}
    # the translator is unpaired: trained on the training renders against other people's photos
    tcfg = json.loads((out / "translators" / "decent" / "config.json").read_text())
    assert Path(tcfg["source"]) == out / "data" / "train" and Path(tcfg["target"]) == out / "data" / "target"
    assert Path(tcfg["val_target"]) == out / "data" / "val_target"
    # the whole training set was converted, mirrored
    conv = sorted(p.relative_to(out / "converted" / "decent" / "images").as_posix()
                  for p in (out / "converted" / "decent" / "images").rglob("*.png"))
    assert conv == sorted(p.relative_to(out / "data" / "train").as_posix() for p in (out / "data" / "train").rglob("*.png"))
    # each recognizer trained on its arm's images with the same settings but the seed
    cards = {}
    for arm in ARMS:
        for s in SEEDS:
            run = json.loads((out / "recognizers" / arm / f"seed{s}" / "config.json").read_text())["config"]
            cards[(arm, s)] = run
            assert run["seed"] == s
    want = {"raw": out / "data" / "train", "decent": out / "converted" / "decent" / "images",
            "photo": out / "data" / "upper"}
    for (arm, s), run in cards.items():
        assert [Path(d) for d in run["data"]] == [want[arm]]
        same = {k: v for k, v in run.items() if k not in ("data", "seed")}
        assert same == {k: v for k, v in cards[("raw", 0)].items() if k not in ("data", "seed")}


def test_report_structure_and_numbers_come_from_the_result_files(finished):
    res, _ = finished
    out = res.out
    md = res.report.read_text()
    assert res.report == out / "report" / "report.md"
    table = md.split("## Table 2")[1].split("## Per seed")[0]
    header = next(l for l in table.splitlines() if l.startswith("| training data"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols == ["training data", "seeds", "photo-style", "Δ photo vs raw (seeds gained)",
                    "render-style (control)", "Δ render vs raw (seeds gained)"]  # only the benchmarks that exist
    rows = [l for l in table.splitlines() if l.startswith("| renders") or l.startswith("| photo-style,")]
    assert len(rows) == 3 and rows[0].startswith("| renders (raw) | 2 |")
    assert all("LFW" not in l for l in md.splitlines())
    per_seed = md.split("## Per seed")[1].split("## ROC")[0]
    assert sum(l.startswith("| renders") or l.startswith("| photo-style,") for l in per_seed.splitlines()) == 6
    assert "![ROC](roc.png)" in md and "![decent](sheets/decent.png)" in md
    for f in REPORT_FILES[3:]:
        assert (out / "report" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # every accuracy and delta is the one in the rt-eval result files
    doc = json.loads((out / "report" / "report.json").read_text())
    acc = {}
    for arm in ARMS:
        for s in SEEDS:
            r = json.loads((out / "results" / arm / f"seed{s}" / "result.json").read_text())
            assert r["format"] == "rtkit-eval" and r["label"] == arm and r["run"] == f"seed{s}"
            acc[arm, s] = {b: r["benchmarks"][b]["accuracy"] for b in ("photo", "render")}
    for arm in ARMS:
        for b in ("photo", "render"):
            cell = doc["table2"][arm][b]
            vals = [acc[arm, s][b] for s in SEEDS]
            assert cell["per_seed"] == {f"seed{s}": acc[arm, s][b] for s in SEEDS}
            assert cell["mean"] == pytest.approx(np.mean(vals)) and cell["std"] == pytest.approx(np.std(vals, ddof=1))
            if arm != "raw":
                deltas = [acc[arm, s][b] - acc["raw", s][b] for s in SEEDS]
                assert cell["delta"]["mean"] == pytest.approx(np.mean(deltas))
                assert cell["delta"]["gained"] == sum(d > 1e-9 for d in deltas)
                shown = f"{100 * np.mean(deltas):+.2f} ± {100 * np.std(deltas, ddof=1):.2f}"
                assert shown in table
    csv_head = (out / "report" / "table2.csv").read_text().splitlines()[0]
    assert csv_head.startswith("arm,training data,photo_mean,photo_std,photo_n,photo_delta_mean")
    conv = doc["conversions"]["decent"]["convert"]
    assert conv["style_gap_before"] > 0 and -1 <= conv["content_corr"] <= 1
    assert set(doc["identity"]) == {"decent", "photo"} and 0 <= doc["identity"]["decent"]["rank1"] <= 1
    # the report holds no absolute paths or dates: it is the same wherever and whenever it ran
    text = md + json.dumps(doc)
    assert str(out) not in text and "20" + time.strftime("%y") + "-" not in text


def test_rerun_redoes_nothing_and_a_changed_setting_reruns_only_what_it_reaches(finished, fast_config, tmp_path):
    res, _ = finished
    out = res.out
    before = _ledger(out)
    report = _report_bytes(out)
    again = run_experiment(load_config(fast_config), log=None)
    assert again.ran == [] and _ledger(out) == before and _report_bytes(out) == report
    assert all(s == "done" for _, s in stage_status(load_config(fast_config)))

    # a longer recognizer run changes the recognizer stages and what reads them, nothing upstream
    changed = tmp_path / "changed.toml"
    changed.write_text(FAST.replace("max_steps = 6", "max_steps = 7").replace('out = "out"', f'out = "{out}"'))
    status = dict(stage_status(load_config(changed)))
    assert {n for n, s in status.items() if s == "changed"} == (
        {f"recognizers/{a}/seed{s}" for a in ARMS for s in SEEDS}
        | {f"results/{a}/seed{s}" for a in ARMS for s in SEEDS} | {"identity/decent", "identity/photo", "report"})
    r = run_experiment(load_config(changed), log=None)
    assert not any(n.startswith(("data/", "benchmarks/", "translators/", "converted/")) for n in r.ran)
    assert json.loads((out / "recognizers" / "raw" / "seed0" / "summary.json").read_text())["steps"] == 7


def test_a_lost_output_makes_its_stage_run_again(finished, fast_config):
    res, _ = finished
    sheet = res.out / "converted" / "decent" / "sheet.png"
    sheet.unlink()
    assert dict(stage_status(load_config(fast_config)))["converted/decent"] == "stopped"


def test_a_second_run_on_the_same_folder_is_refused(finished, fast_config):
    from rtkit.experiment.ledger import RunLock

    with RunLock(finished[0].out):
        with pytest.raises(RtkitError, match="another rt-experiment run"):
            run_experiment(load_config(fast_config), log=None)


# -- kill -9 and rerun ----------------------------------------------------------------------------

def _start(config: Path, out: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rtkit.cli.experiment", "run", str(config), "--out", str(out)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the kill point")
        try:
            if ready():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return
        except (OSError, ValueError, KeyError):  # a file being replaced as we look
            pass
        time.sleep(0.01)
    proc.kill()
    pytest.fail("kill point not reached")


def test_kill_9_then_rerun_keeps_finished_stages_and_gives_the_same_report(finished, fast_config, tmp_path):
    reference = finished[1]
    out = tmp_path / "killed"

    def running(stage):
        return lambda: _ledger(out).get(stage, {}).get("status") == "running"

    # 1. killed inside translator training, after its first checkpoint
    ckpts = out / "translators" / "decent" / "checkpoints"
    p = _start(fast_config, out, tmp_path / "run1.log")
    _kill_when(p, lambda: running("translators/decent")() and any(ckpts.glob("step_*.pt")))
    first = _ledger(out)
    kept = {n: e for n, e in first.items() if e["status"] == "done"}
    assert {f"data/{s}" for s in ("train", "target", "val_source", "val_target")} <= set(kept)

    # 2. the rerun resumes the translator from its checkpoint; killed again inside a recognizer
    p = _start(fast_config, out, tmp_path / "run2.log")
    _kill_when(p, running("recognizers/decent/seed0"))
    second = _ledger(out)
    log2 = (tmp_path / "run2.log").read_text()
    assert "translators/decent: resuming" in log2 and "resumed from" in log2
    assert second["translators/decent"]["attempts"] == 2

    # 3. runs to the end
    p = _start(fast_config, out, tmp_path / "run3.log")
    assert p.wait(timeout=300) == 0, (tmp_path / "run3.log").read_text()[-3000:]
    final = _ledger(out)
    for name, e in kept.items():
        assert final[name] == e, name           # never redone: same entry, same finish time
    for name, e in second.items():
        if e["status"] == "done":
            assert final[name] == e, name
    log3 = (tmp_path / "run3.log").read_text()
    assert "recognizers/decent/seed0: resuming" in log3 or "recognizers/decent/seed0: running" in log3
    assert all(e["status"] == "done" for e in final.values())
    assert _report_bytes(out) == reference
