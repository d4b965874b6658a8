"""The stage ledger: which stages of an experiment are finished, under which configuration.

One JSON file (``OUT/ledger.json``), rewritten whole through a temporary file, fsync and rename,
so a run killed at any moment leaves either the old or the new ledger, never half of one. Each
stage has an entry keyed by its name:

    {"key": "<sha256 of the stage's settings and its inputs' keys>",
     "status": "running" | "done", "attempts": 2,
     "started": "...", "finished": "...", "seconds": 12.3,
     "outputs": {...}}            # what later stages read; paths relative to OUT

A stage counts as finished only when its entry is "done" with the key it has now; a changed
setting or a changed input changes the key, so that stage and everything after it run again.
``RunLock`` keeps a second ``rt-experiment run`` off the same folder (an advisory lock that the
kernel drops when its process dies, so a kill -9 never leaves a stale lock).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

from rtkit.engines.errors import RtkitError

LEDGER_NAME = "ledger.json"
LEDGER_FORMAT = "rtkit-experiment-ledger-v1"


class LedgerError(RtkitError, ValueError):
    """A ledger file that cannot be read."""


def stage_key(kind: str, params: dict, inputs: dict[str, str]) -> str:
    """sha256 of a stage's kind, settings and the keys of the stages it reads."""
    blob = json.dumps({"format": LEDGER_FORMAT, "kind": kind, "params": params, "inputs": inputs},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def write_json_durable(obj, path: Path) -> None:
    """Write JSON through a temporary file in the same folder, fsync it, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Ledger:
    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LEDGER_NAME
        self.stages: dict[str, dict] = {}
        if self.path.is_file():
            try:
                doc = json.loads(self.path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise LedgerError(f"{self.path} is not readable ({e}); move it away to start the experiment "
                                  f"over") from None
            if not isinstance(doc, dict) or doc.get("format") != LEDGER_FORMAT:
                raise LedgerError(f"{self.path} is not an rt-experiment ledger")
            self.stages = dict(doc.get("stages", {}))

    def save(self) -> None:
        write_json_durable({"format": LEDGER_FORMAT, "stages": self.stages}, self.path)

    def entry(self, name: str) -> dict | None:
        return self.stages.get(name)

    def finished(self, name: str, key: str) -> dict | None:
        """The entry if ``name`` is done under ``key``, else None."""
        e = self.stages.get(name)
        return e if e is not None and e.get("status") == "done" and e.get("key") == key else None

    def interrupted(self, name: str, key: str) -> bool:
        """Whether an earlier attempt under the same key was started and not finished."""
        e = self.stages.get(name)
        return e is not None and e.get("status") == "running" and e.get("key") == key

    def start(self, name: str, key: str) -> None:
        old = self.stages.get(name) or {}
        attempts = old.get("attempts", 0) + 1 if old.get("key") == key else 1
        self.stages[name] = {"key": key, "status": "running", "attempts": attempts, "started": _now()}
        self.save()

    def finish(self, name: str, key: str, outputs: dict, seconds: float) -> dict:
        e = dict(self.stages.get(name) or {"attempts": 1, "started": _now()})
        e.update(key=key, status="done", finished=_now(), seconds=round(float(seconds), 3), outputs=outputs)
        self.stages[name] = e
        self.save()
        return e


class RunLock:
    """An exclusive advisory lock on ``OUT/.rt-experiment.lock`` for the life of one run."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / ".rt-experiment.lock"
        self._fd: int | None = None

    def acquire(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RtkitError(f"another rt-experiment run is using {self.path.parent}; wait for it or stop it") \
                from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


__all__ = ["Ledger", "LedgerError", "RunLock", "stage_key", "write_json_durable", "LEDGER_NAME", "LEDGER_FORMAT"]
