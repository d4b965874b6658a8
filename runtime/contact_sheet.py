"""Before/after contact sheets: source and converted images side by side in one PNG."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from rtkit.runtime.sources import DecodeError, decode_image


def contact_sheet(pairs: list[tuple[Path, Path]], path: str | Path, *, columns: int = 8,
                  tile: int = 112, labels: tuple[str, str] = ("before", "after")) -> Path:
    """Write a grid: each cell holds a source image (top) above its converted image (bottom)."""
    cells = []
    for a, b in pairs:
        try:
            ia, ib = decode_image(a), decode_image(b)
        except DecodeError:
            continue
        ia = cv2.resize(ia, (tile, tile), interpolation=cv2.INTER_AREA)
        ib = cv2.resize(ib, (tile, tile), interpolation=cv2.INTER_AREA)
        cells.append(np.concatenate([ia, ib], 0))
    if not cells:
        raise ValueError("no image pairs to put on a contact sheet")
    rows = -(-len(cells) // columns)
    pad, label_w = 4, 64
    h, w = 2 * tile, tile
    sheet = np.full((rows * (h + pad) + pad, label_w + columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, c in enumerate(cells):
        r, k = divmod(i, columns)
        y, x = pad + r * (h + pad), label_w + pad + k * (w + pad)
        sheet[y:y + h, x:x + w] = c
    for r in range(rows):
        for j, text in enumerate(labels):
            y = pad + r * (h + pad) + j * tile + tile // 2
            cv2.putText(sheet, text, (4, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return path


def sheet_from_manifest(src: str | Path, out: str | Path, manifest, path: str | Path,
                        count: int = 16) -> Path:
    """A sheet of the first ``count`` converted files, spread over identities."""
    rows = [r for r in manifest.rows("done")]
    if not rows:
        raise ValueError("nothing converted yet: no contact sheet")
    step = max(1, len(rows) // count)
    picked = rows[::step][:count]
    return contact_sheet([(Path(src) / r.relpath, Path(out) / r.output) for r in picked], path)
