"""Pseudo-spots on an H&E-only slide: a Visium-like (hex) or square grid over the tissue, plus an empty table.

Tissue detector (documented, deterministic): on the pyramid level (or strided view) whose longer side is at
most ``2048`` px, compute the HSV saturation ``(max - min) / max`` of every pixel; tissue is stained, so it is
more saturated than the white/grey background. Pixels above the Otsu threshold of the saturation histogram
(scikit-image's ``threshold_otsu``, 256 bins; at least 0.1, so that a blank slide has no tissue) and not
near-black (slide edges, pen) are tissue; the mask is then closed with a 7 x 7 square (scikit-image's
``closing``), holes are filled and components smaller than 1% of the largest one are removed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from dkan import _keys as K
from dkan._features.levels import check_rgb, image_levels, rgb

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")

_DETECT_MAX_SIDE = 2048
_MIN_SATURATION = 0.1  #: floor of the threshold, so a blank slide (grey noise) has no tissue
_CLOSING = 7  #: side of the square closing footprint (px of the low-res view)


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of a small ``(c, y, x)`` uint8 RGB image (see the module docstring).

    Otsu's threshold and the closing come from scikit-image (:func:`skimage.filters.threshold_otsu`,
    :func:`skimage.morphology.closing`), hole filling and the component sizes from :mod:`scipy.ndimage`.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.morphology import closing

    img = rgb.astype(np.float32)
    mx, mn = img.max(axis=0), img.min(axis=0)
    sat = (mx - mn) / np.maximum(mx, 1.0)
    threshold = threshold_otsu(sat) if sat.min() < sat.max() else _MIN_SATURATION  # constant image: no tissue
    mask = (sat > max(float(threshold), _MIN_SATURATION)) & (mx > 30)
    mask = closing(mask, np.ones((_CLOSING, _CLOSING), bool))
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= 0.01 * sizes[1:].max()
        keep[0] = False
        mask = keep[labels]
    return mask


def _low_res(image: object) -> tuple[np.ndarray, float, float]:
    """Return a small RGB view of the image for tissue detection and its (x, y) scale-0 px per low-res px."""
    levels = image_levels(image)
    w0, h0 = levels[0].sizes["x"], levels[0].sizes["y"]
    small = [lv for lv in levels if max(lv.sizes["x"], lv.sizes["y"]) <= _DETECT_MAX_SIDE]
    level = small[0] if small else levels[-1]
    step = max(1, int(np.ceil(max(level.sizes["x"], level.sizes["y"]) / _DETECT_MAX_SIDE)))
    arr = np.asarray(rgb(level).data[:, ::step, ::step])
    return arr, w0 / arr.shape[2], h0 / arr.shape[1]


def grid_layout(width: float, height: float, pitch: float, grid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spot centres ``(x, y)`` and array coordinates of a grid covering ``width x height`` px.

    ``hex``: rows ``pitch * sqrt(3) / 2`` apart, odd rows shifted by half a pitch; ``array_col`` follows the
    Visium convention (``2 * i + row % 2``) so that :func:`dkan.tl.tile` recognises the hexagonal grid.
    ``square``: rows and columns ``pitch`` apart.
    """
    if grid not in ("hex", "square"):
        raise ValueError(f"`grid` must be 'hex' or 'square'; got {grid!r}.")
    dy = pitch * np.sqrt(3) / 2 if grid == "hex" else pitch
    rows = np.arange(int(np.floor((height - pitch / 2) / dy)) + 1)
    cols = np.arange(int(np.floor((width - pitch) / pitch)) + 1)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    shift = (rr % 2) * pitch / 2 if grid == "hex" else 0.0
    x = pitch / 2 + cc * pitch + shift
    y = pitch / 2 + rr * dy
    inside = x < width
    array_col = 2 * cc + rr % 2 if grid == "hex" else cc
    return np.c_[x, y][inside], rr[inside], array_col[inside]


