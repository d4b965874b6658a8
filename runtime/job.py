"""The conversion job: options, plan, manifest bookkeeping, the summary, and the guarantees.

Whatever executor schedules the work (threads, conversion processes, device workers, Ray), the
job is the same, so every guarantee holds everywhere:

- nothing starts before the folders are checked (OUT may not be SRC, contain SRC or write into
  it) and the output lock is held (one run at a time; a new run waits until every process of a
  killed run is gone);
- the plan refuses output-name collisions (a/x.png and a/x.jpg) over the whole tree, before
  sharding, so no two files and no two shards write the same output;
- each row carries its source's identity and its output's; a changed source, a lost or damaged
  output, or a stale output of older settings is redone, never reported done;
- a full or read-only output folder stops the run with one line; nothing untried is failed.
"""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtkit.engines.errors import RtkitError
from rtkit.runtime.manifest import Done, Manifest, manifest_path
from rtkit.runtime.outdir import check_folders
from rtkit.runtime.runners import Runner
from rtkit.runtime.sinks import OUTPUT_FORMATS
from rtkit.runtime.sources import scan_tree
from rtkit.runtime.stages import OutputFolderError, WorkItem

EXIT_OK, EXIT_USER_ERROR, EXIT_SOME_FAILED, EXIT_ABORTED = 0, 1, 2, 3
MAX_SIDE = 16384  # output sides beyond this are a typo, not a dataset


