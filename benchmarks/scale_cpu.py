"""Scale-out on one machine's CPUs: the same job on 1 and 2 local workers, and the Ray executor's
overhead against the local one.

    python benchmarks/scale_cpu.py [--identities 150 --per-identity 8] [--rounds 3] [--workers 2]

The job: the sample set (rtkit.datasets.sample, render style) through the bundled ONNX engine
(rtkit.engines.render2photo.BUNDLED_ONNX), converted by rtkit.runtime.convert into a fresh output
folder each time, manifest included. Variants, run alternately --rounds times (medians reported,
so a background load hits all alike):

  local xN  --devices cpu,...,cpu: N worker processes (runtime/processes.py), one single-threaded
            engine each
  ray xN    --executor ray: N runner actors (runtime/ray_executor.py) on a local Ray cluster
            started once by this script (its start is reported on its own line)

Per variant: img/s over the whole run (start-up included); img/s after start-up (from the first
result on: the rate a large job sees); the start-up (workers or actors start, engine sessions
open, plan); and CPU ms/img: CPU time of this script's whole process tree during the run (driver,
workers, and for Ray also its raylet, GCS and actors, their start included), sampled from /proc
every 20 ms. Wall-clock figures need an idle machine (on two cores another user's load takes the
second worker's core first); the CPU figure depends less on other load. One warm-up run of each
variant on an eighth of the set comes first (fork server, page cache, Ray's worker pool). The
script checks that every variant writes the same bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.rglob("*.png")):
        h.update(p.relative_to(out).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _proc_table() -> dict[int, tuple[int, float]]:
    """{pid: (parent pid, CPU seconds so far)} of every process /proc shows."""
    table = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                table[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
            except (OSError, IndexError, ValueError):
                pass
    return table


def descendants() -> set[int]:
    table = _proc_table()
    mine, frontier = set(), [os.getpid()]
    while frontier:
        frontier = [p for p, (pp, _) in table.items() if pp in frontier and p not in mine]
        mine.update(frontier)
    return mine


class TreeCPU:
    """CPU seconds used by this process and its descendants (less the subtrees of ``exclude``)
    between start() and stop(); a process that exits in between counts up to its last sample
    (at most one period lost)."""

    def __init__(self, period: float = 0.02):
        self.period = period
        self.exclude: set[int] = set()

    def _sample(self) -> dict[int, float]:
        table = _proc_table()
        mine, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            frontier = [p for p, (pp, _) in table.items()
                        if pp in frontier and p not in mine and p not in self.exclude]
            mine.update(frontier)
        return {p: table[p][1] for p in mine if p in table}

    def start(self, exclude: set[int] = frozenset()):
        self.exclude = set(exclude)
        self.base = self._sample()
        self.last = dict(self.base)
        self.stop_event = threading.Event()

        def loop():
            while not self.stop_event.wait(self.period):
                self.last.update(self._sample())

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def stop(self) -> float:
        self.stop_event.set()
        self.thread.join()
        self.last.update(self._sample())
        return sum(v - self.base.get(p, 0.0) for p, v in self.last.items())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=150)
    ap.add_argument("--per-identity", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="the larger worker count (the smaller is 1)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--no-ray", action="store_true", help="local workers only")
    args = ap.parse_args()

    from rtkit.datasets.sample import make_sample_dataset
    from rtkit.engines.render2photo import BUNDLED_ONNX
    from rtkit.runtime.converter import convert

    work = Path(tempfile.mkdtemp(prefix="rtkit-scale-"))
    try:
        src = work / "render"
        make_sample_dataset(src, style="render", identities=args.identities, per_identity=args.per_identity,
                            seed=0)
        n = args.identities * args.per_identity
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"{n} images 112x112, engine {BUNDLED_ONNX.name}, {cores} CPU cores, batch {args.batch_size}, "
              f"{args.rounds} rounds, load average {os.getloadavg()[0]:.1f} at the start")
        counts = sorted({1, args.workers})
        variants = {f"local x{k}": dict(devices=["cpu"] * k) for k in counts}
        ray_start, cluster = None, set()
        if not args.no_ray:
            import ray

            t = time.perf_counter()
            ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
            ray_start = time.perf_counter() - t
            cluster = descendants()  # raylet, GCS, idle workers: Ray's, not the local variants'
            variants.update({f"ray x{k}": dict(executor="ray", ray_actors=k) for k in counts})

        runs: dict[str, list] = {k: [] for k in variants}
        digests = set()
        meter = TreeCPU()
        for kw in variants.values():  # warm-up: the fork server, page cache, Ray's worker pool
            shutil.rmtree(work / "out", ignore_errors=True)
            convert(BUNDLED_ONNX, src, work / "out", runner_threads=1, batch_size=args.batch_size,
                    shard=(0, 8), progress=False, **kw)
        for r in range(args.rounds):
            for name, kw in variants.items():
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                time.sleep(0.5)  # the last run's workers and actors exit outside the measurement
                meter.start(exclude=set() if kw.get("executor") == "ray" else cluster)
                s = convert(BUNDLED_ONNX, src, out, runner_threads=1, batch_size=args.batch_size,
                            progress=False, **kw)
                cpu = meter.stop()
                assert s.converted == n and s.failed == 0, s.table()
                digests.add(digest(out))
                runs[name].append((s.img_per_s, s.steady_img_per_s, s.startup_s, cpu / n * 1e3))
            print(f"round {r + 1}: " + "   ".join(f"{k} {v[-1][1]:6.1f} img/s {v[-1][3]:.2f} ms CPU/img"
                                                   for k, v in runs.items()))
        assert len(digests) == 1, "the variants wrote different bytes"
        print(f"load average {os.getloadavg()[0]:.1f} at the end")

        med = {k: tuple(statistics.median(x[i] for x in v) for i in range(4)) for k, v in runs.items()}
        print()
        print("| variant | img/s, whole run | img/s after start-up | start-up s | CPU ms/img, whole tree |")
        print("|---|---|---|---|---|")
        for k, (overall, steady, startup, cpu) in med.items():
            print(f"| {k} | {overall:.1f} | {steady:.1f} | {startup:.2f} | {cpu:.2f} |")
        hi = f"x{args.workers}"
        if args.workers > 1:
            two, one = med["local " + hi], med["local x1"]
            print(f"\nlocal {hi} / local x1: {two[0] / one[0]:.2f}x whole run, {two[1] / one[1]:.2f}x after "
                  f"start-up; CPU per image {two[3] / one[3]:.2f}x")
        if ray_start is not None:
            for k in counts:
                lo, ry = med[f"local x{k}"], med[f"ray x{k}"]
                print(f"ray x{k} vs local x{k}: CPU {ry[3] - lo[3]:+.2f} ms/img ({ry[3] / lo[3]:.2f}x, "
                      f"start-up included), start-up {ry[2] - lo[2]:+.2f} s per run, after start-up "
                      f"{ry[1] / lo[1]:.2f}x the rate, whole run {lo[0] / ry[0]:.2f}x the local wall time")
            if args.workers > 1:
                print(f"ray {hi} / ray x1: {med['ray ' + hi][1] / med['ray x1'][1]:.2f}x after start-up")
            print(f"local Ray cluster start (once per session, not per run): {ray_start:.1f} s")
        print("outputs identical across variants: yes")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
