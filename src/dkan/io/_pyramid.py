"""Lazy image pyramids for single image files (the H&E of a legacy ST section: JPEG, PNG or TIFF).

- A tiled TIFF is read through tiffslide like a whole-slide file: every level decodes only the tiles a crop
  touches (levels the file lacks are downsampled lazily from its largest one).
- A JPEG, PNG or untiled TIFF cannot be read a window at a time. Its full-resolution level is decoded on the
  first crop taken from it, and each lower level on its own, without the full-resolution pixels: JPEG files
  are decoded directly at reduced size (libjpeg's DCT scaling, PIL's ``draft`` mode) and box-filtered to the
  level's size. A pipeline that crops at 2 µm/px from a 0.5 µm/px JPEG therefore never holds the
  full-resolution image.
"""

from __future__ import annotations

import threading
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np


def image_pyramid(
    path: str | PathLike[str],
    level0: Any,
    *,
    scale_factors: list[int] | None,
    chunks: tuple[int, int, int],
    transformations: dict[str, Any],
) -> Any:
    """A lazy spatialdata image (multiscale when ``scale_factors``) of an image file.

    Parameters
    ----------
    path
        The image file.
    level0
        Lazy full-resolution ``(3, y, x)`` uint8 dask array of the file (used unless the file is a tiled TIFF).
    scale_factors
        Downsampling factor of each level relative to the previous one, or ``None`` for one level.
    chunks
        Dask chunks ``(c, y, x)``.
    transformations
        Transformations of the scale-0 pixels.

    Returns
    -------
    A ``DataArray`` (one level) or ``DataTree`` (pyramid) that passes spatialdata's ``Image2DModel``.
    """
    from spatialdata.models import Image2DModel

    from dkan.io._wsi import _level_dask, pyramid_tree

    path = Path(path)
    tiled = _tiled_tiff_levels(path)
    if tiled is not None:
        levels = [_level_dask(path, k, shape, tile, chunks[1]) for k, (shape, tile) in enumerate(tiled)]
        if len(levels) > 1:
            return pyramid_tree(levels, transformations)
        level0 = levels[0]
    if not scale_factors or tiled is not None:
        return Image2DModel.parse(
            level0,
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            scale_factors=list(scale_factors) if scale_factors else None,
            transformations=transformations,
            chunks=chunks,
        )
    import dask.array as da

    levels, (h, w), factor = [level0], level0.shape[1:], 1
    for f in scale_factors:
        factor *= int(f)
        h, w = h // int(f), w // int(f)
        src = _ReducedLevel(path, factor, (h, w))
        levels.append(da.from_array(src, chunks=chunks, asarray=False, meta=np.empty((0, 0, 0), np.uint8)))
    return pyramid_tree(levels, transformations)


def _tiled_tiff_levels(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]] | None:
    """``[(shape, tile), ...]`` per level of a tiled RGB TIFF, or None for any other file."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages.first
            if not page.is_tiled or page.samplesperpixel not in (3, 4) or page.dtype != np.uint8:
                return None
            return [
                (tuple(int(v) for v in lv.shape[:2]), (int(lv.keyframe.tilelength), int(lv.keyframe.tilewidth)))
                for lv in tf.series[0].levels
            ]
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, AttributeError):
        return None


class _ReducedLevel:
    """One lower pyramid level of an image file, decoded at reduced size on first access, as ``(3, h, w)``."""

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, path: Path, factor: int, size: tuple[int, int]) -> None:
        self.path, self.factor, self.shape = Path(path), int(factor), (3, *size)
        self._data: np.ndarray | None = None
        self._lock = threading.Lock()

    def _load(self) -> np.ndarray:
        from PIL import Image

        from dkan.io._image import no_pixel_limit

        with self._lock:
            if self._data is None:
                h, w = self.shape[1:]
                with no_pixel_limit(), Image.open(self.path) as im:
                    if im.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 size directly (never larger than needed)
                        im.draft("RGB", (max(w, 1), max(h, 1)))
                    rgb = im if im.mode == "RGB" else im.convert("RGB")
                    small = rgb.resize((w, h), Image.Resampling.BOX)
                self._data = np.ascontiguousarray(np.moveaxis(np.asarray(small), -1, 0))
        return self._data

    def __getitem__(self, key: Any) -> np.ndarray:
        return self._load()[key]

    def __getstate__(self) -> dict:
        return {"path": self.path, "factor": self.factor, "shape": self.shape}

    def __setstate__(self, state: dict) -> None:
        self.path, self.factor, self.shape = state["path"], state["factor"], state["shape"]
        self._data, self._lock = None, threading.Lock()

    def __dask_tokenize__(self) -> tuple:
        return ("dkan-reduced-level", str(self.path.resolve()), self.path.stat().st_mtime_ns, self.factor, self.shape)
