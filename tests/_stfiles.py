"""Write small synthetic legacy-ST sections (counts TSV, spot file, image) for reader tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

PITCH_PX = 40.0  # 200 um pitch -> 5 um/px
ORIGIN = 30.0


def write_section(
    folder: Path,
    name: str = "S1",
    *,
    nx: int = 4,
    ny: int = 3,
    genes: tuple[str, ...] = ("G1", "G2", "G3", "G4", "G5"),
    size: tuple[int, int] = (220, 180),
    seed: int = 0,
    image_ext: str = ".png",
    gz: bool = True,
    extra_unselected: bool = True,
) -> dict:
    """Write ``{name}.tsv(.gz)``, ``{name}_selection.tsv`` and ``{name}{image_ext}`` into ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = np.meshgrid(np.arange(1, nx + 1), np.arange(1, ny + 1))
    xs, ys = xs.ravel(), ys.ravel()
    px = ORIGIN + (xs - 1) * PITCH_PX + rng.uniform(-1, 1, len(xs))
    py = ORIGIN + (ys - 1) * PITCH_PX + rng.uniform(-1, 1, len(xs))
    counts = rng.poisson(3.0, size=(len(xs), len(genes)))
    ids = [f"{x}x{y}" for x, y in zip(xs, ys, strict=True)]
    perm = rng.permutation(len(ids))  # file order differs from the (y, x) order the reader returns
    cdf = pd.DataFrame(counts[perm], index=np.array(ids)[perm], columns=list(genes))
    cpath = folder / (f"{name}.tsv.gz" if gz else f"{name}.tsv")
    cdf.to_csv(cpath, sep="\t")
    spots = pd.DataFrame(
        {
            "x": xs,
            "y": ys,
            "new_x": xs + (px - ORIGIN - (xs - 1) * PITCH_PX) / PITCH_PX,
            "new_y": ys + (py - ORIGIN - (ys - 1) * PITCH_PX) / PITCH_PX,
            "pixel_x": px,
            "pixel_y": py,
            "selected": 1,
        }
    )
    if extra_unselected:  # a spot outside the tissue, flagged unselected, with no counts row
        spots.loc[len(spots)] = [nx + 1, 1, nx + 1, 1, ORIGIN + nx * PITCH_PX, ORIGIN, 0]
    spath = folder / f"{name}_selection.tsv"
    spots.to_csv(spath, sep="\t", index=False)
    w, h = size
    img = np.full((h, w, 3), 235, np.uint8)  # bright background
    yy, xx = np.mgrid[0:h, 0:w]
    for cx, cy in zip(px, py, strict=True):  # dark "tissue" discs under the spots
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= 12**2] = (120, 60, 140)
    ipath = folder / f"{name}{image_ext}"
    Image.fromarray(img).save(ipath)
    return {"counts": cpath, "spots": spath, "image": ipath, "table": cdf, "img": img, "px": px, "py": py}
