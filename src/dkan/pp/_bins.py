"""Visium HD: aggregate square bins (2, 8 or 16 µm) into spot-sized pseudo-spots that dkan trains and predicts on.

A DKAN spot is a patch of tissue with one expression profile, about the size of a Visium spot. Visium HD
measures a regular lattice of small square bins; :func:`aggregate_bins` sums the raw counts of ``k x k``
neighbouring bins (``k = round(spot_um / bin_um)``) into one pseudo-spot on a square grid, so every dkan step
(tiling, features, training, prediction, evaluation) runs on Visium HD as on legacy ST.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import numpy as np

from dkan import _keys as K

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")

#: spatialdata-io names bin tables ``square_008um`` and their shapes ``{dataset_id}_square_008um``
_BIN_NAME = re.compile(r"(\d+)um$")


def aggregate_bins(
    sdata: SpatialData,
    *,
    table_key: str,
    spot_um: float = 56.0,
    bin_um: float | None = None,
    min_fraction: float = 0.5,
    key_added: str | None = None,
    overwrite: bool = False,
) -> tuple[str, str]:
    """Sum square bins (e.g. Visium HD read with ``spatialdata_io.visium_hd``) into pseudo-spots.

    Bins are grouped in blocks of ``k x k`` lattice positions (``array_row // k``, ``array_col // k``) with
    ``k = round(spot_um / bin_um)``; each block becomes one spot whose counts are the sum of its bins' counts.
    The spot is a circle of diameter ``k * bin_um`` centred on the block (centres come from a least-squares fit
    of the bin lattice, so a block with missing bins is still centred on its square). Blocks with fewer than
    ``min_fraction * k * k`` bins in the table (tissue edges) are dropped.

    Parameters
    ----------
    sdata
        SpatialData holding the bin table, its shapes and (for dkan) the H&E image.
    table_key
        The bin table, e.g. ``"square_008um"`` (``obs`` needs ``array_row`` and ``array_col``; raw counts in
        ``X``).
    spot_um
        Side of the pseudo-spots in µm (default 56: 7 x 8 µm bins, about a Visium spot).
    bin_um
        Bin side in µm; default: read from the table or shapes name (``..._008um`` -> 8).
    min_fraction
        Smallest fraction of a block's ``k * k`` bins that must be present to keep it.
    key_added
        Name of the new shapes element. Default ``f"{bins shapes}_dkan_{k * bin_um}um"``; the table is
        ``f"{key_added}_table"``.
    overwrite
        Replace existing elements of those names.

    Returns
    -------
    ``(shapes_key, table_key)`` of the added circles and table. The table has the bin table's ``var``, summed
    counts in ``X``, ``obs`` columns ``region``, ``spot_id``, ``array_row``, ``array_col`` (block positions),
    ``n_bins``, ``obsm["spatial"]`` (centres in the bins' coordinates) and, when an image shares a coordinate
    system with the bins, ``uns["dkan"]["reader"]`` with that image's µm per pixel.
    """
    from dkan._utils import choose_key, grid_coords, table_attrs

    table_key = choose_key("tables", "table_key", table_key, list(sdata.tables.keys()))
    bins = sdata.tables[table_key]
    regions, _, instance_key = table_attrs(bins, table_key=table_key)
    if len(regions) != 1:
        raise ValueError(f"Table `{table_key}` annotates {len(regions)} shapes elements {regions}; expected one.")
    region = regions[0]
    missing = [c for c in (K.ARRAY_ROW, K.ARRAY_COL) if c not in bins.obs]
    if missing:
        raise KeyError(f"Table `{table_key}` has no `obs` columns {missing}: aggregate_bins needs the bin lattice.")
    spot_um = _positive_finite(spot_um, "spot_um")
    bin_um = _bin_um(bin_um, table_key, region)
    k = round(spot_um / bin_um)
    if k < 1 or not 0 < min_fraction <= 1:
        raise ValueError(
            f"`spot_um={spot_um}` must be at least one bin ({bin_um} µm) and `min_fraction` in (0, 1]; "
            f"got {spot_um}, {min_fraction}."
        )
    shapes_key = key_added or f"{region}_dkan_{k * bin_um:g}um"
    new_table_key = f"{shapes_key}_table"
    taken = [key for key in (shapes_key, new_table_key) if key in sdata]
    if taken and not overwrite:
        raise KeyError(f"Elements {taken} already exist; pass `overwrite=True` or another `key_added=`.")

    rows, cols = grid_coords(bins.obs, table_key=table_key).T
    xy = _bin_centres(sdata, region, bins.obs[instance_key].to_numpy())
    lattice = _fit_lattice(rows, cols, xy)
    codes, block_r, block_c, member = _blocks(rows // k, cols // k)
    n_bins = np.bincount(member, minlength=len(codes))
    keep = n_bins >= min_fraction * k * k
    centre = np.c_[block_r * k + (k - 1) / 2, block_c * k + (k - 1) / 2, np.ones(len(codes))] @ lattice
    radius = k * float(np.mean(np.linalg.norm(lattice[:2], axis=1))) / 2
    table = _summed_table(bins, member, keep, block_r, block_c, n_bins, centre, shapes_key)
    shapes = _circles(sdata, region, centre[keep], radius)
    um_per_px = _image_um_per_px(sdata, region, bin_um / float(np.mean(np.linalg.norm(lattice[:2], axis=1))))
    if um_per_px is not None:
        table.uns[K.UNS] = {K.UNS_READER: {shapes_key: {"um_per_px": um_per_px, "layout": "visium_hd_bins"}}}
    for key in taken:
        del sdata[key]
    sdata.shapes[shapes_key] = shapes
    sdata.tables[new_table_key] = table
    logger.info(
        "Aggregated %d bins of %g µm into %d pseudo-spots of %g µm (`%s`, table `%s`); %d edge blocks dropped.",
        bins.n_obs, bin_um, int(keep.sum()), k * bin_um, shapes_key, new_table_key, int((~keep).sum()),
    )  # fmt: skip
    return shapes_key, new_table_key


def _positive_finite(value: object, name: str) -> float:
    """``value`` as a float; TypeError for a non-number, ValueError for NaN, infinity, zero or a negative."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a positive number of µm; found {value!r} ({type(value).__name__}).")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}={value}` must be a positive, finite number of µm.")
    return float(value)


def _bin_um(bin_um: float | None, table_key: str, region: str) -> float:
    if bin_um is not None:
        return _positive_finite(bin_um, "bin_um")
    for name in (table_key, region):
        m = _BIN_NAME.search(name)
        if m:
            return float(int(m.group(1)))
    raise ValueError(
        f"Cannot tell the bin size of table `{table_key}` (shapes `{region}`) from its name; pass `bin_um=`."
    )


def _bin_centres(sdata: SpatialData, region: str, instances: np.ndarray) -> np.ndarray:
    """Bin centres ``(x, y)`` in the shapes' coordinates, in table row order."""
    import pandas as pd

    shapes = sdata.shapes[region]
    pos = pd.Index(shapes.index).get_indexer(instances)
    if (pos < 0).any():
        raise KeyError(f"Table rows name {int((pos < 0).sum())} bins that are not in shapes `{region}`.")
    c = shapes.geometry.centroid
    return np.c_[c.x.to_numpy(), c.y.to_numpy()][pos]


def _fit_lattice(rows: np.ndarray, cols: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """3 x 2 matrix ``A`` with ``[row, col, 1] @ A = (x, y)``: the bin lattice, fitted by least squares."""
    design = np.c_[rows, cols, np.ones(len(rows))].astype(float)
    if np.linalg.matrix_rank(design) < 3:
        raise ValueError("The bins do not span a 2D lattice (need several rows and columns of bins).")
    lattice, *_ = np.linalg.lstsq(design, xy, rcond=None)
    return lattice


def _blocks(br: np.ndarray, bc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique blocks (row-major), their block row / column and each bin's block index."""
    codes, member = np.unique(np.c_[br, bc], axis=0, return_inverse=True)
    return codes, codes[:, 0], codes[:, 1], member.ravel()


def _summed_table(
    bins: AnnData,
    member: np.ndarray,
    keep: np.ndarray,
    block_r: np.ndarray,
    block_c: np.ndarray,
    n_bins: np.ndarray,
    centre: np.ndarray,
    shapes_key: str,
) -> AnnData:
    import anndata as ad
    import pandas as pd
    from scipy import sparse
    from spatialdata.models import TableModel

    n_blocks = len(block_r)
    assign = sparse.csr_matrix(
        (np.ones(len(member), dtype=np.float32), (member, np.arange(len(member)))), shape=(n_blocks, len(member))
    )
    x = sparse.csr_matrix(bins.X, dtype=np.float64, copy=True)  # never share arrays with the user's table
    summed = (assign @ x)[keep]
    if np.issubdtype(x.dtype, np.integer) or np.array_equal(x.data, np.round(x.data)):
        summed = summed.astype(np.int32)
    n = int(keep.sum())
    obs = pd.DataFrame(
        {
            K.REGION: pd.Categorical([shapes_key] * n),
            K.INSTANCE: np.arange(n),
            K.ARRAY_ROW: block_r[keep],
            K.ARRAY_COL: block_c[keep],
            "n_bins": n_bins[keep],
        },
        index=[f"{shapes_key}_{r}_{c}" for r, c in zip(block_r[keep], block_c[keep], strict=True)],
    )
    adata = ad.AnnData(X=sparse.csr_matrix(summed), obs=obs, var=bins.var.copy())
    adata.obsm[K.SPATIAL] = centre[keep].astype(np.float64)
    return TableModel.parse(adata, region=shapes_key, region_key=K.REGION, instance_key=K.INSTANCE)


def _circles(sdata: SpatialData, region: str, centres: np.ndarray, radius: float) -> object:
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    n = len(centres)
    transformations = get_transformation(sdata.shapes[region], get_all=True)
    return ShapesModel.parse(
        centres.astype(float),
        geometry=0,
        radius=np.full(n, radius),
        index=np.arange(n),
        transformations=transformations,
    )


def _image_um_per_px(sdata: SpatialData, region: str, um_per_unit: float) -> float | None:
    """µm per scale-0 pixel of the image dkan will crop the bins' spots from, or None without an image."""
    from dkan._utils import find_image, image_scale

    try:
        image_key = find_image(sdata, region)
    except KeyError:
        return None
    scale = image_scale(sdata, region, image_key)
    return None if not scale else float(um_per_unit / scale)
