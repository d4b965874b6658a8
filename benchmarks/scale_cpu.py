"""Scale-out on one machine's CPUs: the same job on 1 and 2 local workers, and the Ray executor's
overhead against the local one.

    python benchmarks/scale_cpu.py [--identities 150 --per-identity 8] [--rounds 3] [--workers 2]

The job: the sample set (rtkit.datasets.sample, render style) through the bundled ONNX engine
(rtkit.engines.render2photo.BUNDLED_ONNX), converted by rtkit.runtime.convert into a fresh output
folder each time, manifest included. Variants, run alternately --rounds times (medians reported,
so a background load hits all alike, and the best round, which a passing load disturbs least):

  local xN  --devices cpu,...,cpu: N worker processes (runtime/processes.py), one single-threaded
            engine each
  ray xN    --executor ray: N runner actors (runtime/ray_executor.py) on a local Ray cluster
            started once by this script (its start is reported on its own line)

Each line gives img/s over the whole run (start-up included), img/s after start-up (from the
first result on: the steady rate a large job sees), and the start-up (workers or actors start,
engine sessions open, plan). The script checks that every variant writes the same bytes.
Keep the machine otherwise idle for figures you publish: on two cores, other load takes the
second worker's core first.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.rglob("*.png")):
        h.update(p.relative_to(out).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


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
              f"{args.rounds} rounds")
        counts = sorted({1, args.workers})
        variants = {f"local x{k}": dict(devices=["cpu"] * k) for k in counts}
        ray_start = None
        if not args.no_ray:
            import ray

            t = time.perf_counter()
            ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
            ray_start = time.perf_counter() - t
            variants.update({f"ray x{k}": dict(executor="ray", ray_actors=k) for k in counts})

        runs: dict[str, list] = {k: [] for k in variants}
        digests = set()
        for r in range(args.rounds):
            for name, kw in variants.items():
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                s = convert(BUNDLED_ONNX, src, out, runner_threads=1, batch_size=args.batch_size,
                            progress=False, **kw)
                assert s.converted == n and s.failed == 0, s.table()
                digests.add(digest(out))
                runs[name].append((s.img_per_s, s.steady_img_per_s, s.startup_s))
            print(f"round {r + 1}: " + "   ".join(f"{k} {v[-1][1]:7.1f}" for k, v in runs.items())
                  + "  img/s after start-up")
        assert len(digests) == 1, "the variants wrote different bytes"

        med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in runs.items()}
        print()
        best = {k: max(x[1] for x in v) for k, v in runs.items()}
        print("| variant | img/s overall | img/s after start-up | ms/img after start-up | start-up s "
              "| best round, img/s after start-up |")
        print("|---|---|---|---|---|---|")
        for k, (overall, steady, startup) in med.items():
            print(f"| {k} | {overall:.1f} | {steady:.1f} | {1e3 / steady:.2f} | {startup:.2f} "
                  f"| {best[k]:.1f} |")
        hi = f"x{args.workers}"
        if args.workers > 1:
            two, one = med["local " + hi], med["local x1"]
            print(f"\nlocal {hi} / local x1: {two[0] / one[0]:.2f}x overall, "
                  f"{two[1] / one[1]:.2f}x after start-up (best rounds: "
                  f"{best['local ' + hi] / best['local x1']:.2f}x)")
        if ray_start is not None:
            for k in counts:
                lo, ry = med[f"local x{k}"], med[f"ray x{k}"]
                print(f"ray x{k} vs local x{k}: {1e3 / ry[1] - 1e3 / lo[1]:+.3f} ms/img after start-up "
                      f"({ry[1] / lo[1]:.2f}x the rate), start-up {ry[2] - lo[2]:+.2f} s per run, "
                      f"{lo[0] / ry[0]:.2f}x the local wall time on this job; best rounds "
                      f"{1e3 / best[f'ray x{k}'] - 1e3 / best[f'local x{k}']:+.3f} ms/img")
            if args.workers > 1:
                print(f"ray {hi} / ray x1: {med['ray ' + hi][1] / med['ray x1'][1]:.2f}x after start-up")
            print(f"local Ray cluster start (once per session, not per run): {ray_start:.1f} s")
        print("outputs identical across variants: yes")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
