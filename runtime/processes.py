"""rt-convert's CPU mode: one conversion process per core, the parent owns the manifest.

On a CPU every stage (decode, inference, encode) competes for the same cores, so the fastest
schedule keeps each core on one image stream: each worker process decodes, translates (one
single-threaded ONNX Runtime session) and encodes whole batches, and the processes overlap with
one another. Compared with the threaded pipeline this spends nothing on the interpreter lock
or on thread hand-overs (benchmarks/convert_cpu.py measures both against the bound).

The parent plans the job, marks each batch 'running' in the manifest before a worker can write
it, hands out at most two batches per worker (the bounded queue), and records what comes back.
Workers die with their parent (Linux parent-death signal), so a SIGKILLed run leaves no worker
writing behind the run that resumes it.
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
from rtkit.runtime.converter import (ConvertOptions, _Item, _Recorder, _StageClock, decode_batch,
                                     encode_batch, group_by_shape, infer_batch)

_IN_FLIGHT = 2  # batches handed to a worker at once: one running, one waiting


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux only)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(conn, engine_args: dict, src_root: str, opts: ConvertOptions) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    import cv2

    cv2.setNumThreads(1)  # one core per process
    from rtkit.runtime.runners import open_engine

    try:
        runner = open_engine(**engine_args)
    except BaseException as e:
        conn.send(("error", _portable(e)))
        return
    spec = runner.spec
    made_dirs: set[str] = set()
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent is gone
            return
        if job is None:
            break
        items = [_Item(rel, out) for rel, out in job]
        t0 = time.perf_counter()
        ok, failed = decode_batch(items, src_root, spec, opts.size, spng=True)
        t1 = time.perf_counter()
        done, infer_s, encode_s = [], 0.0, 0.0
        try:
            for group in group_by_shape(ok):
                t = time.perf_counter()
                y = infer_batch(runner, group)
                t2 = time.perf_counter()
                d, f = encode_batch(group, y, spec, opts.fmt, opts.quality, made_dirs)
                infer_s, encode_s = infer_s + t2 - t, encode_s + time.perf_counter() - t2
                done += d
                failed += f
        except BaseException as e:  # a runner failure is a bug or a broken engine: stop the run
            conn.send(("error", _portable(e)))
            return
        conn.send(("batch", done, failed, (t1 - t0, infer_s, encode_s)))
    runner.close()


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
    def __init__(self, ctx, engine_args: dict, src_root: str, opts: ConvertOptions):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, engine_args, src_root, opts),
                                daemon=True, name="rt-convert-worker")
        self.proc.start()
        child.close()
        self.in_flight: collections.deque = collections.deque()

    def send(self, batch: list[_Item]):
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


class ProcessPool:
    """``n`` conversion processes, started before the parent plans the job so that their start-up
    (fork, imports, engine session) overlaps the parent's walk and manifest work."""

    def __init__(self, engine_args: dict, n: int, src: Path, opts: ConvertOptions):
        ctx = process_context()
        self.opts = opts
        self.workers = [_Worker(ctx, engine_args, os.fspath(src), opts) for _ in range(max(1, n))]

    def __len__(self):
        return len(self.workers)

    def run(self, todo: list[_Item], rec: _Recorder, clock: _StageClock) -> None:
        """Convert ``todo``: hand out batches (at most _IN_FLIGHT per worker), record results."""
        bs = self.opts.batch_size
        batches = collections.deque(todo[i:i + bs] for i in range(0, len(todo), bs))
        by_conn = {w.conn: w for w in self.workers}

        def hand_out(w: _Worker):
            while batches and len(w.in_flight) < _IN_FLIGHT and not rec.stop.is_set():
                batch = batches.popleft()
                rec.man.mark_running([it.relpath for it in batch])  # before any output can exist
                w.send(batch)

        for w in self.workers:
            hand_out(w)
        while any(w.in_flight for w in self.workers):
            for conn in wait([w.conn for w in self.workers if w.in_flight], timeout=0.25):
                w = by_conn[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    raise w.died() from None
                if msg[0] == "error":
                    raise msg[1]
                _, done, failed, (decode_s, infer_s, encode_s) = msg
                w.in_flight.popleft()
                rec.add(done, failed)
                clock.add("decode", decode_s)
                clock.add("infer", infer_s)
                clock.add("encode", encode_s)
                rec.flush(every=0.25)
                hand_out(w)
            rec.flush(every=0.25)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        deadline = time.monotonic() + 5
        for w in self.workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.terminate()
                w.proc.join()
            w.conn.close()
