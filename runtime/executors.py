"""Executors: ways to schedule a job's batches, all behind ``run(todo, recorder, clock)``.

``ThreadExecutor`` (here) is the streaming pipeline in one process: decode threads -> batcher ->
inference threads -> encode threads, joined by bounded queues that carry whole batches.
``ProcessExecutor`` (runtime/processes.py) runs one conversion process per core or device. The
job (plan, manifest, recorder) is the same for all of them.
"""
from __future__ import annotations

import queue
import threading
import time

from rtkit.engines.spec import ModelSpec
from rtkit.runtime.job import ConvertOptions, Recorder, StageClock
from rtkit.runtime.runners import Runner
from rtkit.runtime.stages import WorkItem, encode_batch, infer_batch, output_images, prepare_batch

_DONE = object()  # queue sentinel


class ThreadExecutor:
    """Every queue carries whole batches, not images: one hand-over between threads per batch
    keeps the interpreter's share (under the GIL) small next to decode, inference and encode,
    which all run outside it."""

    name = "threads"

    def __init__(self, runner: Runner, source, opts: ConvertOptions, image_ops=None, encoders=None):
        self.runner, self.source, self.opts, self.image_ops = runner, source, opts, image_ops
        self.encoders = encoders  # an EncoderPool: encoding and writing in processes

    def workers(self) -> dict[str, int]:
        o = self.opts
        return {"decode": o.decode_workers, "infer": o.infer_workers, "encode": o.encode_workers}

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
        if self.encoders is not None:
            self.encoders.close()

    def run(self, todo: list[WorkItem], rec: Recorder, clock: StageClock) -> None:
        run_threads(self.runner, self.runner.spec, self.source, todo, self.opts, rec, clock, self.image_ops,
                    self.encoders)


def run_threads(runner: Runner, spec: ModelSpec, source, todo: list[WorkItem],
                opts: ConvertOptions, rec: Recorder, clock: StageClock, image_ops=None,
                encoder_pool=None) -> None:
    bs = opts.batch_size
    task_q: queue.Queue = queue.Queue()
    decoded_q: queue.Queue = queue.Queue(maxsize=max(2, opts.queue_batches))
    batch_q: queue.Queue = queue.Queue(maxsize=max(2, opts.queue_batches))
    encode_q: queue.Queue = queue.Queue(maxsize=max(2, opts.queue_batches))
    result_q: queue.Queue = queue.Queue()
    stop = rec.stop
    errors: list[BaseException] = []
    for i in range(0, len(todo), bs):
        task_q.put(todo[i:i + bs])
    for _ in range(opts.decode_workers):
        task_q.put(_DONE)

    def hand_on(ok, images, failed, t0):
        ready, bad = prepare_batch(ok, list(images), spec, opts.size, image_ops)
        clock.add("decode", time.perf_counter() - t0)
        if failed or bad:
            result_q.put(([], failed + bad, None))
        if ready:
            decoded_q.put(ready)

    def decode_worker():
        """Sources that decode a chunk on the calling thread (CPU): several such threads."""
        while not stop.is_set():
            chunk = task_q.get()
            if chunk is _DONE:
                break
            t0 = time.perf_counter()
            hand_on(*source.decode(chunk), t0)
        decoded_q.put(_DONE)

    def batch_feeder():
        """Sources with a pipeline of their own (DALI): one thread draws their batches."""
        t0 = time.perf_counter()
        try:
            for ok, images, failed in source.batches(todo, spec, opts.size, bs):
                if stop.is_set():
                    break
                hand_on(ok, images, failed, t0)
                t0 = time.perf_counter()
        except BaseException as e:
            errors.append(e)
            stop.set()
        finally:
            decoded_q.put(_DONE)

    made_dirs: set[str] = set()
    folder_error = threading.Event()

    def encode_worker():
        while True:
            job = encode_q.get()
            if job is _DONE:
                break
            if folder_error.is_set():
                continue  # the output folder is full or read-only: write nothing more
            if errors:
                continue  # a failed stage: drain without writing
            t0 = time.perf_counter()
            try:
                if encoder_pool is not None:  # postprocess here, encode and write in a process
                    items, y = job
                    result = encoder_pool.write(items, output_images(items, y, spec, image_ops),
                                                opts.fmt, opts.quality)
                else:
                    result = encode_batch(*job, spec, opts.fmt, opts.quality, made_dirs, image_ops)
            except BaseException as e:  # a bug or a dead encoder process: stop the run
                errors.append(e)
                stop.set()
                continue
            clock.add("encode", time.perf_counter() - t0)
            result_q.put(result)
            if result[2]:
                folder_error.set()
                stop.set()

    def infer_worker():
        while True:
            items = batch_q.get()
            if items is _DONE:
                break
            if errors or stop.is_set():
                continue  # a failed runner or a stop: drain without running
            t0 = time.perf_counter()
            try:
                y = infer_batch(runner, items)
            except BaseException as e:  # a runner failure is a bug or a broken engine: stop the run
                errors.append(e)
                stop.set()
                continue
            clock.add("infer", time.perf_counter() - t0)
            encode_q.put((items, y))

    if hasattr(source, "decode"):
        decoders = [threading.Thread(target=decode_worker, daemon=True, name=f"decode-{i}")
                    for i in range(opts.decode_workers)]
    else:
        decoders = [threading.Thread(target=batch_feeder, daemon=True, name="source")]
    inferers = [threading.Thread(target=infer_worker, daemon=True, name=f"infer-{i}")
                for i in range(opts.infer_workers)]
    encoders = [threading.Thread(target=encode_worker, daemon=True, name=f"encode-{i}")
                for i in range(opts.encode_workers)]
    for t in decoders + inferers + encoders:
        t.start()

    def drain(every: float):
        while True:
            try:
                rec.add(*result_q.get_nowait())
            except queue.Empty:
                break
        rec.flush(every)

    def run_batch(items: list[WorkItem]):
        rec.mark_running(items)
        while True:  # wait for room while keeping the manifest and the progress bar current
            try:
                batch_q.put(items, timeout=0.05)
                return
            except queue.Full:
                drain(every=0.25)

    pending: dict[tuple, list[WorkItem]] = {}  # one batch per input shape (fully convolutional models)
    live_decoders = len(decoders)
    try:
        while live_decoders:
            try:
                decoded = decoded_q.get(timeout=0.05)
            except queue.Empty:
                drain(every=0.25)
                continue
            if decoded is _DONE:
                live_decoders -= 1
                continue
            if stop.is_set():
                continue
            for it in decoded:
                group = pending.setdefault(it.x.shape, [])
                group.append(it)
                if len(group) >= bs:
                    run_batch(pending.pop(it.x.shape))
            drain(every=0.25)
        if not stop.is_set():
            for group in pending.values():
                run_batch(group)
    except BaseException:
        stop.set()
        raise
    finally:
        for _ in inferers:
            batch_q.put(_DONE)
        for t in inferers:
            t.join()
        for _ in encoders:
            encode_q.put(_DONE)
        for t in encoders:
            t.join()
        drain(0.0)
    if errors:
        raise errors[0]