def make_spots(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    spacing_um: float = 100.0,
    diameter_um: float = 55.0,
    grid: str = "hex",
    um_per_px: float | None = None,
    tissue_only: bool = True,
    key_added: str | None = None,
    table_key: str | None = None,
    overwrite: bool = False,
) -> tuple[str, str]:
    """Lay pseudo-spots over the tissue of an image and add them with an empty table.

    Parameters
    ----------
    sdata
        SpatialData holding the H&E image.
    image_key
        Image to cover; inferred when there is one.
    spacing_um
        Centre-to-centre distance of neighbouring spots (µm).
    diameter_um
        Spot diameter (µm); the shapes' radius is half of it.
    grid
        ``"hex"`` (Visium-like) or ``"square"`` (legacy ST-like).
    um_per_px
        µm per scale-0 pixel of the image. Default: the pixel size recorded on the image (by
        :func:`dkan.io.read_wsi`, see :func:`dkan.io.image_um_per_px`); an error when there is none.
    tissue_only
        Keep only spots whose centre lies on tissue (see the module docstring for the detector).
    key_added
        Name of the new shapes element. Default ``f"{image_key}_dkan_spots"``.
    table_key
        Name of the new table. Default ``f"{key_added}_table"``: one table per slide, so several slides of one
        SpatialData each get their own.
    overwrite
        Replace existing elements of those names.

    Returns
    -------
    ``(shapes_key, table_key)`` of the added elements. The shapes carry the image's transformations (so they share
    its coordinate systems); the table (n_spots x 0) has ``obs`` columns ``sample`` (the image key without
    ``_image``), ``region``, ``spot_id``, ``array_row``, ``array_col``, ``obsm["spatial"]`` (scale-0 px) and
    ``uns["dkan"]["reader"][sample]`` with ``um_per_px``, so :func:`dkan.tl.tile` works on it. It is its own
    results table (``uns["dkan"]["results_of"]`` names it): tiles, features and predictions are written to it, and
    :func:`dkan.tl.predict` gives it ``var`` = the model's panel.
    """
    from spatialdata.transformations import get_transformation

    from dkan._utils import choose_key
    from dkan.io._wsi import image_um_per_px

    image_key = choose_key("images", "image_key", image_key, list(sdata.images.keys()))
    if um_per_px is None:
        um_per_px = image_um_per_px(sdata.images[image_key])
    if um_per_px is None or not um_per_px > 0:
        raise ValueError(
            f"`um_per_px` is needed to lay {spacing_um} µm spots on image `{image_key}`; got {um_per_px} and the "
            "image records no pixel size. Read whole-slide files with `dkan.io.read_wsi` (which records it), or "
            "pass the slide's resolution: `um_per_px=` here, `dkan predict --um-per-px` on the command line "
            "(0.25-0.5 µm/px at 40x-20x)."
        )
    if not spacing_um > 0 or not diameter_um > 0:
        raise ValueError(f"`spacing_um` and `diameter_um` must be positive; got {spacing_um}, {diameter_um}.")
    shapes_key = key_added or f"{image_key}{K.PSEUDO_SPOTS_SUFFIX}"
    table_key = table_key or f"{shapes_key}_table"
    _check_free(sdata, shapes_key, table_key, overwrite)
    image = sdata.images[image_key]
    levels = image_levels(image)
    check_rgb(levels[0], image_key)
    w0, h0 = levels[0].sizes["x"], levels[0].sizes["y"]
    xy, array_row, array_col = grid_layout(w0, h0, spacing_um / um_per_px, grid)
    if tissue_only:
        small, sx, sy = _low_res(image)
        mask = tissue_mask(small)
        ix = np.clip((xy[:, 0] / sx).astype(int), 0, mask.shape[1] - 1)
        iy = np.clip((xy[:, 1] / sy).astype(int), 0, mask.shape[0] - 1)
        keep = mask[iy, ix]
        xy, array_row, array_col = xy[keep], array_row[keep], array_col[keep]
    if len(xy) == 0:
        raise ValueError(
            f"No pseudo-spot fell on tissue in image `{image_key}`; check `um_per_px`/`spacing_um`, "
            "or pass `tissue_only=False`."
        )
    sample = image_key[: -len(K.IMAGE_SUFFIX)] if image_key.endswith(K.IMAGE_SUFFIX) else image_key
    transformations = get_transformation(image, get_all=True)
    shapes, table = _elements(xy, array_row, array_col, diameter_um / um_per_px / 2, transformations, shapes_key)
    table.obs[K.SAMPLE] = sample
    table.uns[K.UNS] = {
        K.UNS_RESULTS_OF: table_key,  # no counts: dkan's results go to this table itself (dkan._results)
        K.UNS_READER: {
            sample: {"um_per_px": float(um_per_px), "spot_pitch_px": float(spacing_um / um_per_px), "layout": grid}
        },
    }
    for key, store in ((shapes_key, sdata.shapes), (table_key, sdata.tables)):
        if key in store:
            del sdata[key]
    sdata.shapes[shapes_key] = shapes
    sdata.tables[table_key] = table
    logger.info("Added %d pseudo-spots `%s` and table `%s` on image `%s`.", len(xy), shapes_key, table_key, image_key)
    return shapes_key, table_key


def _check_free(sdata: SpatialData, shapes_key: str, table_key: str, overwrite: bool) -> None:
    taken = [k for k in (shapes_key, table_key) if k in sdata]
    if taken and not overwrite:
        raise KeyError(f"Elements {taken} already exist; pass `overwrite=True` or another `key_added=`/`table_key=`.")


def _elements(
    xy: np.ndarray,
    array_row: np.ndarray,
    array_col: np.ndarray,
    radius_px: float,
    transformations: dict,
    shapes_key: str,
) -> tuple:
    """Build the circles shapes element and the empty table annotating it."""
    import anndata as ad
    import pandas as pd
    from scipy import sparse
    from spatialdata.models import ShapesModel, TableModel

    n = len(xy)
    shapes = ShapesModel.parse(
        xy.astype(float), geometry=0, radius=np.full(n, radius_px), index=np.arange(n), transformations=transformations
    )
    obs = pd.DataFrame(
        {
            K.REGION: pd.Categorical([shapes_key] * n),
            K.INSTANCE: np.arange(n),
            K.ARRAY_ROW: np.asarray(array_row, dtype=np.int64),
            K.ARRAY_COL: np.asarray(array_col, dtype=np.int64),
        },
        index=[f"{shapes_key}_{i}" for i in range(n)],
    )
    adata = ad.AnnData(X=sparse.csr_matrix((n, 0), dtype=np.float32), obs=obs, obsm={K.SPATIAL: xy.astype(float)})
    table = TableModel.parse(adata, region=shapes_key, region_key=K.REGION, instance_key=K.INSTANCE)
    return shapes, table
