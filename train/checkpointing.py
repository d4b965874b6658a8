"""Generic training checkpoints: atomic writes, seeding and RNG state capture, numbered checkpoint folders.

A training checkpoint is one ``torch.save`` of plain containers and tensors (model, head,
optimiser, scheduler and scaler state_dicts, RNG states, counters), so it loads with
``torch.load(weights_only=True)`` and never unpickles arbitrary objects. NumPy's RNG state is
stored as a tensor for that reason. Files are written under a temporary name and renamed, so a
run killed while saving leaves the previous checkpoint intact.

``CheckpointDir`` numbers checkpoints by optimiser step (``step_000001234.pt`` plus any
companion files sharing that stem, such as the JSON config and an official-format export),
finds the newest, and prunes old ones.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from rtkit.engines.checkpoint import read_checkpoint
from rtkit.engines.errors import CheckpointError, RtkitError


# -- atomic writes --------------------------------------------------------------------------------

def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_torch_save(obj, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def write_json_atomic(obj, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_training_state(path: str | Path) -> dict:
    """Read a training checkpoint (weights_only) onto the CPU; CheckpointError if unreadable."""
    state = read_checkpoint(path)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not an rtkit training checkpoint (no 'step' entry); "
                              f"to start from a backbone's weights use its loader instead")
    return state


# -- RNG state ----------------------------------------------------------------------------------

def seed_everything(seed: int):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """Python, NumPy and torch (CPU and every initialised CUDA device) generator states."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict):
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # a different machine: keep each visible device's own stream
            for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


# -- numbered checkpoint folder -----------------------------------------------------------------

_STEM = re.compile(r"^step_(\d{9})$")


class CheckpointDir:
    """``root/step_XXXXXXXXX.*``: one training-state ``.pt`` per checkpoint plus companions.

    ``keep``: how many checkpoints to keep (older ones and all their companion files are
    deleted after a save); 0 keeps all.
    """

    def __init__(self, root: str | Path, keep: int = 0):
        self.root = Path(root)
        self.keep = int(keep)

    @staticmethod
    def stem(step: int) -> str:
        return f"step_{int(step):09d}"

    def path(self, step: int, suffix: str = ".pt") -> Path:
        return self.root / (self.stem(step) + suffix)

    def steps(self) -> list[int]:
        """Steps that have a complete training-state file, ascending."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.glob("step_*.pt"):
            m = _STEM.match(p.stem)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def save(self, step: int, state: dict, companions: dict[str, object] | None = None) -> Path:
        """Write companions first (``suffix -> dict`` JSON or torch object) and the state last,
        so a state file is present only when its companions are complete."""
        for suffix, obj in (companions or {}).items():
            target = self.path(step, suffix)
            if suffix.endswith(".json"):
                write_json_atomic(obj, target)
            else:
                atomic_torch_save(obj, target)
        path = atomic_torch_save(state, self.path(step))
        self.prune()
        return path

    def prune(self):
        if self.keep <= 0:
            return
        for old in self.steps()[: -self.keep]:
            stem = self.stem(old)
            # the state file first: a partly pruned checkpoint is then never picked as latest
            self.path(old).unlink(missing_ok=True)
            for p in self.root.glob(stem + ".*"):
                p.unlink(missing_ok=True)




def resolve_resume(ckpts: "CheckpointDir", out_dir: Path, resume) -> Path | None:
    """Which checkpoint a run continues from: None (fresh; refused if ``out_dir`` already has
    checkpoints), "latest"/"auto", an output folder (its latest checkpoint) or a file."""
    if resume is None:
        if ckpts.latest() is not None:
            raise RtkitError(f"{out_dir} already has checkpoints; pass --resume to continue that run "
                             f"or choose another --out")
        return None
    if str(resume) in ("latest", "auto"):
        latest = ckpts.latest()
        if latest is None:
            raise RtkitError(f"no checkpoint to resume in {ckpts.root}")
        return latest
    path = Path(resume)
    if path.is_dir():  # an output folder: its latest checkpoint
        latest = CheckpointDir(path / "checkpoints").latest() or CheckpointDir(path).latest()
        if latest is None:
            raise RtkitError(f"no checkpoint to resume in {path}")
        return latest
    if not path.is_file():
        raise RtkitError(f"checkpoint to resume not found: {path}")
    return path


__all__ = ["atomic_torch_save", "write_json_atomic", "load_training_state", "seed_everything",
           "capture_rng_state", "restore_rng_state", "CheckpointDir", "resolve_resume"]