@dataclass
class ConvertOptions:
    fmt: str = "png"
    quality: int = 95
    size: tuple[int, int] | None = None      # output (height, width); None keeps the source size
    batch_size: int = 4
    decode_workers: int = 2
    encode_workers: int = 2
    infer_workers: int = 1                   # threads calling runner.infer concurrently
    shard: tuple[int, int] | None = None     # (index, count)
    max_failures: int | None = None
    restart: bool = False
    retry_failed: bool = False
    progress: bool = True
    queue_batches: int = 4                   # bound of each queue, in batches

    def validate(self):
        if self.fmt not in OUTPUT_FORMATS:
            raise RtkitError(f"unknown output format {self.fmt!r}; use one of {', '.join(OUTPUT_FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise RtkitError(f"--quality must be in 1..100, got {self.quality}")
        for name in ("batch_size", "decode_workers", "encode_workers", "infer_workers", "queue_batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise RtkitError(f"--{name.replace('_', '-')} must be an integer of at least 1, got {v!r}")
        if self.size is not None:
            h, w = self.size
            if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
                raise RtkitError(f"--size must be between 1 and {MAX_SIDE} pixels per side, got {w}x{h}")
        if self.max_failures is not None and self.max_failures < 0:
            raise RtkitError(f"--max-failures must be 0 or more, got {self.max_failures}")
        if self.shard is not None:
            i, n = self.shard
            if not (n >= 1 and 0 <= i < n):
                raise RtkitError(f"--shard must be i/n with 0 <= i < n, got {i}/{n}")


@dataclass
class Summary:
    engine: str
    src: str
    out: str
    manifest: str
    total: int = 0                  # image files in this shard
    converted: int = 0              # converted by this run
    adopted: int = 0                # written by a killed run, taken over
    already_done: int = 0           # done before this run
    redone: int = 0                 # done before, but the source changed or the output was lost
    failed: int = 0                 # failed in this run
    failed_before: int = 0          # failures recorded earlier and not retried
    skipped: int = 0                # non-image files, unreadable folders
    wall_s: float = 0.0             # the whole run, start-up included
    startup_s: float = 0.0          # before the first image could be converted (engine, plan, workers)
    stage_s: dict[str, float] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    aborted: bool = False
    executor: str = ""
    source: str = "cpu"

    @property
    def img_per_s(self) -> float:
        return self.converted / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steady_img_per_s(self) -> float:
        """Throughput once running (start-up left out)."""
        busy = self.wall_s - self.startup_s
        return self.converted / busy if busy > 0 else 0.0

    @property
    def s_per_img(self) -> float:
        return self.wall_s / self.converted if self.converted else 0.0

    @property
    def exit_code(self) -> int:
        if self.aborted:
            return EXIT_ABORTED
        return EXIT_SOME_FAILED if (self.failed or self.failed_before) else EXIT_OK

    def table(self, max_failures_listed: int = 20) -> str:
        w = self.workers
        lines = [
            "rt-convert summary",
            f"  engine       {self.engine}",
            f"  executor     {self.executor}   source {self.source}",
            f"  source       {self.src}",
            f"  output       {self.out}",
            f"  manifest     {self.manifest}",
            f"  images       {self.total}   converted {self.converted}   already done "
            f"{self.already_done}   adopted {self.adopted}" + (f"   redone {self.redone}" if self.redone else ""),
            f"  failed       {self.failed + self.failed_before}"
            + (f" ({self.failed_before} from earlier runs; --retry-failed to retry)" if self.failed_before else ""),
            f"  skipped      {self.skipped} (not image files, unreadable folders)",
            f"  wall time    {self.wall_s:.2f} s (start-up {self.startup_s:.2f} s)",
            f"  throughput   {self.img_per_s:.1f} img/s overall, {self.steady_img_per_s:.1f} img/s after "
            f"start-up   {self.s_per_img * 1e3:.2f} ms/img",
            "  stage time   " + "   ".join(
                f"{k} {v:.2f} s" + (f" ({w[k]} threads)" if w.get(k, 1) > 1 else "")
                for k, v in self.stage_s.items())
            + (f"   (busy seconds summed over {w['processes']} processes)" if "processes" in w else ""),
        ]
        return "\n".join(lines + self.tail_lines(max_failures_listed))

    def tail_lines(self, max_failures_listed: int = 20) -> list[str]:
        """The summary's last lines: the abort note and the problems (any job's summary)."""
        lines = []
        if self.aborted:
            lines.append("  ABORTED      more failures than --max-failures; fix the inputs and rerun "
                         "(finished files are kept)")
        if self.failures:
            lines.append("  problems:")
            for rel, why in self.failures[:max_failures_listed]:
                lines.append(f"    {rel}: {why}")
            if len(self.failures) > max_failures_listed:
                lines.append(f"    ... {len(self.failures) - max_failures_listed} more in the manifest")
        return lines


class StageClock:
    """Busy seconds per stage, summed over that stage's threads or processes."""

    def __init__(self):
        self.lock = threading.Lock()
        self.busy: dict[str, float] = {"decode": 0.0, "infer": 0.0, "encode": 0.0}

    def add(self, stage: str, dt: float):
        with self.lock:
            self.busy[stage] += dt


class Recorder:
    """Results -> manifest, summary and progress bar, in the main thread.

    The manifest is written a few times a second, not per batch: a commit per batch would cost
    more than the images. Outputs written but not yet recorded are adopted on resume."""

    def __init__(self, man: Manifest, summary: Summary, engine_identity: str, total: int,
                 opts: ConvertOptions, stop: threading.Event, epoch: int = 0):
        self.man, self.summary, self.identity, self.opts, self.stop = man, summary, engine_identity, opts, stop
        self.epoch = epoch
        self.done: list[Done] = []
        self.failed: list[tuple[str, str]] = []
        self.fatal: str | None = None
        self.last = 0.0
        self.first_result: float | None = None
        self.progress = None
        if opts.progress:
            from tqdm import tqdm
            self.progress = tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr,
                                 desc="rt-convert", smoothing=0.1)

    def add(self, done: list[Done], failed: list[tuple[str, str]], fatal: str | None = None):
        if self.first_result is None:
            self.first_result = time.perf_counter()
        self.done += done
        self.failed += failed
        if fatal and self.fatal is None:
            self.fatal = fatal  # the output folder is full or read-only: stop handing out work
            self.stop.set()

    def mark_running(self, items: list[WorkItem]) -> None:
        self.man.mark_running([it.relpath for it in items])  # before any output can exist

    def flush(self, every: float = 0.0):
        now = time.perf_counter()
        if now - self.last < every:
            return
        self.last = now
        if self.done or self.failed:
            done, failed, self.done, self.failed = self.done, self.failed, [], []
            self.man.record(done, failed, engine=self.identity, epoch=self.epoch)
            s = self.summary
            s.converted += len(done)
            s.failed += len(failed)
            s.failures.extend(failed)
            if self.progress is not None:
                self.progress.update(len(done) + len(failed))
        if (self.opts.max_failures is not None and self.summary.failed > self.opts.max_failures
                and not self.summary.aborted):
            self.summary.aborted = True
            self.stop.set()

    def close(self):
        self.flush()
        if self.progress is not None:
            self.progress.close()


def output_relpath(relpath: str, fmt: str) -> str:
    return str(Path(relpath).with_suffix(OUTPUT_FORMATS[fmt]).as_posix())


@dataclass
class Plan:
    images: list[tuple[str, str, tuple[int, int, int]]]   # (relpath, output relpath, source stat)
    skipped: list[tuple[str, str]]                        # (relpath, reason)


def plan_job(src: Path, out: Path, opts: ConvertOptions) -> Plan:
    """This shard's images with their outputs, after refusing output-name collisions over the
    whole tree (two sources may not share an output, in any shard)."""
    scan = scan_tree(src, exclude=out)
    by_output: dict[str, str] = {}
    collisions = []
    for rel, _ in scan.images:
        o = output_relpath(rel, opts.fmt)
        if o in by_output:
            collisions.append(f"{by_output[o]} and {rel} -> {o}")
        else:
            by_output[o] = rel
    if collisions:
        more = f" (and {len(collisions) - 3} more)" if len(collisions) > 3 else ""
        raise RtkitError(f"{len(collisions)} output name collision(s): {'; '.join(collisions[:3])}{more}; "
                         f"rename the sources or convert them into separate output folders")
    images = [(rel, output_relpath(rel, opts.fmt), st) for rel, st in scan.images]
    skipped = [(rel, f"not an image file ({Path(rel).suffix or 'no extension'})") for rel in scan.others]
    skipped += scan.problems
    if opts.shard is not None:
        i, n = opts.shard
        images = images[i::n]
        skipped = sorted(skipped)[i::n]
    return Plan(images, skipped)


def check_shard_layout(out: Path, shard: tuple[int, int] | None) -> None:
    """Shards of one OUT must split it the same way, or two shards could write one file."""
    from rtkit.runtime.manifest import MANIFEST_DIR

    folder = out / MANIFEST_DIR
    if not folder.is_dir():
        return
    counts = set()
    for p in folder.glob("manifest*.sqlite"):
        name = p.name[len("manifest"):-len(".sqlite")]
        counts.add(int(name.rsplit("-of-", 1)[1]) if "-of-" in name else 1)
    mine = shard[1] if shard else 1
    other = sorted(c for c in counts if c != mine)
    if other:
        raise RtkitError(f"{out} already holds a job split into {other[0]} shard(s); a run with "
                         f"{'--shard i/' + str(mine) if shard else 'no --shard'} would overlap it. "
                         f"Use the same split or another output folder")


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _stat_or_none(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _remove_stale(path: str) -> None:
    """An output that does not belong to the current settings or source goes before its row
    turns 'running', so a 'running' row's output is always this epoch's."""
    try:
        os.unlink(path)
    except OSError:  # not there, or a name the system cannot hold: nothing to adopt either way
        pass


def reconcile(man: Manifest, plan: Plan, src: Path, out: Path, summary: Summary,
              epoch: int) -> list[WorkItem]:
    """Decide, row by row, what this run converts; adopt what a killed run finished."""
    planned = {rel: (o, st) for rel, o, st in plan.images}
    todo: list[WorkItem] = []
    adopted: list[Done] = []
    reset: dict[str, tuple[int, int, int]] = {}
    for row in man.rows():
        if row.relpath not in planned:
            if row.status == "skipped":
                summary.skipped += 1
                summary.failures.append((row.relpath, f"skipped: {row.error}"))
            continue  # a file that left the source tree: keep its record, do nothing
        out_rel, st = planned[row.relpath]
        target = os.path.join(out, out_rel)
        src_path = os.path.join(src, row.relpath)
        same_source = (row.src_size, row.src_mtime_ns, row.src_ctime_ns) == tuple(st)
        if not same_source and row.src_sha256 is not None and row.src_size == st[0]:
            # Only the stat changed (a copy, a touch): the content decides.
            try:
                same_source = _file_sha256(src_path) == row.src_sha256
            except OSError:
                same_source = False
            if same_source:
                man.update_identity(row.relpath, src_stat=st)
        if row.src_size is None:  # a row of a manifest from before source identities: adopt the stat
            man.update_identity(row.relpath, src_stat=st)
            same_source = True
        if row.status == "done":
            if same_source and row.output == out_rel and _output_intact(man, row, target):
                summary.already_done += 1
                continue
            summary.redone += 1
            reset[row.relpath] = st
            _remove_stale(target)
        elif row.status == "running":
            written = _stat_or_none(target)
            if same_source and written is not None:
                adopted.append(Done(row.relpath, _file_sha256(target), *written))
                continue
            reset[row.relpath] = st
            _remove_stale(target)
        elif row.status == "failed":
            if same_source:
                summary.failed_before += 1
                summary.failures.append((row.relpath, row.error))
                continue
            reset[row.relpath] = st
        elif row.status == "skipped":
            summary.skipped += 1
            summary.failures.append((row.relpath, f"skipped: {row.error}"))
            continue
        else:  # pending: whatever is on disk under its name is not this epoch's
            _remove_stale(target)
            if not same_source:
                reset[row.relpath] = st
        todo.append(WorkItem(row.relpath, target))
    if reset:
        man.reset(list(reset), reset)
    summary.adopted = len(adopted)
    man.record([], [], adopted=adopted, epoch=epoch)
    return todo


def _output_intact(man: Manifest, row, target: str) -> bool:
    """The recorded output is there, whole: same size and mtime, or (stat changed) same sha256."""
    now = _stat_or_none(target)
    if now is None:
        return False
    if row.out_size is None:  # recorded before output identities: the content decides
        ok = row.sha256 is not None and _file_sha256(target) == row.sha256
    elif now == (row.out_size, row.out_mtime_ns):
        return True
    else:
        ok = now[0] == row.out_size and _file_sha256(target) == row.sha256
    if ok:
        man.update_identity(row.relpath, out_stat=now)
    return ok


def job_config(runner: Runner, src: Path, opts: ConvertOptions) -> dict[str, Any]:
    """What makes two runs the same job: engine, source tree, output settings."""
    return {"engine": runner.identity, "source": os.path.realpath(src), "format": opts.fmt,
            "quality": opts.quality if opts.fmt != "png" else None,
            "size": list(opts.size) if opts.size else None, "extra": _jsonable(runner.extra),
            "shard": list(opts.shard) if opts.shard else None}


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in d.items()}


def run_job(runner: Runner, src: Path, out: Path, opts: ConvertOptions, executor, *, t_start: float,
            executor_name: str = "threads", source_name: str = "cpu") -> Summary:
    """Plan, reconcile with the manifest, run ``executor.run(todo, recorder, clock)``, summarise.
    The caller holds the output lock (runtime/outdir.OutputLock) for the whole call."""
    check_folders(src, out)
    check_shard_layout(out, opts.shard)
    mpath = manifest_path(out, opts.shard)
    summary = Summary(engine=runner.describe(), src=str(src), out=str(out), manifest=str(mpath),
                      workers=executor.workers(), executor=executor_name, source=source_name)
    try:
        mpath.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RtkitError(f"cannot write into the output folder {out}: {e.strerror or e}") from None
    plan = plan_job(src, out, opts)  # refuses collisions before the manifest exists
    with Manifest(mpath) as man:
        epoch = man.bind_job(job_config(runner, src, opts), restart=opts.restart)
        man.add_files(plan.images, plan.skipped)
        if opts.retry_failed:
            man.retry_failed()
        todo = reconcile(man, plan, src, out, summary, epoch)
        summary.total = len(plan.images)
        man.start_run(os.getpid(), socket.gethostname(), epoch)
        state = "finished"
        clock = StageClock()
        rec = Recorder(man, summary, runner.identity, len(todo), opts, threading.Event(), epoch)
        try:
            if todo:
                executor.run(todo, rec, clock)
            state = "aborted" if summary.aborted else "finished"
        except BaseException as e:
            state = "failed" if isinstance(e, Exception) else "interrupted"  # Ctrl-C, SIGTERM
            raise
        finally:
            rec.close()
            summary.stage_s = dict(clock.busy)
            summary.wall_s = time.perf_counter() - t_start
            summary.startup_s = ((rec.first_result - t_start) if rec.first_result is not None else summary.wall_s)
            if rec.fatal:
                state = "stopped"
            man.finish_run(state, summary.converted, summary.adopted, summary.failed, summary.wall_s,
                           summary.startup_s)
        if rec.fatal:
            raise OutputFolderError(f"{rec.fatal}; the run stopped ({summary.converted} converted now, "
                                    f"nothing else marked failed); free space or fix permissions and run "
                                    f"the same command again")
    return summary

