"""Make a results table draw with scanpy's and squidpy's spatial plots: ``uns["spatial"]`` per sample.

scanpy (``sc.pl.spatial``) and squidpy (``sq.pl.spatial_scatter``) read, per library id, a small H&E image and
its scale factors from ``uns["spatial"][library_id]`` (the layout of 10x Visium's ``spatial/`` folder), the spot
centres in full-resolution pixels from ``obsm["spatial"]`` and the library of each row from ``obs["library_id"]``.
dkan writes these on the results table when it predicts, reading the small images from the coarsest pyramid level
that is still large enough, so the full-resolution image is never loaded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K

if TYPE_CHECKING:
    from collections.abc import Mapping

    from spatialdata import SpatialData

logger = logging.getLogger("dkan")

#: Longest side, in pixels, of the images stored per sample: ``hires`` (drawn by default) and ``lowres``.
MAX_SIDE = {"hires": 1000, "lowres": 400}


def add_spatial_uns(
    sdata: SpatialData, table_key: str, results_key: str, *, image_key: str | Mapping[str, str] | None = None
) -> None:
    """Write ``uns["spatial"]``, ``obsm["spatial"]`` and ``obs["library_id"]`` on results table ``results_key``.

    Parameters
    ----------
    sdata
        The SpatialData holding the count table ``table_key`` and its results table ``results_key``.
    table_key
        The count table whose samples (spots + image) the results table annotates.
    results_key
        The results table to write to.
    image_key
        The image per sample, as for :func:`dkan.tl.predict` (``None``: the highest-resolution one).
    """
    from dkan._utils import find_image, iter_samples

    res = sdata.tables[results_key]
    xy = np.full((res.n_obs, 2), np.nan)
    library = np.empty(res.n_obs, dtype=object)
    spatial: dict[str, Any] = {}
    for smp in iter_samples(sdata, table_key=table_key, image_key=image_key, need_image=False):
        try:
            smp = replace(smp, image_key=find_image(sdata, smp.spots_key, smp.image_key))
        except (KeyError, ValueError):  # features computed earlier, image gone: spots only, no backdrop
            smp = replace(smp, image_key=None)
        sxy, r = _spot_geometry(sdata, smp)
        xy[smp.obs_idx] = sxy
        library[smp.obs_idx] = smp.name
        if smp.image_key is not None:
            images, full_wh = small_images(sdata.images[smp.image_key])
            meta = {"image": smp.image_key}
        else:  # a white canvas over the spots, so the plots still find their scale and spot size
            images, full_wh = _blank_images(sxy, r), _extent(sxy, r)
            meta = {"image": ""}
        scalefactors = {f"tissue_{k}_scalef": img.shape[1] / full_wh[0] for k, img in images.items()}
        scalefactors["spot_diameter_fullres"] = float(2 * np.median(r))
        spatial[smp.name] = {"images": images, "scalefactors": scalefactors, "metadata": meta}
    res.obsm[K.SPATIAL] = xy
    res.obs[K.LIBRARY_ID] = library.astype(str)
    res.obs[K.LIBRARY_ID] = res.obs[K.LIBRARY_ID].astype("category")
    res.uns[K.UNS_SPATIAL] = spatial
    logger.debug("Wrote uns['spatial'] for %d samples on `%s`.", len(spatial), results_key)


def _spot_geometry(sdata: SpatialData, smp: Any) -> tuple[np.ndarray, np.ndarray]:
    """Spot centres and radii in the image's full-resolution pixels, or in the spots' own units without an image."""
    from dkan._utils import _align_to_table, spot_pixels

    if smp.image_key is not None:
        return spot_pixels(sdata, smp)
    shapes = sdata.shapes[smp.spots_key]
    c = shapes.geometry.centroid
    r = shapes["radius"].to_numpy(float) if "radius" in shapes else np.sqrt(shapes.geometry.area.to_numpy() / np.pi)
    return _align_to_table(sdata, smp, shapes.index, np.c_[c.x.to_numpy(), c.y.to_numpy()], r)


def _extent(xy: np.ndarray, r: np.ndarray) -> tuple[int, int]:
    """``(width, height)`` of a canvas from the origin that holds every spot."""
    top = np.nanmax(xy + r[:, None], axis=0) if len(xy) else np.ones(2)
    return math.ceil(max(float(top[0]), 1.0)), math.ceil(max(float(top[1]), 1.0))


def _blank_images(xy: np.ndarray, r: np.ndarray) -> dict[str, np.ndarray]:
    w, h = _extent(xy, r)
    out = {}
    for name, cap in MAX_SIDE.items():
        f = min(1.0, cap / max(w, h))
        out[name] = np.full((max(1, round(h * f)), max(1, round(w * f)), 3), 255, np.uint8)
    return out


def small_images(image: Any) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """Downsampled RGB copies (uint8, height x width x 3) of an image, and its full-resolution ``(width, height)``.

    Each copy is made from the coarsest pyramid level whose longest side still reaches the copy's
    :data:`MAX_SIDE` (block means over the remaining factor), so at most that level is read.
    """
    levels = _levels(image)
    full_h, full_w = levels[0].shape[-2:]
    out = {}
    for name, cap in MAX_SIDE.items():
        big = [lv for lv in levels if max(lv.shape[-2:]) >= cap]
        level = big[-1] if big else levels[0]
        factor = max(1, math.ceil(max(level.shape[-2:]) / cap))
        out[name] = _rgb_uint8(_block_mean(level.data, factor), level.dtype)
    return out, (int(full_w), int(full_h))


def _levels(image: Any) -> list[Any]:
    """The (c, y, x) DataArrays of an image element, finest first."""
    if hasattr(image, "children") and len(image.children):  # multiscale DataTree
        levels = [next(iter(image[k].data_vars.values())) for k in image.children]
        return sorted(levels, key=lambda a: -a.shape[-1])
    return [image]


def _block_mean(arr: Any, factor: int) -> np.ndarray:
    import dask.array as da

    arr = da.asarray(arr)
    if factor > 1:
        arr = da.coarsen(np.mean, arr.astype(np.float32), {1: factor, 2: factor}, trim_excess=True)
    return np.asarray(arr.compute())


def _rgb_uint8(chw: np.ndarray, dtype: Any) -> np.ndarray:
    """(c, y, x) of any dtype -> (y, x, 3) uint8 (grey repeated, alpha and extra channels dropped)."""
    x = np.moveaxis(chw, 0, -1).astype(np.float32)
    if x.shape[-1] < 3:
        x = np.repeat(x[..., :1], 3, axis=-1)
    x = x[..., :3]
    top = float(np.nanmax(x)) if x.size else 0.0
    if top > 255:  # e.g. uint16: stretch to 8 bits
        x = x * (255.0 / top)
    elif np.issubdtype(dtype, np.floating) and 0 < top <= 1.0:  # float in [0, 1]
        x = x * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
