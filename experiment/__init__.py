"""rtkit.experiment: the paper's experiment as one resumable job (what ``rt-experiment`` runs).

- ``config``: the TOML experiment file (``load_config``, ``TEMPLATE``, ``write_template``).
- ``plan``: its stages, their settings, inputs and folders.
- ``ledger``: which stages are finished, keyed by each stage's configuration hash.
- ``stages``: what each kind of stage does (library calls into datasets, train, runtime, eval).
- ``chain``: ``run_experiment``: runs what is not finished yet, resumes what was interrupted.
- ``report``: Table 2 over seeds with per-seed deltas, ROC figure, conversion figures, sheets.
"""
from rtkit.experiment.config import ExperimentConfig, TEMPLATE, load_config, parse_config, write_template

__all__ = ["ExperimentConfig", "TEMPLATE", "load_config", "parse_config", "write_template", "run_experiment",
           "plan"]


def __getattr__(name):
    # the runner imports torch-using modules lazily; importing the package stays light
    if name == "run_experiment":
        from rtkit.experiment.chain import run_experiment
        return run_experiment
    if name == "plan":
        from rtkit.experiment.plan import plan
        return plan
    raise AttributeError(name)
