"""Naive per-image loop vs rt-convert, same engine, same images, one run, side by side.

    python benchmarks/convert_cpu.py [--identities 300 --per-identity 8] [--rounds 5] [--engine PATH.onnx]

(a) naive: for each file, in one Python loop: read + decode (cv2.imread), preprocess, one ONNX
    Runtime call with a batch of 1 (default session options, so inference uses every core),
    postprocess, cv2.imwrite with OpenCV's default PNG settings (libpng level 1, RLE strategy:
    as small as level 3 on faces and twice as fast). Pre/postprocessing are rtkit's own
    functions, so every variant writes the same pixels.
(b) the same loop writing with rtkit's PNG writer (runtime/sinks.encode_png, its default level):
    what the loop gains from the writer alone, so (c)/(b) is what the runtime itself gives.
(c) rtkit.runtime.convert (what rt-convert runs) with its defaults: on CPU with an ONNX engine,
    one conversion process per core (runtime/processes.py); the time includes starting them.
(d) the bound for (c): rt-convert's per-image work (decode, preprocess, single-threaded ORT,
    postprocess, PNG writer, atomic write, sha256) as a serial loop, in one process (one core's
    rate) and in one process per core on interleaved parts of the files, batch 1, no manifest.
The script checks that all decoded outputs are identical and prints the mean file sizes.
Variants run alternately --rounds times and the median of each is reported, so a background
load hits all alike; keep the machine otherwise idle for figures you publish.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def naive(engine: Path, src: Path, out: Path, writer: str) -> float:
    import onnxruntime as ort

    from rtkit.engines.card import read_card
    from rtkit.runtime.image import postprocess, preprocess
    from rtkit.runtime.sinks import encode_png

    spec = read_card(engine).spec
    sess = ort.InferenceSession(str(engine), providers=["CPUExecutionProvider"])
    files = sorted(src.rglob("*.png"))
    t0 = time.perf_counter()
    for f in files:
        rgb = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        y = sess.run(None, {"input": preprocess(rgb, spec)[None]})[0][0]
        target = out / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        result = postprocess(y, spec, rgb.shape[:2])
        if writer == "libpng":
            cv2.imwrite(str(target), cv2.cvtColor(result, cv2.COLOR_RGB2BGR))  # OpenCV's defaults
        else:
            target.write_bytes(encode_png(result))
    return len(files) / (time.perf_counter() - t0)


def serial_rtkit(args: tuple) -> tuple[int, float]:
    """rt-convert's per-image work without its pipeline: (images, seconds)."""
    import hashlib

    import onnxruntime as ort

    from rtkit.engines.card import read_card
    from rtkit.runtime.image import postprocess, preprocess
    from rtkit.runtime.sinks import atomic_write, encode_png
    from rtkit.runtime.sources import decode_image

    engine, files, src, out = args
    spec = read_card(engine).spec
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(engine), so, providers=["CPUExecutionProvider"])
    t0 = time.perf_counter()
    for f in files:
        rgb = decode_image(os.path.join(src, f), spng=True)
        y = sess.run(None, {"input": preprocess(rgb, spec)[None]})[0][0]
        target = os.path.join(out, f)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        data = encode_png(postprocess(y, spec, rgb.shape[:2]))
        atomic_write(target, data)
        hashlib.sha256(data).hexdigest()
    return len(files), time.perf_counter() - t0


def bound(engine: Path, src: Path, out: Path, pool) -> tuple[float, float]:
    """(one core's img/s, all cores' img/s) for serial_rtkit."""
    from rtkit.runtime.sources import walk_files

    files = walk_files(src)[0]
    n, dt = serial_rtkit((engine, files, str(src), str(out / "one")))
    k = os.cpu_count() or 1
    parts = pool.map(serial_rtkit, [(engine, files[i::k], str(src), str(out / "all")) for i in range(k)])
    return n / dt, n / max(t for _, t in parts)


