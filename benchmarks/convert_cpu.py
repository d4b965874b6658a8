"""Naive per-image loop vs rt-convert, same engine, same images, one run, side by side.

    python benchmarks/convert_cpu.py [--identities 120 --per-identity 8] [--rounds 3] [--engine PATH.onnx]

(a) naive: for each file, in one Python loop: read + decode (OpenCV), preprocess, one
    ONNX Runtime call with a batch of 1 (default session options), postprocess, encode + write.
(b) rtkit.runtime.convert (what rt-convert runs) with its defaults.
Both write PNG at compression level 3 to fresh folders: the naive loop with OpenCV (libpng),
rt-convert with its own writer (runtime/sinks.encode_png); the script checks the decoded
outputs are identical and prints both mean file sizes. The two are run alternately --rounds times and the median of each is reported, so a
background load hits both alike; keep the machine otherwise idle for figures you publish.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def naive(engine: Path, src: Path, out: Path) -> float:
    import onnxruntime as ort

    from rtkit.export.metadata import read_metadata
    from rtkit.runtime.converter import postprocess, preprocess

    spec = read_metadata(engine).spec
    sess = ort.InferenceSession(str(engine), providers=["CPUExecutionProvider"])
    files = sorted(src.rglob("*.png"))
    t0 = time.perf_counter()
    for f in files:
        rgb = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        y = sess.run(None, {"input": preprocess(rgb, spec)[None]})[0][0]
        target = out / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), cv2.cvtColor(postprocess(y, spec, rgb.shape[:2]), cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_PNG_COMPRESSION, 3])
    return len(files) / (time.perf_counter() - t0)


def main():
    from rtkit.engines.render2photo import BUNDLED_ONNX
    from rtkit.runtime.converter import convert
    from rtkit.runtime.sample import make_sample_dataset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", type=Path, default=BUNDLED_ONNX)
    ap.add_argument("--identities", type=int, default=120)
    ap.add_argument("--per-identity", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=None, help="default: rt-convert's")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        make_sample_dataset(src, style="render", identities=args.identities, per_identity=args.per_identity)
        n = len(list(src.rglob("*.png")))
        print(f"{n} images 112x112, engine {args.engine}, {os.cpu_count()} CPU cores")
        naive_rates, runs = [], []
        for r in range(args.rounds):
            naive_rates.append(naive(args.engine, src, tmp / f"naive{r}"))
            runs.append(convert(args.engine, src, tmp / f"rtkit{r}", progress=False, batch_size=args.batch_size))
            print(f"round {r + 1}: naive {naive_rates[-1]:7.1f} img/s   rt-convert {runs[-1].img_per_s:7.1f} img/s")
        same = all(np.array_equal(cv2.imread(str(p)), cv2.imread(str(tmp / "naive0" / p.relative_to(tmp / "rtkit0"))))
                   for p in (tmp / "rtkit0").rglob("*.png"))
        naive_rate = float(np.median(naive_rates))
        s = sorted(runs, key=lambda x: x.img_per_s)[len(runs) // 2]
        print(f"naive loop : {naive_rate:8.1f} img/s  {1e3 / naive_rate:6.2f} ms/img  (median of {args.rounds})")
        print(f"rt-convert : {s.img_per_s:8.1f} img/s  {s.s_per_img * 1e3:6.2f} ms/img  "
              f"(stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in s.stage_s.items()) + ")")
        size = {k: np.mean([p.stat().st_size for p in (tmp / k).rglob("*.png")]) / 1e3 for k in ("naive0", "rtkit0")}
        print(f"ratio      : {s.img_per_s / naive_rate:.2f}x   decoded outputs identical: {same}   "
              f"mean PNG size: naive (libpng) {size['naive0']:.2f} kB, rt-convert {size['rtkit0']:.2f} kB")

if __name__ == "__main__":
    main()
