"""Face-folder datasets for recognizer training, with AdaFace-style augmentation.

Layout: one or more roots in the DigiFace-1M layout, ``<root>/<identity>/<k>.png`` (any image
extension the runtime reads). Several roots are combined into one label space:

- by default each root's identities are distinct classes (an original dataset and a dataset
  of other people);
- with ``same_identities=True`` folders of the same name are the same class in every root
  (an original dataset and its translated copy: ``digiface/17`` and ``digiface_vsait/17``).

Images are decoded in DataLoader workers by the runtime's validating decoder (a truncated or
corrupt file is skipped, reported and replaced by the next image; train/images.py) and returned
as uint8 HWC RGB frames; the trainer maps a batch to the backbone's input on the device with
``rtkit.train.images.to_model_input`` (the spec's value range and channel order; cheaper than
sending floats between processes).

Augmentation follows the AdaFace training recipe, each step with its own probability (0.2
each in the paper), in this order, then a horizontal flip (p 0.5):

- crop: a random box (20-100 % of the area, aspect 3/4-4/3) is kept in place and the rest
  of the image is set to black, so the face keeps its alignment but loses context;
- low resolution: down-scale to 20-100 % of the side and back up, each resize with a random
  interpolation (nearest, linear, area, cubic, Lanczos);
- photometric: brightness, contrast and saturation factors in [0.5, 1.5], applied in a random
  order.

Randomness is a pure function of (dataset seed, epoch, sample index): ``EpochSampler`` yields
``(index, epoch)`` keys, so the images a run sees do not depend on the number of workers and
are the same again after resuming from a checkpoint.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from rtkit.datasets.identities import natural_key, scan_identities
from rtkit.engines.errors import RtkitError
from rtkit.train.images import DecodeError, SkipReport, read_image


# -- scanning ---------------------------------------------------------------------------------

def scan_face_folder(root: str | Path) -> list[tuple[str, list[str]]]:
    """``[(identity, [image paths])]`` of a ``<root>/<identity>/<image>`` tree in natural order
    (rtkit.datasets.identities, the walker evaluation and generation use too)."""
    root = Path(root)
    return [(ident.name, [os.path.join(root, rel) for rel in ident.relpaths])
            for ident in scan_identities(root).identities]


@dataclass
class FaceIndex:
    """Every training image with its class: paths (bytes, compact), labels and class names."""

    paths: np.ndarray          # (N,) bytes_ absolute-ish paths
    labels: np.ndarray         # (N,) int64
    class_names: list[str]     # label -> "name" (same identities) or "<root index>/<name>"
    roots: list[str]
    same_identities: bool

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.labels.size)


def index_face_folders(roots: Sequence[str | Path], same_identities: bool = False) -> FaceIndex:
    """Combine dataset roots into one labelled list (see the module docstring for the rules)."""
    if not roots:
        raise RtkitError("no dataset root given")
    scanned = [scan_face_folder(r) for r in roots]
    if same_identities:
        names = sorted({name for ids in scanned for name, _ in ids}, key=natural_key)
        label_of = {n: i for i, n in enumerate(names)}
        class_names = names
        keys = [[label_of[name] for name, _ in ids] for ids in scanned]
    else:
        class_names, keys = [], []
        for r, ids in enumerate(scanned):
            keys.append(list(range(len(class_names), len(class_names) + len(ids))))
            class_names.extend(f"{r}/{name}" for name, _ in ids)
    paths, labels = [], []
    for ids, lab in zip(scanned, keys):
        for (_, files), label in zip(ids, lab):
            paths.extend(files)
            labels.extend([label] * len(files))
    # One fixed-width bytes array instead of a list of str: workers forked from the main process
    # then share the pages instead of copying them on every refcount change.
    return FaceIndex(paths=np.array([os.fsencode(p) for p in paths]), labels=np.asarray(labels, np.int64),
                     class_names=class_names, roots=[str(r) for r in roots], same_identities=same_identities)


# -- augmentation -------------------------------------------------------------------------------

_INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_AREA, cv2.INTER_CUBIC, cv2.INTER_LANCZOS4)


@dataclass
class AugmentConfig:
    """AdaFace-style augmentation probabilities and ranges (paper: 0.2 each, flip 0.5)."""

    crop_p: float = 0.2
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    low_res_p: float = 0.2
    low_res_side: tuple[float, float] = (0.2, 1.0)
    photometric_p: float = 0.2
    brightness: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5
    flip_p: float = 0.5

    @classmethod
    def none(cls) -> "AugmentConfig":
        return cls(crop_p=0.0, low_res_p=0.0, photometric_p=0.0, flip_p=0.0)


def random_crop_box(h: int, w: int, rng: np.random.Generator, scale=(0.2, 1.0),
                    ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a box with random area fraction and log-uniform aspect;
    the whole image after ten misses (the RandomResizedCrop sampling rule)."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        bw = int(round(math.sqrt(target * aspect)))
        bh = int(round(math.sqrt(target / aspect)))
        if 0 < bw <= w and 0 < bh <= h:
            return int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw
    return 0, 0, h, w


def _grey(img: np.ndarray) -> np.ndarray:
    """Luma of an RGB image (ITU-R 601 weights)."""
    return 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]


def photometric(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Brightness, contrast and saturation jitter of an RGB image in a random order (uint8 in, uint8 out)."""
    x = img.astype(np.float32)
    factors = {
        "brightness": rng.uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness),
        "contrast": rng.uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast),
        "saturation": rng.uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation),
    }
    for op in rng.permutation(list(factors)):
        f = np.float32(factors[op])
        if op == "brightness":
            x = x * f
        elif op == "contrast":
            x = x * f + (1 - f) * np.float32(_grey(x).mean())
        else:
            x = x * f + (1 - f) * _grey(x)[..., None]
        np.clip(x, 0, 255, out=x)
    return (x + 0.5).astype(np.uint8)


