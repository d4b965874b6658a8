"""Identity-folder datasets (the DigiFace-1M layout, ``<root>/<identity>/<image>``): the one walker
that training, evaluation (pairs) and generation share.

Identities and their images come in natural order (numeric names numerically: DigiFace ids and
image numbers), so class labels, drawn pairs and shards do not depend on how a file system lists
a folder. Built on the runtime's tree scan, so hidden entries, symlink loops and unreadable
folders are handled the same way everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rtkit.engines.errors import RtkitError
from rtkit.runtime.sources import scan_tree


def natural_key(name: str):
    """Numeric names in numeric order (DigiFace ids, image numbers), then the others by text."""
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


@dataclass
class Identity:
    name: str
    images: list[tuple[str, tuple[int, int, int]]]   # (relpath, (size, mtime_ns, ctime_ns)), sorted

    @property
    def relpaths(self) -> list[str]:
        return [rel for rel, _ in self.images]


@dataclass
class IdentityScan:
    identities: list[Identity]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)


def scan_identities(root: str | Path, exclude: Path | None = None, *, required: bool = True) -> IdentityScan:
    """The identity folders under ``root`` (images at any depth below one top-level folder) and
    the problems met (unreadable folders, images outside any identity folder). ``required``: no
    identity at all is a one-line error."""
    root = Path(root)
    if not root.is_dir():
        raise RtkitError(f"dataset folder not found: {root}")
    scan = scan_tree(root, exclude=exclude)
    groups: dict[str, list] = {}
    problems = list(scan.problems)
    for rel, st in scan.images:
        if "/" not in rel:
            problems.append((rel, "image outside any identity folder (layout: ROOT/<identity>/<image>); ignored"))
            continue
        groups.setdefault(rel.split("/", 1)[0], []).append((rel, st))
    identities = [Identity(name, sorted(imgs, key=lambda x: tuple(natural_key(p) for p in x[0].split("/"))))
                  for name, imgs in sorted(groups.items(), key=lambda kv: natural_key(kv[0]))]
    if required and not identities:
        raise RtkitError(f"no identity folders with images in {root} (expected {root}/<identity>/<image>)")
    return IdentityScan(identities, problems)
