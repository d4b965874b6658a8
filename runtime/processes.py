"""Conversion processes: one worker process per core (CPU) or per device, the parent owns the job.

On a CPU every stage (decode, inference, encode) competes for the same cores, so the fastest
schedule keeps each core on one image stream: each worker decodes, translates and encodes whole
batches (``stages.convert_batch``), and the processes overlap one another. With ``devices``
(``--devices cuda:0,cuda:1``) each worker owns one device instead.

The parent plans the job, marks each batch 'running' in the manifest before a worker can write
it, hands out at most two batches per worker, and records what comes back. A worker cannot
outlive its parent: a watchdog thread in each worker waits on the parent's pidfd (Linux) and
SIGKILLs its own process the moment the parent is gone, even mid-batch, and every worker holds
the run's writers lock, so a new run starts only after every worker of a killed one has exited.
A worker that dies mid-batch ends the run with one line; its batch stays 'running' and is
redone (or adopted where its output was written whole) by the next run.
"""
from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import wait
from pathlib import Path

from rtkit.engines.errors import RtkitError
from rtkit.runtime.job import ConvertOptions, Recorder, StageClock
from rtkit.runtime.stages import CpuSource, WorkItem, convert_batch

_IN_FLIGHT = 2  # batches handed to a worker at once: one running, one waiting


def _worker(conn, parent_pid: int, writers_lock: str, engine_args: dict, src_root: str,
            opts: ConvertOptions, device: str | None) -> None:
    # Ctrl-C and SIGTERM are the parent's to handle; a worker just stops with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    from rtkit.runtime.outdir import exit_with, hold_writers_lock

    exit_with(parent_pid)

    hold_writers_lock(writers_lock)  # held until this process exits
    if os.getppid() != parent_pid and not _alive(parent_pid):
        os._exit(0)
    import cv2

    cv2.setNumThreads(1)  # one core per process
    from rtkit.runtime.runners import open_engine

    args = dict(engine_args)
    if device is not None:
        args["device"] = device
    try:
        runner = open_engine(**args)
    except BaseException as e:
        _send(conn, ("error", _portable(e)))
        return
    spec = runner.spec
    source = CpuSource(src_root, spng=True)
    made_dirs: set[str] = set()
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            os._exit(0)
        if job is None:
            break
        items = [WorkItem(rel, out) for rel, out in job]
        try:
            done, failed, fatal, times = convert_batch(runner, items, source, spec, opts, made_dirs)
        except BaseException as e:  # a runner failure is a bug or a broken engine: stop the run
            _send(conn, ("error", _portable(e)))
            return
        _send(conn, ("batch", done, failed, fatal, times))
    runner.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _send(conn, msg) -> None:
    try:
        conn.send(msg)
    except (BrokenPipeError, OSError):  # the parent is gone: nobody to tell
        os._exit(0)


