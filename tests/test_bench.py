"""rt-bench: the `time` command (and its old spelling without the command name) and `table1`, which
writes the Markdown table, the CSV and the bar chart, on tiny models on CPU."""
from __future__ import annotations

import csv

import cv2
import pytest
from click.testing import CliRunner

from rtkit.cli.bench import main
from rtkit.runtime.bench import PAPER_S_PER_IMG, Table1Options, paper_s_per_img, table1


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_both_commands():
    res = invoke("--help")
    assert res.exit_code == 0 and "time" in res.output and "table1" in res.output
    for cmd, words in (("time", "--batch-size"), ("table1", "--random-weights")):
        res = invoke(cmd, "--help")
        assert res.exit_code == 0 and words in res.output


@pytest.mark.parametrize("prefix", [[], ["time"]])
def test_time_keeps_the_old_invocation(prefix):
    res = invoke(*prefix, "render2photo_tiny", "--batch-size", 2, "--seconds", 0.05)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("| render2photo_tiny")]
    assert len(lines) == 1 and "| torch | cpu | 112x112 | 2 |" in lines[0]


def test_paper_reference_figures():
    assert PAPER_S_PER_IMG == {"codeformer": 0.41, "vsait": 0.015, "decent": 0.13, "unsb": 0.38, "ddim": 8.7}
    assert paper_s_per_img("vsait_tiny") == 0.015
    assert paper_s_per_img("codeformer_arcface112") == 0.41
    assert paper_s_per_img("render2photo") is None


def test_models_without_weights_need_the_opt_in(tmp_path):
    res = CliRunner().invoke(main, ["table1", "vsait", "--out", str(tmp_path)])
    assert res.exit_code == 1
    assert "--random-weights" in res.output and "vsait" in res.output
    assert not (tmp_path / "table1.md").exists()


def test_bad_options_are_one_line_errors(tmp_path):
    for args in (["--backends", "torch,cuda-magic"], ["--precisions", "fp8"], ["--batch-sizes", "0"]):
        res = CliRunner().invoke(main, ["table1", "vsait_tiny", *args, "--out", str(tmp_path)])
        assert res.exit_code == 1, res.output
        assert "Error:" in res.output and "Traceback" not in res.output


def test_table1_writes_table_csv_and_chart(tmp_path):
    out = tmp_path / "t1"
    res = invoke("table1", "vsait_tiny", "codeformer_tiny", "--backends", "torch,onnxruntime",
                 "--batch-sizes", 2, "--images", 4, "--seconds", 0.05, "--out", out)
    assert res.exit_code == 0, res.output
    md = (out / "table1.md").read_text()
    assert "paper RTX 3090 Ti s/img" in md and "naive loop s/img" in md
    assert "random (tiny)" in md and "timing only" in md  # random weights are labelled
    with open(out / "table1.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["model"], r["backend"], r["batch"]) for r in rows} == {
        (m, b, "2") for m in ("vsait_tiny", "codeformer_tiny") for b in ("torch", "onnxruntime")}
    assert len(rows) == 4
    for r in rows:
        assert r["note"] == "", r
        for col in ("naive loop s/img", "compute s/img", "end-to-end s/img", "compute img/s"):
            assert float(r[col]) > 0, (col, r)
        assert float(r["compute img/s"]) == pytest.approx(1 / float(r["compute s/img"]))
    paper = {r["model"]: r["paper RTX 3090 Ti s/img"] for r in rows}
    assert paper == {"vsait_tiny": "0.015", "codeformer_tiny": "0.41"}
    assert {r["input"] for r in rows if r["model"] == "codeformer_tiny"} == {"32x32"}  # the FFHQ warp
    chart = cv2.imread(str(out / "table1.png"))
    assert chart is not None and chart.shape[0] > 200 and chart.shape[1] > 400
    # every configuration converted the whole sample set, files in -> files out
    for r in rows:
        folder = out / "work" / "out" / f"{r['model']}-{r['backend']}-fp32-b2"
        assert len(list(folder.rglob("*.png"))) == 4


def test_table1_library_on_a_pipeline_model_and_two_batch_sizes(tmp_path):
    from rtkit.engines.registry import list_models

    assert "unsb_tiny" in list_models(task="translate", tiny=True)
    rows = table1(["unsb_tiny"], tmp_path, Table1Options(backends=["torch"], batch_sizes=[1, 2],
                                                         images=4, seconds=0.05))
    assert [r.batch_size for r in rows] == [1, 2]
    for row in rows:
        assert row.weights == "random (tiny)" and row.images == 4 and row.paper_s == 0.38
        assert row.naive_s > 0 and row.compute_s > 0 and row.e2e_s > 0
        assert row.e2e_over_compute == pytest.approx(row.compute_s / row.e2e_s)
        assert row.speedup_vs_naive == pytest.approx(row.naive_s / row.e2e_s)


def test_rt_bench_generate_times_the_tiny_generator():
    from click.testing import CliRunner

    from rtkit.cli.bench import main

    res = CliRunner().invoke(main, ["generate", "--tiny", "--batch-sizes", "1,2", "--steps", "2", "--repeats", "1"])
    assert res.exit_code == 0, res.output
    rows = [ln for ln in res.output.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2"]
    assert all(float(r.split("|")[5]) > 0 for r in rows)
