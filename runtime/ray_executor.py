"""The Ray executor: batch actors on a Ray cluster, one per GPU (or CPU), the driver owns the job.

RayPool is the machinery (actors, submission, replacement of dead actors, writers lock); what an
actor does with a batch is its worker: ConvertWorker here for rt-convert, GenerateWorker
(runtime/generate.py) for rt-generate digi2real, where the driver computes the ID vectors and
the actors run the generator and write the crops.

Why actors and not Ray Data: each actor opens its engine once and converts whole batches with
``stages.convert_batch``, reading SRC and writing OUT itself (a filesystem every node mounts at
the same path), so only file names and a few hashes cross the cluster, never pixels; and the
driver alone keeps the manifest through the job's Recorder, so exactly-once stays the job's
rule, not a property of Ray's retries.

The driver marks a batch 'running' before submitting it, keeps at most two batches per actor in
flight (one running, one queued), and records results as they complete (``ray.wait``). An actor
that dies mid-batch (node lost, OOM, ``ray.kill``) is replaced and its batches are resubmitted;
outputs are written atomically and are the same bytes whoever writes them, and only the
completed call is recorded, so the manifest records each file once. A batch that kills three
actors stops the run with one line (its files are the likely cause) and stays 'running'.

What holds where:
- On the driver's machine every actor holds the run's writers lock (runtime/outdir.py) and
  SIGKILLs itself when the driver process exits, so a new run starts only after every actor of
  a killed one is gone, exactly as with local conversion processes.
- On other machines the actors take the same lock on OUT's shared filesystem; it keeps a new
  run waiting only where that filesystem honours flock across clients (NFSv4, CephFS, Lustre
  mounted with -o flock). Elsewhere a killed driver's remote actors are ended by Ray itself
  (they belong to the driver's job) within Ray's failure-detection time; a late write there is
  the same bytes under the same settings, but start a run with --restart only after the old
  job is gone (``ray list actors``).
- Every node needs rtkit installed and SRC, OUT and the engine at the same paths.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

from rtkit.engines.errors import RtkitError, optional_import
from rtkit.runtime.job import ConvertOptions, Recorder, StageClock
from rtkit.runtime.stages import CpuSource, WorkItem, convert_batch

log = logging.getLogger(__name__)

_IN_FLIGHT = 2       # batches per actor at once: one running, one queued behind it
_MAX_ATTEMPTS = 3    # actors a batch may see die before the run stops
_MAX_START_FAILURES = 3
_NO_ACTOR_WARN_S = 60.0


def require_ray():
    return optional_import("ray", extra="ray", purpose="--executor ray")


def check_ray_options(engine, devices, processes, address, num_cpus, actors) -> None:
    """Refuse option mixes that mean nothing on Ray, before any folder or cluster is touched."""
    from rtkit.runtime.runners import Runner

    if isinstance(engine, Runner):
        raise RtkitError("--executor ray needs an engine path or name, not an open runner")
    if devices:
        raise RtkitError("--devices places workers on this machine; with --executor ray, Ray places "
                         "one actor per GPU (--device cuda) or per CPU of the cluster (--ray-actors)")
    if processes:
        raise RtkitError("--processes applies to the local executor; with --executor ray use --ray-actors")
    if address and num_cpus is not None:
        raise RtkitError("--ray-cpus sizes a local Ray cluster; a cluster at --ray-address has its own")
    for name, v in (("--ray-cpus", num_cpus), ("--ray-actors", actors)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise RtkitError(f"{name} must be an integer of at least 1, got {v!r}")
    require_ray()


def _absolute(engine_args: dict) -> dict:
    """Actors run in other folders (and on other machines): paths must not depend on the cwd."""
    args = dict(engine_args)
    for key in ("engine", "checkpoint"):
        v = args.get(key)
        if v is not None and os.path.exists(v):
            args[key] = os.path.abspath(v)
    return args


class BatchActor:
    """One Ray worker process running whole batches through a worker built once in it,
    ``make_worker(*worker_args)`` (a callable: batch payload -> result). Made a Ray actor by
    RayPool; a plain class so that importing this module needs no Ray."""

    def __init__(self, make_worker, worker_args: tuple, writers_lock: str, driver_node: str,
                 driver_pid: int | None):
        self.error: BaseException | None = None
        try:
            import ray

            from rtkit.runtime.outdir import exit_with, hold_writers_lock

            if driver_pid is not None and ray.get_runtime_context().get_node_id() == driver_node:
                exit_with(driver_pid)

            try:
                self.lock_fd = hold_writers_lock(writers_lock)  # held until this process exits
            except OSError as e:
                raise RtkitError(f"a Ray worker on {ray.util.get_node_ip_address()} cannot open "
                                 f"{writers_lock} ({e.strerror or e}): SRC, OUT and the engine must be "
                                 f"on a filesystem every node mounts at the same path") from None
            import cv2

            cv2.setNumThreads(1)  # one core per actor: the actors overlap one another
            self.worker = make_worker(*worker_args)
        except Exception as e:  # reported by ready(), where the driver can raise it as it is
            self.error = e

    def ready(self) -> int:
        if self.error is not None:
            raise self.error
        return os.getpid()

    def run(self, payload):
        return self.worker(payload)


class ConvertWorker:
    """rt-convert's batch work in an actor: one engine, batches of (relpath, absolute output path)
    decoded from SRC, converted and written by ``stages.convert_batch``."""

    def __init__(self, engine_args: dict, src_root: str, opts: ConvertOptions):
        from rtkit.runtime.runners import open_engine

        self.runner = open_engine(**engine_args)
        self.spec = self.runner.spec
        self.source = CpuSource(src_root, spng=True)
        self.opts = opts
        self.made_dirs: set[str] = set()

    def __call__(self, pairs: list[tuple[str, str]]):
        items = [WorkItem(rel, out) for rel, out in pairs]
        return convert_batch(self.runner, items, self.source, self.spec, self.opts, self.made_dirs)


class _Slot:
    """One actor place; a dead actor is replaced by a new generation in the same slot."""

    def __init__(self, index: int):
        self.index = index
        self.generation = 0
        self.actor = None
        self.live = False
        self.in_flight = 0
        self.start_failures = 0


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


class RayPool:
    """Batch actors on a Ray cluster: the one at ``address`` (or $RAY_ADDRESS), else a new local
    one of ``num_cpus`` CPUs; an already initialised Ray session is used as it is (and left
    running). ``actors``: default one per GPU of the cluster (``on_gpu``), else one per CPU. Each
    actor builds ``make_worker(*worker_args)`` once. ``writers_lock`` is the run's writers lock
    file (OutputLock.writers_path); ``label`` names the actors and the log lines (rt-convert)."""

    def __init__(self, make_worker, worker_args: tuple, writers_lock: str, *, on_gpu: bool,
                 label: str, address: str | None = None, num_cpus: int | None = None,
                 actors: int | None = None):
        ray = require_ray()
        self.ray = ray
        self.label = label
        self.on_gpu = on_gpu
        self.slots: list[_Slot] = []
        self.waiting: dict = {}  # ObjectRef -> (what, slot, generation, batch index)
        self.own_session = False
        self.where = "connected session"
        if not ray.is_initialized():
            self._connect(address, num_cpus)
        try:
            self._start_actors(make_worker, worker_args, writers_lock, actors)
        except BaseException:
            self.close()
            raise

    def _connect(self, address: str | None, num_cpus: int | None) -> None:
        ray = self.ray
        address = address or os.environ.get("RAY_ADDRESS")
        quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
                ray.init(address="local", num_cpus=num_cpus or cores or 1, include_dashboard=False, **quiet)
        except ConnectionError as e:
            raise RtkitError(f"cannot connect to the Ray cluster at {address}: {_reason(e)}") from None
        self.own_session = True
        self.where = address or "local cluster"

    def _start_actors(self, make_worker, worker_args: tuple, writers_lock: str, actors: int | None) -> None:
        ray = self.ray
        on_gpu = self.on_gpu
        resources = ray.cluster_resources()
        n = actors or int(resources.get("GPU" if on_gpu else "CPU", 0))
        if n < 1:
            raise RtkitError(f"the Ray cluster ({self.where}) has no {'GPU' if on_gpu else 'CPU'}s "
                             f"for {self.label} actors" + (" (run on CPU with --device cpu)" if on_gpu else ""))
        client = ray.util.client.ray.is_connected()
        # The driver watchdog needs the driver's pid on the actor's machine; a Ray Client driver
        # runs elsewhere.
        driver_pid = None if client else os.getpid()
        self.actor_cls = ray.remote(num_cpus=1, num_gpus=1 if on_gpu else 0)(BatchActor)
        self.ctor = (make_worker, worker_args, os.path.abspath(writers_lock),
                     ray.get_runtime_context().get_node_id(), driver_pid)
        self.token = uuid.uuid4().hex[:8]
        self.slots = [_Slot(i) for i in range(n)]
        for s in self.slots:
            self._start(s)  # starts overlap the job's planning; batches go to actors once ready
        self.name = f"ray ({n} actors{' on GPUs' if on_gpu else ''}, {self.where})"

    def _start(self, slot: _Slot) -> None:
        slot.generation += 1
        slot.live, slot.in_flight = False, 0
        slot.actor = self.actor_cls.options(
            name=f"{self.label}-{self.token}-{slot.index}.{slot.generation}").remote(*self.ctor)
        self.waiting[slot.actor.ready.remote()] = ("ready", slot, slot.generation, None)

    def run(self, batches: Iterable[tuple[list[WorkItem], Any]], record: Callable[[Any], None],
            rec: Recorder) -> None:
        """Run ``batches`` ((items, payload) pairs, pulled only when an actor is free to take
        one): each batch's items are marked 'running' before it is submitted, ``record(result)``
        is called once per completed batch, and a batch whose actor died is resubmitted first."""
        ray = self.ray
        source = iter(batches)
        counter = itertools.count()
        exhausted = False
        held: dict[int, tuple[list[WorkItem], Any]] = {}  # batches not yet recorded
        retry: collections.deque = collections.deque()
        attempts: collections.Counter = collections.Counter()
        t_none = time.monotonic()
        warned = False

        def next_batch() -> int | None:
            nonlocal exhausted
            if retry:
                return retry.popleft()
            if exhausted:
                return None
            got = next(source, None)
            if got is None:
                exhausted = True
                return None
            b = next(counter)
            held[b] = got
            return b

        def hand_out(slot: _Slot):
            while slot.live and slot.in_flight < _IN_FLIGHT and not rec.stop.is_set():
                b = next_batch()
                if b is None:
                    return
                items, payload = held[b]
                rec.mark_running(items)  # before any output of it can exist
                self.waiting[slot.actor.run.remote(payload)] = ("batch", slot, slot.generation, b)
                slot.in_flight += 1

        def batches_in_flight() -> bool:
            return any(what == "batch" for what, *_ in self.waiting.values())

        def lost(slot: _Slot, generation: int, what: str, b: int | None, e: BaseException):
            if b is not None:
                attempts[b] += 1
                items = held[b][0]
                if attempts[b] >= _MAX_ATTEMPTS:
                    raise RtkitError(f"a batch of {len(items)} images (first {items[0].relpath}) was on "
                                     f"{attempts[b]} Ray actors that died ({_reason(e)}); its images stay "
                                     f"'running' in the manifest and are redone when you run the same "
                                     f"command again") from None
                retry.appendleft(b)  # redone first, by whichever actor is free
            if generation != slot.generation:
                return  # that actor was already replaced
            if what == "ready":
                slot.start_failures += 1
                if slot.start_failures >= _MAX_START_FAILURES:
                    raise RtkitError(f"Ray {self.label} actors keep dying while they start: {_reason(e)}")
            log.warning("%s: Ray actor %d died (%s); its batches are resubmitted to a new actor",
                        self.label, slot.index, _reason(e))
            try:
                ray.kill(slot.actor)  # may be only unreachable: make sure it writes no more
            except Exception:
                pass
            self._start(slot)

        while batches_in_flight() or ((retry or not exhausted) and not rec.stop.is_set()):
            ready, _ = ray.wait(list(self.waiting), num_returns=1, timeout=0.25)
            for ref in ready:
                what, slot, generation, b = self.waiting.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    lost(slot, generation, what, b, e)
                    continue
                except ray.exceptions.RayTaskError as e:  # a failed engine or a bug: stop the run
                    raise (e.cause if isinstance(e.cause, BaseException) else e) from None
                if what == "ready":
                    slot.live, slot.start_failures = True, 0
                else:
                    if generation == slot.generation:
                        slot.in_flight -= 1
                    del held[b]
                    record(result)
                    rec.flush(every=0.25)
            for slot in self.slots:
                hand_out(slot)
            if any(s.live for s in self.slots):
                t_none = time.monotonic()
            elif not warned and time.monotonic() - t_none > _NO_ACTOR_WARN_S:
                warned = True
                log.warning("%s: no Ray actor has started after %.0f s; does the cluster have "
                            "free %s? (ray status)", self.label, _NO_ACTOR_WARN_S,
                            "GPUs" if self.on_gpu else "CPUs")
            rec.flush(every=0.25)

    def close(self) -> None:
        for s in self.slots:
            if s.actor is not None:
                try:
                    self.ray.kill(s.actor)
                except Exception:
                    pass
                s.actor = None
        self.waiting.clear()
        if self.own_session:
            self.ray.shutdown()
            self.own_session = False


class RayExecutor:
    """rt-convert's executor on Ray: ConvertWorker actors in a RayPool (see RayPool for where the
    cluster comes from and how many actors run)."""

    def __init__(self, engine_args: dict, src: str | Path, opts: ConvertOptions, writers_lock: str, *,
                 address: str | None = None, num_cpus: int | None = None, actors: int | None = None):
        self.opts = opts
        on_gpu = str(engine_args.get("device", "cpu")).startswith("cuda")
        args = _absolute(engine_args)
        if on_gpu:
            args["device"] = "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to the actor's own GPU
        elif args.get("threads") is None:
            args["threads"] = 1  # one CPU per actor
        self.pool = RayPool(ConvertWorker, (args, os.path.abspath(src), opts), writers_lock, on_gpu=on_gpu,
                            label="rt-convert", address=address, num_cpus=num_cpus, actors=actors)
        self.name = self.pool.name

    def workers(self) -> dict[str, int]:
        return {"processes": len(self.pool.slots)}

    def run(self, todo: list[WorkItem], rec: Recorder, clock: StageClock) -> None:
        """Convert ``todo``: submit batches to live actors, record results as they complete."""
        bs = self.opts.batch_size
        batches = ((chunk, [(it.relpath, os.path.abspath(it.out)) for it in chunk])
                   for chunk in (todo[i:i + bs] for i in range(0, len(todo), bs)))

        def record(result):
            done, failed, fatal, (decode_s, infer_s, encode_s) = result
            rec.add(done, failed, fatal)
            clock.add("decode", decode_s)
            clock.add("infer", infer_s)
            clock.add("encode", encode_s)

        self.pool.run(batches, record, rec)

    def close(self) -> None:
        self.pool.close()
