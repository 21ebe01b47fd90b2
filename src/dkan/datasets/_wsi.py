"""A synthetic whole-slide file: a pyramidal, tiled, JPEG-compressed TIFF with tissue-like blobs.

Written tile by tile (never the whole image in memory), so it scales to scanner-sized slides for benchmarks,
and read by :func:`dkan.io.read_wsi` the way a scanner's TIFF is.
"""

from __future__ import annotations

from collections.abc import Iterator
from os import PathLike
from pathlib import Path

import numpy as np

_BACKGROUND = np.array([238, 236, 240], np.float32)
_STAIN = (np.array([222, 150, 190], np.float32), np.array([120, 70, 150], np.float32))  # eosin, haematoxylin


def synthetic_wsi(
    path: str | PathLike[str],
    *,
    width: int = 4096,
    height: int = 3072,
    um_per_px: float = 0.5,
    n_blobs: int = 6,
    tile: int = 256,
    n_levels: int | None = None,
    quality: int = 85,
    seed: int = 0,
) -> Path:
    """Write a synthetic H&E-like whole-slide image as a pyramidal tiled JPEG TIFF.

    Tissue is a union of ``n_blobs`` ellipses covering roughly half of the slide, filled with a pink/purple
    texture (nuclei-like dark dots on eosin); the rest is near-white glass. Every pyramid level (downsampling
    by 2) is rendered from the same analytic tissue, tile by tile; the resolution tags give ``um_per_px``.

    Parameters
    ----------
    path
        Output file (``.tif``); an existing file is an error.
    width, height
        Size of the full-resolution level in pixels.
    um_per_px
        Pixel size written to the resolution tags (µm/px at full resolution).
    n_blobs
        Number of tissue ellipses.
    tile
        TIFF tile side (multiple of 16).
    n_levels
        Pyramid levels; default: halve until the longer side is at most 1024 px.
    quality
        JPEG quality.
    seed
        Seed of the layout and texture.

    Returns
    -------
    The path written.
    """
    import tifffile

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"`path={path}` exists; remove it or choose another path.")
    if n_levels is None:
        n_levels = 1 + max(0, int(np.ceil(np.log2(max(width, height) / 1024))))
    rng = np.random.default_rng(seed)
    blobs = _blobs(rng, width, height, n_blobs)
    res = 1e4 / um_per_px  # pixels per centimetre
    opts = {
        "tile": (tile, tile),
        "compression": "jpeg",
        "compressionargs": {"level": quality},
        "photometric": "rgb",
        "dtype": np.uint8,
    }
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tw:
        for k in range(n_levels):
            f = 2**k
            w, h = -(-width // f), -(-height // f)
            tw.write(
                _tiles(blobs, w, h, f, tile, seed),
                shape=(h, w, 3),
                subifds=n_levels - 1 if k == 0 else None,
                subfiletype=0 if k == 0 else 1,
                resolution=(res / f, res / f),
                resolutionunit="CENTIMETER",
                **opts,
            )
    return path


def _blobs(rng: np.random.Generator, width: int, height: int, n: int) -> np.ndarray:
    """Ellipses ``(cx, cy, a, b, angle)`` in full-resolution pixels, together covering about half the slide."""
    side = np.sqrt(0.5 * width * height / max(n, 1) / np.pi)
    cx = rng.uniform(0.2, 0.8, n) * width
    cy = rng.uniform(0.2, 0.8, n) * height
    a = side * rng.uniform(0.9, 1.5, n)
    b = side * rng.uniform(0.7, 1.1, n)
    return np.c_[cx, cy, a, b, rng.uniform(0, np.pi, n)]


def _tissue(blobs: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    inside = np.zeros(np.broadcast(x, y).shape, bool)
    for cx, cy, a, b, t in blobs:
        dx, dy = x - cx, y - cy
        u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
        inside |= (u / a) ** 2 + (v / b) ** 2 <= 1
    return inside


def _tiles(blobs: np.ndarray, w: int, h: int, f: int, tile: int, seed: int) -> Iterator[np.ndarray]:
    """Tiles of one level (row-major), rendered at full-resolution coordinates ``f`` px apart."""
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            rng = np.random.default_rng([seed, f, ty, tx])
            ys = (ty + np.arange(tile))[:, None] * f
            xs = (tx + np.arange(tile))[None, :] * f
            tissue = _tissue(blobs, xs.astype(np.float64), ys.astype(np.float64))
            nuclei = (np.sin(xs / 23.0) * np.sin(ys / 19.0) + rng.normal(0, 0.35, (tile, tile))) > 0.8
            stain = np.where(nuclei[..., None], _STAIN[1], _STAIN[0])
            img = np.where(tissue[..., None], stain, _BACKGROUND) + rng.normal(0, 6, (tile, tile, 3))
            yield np.clip(img, 0, 255).astype(np.uint8)
