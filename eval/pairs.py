"""Verification pairs from an identity-folder tree, laid out as insightface's .bin pairs are.

``make_pairs(ROOT, OUT)`` writes the pairs file that ``build_bin`` (``rt-eval make-bin``) reads:
one line ``relpath1 relpath2 1|0`` per pair, relative to ROOT (``ROOT/<identity>/<image>``).
The layout is that of LFW's View 2, which the .bin benchmarks keep: ``folds`` consecutive
blocks of ``pairs_per_fold`` pairs, each block its genuine half first and its impostor half
second, so the contiguous folds of the 10-fold protocol are exactly these blocks (evaluate
with the same number of folds). As in LFW, every identity belongs to one fold only, so the
threshold applied to a fold was chosen on other people. Identities are dealt to folds in a
seeded random order; genuine pairs are spread over a fold's identities in turn, impostor pairs
join two of its identities; no pair appears twice. The same tree and seed give the same file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtkit.datasets.identities import scan_identities
from rtkit.engines.errors import RtkitError
from rtkit.eval.verification import N_FOLDS, BenchmarkError, check_n_folds

PAIRS_PER_FOLD = 600      # LFW: 300 genuine + 300 impostor pairs in each of 10 folds
_ENUMERATE_UP_TO = 200_000  # below this many candidate pairs draw from the full list


@dataclass
class PairsSummary:
    path: Path
    folds: int
    pairs_per_fold: int
    identities: int        # identity folders with images
    images: int

    @property
    def pairs(self) -> int:
        return self.folds * self.pairs_per_fold


def identity_images(root: str | Path) -> dict[str, list[str]]:
    """identity -> image paths relative to ``root`` (``root/<identity>/...``), in natural order
    (rtkit.datasets.identities)."""
    try:
        scan = scan_identities(root)
    except RtkitError as e:
        raise BenchmarkError(str(e)) from None
    return {ident.name: ident.relpaths for ident in scan.identities}


class _GenuineDraws:
    """Distinct unordered image pairs of one identity, in a seeded random order."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.rng, self.capacity = n, rng, n * (n - 1) // 2
        self.used: set[tuple[int, int]] = set()
        self.order = None
        if self.capacity <= _ENUMERATE_UP_TO:
            a, b = np.triu_indices(n, 1)
            perm = rng.permutation(self.capacity)
            self.order = iter(zip(a[perm].tolist(), b[perm].tolist()))

    def left(self) -> int:
        return self.capacity - len(self.used)

    def draw(self) -> tuple[int, int]:
        if self.order is not None:
            pair = next(self.order)
        else:  # far more pairs than will be drawn: rejection stays cheap
            while True:
                a, b = sorted(self.rng.choice(self.n, 2, replace=False).tolist())
                if (a, b) not in self.used:
                    pair = (a, b)
                    break
        self.used.add(pair)
        return pair


def _genuine_pairs(members: list[list[str]], count: int, rng) -> list[tuple[str, str]]:
    draws = [(imgs, _GenuineDraws(len(imgs), rng)) for imgs in members if len(imgs) >= 2]
    out: list[tuple[str, str]] = []
    while len(out) < count:
        live = [d for d in draws if d[1].left() > 0]
        for k in rng.permutation(len(live)):  # one pair per identity per round
            imgs, d = live[k]
            a, b = d.draw()
            out.append((imgs[a], imgs[b]))
            if len(out) == count:
                break
    return out


def _impostor_pairs(members: list[list[str]], count: int, rng) -> list[tuple[str, str]]:
    sizes = np.array([len(m) for m in members])
    total = int((sizes.sum() ** 2 - (sizes ** 2).sum()) // 2)
    if total <= _ENUMERATE_UP_TO:
        flat = [(i, img) for i, m in enumerate(members) for img in m]
        ident = np.array([i for i, _ in flat])
        a, b = np.triu_indices(len(flat), 1)
        keep = ident[a] != ident[b]
        a, b = a[keep], b[keep]
        pick = rng.permutation(a.size)[:count]
        return [(flat[x][1], flat[y][1]) for x, y in zip(a[pick].tolist(), b[pick].tolist())]
    out: list[tuple[str, str]] = []
    seen: set[frozenset] = set()
    while len(out) < count:
        i, j = rng.choice(len(members), 2, replace=False).tolist()
        pair = (members[i][int(rng.integers(sizes[i]))], members[j][int(rng.integers(sizes[j]))])
        key = frozenset(pair)
        if key not in seen:
            seen.add(key)
            out.append(pair)
    return out


def make_pairs(root: str | Path, out: str | Path, *, folds: int = N_FOLDS,
               pairs_per_fold: int = PAIRS_PER_FOLD, seed: int = 0) -> PairsSummary:
    """Write ``folds`` x ``pairs_per_fold`` pairs (half genuine, half impostor per fold) of
    the images under ``root`` to ``out``; see the module docstring for the layout."""
    check_n_folds(folds)
    if pairs_per_fold < 2 or pairs_per_fold % 2:
        raise BenchmarkError(f"pairs per fold must be an even number (half genuine, half "
                             f"impostor), got {pairs_per_fold}")
    by_identity = identity_images(root)
    spaced = next((p for imgs in by_identity.values() for p in imgs if " " in p), None)
    if spaced is not None:
        raise BenchmarkError(f"{root}/{spaced}: a pairs file cannot hold paths with spaces")
    names = list(by_identity)
    if len(names) < 2 * folds:
        raise BenchmarkError(f"{root} has {len(names)} identities; {folds} identity-disjoint "
                             f"folds need at least {2 * folds} (two per fold for impostor pairs)")
    rng = np.random.default_rng(seed)
    dealt = [names[k] for k in rng.permutation(len(names))]
    half = pairs_per_fold // 2
    lines = [f"# rt-eval make-pairs {Path(root).name}: {folds} folds x ({half} genuine + {half} "
             f"impostor) pairs, seed {seed}; identities disjoint across folds"]
    for f in range(folds):
        members = [by_identity[n] for n in dealt[f::folds]]
        genuine_cap = sum(math.comb(len(m), 2) for m in members)
        if genuine_cap < half:
            raise BenchmarkError(f"fold {f + 1} of {folds} can hold only {genuine_cap} genuine "
                                 f"pairs ({len(members)} identities, "
                                 f"{sum(len(m) >= 2 for m in members)} with 2+ images); lower "
                                 f"the pairs per fold or the number of folds")
        sizes = [len(m) for m in members]
        impostor_cap = (sum(sizes) ** 2 - sum(s * s for s in sizes)) // 2
        if impostor_cap < half:
            raise BenchmarkError(f"fold {f + 1} of {folds} can hold only {impostor_cap} impostor "
                                 f"pairs; lower the pairs per fold or the number of folds")
        lines += [f"{a} {b} 1" for a, b in _genuine_pairs(members, half, rng)]
        lines += [f"{a} {b} 0" for a, b in _impostor_pairs(members, half, rng)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    return PairsSummary(out, folds, pairs_per_fold, len(names),
                        sum(len(v) for v in by_identity.values()))


__all__ = ["PAIRS_PER_FOLD", "PairsSummary", "identity_images", "make_pairs"]
