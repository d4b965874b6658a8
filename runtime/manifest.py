"""The job manifest: one SQLite row per source file, kept in the output folder.

Status flow: pending -> running (handed to the encoders) -> done | failed; files without an
image extension are recorded as skipped. A row left 'running' by a killed run whose output
file exists was written completely (writes are atomic) and is adopted on resume instead of
being converted again, so `conversions` is 1 for every file however often a run is killed.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from rtkit.engines.errors import RtkitError

MANIFEST_DIR = ".rtkit"
SCHEMA = """
CREATE TABLE IF NOT EXISTS job (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    relpath TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    output TEXT,
    error TEXT,
    sha256 TEXT,
    engine TEXT,
    conversions INTEGER NOT NULL DEFAULT 0,
    run INTEGER,
    updated REAL
);
CREATE INDEX IF NOT EXISTS files_status ON files(status);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started REAL NOT NULL,
    finished REAL,
    state TEXT NOT NULL,
    converted INTEGER DEFAULT 0,
    adopted INTEGER DEFAULT 0,
    failed INTEGER DEFAULT 0,
    wall_s REAL
);
"""


def manifest_path(out: str | Path, shard: tuple[int, int] | None = None) -> Path:
    name = "manifest.sqlite" if shard is None else f"manifest.shard-{shard[0]}-of-{shard[1]}.sqlite"
    return Path(out) / MANIFEST_DIR / name


@dataclass
class Row:
    relpath: str
    status: str
    output: str | None
    error: str | None
    sha256: str | None
    conversions: int


class Manifest:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used only by the converter's main thread.
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.run_id: int | None = None

    def close(self):
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- job configuration -------------------------------------------------------------
    def job(self) -> dict:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM job")}

    def bind_job(self, config: dict, restart: bool = False) -> None:
        """Tie the manifest to a job's settings; a resume with other settings is refused."""
        old = self.job().get("config")
        if old is not None and old != config and not restart:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise RtkitError(f"{self.path.parent.parent} already holds a conversion with other "
                             f"settings ({', '.join(diff)} differ); use another output folder, or "
                             f"--restart to convert everything again with the new settings")
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT OR REPLACE INTO job VALUES ('config', ?)", (json.dumps(config),))
            if restart:
                self.db.execute("UPDATE files SET status='pending', error=NULL, sha256=NULL, "
                                "conversions=0 WHERE status != 'skipped'")

    # -- planning ----------------------------------------------------------------------
    def add_files(self, images: list[tuple[str, str]], skipped: list[tuple[str, str]]) -> None:
        """Insert new rows (relpath, output) as pending and (relpath, reason) as skipped."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO files(relpath, status, output, updated) "
                                "VALUES (?, 'pending', ?, ?)", [(r, o, now) for r, o in images])
            self.db.executemany("INSERT OR IGNORE INTO files(relpath, status, error, updated) "
                                "VALUES (?, 'skipped', ?, ?)", [(r, e, now) for r, e in skipped])

    def rows(self, status: str | None = None) -> list[Row]:
        q = "SELECT relpath, status, output, error, sha256, conversions FROM files"
        args: tuple = ()
        if status:
            q += " WHERE status = ?"
            args = (status,)
        return [Row(*r) for r in self.db.execute(q + " ORDER BY relpath", args)]

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT status, count(*) FROM files GROUP BY status"))

    # -- runs --------------------------------------------------------------------------
    def start_run(self) -> int:
        cur = self.db.execute("INSERT INTO runs(started, state) VALUES (?, 'running')", (time.time(),))
        self.run_id = cur.lastrowid
        return self.run_id

    def finish_run(self, state: str, converted: int, adopted: int, failed: int, wall: float) -> None:
        self.db.execute("UPDATE runs SET finished=?, state=?, converted=?, adopted=?, failed=?, "
                        "wall_s=? WHERE id=?",
                        (time.time(), state, converted, adopted, failed, wall, self.run_id))

    # -- progress ----------------------------------------------------------------------
    def mark_running(self, relpaths: list[str]) -> None:
        # One statement per batch (a transaction of its own): this runs for every batch.
        for i in range(0, len(relpaths), 500):  # stay under SQLite's bound-parameter limit
            part = relpaths[i:i + 500]
            self.db.execute(f"UPDATE files SET status='running', run=?, updated=? "
                            f"WHERE relpath IN ({','.join('?' * len(part))})",
                            (self.run_id, time.time(), *part))

    def record(self, done: list[tuple[str, str, str]], failed: list[tuple[str, str]],
               adopted: list[tuple[str, str]] = ()) -> None:
        """done: (relpath, sha256, engine); failed: (relpath, reason); adopted: (relpath, sha256)."""
        if not (done or failed or adopted):
            return
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "UPDATE files SET status='done', sha256=?, engine=?, error=NULL, "
                "conversions=conversions+1, run=?, updated=? WHERE relpath=?",
                [(h, eng, self.run_id, now, r) for r, h, eng in done])
            self.db.executemany(
                "UPDATE files SET status='failed', error=?, run=?, updated=? WHERE relpath=?",
                [(e, self.run_id, now, r) for r, e in failed])
            self.db.executemany(
                # The killed run converted it; only its bookkeeping was lost.
                "UPDATE files SET status='done', sha256=?, error=NULL, conversions=conversions+1, "
                "updated=? WHERE relpath=?",
                [(h, now, r) for r, h in adopted])