def augment_face(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """One AdaFace-style augmentation of an HxWx3 uint8 RGB image (crop, low-res, photometric, flip)."""
    h, w = img.shape[:2]
    if cfg.crop_p > 0 and rng.random() < cfg.crop_p:
        top, left, bh, bw = random_crop_box(h, w, rng, cfg.crop_scale, cfg.crop_ratio)
        kept = np.zeros_like(img)
        kept[top:top + bh, left:left + bw] = img[top:top + bh, left:left + bw]
        img = kept
    if cfg.low_res_p > 0 and rng.random() < cfg.low_res_p:
        ratio = rng.uniform(*cfg.low_res_side)
        sh, sw = max(1, int(ratio * h)), max(1, int(ratio * w))
        down = _INTERPOLATIONS[rng.integers(len(_INTERPOLATIONS))]
        up = _INTERPOLATIONS[rng.integers(len(_INTERPOLATIONS))]
        img = cv2.resize(cv2.resize(img, (sw, sh), interpolation=down), (w, h), interpolation=up)
    if cfg.photometric_p > 0 and rng.random() < cfg.photometric_p:
        img = photometric(img, rng, cfg)
    if cfg.flip_p > 0 and rng.random() < cfg.flip_p:
        img = img[:, ::-1]
    return img


# -- dataset and sampler ------------------------------------------------------------------------

class FaceFolderDataset(Dataset):
    """Decoded, augmented training images: ``dataset[key] -> (uint8 HWC RGB tensor, label)``.

    ``key`` is an index, or ``(index, epoch)`` as ``EpochSampler`` yields it; the augmentation
    draws come from ``numpy.random.default_rng((seed, epoch, index))``. ``augment=None`` turns
    augmentation off. A file that does not decode is recorded in ``skipped`` and the next
    index (with its own label) takes its place, so it is never trained on.
    """

    def __init__(self, index: FaceIndex, *, input_size: tuple[int, int] = (112, 112),
                 augment: AugmentConfig | None = None, seed: int = 0, skipped: SkipReport | None = None):
        self.index = index
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.augment = augment
        self.seed = int(seed)
        self.skipped = skipped or SkipReport()

    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    def path(self, i: int) -> str:
        return os.fsdecode(self.index.paths[i])

    def load(self, i: int) -> tuple[np.ndarray, int]:
        """(HxWx3 uint8 RGB at ``input_size``, not augmented; its label): image ``i``, or the next
        decodable one when ``i`` is unreadable."""
        n = len(self)
        for attempt in range(n):
            j = (i + attempt) % n
            try:
                img = read_image(self.path(j))
            except DecodeError as e:
                self.skipped.record(self.path(j), str(e))
                continue
            h, w = self.input_size
            if img.shape[:2] != (h, w):
                shrink = img.shape[0] > h
                img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            return img, int(self.index.labels[j])
        raise RtkitError(f"no training image of {', '.join(self.index.roots)} decodes")

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        i = int(i)
        img, label = self.load(i)
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, int(epoch), i))
            img = augment_face(img, rng, self.augment)
        return torch.from_numpy(np.ascontiguousarray(img)), label


class EpochSampler(DistributedSampler):
    """DistributedSampler (shuffle per epoch, padded shards per rank) that yields
    ``(index, epoch)`` keys and can start part-way into an epoch for exact resume.

    Works without a process group: pass ``num_replicas=1, rank=0`` for one process.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.start = 0

    def set_start(self, n: int):
        """Skip the first ``n`` samples of this rank's share of the current epoch."""
        self.start = max(0, int(n))

    def __iter__(self):
        order = list(super().__iter__())
        for i in order[self.start:]:
            yield int(i), self.epoch

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def _worker_init(_worker_id: int):
    # Each worker decodes one image at a time: threads inside OpenCV/torch only oversubscribe.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def make_loader(dataset: Dataset, sampler: EpochSampler, batch_size: int, *, workers: int = 8,
                pin_memory: bool = False, prefetch_factor: int = 4) -> DataLoader:
    """Training DataLoader: full batches only, cv2 decode in ``workers`` processes.

    The loader gets its own torch Generator so creating an iterator does not consume the
    global RNG (that would shift dropout masks after a resume).
    """
    kwargs = {}
    if workers > 0:
        # forkserver: workers are forked from a clean process. Forking the trainer itself deadlocks
        # when OpenCV's thread pool was used before (a decode thread, an earlier conversion).
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor, worker_init_fn=_worker_init,
                      multiprocessing_context="forkserver")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(0), **kwargs)


__all__ = ["scan_face_folder", "FaceIndex", "index_face_folders", "AugmentConfig", "random_crop_box",
           "photometric", "augment_face", "FaceFolderDataset", "EpochSampler", "make_loader"]
