"""rt-experiment: the paper's experiment (renders vs translated renders -> face recognition) as one job."""
from __future__ import annotations

import click

from rtkit.cli.common import user_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Run the realism-transfer experiment end to end: sample world (or your folders), translator
    training, conversion, recognizers per arm and seed, verification, report."""


@main.command(epilog="""\b
Example:
  rt-experiment init                 # writes ./experiment.toml
  rt-experiment run experiment.toml""")
@click.argument("path", type=click.Path(), default="experiment.toml", required=False)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@user_errors
def init(path, force):
    """Write the experiment template (the paper's design on the sample world, CPU-sized) to PATH."""
    from rtkit.experiment.config import write_template

    click.echo(f"wrote {write_template(path, force=force)}; run it with: rt-experiment run {path}")


@main.command(epilog="""\b
Stages (folders under OUT): data/*, benchmarks/*, translators/<method>, converted/<method>,
recognizers/<arm>/seed<s>, results/<arm>/seed<s>, identity/<arm>, report/.
OUT/ledger.json records each finished stage under the hash of its settings and inputs: a rerun
skips them and reopens their outputs by path; an interrupted stage resumes (training from its
last checkpoint, conversion from its manifest) or starts over. Change a setting and only the
stages it reaches run again. OUT/report/report.md is the result; OUT/timings.json the times.

\b
Example:
  rt-experiment run experiment.toml
  rt-experiment run experiment.toml --out runs/exp2   # same design, another folder""")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "-o", type=click.Path(file_okay=False),
              help="Experiment folder [default: [experiment] out of CONFIG, relative to it].")
@click.option("--stages", "list_only", is_flag=True, help="List the stages and whether each is finished; run nothing.")
@user_errors
def run(config, out, list_only):
    """Run (or resume) the experiment described by CONFIG."""
    from rtkit.experiment.config import load_config

    cfg = load_config(config)
    if list_only:
        from rtkit.experiment.chain import stage_status

        for name, status in stage_status(cfg, out):
            click.echo(f"{status:<9} {name}")
        return
    from rtkit.experiment.chain import run_experiment

    res = run_experiment(cfg, out, log=click.echo)
    ran = [s for s in res.stages if s.status == "ran"]
    click.echo(f"\n{len(ran)} stage(s) ran, {len(res.stages) - len(ran)} finished earlier; "
               f"this run {res.wall_s:.0f} s")
    slow = sorted(ran, key=lambda s: -s.seconds)[:5]
    if slow:
        click.echo("longest: " + ", ".join(f"{s.name} {s.seconds:.0f} s" for s in slow))
    click.echo(f"report: {res.report}")


if __name__ == "__main__":
    main()
