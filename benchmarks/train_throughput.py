"""Recognizer training throughput: data loading alone, compute alone, and both together.

    python benchmarks/train_throughput.py --data DigiFace1M --backbone adaface_ir50 --batch-size 256
    python benchmarks/train_throughput.py                      # sample faces, tiny model, CPU-sized

(a) data: the training DataLoader (validating decode + augmentation in --workers processes),
    each batch copied to the device and mapped to the backbone's input (its spec); no model.
(b) compute: one batch kept on the device, full training steps (forward, margin head, loss,
    backward, SGD) in the chosen precision; no data loading.
(c) both: the training loop as rt-train runs it (loader feeding train_step).
If (c) is close to (b), the GPU is the bottleneck; if close to (a), add --workers or faster
storage. Rates are global images per second after --warmup steps; CUDA is synchronised before
each clock reading.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def _rate(n_images: int, seconds: float) -> float:
    return n_images / seconds if seconds > 0 else float("nan")


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_data(trainer, steps: int, warmup: int) -> float:
    from rtkit.train.images import to_model_input

    dev = trainer.ctx.device
    it = iter(trainer.loader)
    for _ in range(warmup):
        to_model_input(next(it)[0], trainer.spec, dev)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        images, labels = next(it)
        to_model_input(images, trainer.spec, dev)
        labels.to(dev, non_blocking=True)
    _sync(dev)
    return _rate(steps * trainer.cfg.batch_size, time.perf_counter() - t0)


def bench_compute(trainer, steps: int, warmup: int) -> float:
    dev = trainer.ctx.device
    images, labels = next(iter(trainer.loader))
    images, labels = images.to(dev), labels.to(dev)
    for _ in range(warmup):
        trainer.train_step(images, labels)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(images, labels)
    _sync(dev)
    return _rate(steps * trainer.cfg.batch_size, time.perf_counter() - t0)


def bench_both(trainer, steps: int, warmup: int) -> float:
    dev = trainer.ctx.device
    it = iter(trainer.loader)
    for _ in range(warmup):
        trainer.train_step(*next(it))
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(*next(it))
    _sync(dev)
    return _rate(steps * trainer.cfg.batch_size, time.perf_counter() - t0)


def main():
    from rtkit.train.data import AugmentConfig
    from rtkit.train.recognizer import RecognizerConfig, RecognizerTrainer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", help="dataset root (repeatable); default: generated sample faces")
    ap.add_argument("--identities", type=int, default=100, help="sample identities when --data is not given")
    ap.add_argument("--per-identity", type=int, default=8)
    ap.add_argument("--backbone", default=None, help="default: adaface_ir50 on CUDA, adaface_tiny on CPU")
    ap.add_argument("--head", default="adaface")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 32 on CPU")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=15, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads of the main process")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    backbone = args.backbone or ("adaface_ir50" if cuda else "adaface_tiny")
    batch = args.batch_size or (256 if cuda else 32)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if not data:
            from rtkit.datasets.sample import make_sample_dataset
            root = Path(tmp) / "faces"
            print(f"generating {args.identities} x {args.per_identity} sample faces ...")
            make_sample_dataset(root, identities=args.identities, per_identity=args.per_identity,
                                size=args.image_size)
            data = [str(root)]
        cfg = RecognizerConfig(data=data, backbone=backbone, head=args.head, batch_size=batch,
                               image_size=args.image_size, workers=args.workers, device=args.device,
                               precision=args.precision, progress=False,
                               augment=AugmentConfig.none() if args.no_augment else AugmentConfig())
        trainer = RecognizerTrainer(cfg, Path(tmp) / "run", log=None)
        n_batches = trainer.steps_per_epoch
        need = args.steps + args.warmup
        if n_batches < need:
            raise SystemExit(f"only {n_batches} batches per epoch; need {need} (more data, smaller batch "
                             f"or fewer --steps)")
        results = {
            "data_img_per_s": bench_data(trainer, args.steps, args.warmup),
            "compute_img_per_s": bench_compute(trainer, args.steps, args.warmup),
            "both_img_per_s": bench_both(trainer, args.steps, args.warmup),
        }
        dev = trainer.ctx.device
        info = {"backbone": backbone, "head": args.head, "batch_size": batch, "image_size": args.image_size,
                "workers": args.workers, "device": str(dev),
                "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                "precision": str(trainer.dtype or "fp32"), "torch_threads": torch.get_num_threads(),
                "steps": args.steps, "augment": not args.no_augment}
    print(f"{backbone} + {args.head}, batch {batch}, {args.image_size}px, {args.workers} workers, "
          f"{info['device']} ({info['gpu'] or 'CPU'}), {info['precision']}")
    print(f"{'measurement':<28} {'img/s':>10}")
    for name, label in (("data_img_per_s", "(a) data loading alone"), ("compute_img_per_s", "(b) compute alone"),
                        ("both_img_per_s", "(c) training loop (both)")):
        print(f"{label:<28} {results[name]:>10.1f}")
    if args.json:
        args.json.write_text(json.dumps({**info, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