def _decoded(folder: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(folder).as_posix(): cv2.imread(str(p)) for p in sorted(folder.rglob("*.png"))}


def _mean_kb(folder: Path) -> float:
    return float(np.mean([p.stat().st_size for p in folder.rglob("*.png")])) / 1e3


def main():
    from rtkit.engines.render2photo import BUNDLED_ONNX
    from rtkit.runtime.converter import convert
    from rtkit.datasets.sample import make_sample_dataset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", type=Path, default=BUNDLED_ONNX)
    ap.add_argument("--identities", type=int, default=300,
                    help="x --per-identity images; 2400 keep start-up (processes, sessions) to a few percent")
    ap.add_argument("--per-identity", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=None, help="default: rt-convert's")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from rtkit.runtime.processes import process_context

    pool = process_context().Pool(os.cpu_count() or 1)  # the fork server rt-convert's processes use
    with pool, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        make_sample_dataset(src, style="render", identities=args.identities, per_identity=args.per_identity)
        n = len(list(src.rglob("*.png")))
        print(f"{n} images 112x112, engine {args.engine}, {os.cpu_count()} CPU cores")
        rates: dict[str, list[float]] = {"naive": [], "naive_fastpng": [], "rt-convert": [],
                                         "one core": [], "all cores": []}
        summaries = []
        for r in range(args.rounds):
            rates["naive"].append(naive(args.engine, src, tmp / f"naive{r}", "libpng"))
            rates["naive_fastpng"].append(naive(args.engine, src, tmp / f"fastpng{r}", "rtkit"))
            s = convert(args.engine, src, tmp / f"rtkit{r}", progress=False, batch_size=args.batch_size)
            summaries.append(s)
            rates["rt-convert"].append(s.img_per_s)
            one, every = bound(args.engine, src, tmp / f"bound{r}", pool)
            rates["one core"].append(one)
            rates["all cores"].append(every)
            print(f"round {r + 1}: " + "   ".join(f"{k} {v[-1]:7.1f} img/s" for k, v in rates.items()))
        ref = _decoded(tmp / "naive0")
        same = all(ref.keys() == d.keys() and all(np.array_equal(ref[k], d[k]) for k in ref)
                   for d in (_decoded(tmp / "fastpng0"), _decoded(tmp / "rtkit0")))
        med = {k: float(np.median(v)) for k, v in rates.items()}
        s = sorted(summaries, key=lambda x: x.img_per_s)[len(summaries) // 2]
        print(f"(a) naive loop, cv2.imwrite     : {med['naive']:8.1f} img/s  {1e3 / med['naive']:6.2f} ms/img  "
              f"{_mean_kb(tmp / 'naive0'):.2f} kB/PNG")
        print(f"(b) naive loop, rtkit PNG writer: {med['naive_fastpng']:8.1f} img/s  "
              f"{1e3 / med['naive_fastpng']:6.2f} ms/img  {_mean_kb(tmp / 'fastpng0'):.2f} kB/PNG")
        print(f"(c) rt-convert                  : {med['rt-convert']:8.1f} img/s  "
              f"{1e3 / med['rt-convert']:6.2f} ms/img  {_mean_kb(tmp / 'rtkit0'):.2f} kB/PNG  (stages, busy "
              f"thread-seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in s.stage_s.items()) + ")")
        print(f"(d) bound: rt-convert's work as a serial loop: {med['one core']:.1f} img/s on one core, "
              f"{med['all cores']:.1f} img/s with one process per core; (c) reaches "
              f"{100 * med['rt-convert'] / med['all cores']:.1f} % of it, and the bound is "
              f"{med['all cores'] / med['naive']:.2f}x (a)")
        print(f"ratio (c)/(a): {med['rt-convert'] / med['naive']:.2f}x   (c)/(b): "
              f"{med['rt-convert'] / med['naive_fastpng']:.2f}x   (medians of {args.rounds} rounds)   "
              f"decoded outputs identical: {same}")


if __name__ == "__main__":
    main()
