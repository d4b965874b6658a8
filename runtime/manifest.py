"""The job manifest: one SQLite row per source file, kept in the output folder.

Status flow: pending -> running (handed to a worker) -> done | failed; files without an image
extension are recorded as skipped. Each row records its source's identity (size, mtime, ctime
and, once read, its sha256) and its output's (sha256, size, mtime), so a changed source is
redone and a truncated, replaced or missing output is never reported done.

The job has an epoch, raised by every --restart. A row is 'running' only after any stale output
it had was removed, and only a process of the current run can write (the output lock makes a
new run wait until every process of a killed one is gone), so a 'running' row whose output
exists was written completely under the current settings and is adopted on resume: every
file is converted once however often a run is killed.
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
# Columns added after the first release; older manifests get them on open.
_ADDED_COLUMNS = {
    "files": (("src_size", "INTEGER"), ("src_mtime_ns", "INTEGER"), ("src_ctime_ns", "INTEGER"),
              ("src_sha256", "TEXT"), ("out_size", "INTEGER"), ("out_mtime_ns", "INTEGER"),
              ("epoch", "INTEGER")),
    "runs": (("pid", "INTEGER"), ("host", "TEXT"), ("epoch", "INTEGER"), ("startup_s", "REAL")),
}


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
    src_size: int | None = None
    src_mtime_ns: int | None = None
    src_ctime_ns: int | None = None
    src_sha256: str | None = None
    out_size: int | None = None
    out_mtime_ns: int | None = None


@dataclass
class Done:
    """One converted file as a worker reports it."""

    relpath: str
    sha256: str            # of the output bytes
    size: int
    mtime_ns: int
    src_sha256: str | None = None


_ROW_COLUMNS = ("relpath, status, output, error, sha256, conversions, src_size, src_mtime_ns, "
                "src_ctime_ns, src_sha256, out_size, out_mtime_ns")


class ManifestError(RtkitError):
    """The manifest cannot be read or written (disk full, read-only, not a manifest)."""


def _sqlite_error(path: Path, e: sqlite3.Error) -> ManifestError:
    return ManifestError(f"job manifest {path}: {e} (check free space and permissions of the output folder)")


class Manifest:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One connection, used only by the converter's main thread.
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            for table, cols in _ADDED_COLUMNS.items():
                have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
                for name, kind in cols:
                    if name not in have:
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        except sqlite3.DatabaseError as e:
            raise _sqlite_error(self.path, e) from None
        except OSError as e:
            raise ManifestError(f"cannot create the job manifest in {self.path.parent}: "
                                f"{e.strerror or e}") from None
        self.run_id: int | None = None

    def close(self):
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _write(self, fn):
        """Run a write; SQLite's own errors (disk full, read-only) become one-line ManifestErrors."""
        try:
            return fn()
        except sqlite3.DatabaseError as e:
            raise _sqlite_error(self.path, e) from None

    # -- job configuration -------------------------------------------------------------
    def job(self) -> dict:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM job")}

    @property
    def epoch(self) -> int:
        return int(self.job().get("epoch", 0))

    def bind_job(self, config: dict, restart: bool = False) -> int:
        """Tie the manifest to a job's settings; a resume with other settings is refused.
        --restart raises the epoch and makes every row pending. Returns the epoch."""
        job = self.job()
        old = job.get("config")
        if old is not None and old != config and not restart:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise RtkitError(f"{self.path.parent.parent} already holds a conversion with other "
                             f"settings ({', '.join(diff)} differ); use another output folder, or "
                             f"--restart to convert everything again with the new settings")
        epoch = int(job.get("epoch", 0)) + (1 if restart else 0)

        def write():
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("INSERT OR REPLACE INTO job VALUES ('config', ?)", (json.dumps(config),))
                self.db.execute("INSERT OR REPLACE INTO job VALUES ('epoch', ?)", (json.dumps(epoch),))
                if restart:
                    self.db.execute("UPDATE files SET status='pending', error=NULL, sha256=NULL, "
                                    "out_size=NULL, out_mtime_ns=NULL, conversions=0 "
                                    "WHERE status != 'skipped'")

        self._write(write)
        return epoch

    # -- planning ----------------------------------------------------------------------
    def add_files(self, images: list[tuple[str, str, tuple[int, int, int]]],
                  skipped: list[tuple[str, str]]) -> None:
        """Insert new rows (relpath, output, source stat) as pending and (relpath, reason) as
        skipped; a known file whose output name changed is brought up to date."""
        now = time.time()

        def write():
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany(
                    "INSERT OR IGNORE INTO files(relpath, status, output, updated, src_size, src_mtime_ns, "
                    "src_ctime_ns) VALUES (?, 'pending', ?, ?, ?, ?, ?)",
                    [(r, o, now, *st) for r, o, st in images])
                self.db.executemany("INSERT OR IGNORE INTO files(relpath, status, error, updated) "
                                    "VALUES (?, 'skipped', ?, ?)", [(r, e, now) for r, e in skipped])

        self._write(write)

    def rows(self, status: str | None = None) -> list[Row]:
        q = f"SELECT {_ROW_COLUMNS} FROM files"
        args: tuple = ()
        if status:
            q += " WHERE status = ?"
            args = (status,)
        return [Row(*r) for r in self.db.execute(q + " ORDER BY relpath", args)]

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT status, count(*) FROM files GROUP BY status"))

    def reset(self, relpaths: list[str], stats: dict[str, tuple[int, int, int]] | None = None) -> None:
        """Make rows pending again (a changed source, a lost or damaged output), with the source's
        current stat."""
        stats = stats or {}

        def write():
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany(
                    "UPDATE files SET status='pending', error=NULL, sha256=NULL, out_size=NULL, "
                    "out_mtime_ns=NULL, src_sha256=NULL, src_size=?, src_mtime_ns=?, src_ctime_ns=? "
                    "WHERE relpath=?",
                    [(*(stats.get(r) or (None, None, None)), r) for r in relpaths])

        self._write(write)

    def update_identity(self, relpath: str, *, src_stat=None, out_stat=None) -> None:
        """Record a new stat for a source or output whose content hash was checked unchanged."""
        def write():
            if src_stat is not None:
                self.db.execute("UPDATE files SET src_size=?, src_mtime_ns=?, src_ctime_ns=? WHERE relpath=?",
                                (*src_stat, relpath))
            if out_stat is not None:
                self.db.execute("UPDATE files SET out_size=?, out_mtime_ns=? WHERE relpath=?",
                                (*out_stat, relpath))

        self._write(write)

    def retry_failed(self) -> None:
        self._write(lambda: self.db.execute(
            "UPDATE files SET status='pending', error=NULL WHERE status='failed'"))

    # -- runs --------------------------------------------------------------------------
    def start_run(self, pid: int, host: str, epoch: int) -> int:
        def write():
            # A run still 'running' here is one that was killed: the output lock proves nobody runs it.
            self.db.execute("UPDATE runs SET state='killed' WHERE state='running'")
            return self.db.execute("INSERT INTO runs(started, state, pid, host, epoch) "
                                   "VALUES (?, 'running', ?, ?, ?)", (time.time(), pid, host, epoch)).lastrowid

        self.run_id = self._write(write)
        return self.run_id

    def finish_run(self, state: str, converted: int, adopted: int, failed: int, wall: float,
                   startup: float | None = None) -> None:
        self._write(lambda: self.db.execute(
            "UPDATE runs SET finished=?, state=?, converted=?, adopted=?, failed=?, wall_s=?, startup_s=? "
            "WHERE id=?", (time.time(), state, converted, adopted, failed, wall, startup, self.run_id)))

    # -- progress ----------------------------------------------------------------------
    def mark_running(self, relpaths: list[str]) -> None:
        def write():
            # One statement per batch (a transaction of its own): this runs for every batch.
            for i in range(0, len(relpaths), 500):  # stay under SQLite's bound-parameter limit
                part = relpaths[i:i + 500]
                self.db.execute(f"UPDATE files SET status='running', run=?, updated=? "
                                f"WHERE relpath IN ({','.join('?' * len(part))})",
                                (self.run_id, time.time(), *part))

        self._write(write)

    def record(self, done: list[Done], failed: list[tuple[str, str]], engine: str = "",
               adopted: list[Done] = (), epoch: int = 0) -> None:
        """done/adopted: Done entries; failed: (relpath, reason)."""
        if not (done or failed or adopted):
            return
        now = time.time()

        def write():
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany(
                    "UPDATE files SET status='done', sha256=?, out_size=?, out_mtime_ns=?, "
                    "src_sha256=COALESCE(?, src_sha256), engine=?, error=NULL, epoch=?, "
                    "conversions=conversions+1, run=?, updated=? WHERE relpath=?",
                    [(d.sha256, d.size, d.mtime_ns, d.src_sha256, engine, epoch, self.run_id, now, d.relpath)
                     for d in done])
                self.db.executemany(
                    "UPDATE files SET status='failed', error=?, run=?, updated=? WHERE relpath=?",
                    [(e, self.run_id, now, r) for r, e in failed])
                self.db.executemany(
                    # The killed run converted it; only its bookkeeping was lost.
                    "UPDATE files SET status='done', sha256=?, out_size=?, out_mtime_ns=?, engine=?, "
                    "error=NULL, epoch=?, conversions=conversions+1, updated=? WHERE relpath=?",
                    [(d.sha256, d.size, d.mtime_ns, engine, epoch, now, d.relpath) for d in adopted])

        self._write(write)
