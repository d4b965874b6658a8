"""Unpaired image data for translator training: two image trees drawn independently.

The source and target folders are any image trees (png/jpg/jpeg/webp/bmp). Each domain is drawn
independently, epoch by epoch, in an order seeded by (seed, domain, epoch); image k of step s on
rank r is a function of (seed, s, r, k) only, as are its random crop and flip. Images smaller
than the crop are scaled up first; ``load_size`` resizes every image to a square first (the
CUT-family recipe: 286 then random 256 crops). A file that fails to decode is reported
(``SkipReport``) and the next image of the order is used.

Batches are uint8 NHWC RGB frames; the trainer maps them to the generator's input on the device.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from rtkit.engines.errors import RtkitError
from rtkit.train.images import DecodeError, SkipReport, read_image


def seed_int(*parts: int) -> int:
    """One 32-bit seed from several integers (a SeedSequence hash: nearby inputs do not collide)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class ImageDomain:
    """The sorted image files of one domain and a per-epoch seeded order over them."""

    def __init__(self, root: str | Path, name: str):
        from rtkit.runtime.sources import walk_files

        self.root = Path(root)
        if not self.root.is_dir():
            raise RtkitError(f"{name} folder not found: {self.root}")
        self.files, _ = walk_files(self.root)
        if not self.files:
            raise RtkitError(f"{name} folder {self.root} has no images (png/jpg/jpeg/webp/bmp)")
        self.name = name
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def index(self, seed: int, stream: int, k: int) -> int:
        """File index of draw ``k``: epoch k // n in the order seeded by (seed, stream, epoch)."""
        n = len(self.files)
        epoch, pos = divmod(int(k), n)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([seed, stream, epoch]).permutation(n))
        return int(self._order[1][pos])


def fit_image(img: np.ndarray, crop: int, load_size: int | None) -> np.ndarray:
    """Resize to ``load_size`` squared (if given), then scale up so the short side is >= ``crop``."""
    if load_size:
        img = cv2.resize(img, (load_size, load_size), interpolation=cv2.INTER_CUBIC)
    h, w = img.shape[:2]
    if min(h, w) < crop:
        s = crop / min(h, w)
        img = cv2.resize(img, (max(crop, round(w * s)), max(crop, round(h * s))), interpolation=cv2.INTER_CUBIC)
    return img


def _frames(imgs) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs))


class UnpairedCrops(torch.utils.data.Dataset):
    """``dataset[step]`` -> {"source": (B,c,c,3) uint8, "target": ...[, "source2": ...]} RGB frames.

    Draw k of a step is ((step * world + rank) * B + i); domains use independent orders
    (streams 0, 1, and 2 for UNSB's second source batch).
    """

    STREAMS = {"source": 0, "target": 1, "source2": 2}

    def __init__(self, source: ImageDomain, target: ImageDomain, *, batch_size: int, crop_size: int,
                 load_size: int | None = None, flip: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, second_source: bool = False, steps: int = 0,
                 skipped: SkipReport | None = None):
        self.domains = {"source": source, "target": target}
        if second_source:
            self.domains["source2"] = source
        self.batch_size, self.crop, self.load_size, self.flip = batch_size, crop_size, load_size, flip
        self.seed, self.rank, self.world_size, self.steps = seed, rank, world_size, steps
        self.skipped = skipped or SkipReport()

    def __len__(self) -> int:
        return self.steps

    def _load(self, domain: ImageDomain, stream: int, k: int) -> np.ndarray:
        for attempt in range(len(domain)):
            rel = domain.files[domain.index(self.seed, stream, k + attempt * 7919)]
            try:
                return read_image(domain.root / rel)
            except DecodeError as e:
                self.skipped.record(domain.root / rel, str(e))
        raise RtkitError(f"no decodable image in {domain.root}")

    def crop_one(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        img = fit_image(img, self.crop, self.load_size)
        h, w = img.shape[:2]
        y = int(rng.integers(0, h - self.crop + 1))
        x = int(rng.integers(0, w - self.crop + 1))
        img = img[y:y + self.crop, x:x + self.crop]
        if self.flip and rng.random() < 0.5:
            img = img[:, ::-1]
        return np.ascontiguousarray(img)

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, domain in self.domains.items():
            stream = self.STREAMS[name]
            imgs = []
            for i in range(self.batch_size):
                k = (int(step) * self.world_size + self.rank) * self.batch_size + i
                rng = np.random.default_rng([self.seed, 100 + stream, k])
                imgs.append(self.crop_one(self._load(domain, stream, k), rng))
            out[name] = _frames(imgs)
        return out


def decode_worker_init(_worker_id: int):
    cv2.setNumThreads(1)  # one image at a time per worker: inner threads only oversubscribe
    torch.set_num_threads(1)


def center_crops(domain: ImageDomain, count: int, crop: int, seed: int, stream: int = 7,
                 skipped: SkipReport | None = None) -> torch.Tensor:
    """``count`` fixed images of a domain (a seeded choice), centre-cropped to ``crop``: uint8 NHWC."""
    order = np.random.default_rng([seed, stream]).permutation(len(domain))
    imgs = []
    for i in order:
        if len(imgs) == count:
            break
        path = domain.root / domain.files[int(i)]
        try:
            img = fit_image(read_image(path), crop, None)
        except DecodeError as e:
            if skipped is not None:
                skipped.record(path, str(e))
            continue
        h, w = img.shape[:2]
        y, x = (h - crop) // 2, (w - crop) // 2
        imgs.append(np.ascontiguousarray(img[y:y + crop, x:x + crop]))
    if not imgs:
        raise RtkitError(f"no decodable image in {domain.root}")
    return _frames(imgs)


__all__ = ["ImageDomain", "UnpairedCrops", "center_crops", "fit_image", "seed_int", "decode_worker_init"]
