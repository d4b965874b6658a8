"""Whole-dataset conversion at GPU speed, in one command, on a machine with torch (CUDA), OpenCV
and numpy only (the repository need not be installed):

    python benchmarks/gpu_convert.py                 # VSAIT at 112 (100k images), CodeFormer at 512
    python benchmarks/gpu_convert.py --tiny          # tiny models, a few hundred images, CPU (tests)

For each model it draws a sample set on local disk (ArcFace-aligned 112x112 PNG faces from the
procedural sample world; --unique renders, the rest are byte copies under other names, so the
set is ready in seconds and costs decode and encode the same), converts it end to end (PNG
files in -> PNG files out, random weights: speed does not depend on them), measures compute
only (the network on device-resident inputs, same batch and precision), and prints img/s, s/img,
the GPU busy fraction, end-to-end / compute-only and where the time goes.

The pipeline, all of it here (rt-convert's GPU executor may reuse the pieces):
  decode processes (read, validate, decode with OpenCV) -> shared-memory uint8 slots
    -> H2D on a copy stream (the slots are page-locked with cudaHostRegister)
    -> compute stream: uint8 NHWC -> model input on the GPU (runtime/gpu_image.py: warp or
       resize, range, fp16, channels_last) -> model -> back to uint8 NHWC at the source size
    -> D2H of uint8 only on a third stream into shared-memory output slots
    -> encode processes (PNG, atomic writes).
Slots are the bounded queues: a stage that falls behind stalls the ones before it, and the three
streams overlap batch i-1's D2H, batch i's compute and batch i+1's H2D (double buffering).
Stage times: decode and encode are busy seconds summed over their processes; H2D, compute and
D2H are CUDA-event times on their streams (on CPU, wall seconds of the same steps). GPU busy is
the compute stream's busy time over the wall time of the conversion.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engines", "export", "runtime", "datasets", "train", "eval", "cli")


def bootstrap_rtkit() -> None:
    """Make ``import rtkit.<pkg>`` work from the repository alone (no pip install): a folder
    holding an ``rtkit`` namespace of symlinks to the top-level packages, put on sys.path and on
    PYTHONPATH for the worker processes."""
    import importlib.util

    try:
        if importlib.util.find_spec("rtkit.runtime") is not None:  # installed, or bootstrapped
            return
    except ImportError:  # no rtkit at all
        pass
    shim = Path(tempfile.gettempdir()) / f"rtkit-shim-{os.getuid()}"
    ns = shim / "rtkit"
    ns.mkdir(parents=True, exist_ok=True)
    for pkg in PACKAGES:
        link = ns / pkg
        if not link.exists() and (REPO / pkg).is_dir():
            try:
                link.symlink_to(REPO / pkg, target_is_directory=True)
            except FileExistsError:  # another process made it first
                pass
    sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)


# -- the sample set ---------------------------------------------------------------------------

def _render_part(args) -> list[str]:
    root, part, identities, per_identity = args
    bootstrap_rtkit()
    from rtkit.datasets.sample import make_sample_dataset

    paths = make_sample_dataset(Path(root) / f"p{part}", identities=identities, per_identity=per_identity,
                                seed=part, workers=1)
    return [p.relative_to(root).as_posix() for p in paths]


def draw_sample_set(root: Path, images: int, unique: int, workers: int) -> tuple[list[str], float]:
    """``images`` PNG files under ``root`` (``unique`` rendered, the rest copies): (relpaths, s)."""
    t0 = time.perf_counter()
    unique = max(1, min(unique, images))
    per_identity = 8
    parts = max(1, min(workers, -(-unique // per_identity)))
    ids_per_part = max(1, -(-unique // (per_identity * parts)))
    with mp.get_context("spawn").Pool(parts) as pool:
        rendered = sorted(r for rs in pool.map(_render_part, [(str(root), p, ids_per_part, per_identity)
                                                               for p in range(parts)]) for r in rs)
    rels = rendered[:images]
    k = 0
    while len(rels) < images:  # copies under new names: same decode and encode cost, no rendering
        for rel in rendered:
            if len(rels) >= images:
                break
            new = f"copy{k}/{rel}"
            (root / new).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, root / new)
            rels.append(new)
        k += 1
    return sorted(rels), time.perf_counter() - t0


# -- worker processes ---------------------------------------------------------------------------

def _slots(name: str, count: int, batch: int, hw: tuple[int, int]):
    import numpy as np
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(name=name)
    return shm, np.ndarray((count, batch, hw[0], hw[1], 3), np.uint8, buffer=shm.buf)


def _decode_worker(shm_name, count, batch, hw, src, rels, tasks, free, ready, hello):
    bootstrap_rtkit()
    import cv2

    cv2.setNumThreads(1)
    from rtkit.runtime.sources import DecodeError, decode_image

    shm, slots = _slots(shm_name, count, batch, hw)
    hello.put("decoder")
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            b, start, stop = task
            slot = free.get()
            t0 = time.perf_counter()
            ok, failed = [], []
            for i in range(start, stop):
                try:
                    img = decode_image(os.path.join(src, rels[i]))
                    if img.shape[:2] != tuple(hw):
                        raise DecodeError(f"image is {img.shape[1]}x{img.shape[0]}, this run takes "
                                          f"{hw[1]}x{hw[0]}")
                    slots[slot, len(ok)] = img
                    ok.append(i)
                except DecodeError as e:
                    failed.append((rels[i], str(e)))
            ready.put((b, slot, ok, failed, time.perf_counter() - t0))
    finally:
        del slots
        shm.close()


def _encode_worker(shm_name, count, batch, hw, out, rels, jobs, free, results, hello):
    bootstrap_rtkit()
    import cv2

    cv2.setNumThreads(1)
    from rtkit.runtime.sinks import atomic_write, encode_image

    shm, slots = _slots(shm_name, count, batch, hw)
    hello.put("encoder")
    made: set[str] = set()
    try:
        while True:
            job = jobs.get()
            if job is None:
                break
            slot, indices = job
            t0 = time.perf_counter()
            for j, i in enumerate(indices):
                target = os.path.join(out, rels[i])
                folder = os.path.dirname(target)
                if folder not in made:
                    os.makedirs(folder, exist_ok=True)
                    made.add(folder)
                atomic_write(target, encode_image(slots[slot, j], "png"))
            free.put(slot)
            results.put((len(indices), time.perf_counter() - t0))
    finally:
        del slots
        shm.close()


# -- the device side ----------------------------------------------------------------------------

class Device:
    """Streams and timing on CUDA; the same calls on CPU run in order and time with the clock."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.h2d = torch.cuda.Stream(self.device)
            self.compute = torch.cuda.Stream(self.device)
            self.d2h = torch.cuda.Stream(self.device)

    def event(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record(self.torch.cuda.current_stream(self.device))
            return e
        return time.perf_counter()

    @staticmethod
    def elapsed(a, b) -> float:
        return a.elapsed_time(b) / 1e3 if hasattr(a, "elapsed_time") else b - a

    def done(self, e) -> bool:
        return e.query() if self.cuda else True

    def wait(self, e) -> None:
        if self.cuda:
            e.synchronize()

    def synchronize(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def stream(self, which: str):
        import contextlib

        return self.torch.cuda.stream(getattr(self, which)) if self.cuda else contextlib.nullcontext()


def pin_host(array, dev: Device) -> bool:
    """Page-lock a shared-memory block so H2D / D2H copies from it are asynchronous DMA."""
    if not dev.cuda:
        return False
    import ctypes

    import numpy as np

    ptr = array.ctypes.data_as(ctypes.c_void_p).value
    try:
        err = dev.torch.cuda.cudart().cudaHostRegister(ptr, int(np.prod(array.shape)) * array.itemsize, 0)
    except (AttributeError, RuntimeError):  # no cudart bindings in this torch: copies stay synchronous
        return False
    return int(getattr(err, "value", err)) == 0


def unpin_host(array, dev: Device) -> None:
    import ctypes

    dev.torch.cuda.cudart().cudaHostUnregister(array.ctypes.data_as(ctypes.c_void_p).value)


def build_model(name: str, dev: Device, precision: str, channels_last: bool):
    bootstrap_rtkit()
    from rtkit.engines import registry

    model = registry.create(name, pretrained=False)  # random weights: timing only
    spec = model.spec
    dtype = {"fp32": dev.torch.float32, "fp16": dev.torch.float16, "bf16": dev.torch.bfloat16}[precision]
    model = model.to(dev.device, dtype).eval()
    if channels_last:
        model = model.to(memory_format=dev.torch.channels_last)
    return model, spec, dtype


def compute_only(model, spec, dev: Device, dtype, batch: int, hw, seconds: float,
                 channels_last: bool) -> dict:
    """The network alone on device-resident inputs, and the whole GPU stage (pre + net + post)."""
    torch = dev.torch
    from rtkit.runtime.gpu_image import model_input_size, postprocess_batch, preprocess_batch

    frames = torch.randint(0, 256, (batch, hw[0], hw[1], 3), dtype=torch.uint8, device=dev.device)
    x = preprocess_batch(frames, spec, dtype=dtype, channels_last=channels_last)
    in_hw = tuple(model_input_size(spec, *hw))
    out = {"model_input": f"{in_hw[1]}x{in_hw[0]}"}
    with torch.inference_mode():
        for key, step in (("model", lambda: model(x)),
                          ("gpu_stage", lambda: postprocess_batch(
                              model(preprocess_batch(frames, spec, dtype=dtype, channels_last=channels_last)),
                              spec, hw))):
            for _ in range(3 if dev.cuda else 1):  # cudnn autotuning, allocator warm-up
                step()
            dev.synchronize()
            n, t0 = 0, time.perf_counter()
            while True:
                step()
                n += batch
                dev.synchronize()
                dt = time.perf_counter() - t0
                if dt >= seconds:
                    break
            out[key + "_img_s"] = n / dt
    return out


def convert_end_to_end(model, spec, dev: Device, dtype, rels: list[str], src: Path, out: Path, *,
                       batch: int, decoders: int, encoders: int, channels_last: bool, hw=(112, 112)) -> dict:
    torch = dev.torch
    import numpy as np
    from multiprocessing import shared_memory

    from rtkit.runtime.gpu_image import postprocess_batch, preprocess_batch

    ctx = mp.get_context("spawn")  # CUDA is initialised here: workers must not be forked from it
    n_in, n_out = 2 * decoders + 2, 2 * encoders + 2
    slot_bytes = batch * hw[0] * hw[1] * 3
    shm_in = shared_memory.SharedMemory(create=True, size=n_in * slot_bytes)
    shm_out = shared_memory.SharedMemory(create=True, size=n_out * slot_bytes)
    in_slots = np.ndarray((n_in, batch, hw[0], hw[1], 3), np.uint8, buffer=shm_in.buf)
    out_slots = np.ndarray((n_out, batch, hw[0], hw[1], 3), np.uint8, buffer=shm_out.buf)
    pinned = pin_host(in_slots, dev) and pin_host(out_slots, dev)
    tasks, free_in, ready, hello = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    jobs, free_out, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    for s in range(n_in):
        free_in.put(s)
    procs = [ctx.Process(target=_decode_worker, daemon=True,
                         args=(shm_in.name, n_in, batch, hw, str(src), rels, tasks, free_in, ready, hello))
             for _ in range(decoders)]
    procs += [ctx.Process(target=_encode_worker, daemon=True,
                          args=(shm_out.name, n_out, batch, hw, str(out), rels, jobs, free_out, results,
                                hello))
              for _ in range(encoders)]
    t_spawn = time.perf_counter()
    for p in procs:
        p.start()
    for _ in procs:  # process start-up is a fixed cost, reported apart from the per-image rate
        hello.get(timeout=120)
    t_start = time.perf_counter()
    nb = -(-len(rels) // batch)
    for b in range(nb):
        tasks.put((b, b * batch, min(len(rels), (b + 1) * batch)))
    for _ in range(decoders):
        tasks.put(None)
    free_outs = list(range(n_out))
    pending = []  # [in_slot or None once released, out_slot, indices, events], in issue order
    times = {"h2d": 0.0, "compute": 0.0, "d2h": 0.0}
    stats = {"failed": [], "decode_s": 0.0, "encode_s": 0.0, "written": 0}
    first_ready = None

    def retire(block: bool) -> None:
        """Hand finished work on: an input slot back to the decoders once its H2D is done, an
        output slot to the encoders once its D2H is done (the oldest first; ``block`` waits for it)."""
        for entry in pending:
            if entry[0] is not None and dev.done(entry[3][1]):
                free_in.put(entry[0])
                entry[0] = None
        while pending and (block or dev.done(pending[0][3][-1])):
            in_slot, out_slot, idx, ev = pending.pop(0)
            dev.wait(ev[-1])
            if in_slot is not None:
                free_in.put(in_slot)
            jobs.put((out_slot, idx))
            times["h2d"] += dev.elapsed(ev[0], ev[1])
            times["compute"] += dev.elapsed(ev[2], ev[3])
            times["d2h"] += dev.elapsed(ev[4], ev[5])
            block = False

    def take_out_slot() -> int:
        while True:
            try:
                while True:
                    free_outs.append(free_out.get_nowait())
            except queue.Empty:
                pass
            if free_outs:
                return free_outs.pop(0)
            if pending:
                retire(block=True)  # our own finished batches may be what frees a slot
            else:
                free_outs.append(free_out.get(timeout=120))

    try:
        with torch.inference_mode():
            for _ in range(nb):
                while True:
                    try:
                        b, slot, ok, failed, busy = ready.get(timeout=0.005)
                        break
                    except queue.Empty:
                        retire(block=False)
                        if not any(p.is_alive() for p in procs[:decoders]) and ready.empty():
                            raise RuntimeError("decode workers exited early") from None
                first_ready = first_ready or time.perf_counter()
                stats["decode_s"] += busy
                stats["failed"] += failed
                if not ok:
                    free_in.put(slot)
                    continue
                n = len(ok)
                host_in = torch.from_numpy(in_slots[slot, :n])
                with dev.stream("h2d"):
                    e0 = dev.event()
                    x_u8 = host_in.to(dev.device, non_blocking=pinned)
                    e1 = dev.event()
                with dev.stream("compute"):
                    if dev.cuda:
                        dev.compute.wait_stream(dev.h2d)
                        x_u8.record_stream(dev.compute)
                    c0 = dev.event()
                    if dev.cuda and n < batch:  # pad the last batch: no new shape to autotune
                        x_u8 = torch.cat([x_u8, x_u8.new_zeros((batch - n, *x_u8.shape[1:]))])
                    x = preprocess_batch(x_u8, spec, dtype=dtype, channels_last=channels_last)
                    y = model(x)
                    y_u8 = postprocess_batch(y, spec, hw)[:n]
                    c1 = dev.event()
                out_slot = take_out_slot()
                with dev.stream("d2h"):
                    if dev.cuda:
                        dev.d2h.wait_stream(dev.compute)
                        y_u8.record_stream(dev.d2h)
                    d0 = dev.event()
                    torch.from_numpy(out_slots[out_slot, :n]).copy_(y_u8, non_blocking=pinned)
                    d1 = dev.event()
                pending.append([slot, out_slot, ok, (e0, e1, c0, c1, d0, d1)])
                retire(block=False)
            while pending:
                retire(block=True)
            dev.synchronize()
        for _ in range(encoders):
            jobs.put(None)
        while stats["written"] < len(rels) - len(stats["failed"]):
            count, busy = results.get(timeout=300)
            stats["written"] += count
            stats["encode_s"] += busy
        wall = time.perf_counter() - t_start
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        if pinned:
            unpin_host(in_slots, dev)
            unpin_host(out_slots, dev)
        del in_slots, out_slots
        for shm in (shm_in, shm_out):
            shm.close()
            shm.unlink()
    return {"images": stats["written"], "failed": len(stats["failed"]), "wall_s": wall,
            "spawn_s": t_start - t_spawn, "first_batch_s": (first_ready or t_start) - t_start,
            "pinned": pinned,
            "decode_busy_s": stats["decode_s"], "encode_busy_s": stats["encode_s"], **{
                f"{k}_s": v for k, v in times.items()}}


# -- one model, and the report -------------------------------------------------------------------

def run_model(name: str, args, dev: Device, work: Path) -> dict:
    model, spec, dtype = build_model(name, dev, args.precision, args.channels_last)
    images = args.images if name.startswith("vsait") else args.codeformer_images
    batch = args.batch if name.startswith("vsait") else args.codeformer_batch
    src, out = work / f"{name}-src", work / f"{name}-out"
    rels, draw_s = draw_sample_set(src, images, args.unique, args.workers)
    comp = compute_only(model, spec, dev, dtype, batch, (112, 112), args.seconds, args.channels_last)
    e2e = convert_end_to_end(model, spec, dev, dtype, rels, src, out, batch=batch, decoders=args.decoders,
                             encoders=args.encoders, channels_last=args.channels_last)
    written = sum(1 for _ in out.rglob("*.png"))
    if written != e2e["images"] or e2e["failed"]:
        raise RuntimeError(f"{name}: {written} files written, {e2e['images']} reported, "
                           f"{e2e['failed']} failed")
    rate = e2e["images"] / e2e["wall_s"]
    return {"model": name, "precision": args.precision, "batch": batch, "draw_s": draw_s, **comp, **e2e,
            "e2e_img_s": rate, "e2e_s_per_img": 1 / rate, "e2e_over_compute": rate / comp["model_img_s"],
            "gpu_busy": e2e["compute_s"] / e2e["wall_s"]}


def report(r: dict, dev: Device) -> str:
    n, wall = r["images"], r["wall_s"]

    def per(v):
        return f"{v:8.2f} s  {v / n * 1e6:8.1f} us/img"

    where = "GPU stream time" if dev.cuda else "wall time of the step"
    return "\n".join([
        f"== {r['model']} ({r['precision']}, batch {r['batch']}, model input {r['model_input']}, "
        f"random weights)",
        f"  end to end   {n} images in {wall:.2f} s: {r['e2e_img_s']:,.0f} img/s, "
        f"{r['e2e_s_per_img']:.3g} s/img "
        f"(first batch decoded after {r['first_batch_s']:.2f} s; not counted: worker start-up "
        f"{r['spawn_s']:.1f} s, drawing the set {r['draw_s']:.1f} s)",
        f"  compute only {r['model_img_s']:,.0f} img/s (network), {r['gpu_stage_img_s']:,.0f} img/s "
        f"(pre + network + post on the device)",
        f"  end to end / compute only  {r['e2e_over_compute']:.0%}     "
        f"{'GPU' if dev.cuda else 'device (CPU)'} busy  {r['gpu_busy']:.0%}",
        f"  decode       {per(r['decode_busy_s'])}  (busy, summed over {r['decoders']} processes)",
        f"  H2D          {per(r['h2d_s'])}  ({where}; page-locked slots: {r['pinned']})",
        f"  compute      {per(r['compute_s'])}  ({where})",
        f"  D2H          {per(r['d2h_s'])}  ({where})",
        f"  encode       {per(r['encode_busy_s'])}  (busy, summed over {r['encoders']} processes)",
    ])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models, a few hundred images, CPU")
    ap.add_argument("--device", help="default: cuda when available, else cpu (always cpu with --tiny)")
    ap.add_argument("--images", type=int, help="VSAIT images (default 100000; 64 with --tiny)")
    ap.add_argument("--codeformer-images", type=int, help="CodeFormer images (default 4096; 32 with --tiny)")
    ap.add_argument("--unique", type=int, default=20000, help="rendered faces; the rest are copies")
    ap.add_argument("--batch", type=int, help="VSAIT batch (default 256; 16 with --tiny)")
    ap.add_argument("--codeformer-batch", type=int, help="CodeFormer batch (default 32; 8 with --tiny)")
    ap.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="default fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--decoders", type=int, help="decode processes (default: about half the cores)")
    ap.add_argument("--encoders", type=int, help="encode processes (default: about half the cores)")
    ap.add_argument("--seconds", type=float,
                    help="timed seconds per compute-only figure (default 5; 0.2 with --tiny)")
    ap.add_argument("--models", default=None, help="comma-separated (default vsait,codeformer)")
    ap.add_argument("--work", type=Path, help="local folder for the sets and outputs (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    bootstrap_rtkit()
    import torch

    if args.tiny:
        args.device = args.device or "cpu"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny
    args.images = args.images or (64 if tiny else 100_000)
    args.codeformer_images = args.codeformer_images or (32 if tiny else 4096)
    args.batch = args.batch or (16 if tiny else 256)
    args.codeformer_batch = args.codeformer_batch or (8 if tiny else 32)
    args.precision = args.precision or ("fp16" if args.device.startswith("cuda") else "fp32")
    args.seconds = args.seconds or (0.2 if tiny else 5.0)
    cores = len(os.sched_getaffinity(0))
    args.workers = cores
    args.decoders = args.decoders or max(1, (cores - 2) // 2)
    args.encoders = args.encoders or max(1, cores - 2 - args.decoders)
    models = (args.models.split(",") if args.models else
              (["vsait_tiny", "codeformer_tiny"] if tiny else ["vsait", "codeformer"]))
    dev = Device(args.device)
    if dev.cuda:
        torch.backends.cudnn.benchmark = True
        gpu = (f"{torch.cuda.get_device_name(dev.device)}, torch {torch.__version__}, "
               f"CUDA {torch.version.cuda}")
    else:
        gpu = f"no GPU: CPU only ({cores} cores), torch {torch.__version__}"
    print(f"gpu_convert on {gpu}; {cores} CPU cores, {args.decoders} decoders, {args.encoders} encoders",
          flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_convert-"))
    results = []
    try:
        for name in models:
            r = run_model(name, args, dev, work)
            r.update(decoders=args.decoders, encoders=args.encoders, device=gpu)
            results.append(r)
            print(report(r, dev), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