def _portable(e: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def process_context():
    """The multiprocessing context of conversion processes (benchmarks use it for their baselines)."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:  # Windows
        return multiprocessing.get_context("spawn")
    # A fork server is a clean interpreter (no threads, no torch) that has imported the
    # converter once; workers fork from it in milliseconds instead of importing for ~0.5 s.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["rtkit.runtime.processes", "onnxruntime"])
    return ctx


class _Worker:
    def __init__(self, ctx, writers_lock: str, engine_args: dict, src_root: str, opts: ConvertOptions,
                 device: str | None):
        self.conn, child = ctx.Pipe()
        self.device = device
        self.proc = ctx.Process(target=_worker, args=(child, os.getpid(), writers_lock, engine_args,
                                                      src_root, opts, device),
                                daemon=True, name="rt-convert-worker")
        self.proc.start()
        child.close()
        self.in_flight: collections.deque = collections.deque()

    def send(self, batch: list[WorkItem]):
        self.in_flight.append(batch)
        try:
            self.conn.send([(it.relpath, it.out) for it in batch])
        except OSError:  # the worker is gone (killed, crashed)
            raise self.died() from None

    def stop(self):
        try:
            self.conn.send(None)
        except OSError:
            pass

    def died(self) -> RtkitError:
        self.proc.join(timeout=1)
        return RtkitError(f"a conversion process died (exit code {self.proc.exitcode}); its "
                          f"{sum(map(len, self.in_flight))} images stay 'running' in the manifest "
                          f"and are redone when you run the same command again")


class ProcessExecutor:
    """``n`` conversion processes (or one per device), started before the parent plans the job so
    that their start-up (fork, imports, engine session) overlaps the parent's walk and manifest
    work. ``writers_lock`` is the run's writers lock file (OutputLock.writers_path)."""

    def __init__(self, engine_args: dict, n: int, src: Path, opts: ConvertOptions, writers_lock: str,
                 devices: list[str] | None = None):
        ctx = process_context()
        self.opts = opts
        devs = devices or [None] * max(1, n)
        self.workers_ = [_Worker(ctx, writers_lock, engine_args, os.fspath(src), opts, d) for d in devs]
        self.name = f"processes ({len(self.workers_)}" + (f" on {', '.join(devices)})" if devices else ")")

    def __len__(self):
        return len(self.workers_)

    def workers(self) -> dict[str, int]:
        return {"processes": len(self.workers_)}

    def run(self, todo: list[WorkItem], rec: Recorder, clock: StageClock) -> None:
        """Convert ``todo``: hand out batches (at most _IN_FLIGHT per worker), record results."""
        bs = self.opts.batch_size
        batches = collections.deque(todo[i:i + bs] for i in range(0, len(todo), bs))
        by_conn = {w.conn: w for w in self.workers_}

        def hand_out(w: _Worker):
            while batches and len(w.in_flight) < _IN_FLIGHT and not rec.stop.is_set():
                batch = batches.popleft()
                rec.mark_running(batch)
                w.send(batch)

        for w in self.workers_:
            hand_out(w)
        while any(w.in_flight for w in self.workers_):
            for conn in wait([w.conn for w in self.workers_ if w.in_flight], timeout=0.25):
                w = by_conn[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    raise w.died() from None
                if msg[0] == "error":
                    raise msg[1]
                _, done, failed, fatal, (decode_s, infer_s, encode_s) = msg
                w.in_flight.popleft()
                rec.add(done, failed, fatal)
                clock.add("decode", decode_s)
                clock.add("infer", infer_s)
                clock.add("encode", encode_s)
                rec.flush(every=0.25)
                hand_out(w)
            rec.flush(every=0.25)

    def close(self) -> None:
        for w in self.workers_:
            w.stop()
        deadline = time.monotonic() + 5
        for w in self.workers_:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.terminate()
                w.proc.join()
            w.conn.close()


_encoder_dirs: set[str] = set()  # folders an encoder process has made (per process)


def _encoder_init(parent_pid: int, writers_lock: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    from rtkit.runtime.outdir import exit_with, hold_writers_lock

    exit_with(parent_pid)
    hold_writers_lock(writers_lock)  # held until this process exits
    import cv2

    cv2.setNumThreads(1)


def _encode_in_process(items: list[tuple[str, str, str | None]], imgs, fmt: str, quality: int):
    from rtkit.runtime.stages import write_batch

    return write_batch(items, imgs, fmt, quality, _encoder_dirs)


class EncoderPool:
    """PNG/JPEG encoding and writing in ``n`` processes for the threaded pipeline: on a GPU machine
    encoding is the CPU-bound stage (a 16-core machine needs ~10 encoders for 7k img/s). uint8
    images go over pipes; each process holds the run's writers lock and dies with the run."""

    def __init__(self, n: int, writers_lock: str):
        from concurrent.futures import ProcessPoolExecutor

        self.n = n
        self.pool = ProcessPoolExecutor(max_workers=n, mp_context=process_context(),
                                        initializer=_encoder_init, initargs=(os.getpid(), writers_lock))

    def write(self, items, imgs, fmt: str, quality: int):
        """(done, failures, folder error) of one batch, written by one of the processes."""
        keys = [(it.relpath, it.out, it.src_sha256) for it in items]
        return self.pool.submit(_encode_in_process, keys, list(imgs), fmt, quality).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
