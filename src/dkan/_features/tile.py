"""Tile geometry: spot-centred patches, ``G x G`` regions and slide-grid positions for every spot.

Geometry (one sample, pixels of the chosen pyramid level ``k``, origin at the top-left pixel corner):

- ``c = (x, y)`` is the spot centre, ``obsm[SPOT_PX]``. Windows are anchored at ``floor(c)`` as in the
  reference (``img[y - 112 : y + 112, x - 112 : x + 112]`` for ``y = int(pixel_y)``).
- The **patch** window has side ``s_p = round(patch_size * resample)`` and origin ``floor(c) - s_p // 2``;
  it is resized to ``patch_size`` when ``resample != 1``.
- The **region** window has side ``s_r = round(region_grid * patch_size * resample)`` and origin
  ``floor(c) - s_r // 2``; it is cut row-major into ``region_grid ** 2`` tiles of ``patch_size``.
- **Mask**: a tile is valid iff it lies fully inside the image, except that the spot's own row and column of
  tiles always count as inside along their axis (the spot centre is on the image). This is exactly the
  reference's ``make_masking_table``: for 5 x 5 tiles of 224 px, the outer rows/columns are masked when
  ``c -/+ 560`` crosses the edge, the inner ones when ``c -/+ 336`` does, the centre row/column never; so the
  centre tile is always valid. Crops are zero-padded at the image edge, never shifted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K
from dkan._features.levels import check_rgb, choose_level, image_levels, sample_um_per_px
from dkan._utils import Sample, check_int, get_table, grid_coords, iter_samples, spot_pixels, uns_get, uns_set

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")


def window_sides(patch_size: int, region_grid: int, resample: float) -> tuple[int, int]:
    """Sides of the patch and region windows read at the chosen level."""
    return round(patch_size * resample), round(region_grid * patch_size * resample)


def window_origins(spot_px: np.ndarray, side: int) -> np.ndarray:
    """Top-left corners ``(x0, y0)`` (int64) of square windows of ``side`` px centred on ``floor(spot_px)``."""
    return np.floor(spot_px).astype(np.int64) - side // 2


def region_mask(spot_px: np.ndarray, shape_yx: tuple[int, int], region_side: int, region_grid: int) -> np.ndarray:
    """``(n, G*G)`` bool mask, row-major: tiles whose row and column bands lie inside the image (module docstring)."""
    g = region_grid
    origin = window_origins(spot_px, region_side).astype(float)
    step = region_side / g
    j = np.arange(g)
    ok = []
    for axis, size in ((0, shape_yx[1]), (1, shape_yx[0])):  # x then y
        start = origin[:, axis, None] + j * step
        inside = (start >= -1e-9) & (start + step <= size + 1e-9)
        if g % 2 == 1:
            inside[:, g // 2] = True  # the spot's own row / column of tiles always counts as inside
        ok.append(inside)
    mask = ok[1][:, :, None] & ok[0][:, None, :]  # (n, row=y, col=x)
    return mask.reshape(len(spot_px), g * g)


def grid_positions(obs: Any, spot_px: np.ndarray, *, table_key: str | None = None) -> tuple[np.ndarray, str]:
    """Integer ``(row, col)`` grid positions (min 0) of one sample's spots and the grid kind.

    ``square`` (legacy ST): ``(array_row, array_col)``; ``hex`` (Visium: every ``array_row + array_col`` is even):
    ``(array_row, array_col // 2)``; ``irregular`` (no array coordinates): pixel centres quantised by the median
    nearest-neighbour spacing, the step shrunk by sqrt(2) until positions are unique.
    """
    if K.ARRAY_ROW in obs and K.ARRAY_COL in obs:
        row, col = grid_coords(obs, table_key=table_key).T
        hexagonal = len(row) > 1 and np.all((row + col) % 2 == 0) and len(np.unique(row % 2)) == 2
        grid = np.c_[row, col // 2 if hexagonal else col]
        kind = "hex" if hexagonal else "square"
    else:
        grid, kind = _quantise(spot_px), "irregular"
    grid = grid - grid.min(axis=0, keepdims=True)
    if len(np.unique(grid, axis=0)) < len(grid):
        logger.warning("Spot grid positions (%s) are not unique; the slide encoder will see duplicates.", kind)
    return grid.astype(np.int64), kind


def _quantise(xy: np.ndarray) -> np.ndarray:
    """Quantise pixel centres to integer ``(row, col)`` by the median nearest-neighbour spacing."""
    if len(xy) == 1:
        return np.zeros((1, 2), dtype=np.int64)
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(xy).query(xy, k=2)
    step = float(np.median(dist[:, 1]))
    if step <= 0:
        step = 1.0
    grid = np.zeros((len(xy), 2), dtype=np.int64)
    for _ in range(6):
        grid = np.rint((xy[:, ::-1] - xy[:, ::-1].min(axis=0)) / step).astype(np.int64)
        if len(np.unique(grid, axis=0)) == len(grid):
            break
        step /= np.sqrt(2)
    return grid


def _sample_geometry(
    sdata: SpatialData, sample: Sample, *, patch_size: int, region_grid: int, target_mpp: float | None
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    """Geometry record and per-spot ``(spot_px, mask, grid)`` of one sample."""
    levels = image_levels(sdata.images[sample.image_key])
    check_rgb(levels[0], sample.image_key)
    xy0, r0 = spot_pixels(sdata, sample)
    if len(xy0) == 0:
        raise ValueError(f"Sample `{sample.name}` has no spots; dkan needs at least one spot per sample.")
    h0, w0 = levels[0].sizes["y"], levels[0].sizes["x"]
    outside = ~((xy0[:, 0] >= 0) & (xy0[:, 0] < w0) & (xy0[:, 1] >= 0) & (xy0[:, 1] < h0))
    if outside.any():
        raise ValueError(
            f"{int(outside.sum())} of {len(xy0)} spots of `{sample.spots_key}` have centres outside image "
            f"`{sample.image_key}` ({w0} x {h0} px), e.g. (x, y) = {xy0[outside][0].round(1).tolist()}. "
            "Check the coordinate transformations, or drop those spots."
        )
    mpp0 = sample_um_per_px(sdata, sample, r0, required=target_mpp is not None)
    k, resample = choose_level(levels, mpp0, target_mpp)
    level = levels[k]
    h, w = level.sizes["y"], level.sizes["x"]
    check_rgb(level, sample.image_key)
    ds = (w0 / w, h0 / h)
    xy = xy0 / np.asarray(ds)
    side_p, side_r = window_sides(patch_size, region_grid, resample)
    if side_p > min(h, w):
        raise ValueError(
            f"`patch_size={patch_size}` ({side_p} px at level {k}) is larger than image `{sample.image_key}` "
            f"({w} x {h} px). Use a smaller `patch_size` or a larger `target_mpp`."
        )
    mask = region_mask(xy, (h, w), side_r, region_grid)
    obs = sdata.tables[sample.table_key].obs.iloc[sample.obs_idx]
    grid, kind = grid_positions(obs, xy, table_key=sample.table_key)
    record = {
        "image_key": sample.image_key,
        "spots_key": sample.spots_key,
        "level": int(k),
        "downsample": float(np.mean(ds)),
        "mpp": None if mpp0 is None else float(mpp0 * np.mean(ds)),
        "resample": float(resample),
        "patch_side": side_p,
        "region_side": side_r,
        "shape": [int(h), int(w)],
        "grid_kind": kind,
    }
    return record, xy, mask, grid


def tile(
    sdata: SpatialData,
    *,
    image_key: str | Mapping[str, str] | None = None,
    spots_key: str | None = None,
    table_key: str | None = None,
    patch_size: int = 224,
    region_grid: int = 5,
    target_mpp: float | None = None,
    key_added: str | None = None,
    inplace: bool = True,
) -> dict[str, Any] | None:
    """Compute the patch, region and slide-grid geometry of every spot.

    Spot centres come from the shapes through the coordinate transformations to the image (see the module
    docstring for the exact windows and mask rule).

    Parameters
    ----------
    sdata
        SpatialData with spots (shapes), their table and an RGB uint8 image per sample.
    image_key
        Image to crop from (one name, or a mapping ``{spots_key: image_key}`` for several samples). Default: the
        highest-resolution image sharing a coordinate system with each sample's spots.
    spots_key
        Only tile this shapes element (one sample). Default: every shapes element annotated by the table.
    table_key
        Table annotating the spots; inferred when there is one.
    patch_size
        Side of the spot patch in output pixels (224 as in the reference).
    region_grid
        The region is ``region_grid x region_grid`` patch-sized tiles centred on the spot (an odd int >= 1).
    target_mpp
        ``None`` keeps native pixels of the full-resolution level (reference parity). A number (µm/px) picks the
        pyramid level whose resolution is closest at or below it and records the resample factor.
        µm/px comes from ``table.uns["dkan"]["reader"][sample]["um_per_px"]`` or, for circles, from the Visium
        rule (55 µm / spot diameter in px).
    key_added
        Name of the ``uns["dkan"]`` step; obsm keys get it as a suffix. Default: the keys of :mod:`dkan._keys`
        (``obsm["dkan_spot_px"]``, ``obsm["dkan_region_mask"]``, ``obsm["dkan_grid"]``, ``uns["dkan"]["tile"]``).
    inplace
        Write to the panel-sized results table ``f"{table_key}_dkan"`` (created when missing; see
        :mod:`dkan._results`) and return None, or return the results as a dict.

    Returns
    -------
    None when ``inplace``; else a dict with ``spot_px`` (n, 2) float (x, y), ``region_mask`` (n, G*G) bool,
    ``grid`` (n, 2) int64 (row, col; -1 for rows outside any tiled sample) and ``uns`` (the geometry record).
    """
    patch_size, region_grid = check_int(patch_size, "patch_size"), check_int(region_grid, "region_grid")
    if region_grid % 2 == 0:
        raise ValueError(
            f"`region_grid={region_grid}` must be odd (the region is centred on the spot's own tile, as "
            f"`DKANConfig.region_grid` requires); use {region_grid - 1} or {region_grid + 1}."
        )
    if target_mpp is not None and not target_mpp > 0:
        raise ValueError(f"`target_mpp` must be positive or None; got {target_mpp}.")
    from dkan._features.image_checks import check_image
    from dkan._results import find_results, results_table

    tkey, adata = get_table(sdata, table_key)
    samples = iter_samples(sdata, table_key=tkey, image_key=image_key, spots_key=spots_key)
    keys = tile_keys(key_added)
    n, g2 = adata.n_obs, region_grid**2
    found = find_results(sdata, tkey)
    store = found[1] if found is not None else None
    spot_px, mask, grid = _existing(store, keys, n, g2, keep=spots_key is not None and inplace)
    records = {}
    for sample in samples:
        rec, xy, m, gr = _sample_geometry(
            sdata, sample, patch_size=int(patch_size), region_grid=int(region_grid), target_mpp=target_mpp
        )
        level = image_levels(sdata.images[sample.image_key])[rec["level"]]
        check_image(sdata, sample, level, xy, image_key=image_key, level_mpp=rec["mpp"], target_mpp=target_mpp)
        spot_px[sample.obs_idx], mask[sample.obs_idx], grid[sample.obs_idx] = xy, m, gr
        records[sample.name] = rec
        logger.info(
            "Tiled sample %s: %d spots, level %d, %s grid.", sample.name, len(xy), rec["level"], rec["grid_kind"]
        )
    params = {"patch_size": int(patch_size), "region_grid": int(region_grid), "target_mpp": target_mpp}
    old = uns_get(store, keys["uns"]) if store is not None else None
    if spots_key is not None and old and all(old.get(p) == v for p, v in params.items()):
        records = {**old.get("samples", {}), **records}
    uns = {**params, "keys": {k: v for k, v in keys.items() if k != "uns"}, "samples": records}
    if not inplace:
        return {"spot_px": spot_px, "region_mask": mask, "grid": grid, "uns": uns}
    _, store = results_table(sdata, tkey, create=True)
    store.obsm[keys["spot_px"]], store.obsm[keys["region_mask"]], store.obsm[keys["grid"]] = spot_px, mask, grid
    uns_set(store, keys["uns"], uns)
    return None


def tile_keys(key_added: str | None = None) -> dict[str, str]:
    """Storage keys of the tile geometry: ``spot_px``, ``region_mask``, ``grid`` (obsm) and ``uns`` (step)."""
    if key_added is None:
        return {"spot_px": K.SPOT_PX, "region_mask": K.REGION_MASK, "grid": K.GRID, "uns": K.UNS_TILE}
    return {
        "spot_px": f"{K.SPOT_PX}_{key_added}",
        "region_mask": f"{K.REGION_MASK}_{key_added}",
        "grid": f"{K.GRID}_{key_added}",
        "uns": key_added,
    }


def _existing(
    adata: AnnData | None, keys: dict[str, str], n: int, g2: int, *, keep: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Output arrays: the existing ones (when updating one sample and shapes match) or fresh ones."""
    fresh = (np.full((n, 2), np.nan), np.zeros((n, g2), dtype=bool), np.full((n, 2), -1, dtype=np.int64))
    if adata is None or not keep or any(keys[k] not in adata.obsm for k in ("spot_px", "region_mask", "grid")):
        return fresh
    old = tuple(np.array(adata.obsm[keys[k]]) for k in ("spot_px", "region_mask", "grid"))
    if any(o.shape != f.shape for o, f in zip(old, fresh, strict=True)):
        return fresh
    return old[0].astype(float), old[1].astype(bool), old[2].astype(np.int64)
