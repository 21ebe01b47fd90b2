"""Reader for the legacy Spatial Transcriptomics layout (her2st, STNet, cSCC).

One section comes as three files: a counts table (spots x genes, spots named ``"{x}x{y}"`` after their array
coordinates), a spot file mapping array coordinates to full-resolution image pixels, and the H&E image.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dkan import _keys as K

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")

_SPOT_ID = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*x\s*(-?\d+(?:\.\d+)?)\s*$")


def read_st(
    counts: str | PathLike[str],
    spots: str | PathLike[str],
    image: str | PathLike[str],
    *,
    sample_id: str,
    patient: str | None = None,
    spot_diameter_um: float = 100.0,
    spot_pitch_um: float = 200.0,
    um_per_px: float | None = None,
    selected_only: bool = True,
    max_unmatched: float = 0.1,
    scale_factors: Sequence[int] | None = (2, 2, 2, 2),
    chunks: tuple[int, int, int] = (3, 1024, 1024),
) -> SpatialData:
    """Read one legacy Spatial Transcriptomics section into a SpatialData.

    The layout is the one of the her2st, STNet and cSCC datasets: a counts table whose rows are spots named
    ``"{x}x{y}"`` (array coordinates) and whose columns are genes; a spot file with columns ``x``, ``y``
    (or ``new_x``, ``new_y``), ``pixel_x``, ``pixel_y`` and optionally ``selected``; and the H&E image.
    Count rows are joined to spot rows on ``f"{round(x)}x{round(y)}"`` and sorted by ``(y, x)``. Count rows
    without a selected spot-file row are dropped with a warning. Count rows that the spot file does not list at
    all may be at most ``max_unmatched`` of them (10 % by default); more means the two files most likely belong to
    different sections, and reading stops (rows listed but unselected, spots outside the tissue, do not count).

    The image is lazy: a tiled TIFF is read a tile at a time (through tiffslide, as :func:`dkan.io.read_wsi`);
    a JPEG or PNG is decoded on first use, not while reading, with PIL's decompression-bomb limit lifted for
    this file only, each pyramid level on its own (lower levels of a JPEG directly at reduced size), so work
    at a coarser resolution never decodes the full-resolution pixels. Once touched, a decoded JPEG level stays
    in memory; write the result to zarr (``sdata.write``) and read it back to work from disk instead.

    The image resolution is inferred from the spot grid: the median pixel distance between neighbouring
    spots is one ``spot_pitch_um``; the spot circles get a radius of ``spot_diameter_um / 2`` in pixels.

    Parameters
    ----------
    counts
        Counts table, tab-separated, optionally gzipped: spots as rows (``"{x}x{y}"``), genes as columns.
        A genes x spots table is transposed automatically.
    spots
        Spot file (tab- or comma-separated) with ``x``, ``y`` (or ``new_x``, ``new_y``), ``pixel_x``,
        ``pixel_y`` and optionally ``selected``.
    image
        H&E image (JPEG, PNG or TIFF) whose full-resolution pixels ``pixel_x``/``pixel_y`` refer to.
    sample_id
        Name of the section; names the coordinate system and the elements
        ``f"{sample_id}_image"`` and ``f"{sample_id}_spots"``.
    patient
        Patient (donor) of the section, written to ``obs["patient"]``; defaults to ``sample_id``.
    spot_diameter_um
        Spot diameter in micrometres (100 for legacy ST).
    spot_pitch_um
        Centre-to-centre distance of neighbouring spots in micrometres (200 for legacy ST).
    um_per_px
        Image resolution in micrometres per pixel; inferred from the spot pitch when not given.
    selected_only
        Keep only spot-file rows with ``selected == 1`` (when that column exists).
    max_unmatched
        Largest fraction (0 to 1) of count rows that the spot file may not list at all (selected or not); above
        it a ValueError names both files. Raise it (e.g. ``1.0``) to keep the matched spots of a spot file you
        know is partial. With their own spot files, her2st sections miss no count row, STUtility's MOB sections
        under 1 % (11 of 1,934 and 8 of 1,933).
    scale_factors
        Downsampling factors of the image pyramid; ``None`` for a single-scale image.
    chunks
        Dask chunks of the image, ``(c, y, x)``.

    Returns
    -------
    A SpatialData with the image, the spot circles (in image pixels) and table ``"table"`` (raw counts in
    ``X``, ``obs`` columns ``sample``, ``patient``, ``array_row`` (= y), ``array_col`` (= x), pixel
    coordinates in ``obsm["spatial"]``, reader metadata in ``uns["dkan"]["reader"][sample_id]``), all in
    the coordinate system ``sample_id``.
    """
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    from dkan.io._image import LazyImage
    from dkan.io._pyramid import image_pyramid

    sample_id = str(sample_id)
    cnt = read_counts(counts)
    spt = read_spot_file(spots, selected_only=selected_only)
    cnt, spt = _join(cnt, spt, counts=counts, spots=spots, max_unmatched=max_unmatched)

    lazy = LazyImage(image)
    xy = spt[["pixel_x", "pixel_y"]].to_numpy(dtype=float)
    _check_covers(xy, lazy.shape, image=image, spots=spots)

    grid = spt[["x", "y"]].to_numpy(dtype=float)
    pitch_px = spot_pitch_px(grid, xy, spt[["fine_x", "fine_y"]].to_numpy(dtype=float))
    if um_per_px is None:
        if not np.isfinite(pitch_px):
            raise ValueError(
                f"Cannot infer the image resolution of sample {sample_id!r}: it has {len(xy)} spot(s) and no "
                "neighbouring pair. Pass `um_per_px=`."
            )
        um_per_px = spot_pitch_um / pitch_px
    radius_px = spot_diameter_um / 2 / um_per_px

    tf = {sample_id: Identity()}
    img = image_pyramid(
        image,
        lazy.to_dask(chunks),
        scale_factors=list(scale_factors) if scale_factors else None,
        chunks=chunks,
        transformations=tf,
    )
    ids = np.arange(len(spt))
    shapes = ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), radius_px), index=ids, transformations=tf)
    spots_key = f"{sample_id}{K.SPOTS_SUFFIX}"
    meta = {
        "layout": "st",
        "um_per_px": float(um_per_px),
        "spot_pitch_px": float(pitch_px),
        "spot_radius_px": float(radius_px),
        "spot_diameter_um": float(spot_diameter_um),
        "spot_pitch_um": float(spot_pitch_um),
        "counts": str(counts),
        "spots": str(spots),
        "image": str(image),
    }
    table = _make_table(cnt, spt, xy, sample_id=sample_id, patient=patient, spots_key=spots_key, meta=meta)
    logger.info(
        "read_st: sample %s, %d spots x %d genes, image %s, %.3f um/px", sample_id, *cnt.shape, lazy.shape, um_per_px
    )
    return SpatialData(
        images={f"{sample_id}{K.IMAGE_SUFFIX}": img}, shapes={spots_key: shapes}, tables={K.TABLE: table}
    )


# --- counts and spot files ------------------------------------------------------------------------------


def _parse_ids(labels: Sequence[Any]) -> np.ndarray | None:
    """``"{x}x{y}"`` labels -> (n, 2) float array, or None when any label does not match."""
    out = np.empty((len(labels), 2))
    for i, lab in enumerate(labels):
        m = _SPOT_ID.match(str(lab))
        if m is None:
            return None
        out[i] = float(m.group(1)), float(m.group(2))
    return out


def _spot_keys(xy: np.ndarray) -> np.ndarray:
    r = np.rint(xy).astype(np.int64)
    return np.array([f"{a}x{b}" for a, b in r], dtype=object)


def read_counts(path: str | PathLike[str]) -> pd.DataFrame:
    """Read a legacy ST counts table as spots x genes, indexed by ``"{x}x{y}"`` keys of rounded coordinates."""
    df = _read_text_table(path, "counts", sep="\t", index_col=0)
    header = pd.read_csv(path, sep="\t", header=None, nrows=1, dtype=str).iloc[0, 1:]
    if len(header) == df.shape[1]:  # pandas renames duplicated columns ("G.1"): keep the names as written
        df.columns = header.to_numpy()
    if _parse_ids(df.index) is None and len(df.columns) and _parse_ids(df.columns) is not None:
        logger.info("read_st: counts file %s is genes x spots; transposing", path)
        df = df.T
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise ValueError(
            f"`counts` file {path} holds {df.shape[0]} spot row(s) and {df.shape[1]} gene column(s); it needs both "
            "(spot names in the first column, one column per gene). Check that it is the section's counts table."
        )
    coords = _parse_ids(df.index)
    if coords is None:
        bad = [str(v) for v in df.index if _SPOT_ID.match(str(v)) is None][:5]
        raise ValueError(
            f"`counts` file {path} has rows that are not spot names of the form '{{x}}x{{y}}', e.g. {bad}. "
            "Pass a spots x genes table whose first column holds the spot names."
        )
    genes = pd.Index(df.columns.astype(str))
    dup = genes[genes.duplicated()].unique()
    if len(dup):
        raise ValueError(
            f"`counts` file {path} has {len(dup)} duplicated gene column(s), e.g. {list(dup[:5])}. "
            "Make gene names unique (e.g. sum the duplicated columns or append a suffix) before reading."
        )
    non_numeric = [c for c, t in df.dtypes.items() if not np.issubdtype(t, np.number)]
    if non_numeric:
        raise ValueError(
            f"`counts` file {path} has non-numeric column(s) {non_numeric[:5]}; it must hold counts only "
            "(spot names in the first column, one column per gene)."
        )
    df.columns = genes
    df.index = pd.Index(_spot_keys(coords))
    if df.index.duplicated().any():
        raise ValueError(
            f"`counts` file {path} names some spots twice, e.g. {list(df.index[df.index.duplicated()][:5])}."
        )
    return df


def _read_text_table(path: str | PathLike[str], param: str, **kwargs: Any) -> pd.DataFrame:
    """``pandas.read_csv`` with an empty file reported as a ValueError naming the parameter and the file."""
    import csv

    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError as err:
        raise ValueError(
            f"`{param}` file {path} is empty (no header, no rows); pass the section's {param} table."
        ) from err
    except csv.Error as err:  # delimiter sniffing (``sep=None``) fails on an empty or one-column file
        raise ValueError(
            f"`{param}` file {path} cannot be read as a tab- or comma-separated table ({err}); it is empty or not "
            f"the section's {param} table."
        ) from err


def read_spot_file(path: str | PathLike[str], *, selected_only: bool = True) -> pd.DataFrame:
    """Read a legacy ST spot file into columns ``x``, ``y`` (array), ``pixel_x``, ``pixel_y``, indexed by spot key."""
    df = _read_text_table(path, "spots", sep=None, engine="python")
    df.columns = [str(c).strip().lower() for c in df.columns]
    if not {"x", "y"} <= set(df.columns) and {"new_x", "new_y"} <= set(df.columns):
        df = df.rename(columns={"new_x": "x", "new_y": "y"})
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in df.columns]
    if missing:
        raise ValueError(
            f"`spots` file {path} lacks column(s) {missing}; found {list(df.columns)}. It needs array coordinates "
            "`x`, `y` (or `new_x`, `new_y`) and full-resolution image coordinates `pixel_x`, `pixel_y`."
        )
    listed = _spot_keys(np.rint(df[["x", "y"]].to_numpy(dtype=float)).astype(np.int64))
    if selected_only and "selected" in df.columns:
        df = df[df["selected"].astype(float) != 0]
    out = pd.DataFrame(
        {
            "x": np.rint(df["x"].to_numpy(dtype=float)).astype(np.int64),
            "y": np.rint(df["y"].to_numpy(dtype=float)).astype(np.int64),
            "pixel_x": df["pixel_x"].to_numpy(dtype=float),
            "pixel_y": df["pixel_y"].to_numpy(dtype=float),
            "fine_x": df["new_x" if "new_x" in df.columns else "x"].to_numpy(dtype=float),
            "fine_y": df["new_y" if "new_y" in df.columns else "y"].to_numpy(dtype=float),
        }
    )
    out.index = pd.Index(_spot_keys(out[["x", "y"]].to_numpy()))
    if out.index.duplicated().any():
        raise ValueError(
            f"`spots` file {path} lists some array positions twice, e.g. {list(out.index[out.index.duplicated()][:5])}."
        )
    out.attrs["listed"] = listed  # every position the file lists, selected or not (see `_join`)
    return out


def _join(
    cnt: pd.DataFrame, spt: pd.DataFrame, *, counts: Any, spots: Any, max_unmatched: float = 0.1
) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not 0.0 <= float(max_unmatched) <= 1.0:
        raise ValueError(f"`max_unmatched` is a fraction between 0 and 1; found {max_unmatched!r}.")
    common = cnt.index.intersection(spt.index)
    if len(common) == 0:
        raise ValueError(
            f"No spot of `counts` ({counts}, e.g. {list(cnt.index[:3])}) matches a row of `spots` ({spots}, e.g. "
            f"{list(spt.index[:3])}); spots are joined on '{{x}}x{{y}}' array coordinates. Check that both files "
            "belong to the same section (and pass `selected_only=False` if the spot file marks them unselected)."
        )
    n_drop = len(cnt) - len(common)
    listed = spt.attrs.get("listed", spt.index)
    n_absent = len(cnt) - len(cnt.index.intersection(pd.Index(listed)))  # rows unselected on purpose do not count
    if n_absent > max_unmatched * len(cnt):
        raise ValueError(
            f"{n_absent} of {len(cnt)} spots ({n_absent / len(cnt):.0%}) of `counts` ({counts}) have no row at "
            f"all in `spots` ({spots}), more than `max_unmatched={max_unmatched:g}`: the two files most likely "
            "belong to different sections. Pass the section's own spot file, or `max_unmatched=1.0` to keep only "
            "the matched spots."
        )
    if n_drop:
        logger.warning(
            "read_st: %d of %d spots in %s have no (selected) spot-file row; dropped", n_drop, len(cnt), counts
        )
    spt = spt.loc[common].sort_values(["y", "x"], kind="stable")
    return cnt.loc[spt.index], spt


# --- geometry -------------------------------------------------------------------------------------------


def spot_pitch_px(grid: np.ndarray, xy: np.ndarray, fine: np.ndarray | None = None) -> float:
    """Pixel distance between neighbouring spots (NaN with fewer than two spots).

    The grid step is the smallest nearest-neighbour distance in (integer) array coordinates ``grid``. With at
    least three non-collinear spots, pixels per array unit come from a least-squares affine fit of the pixel
    positions ``xy`` on the array coordinates (``fine``, e.g. her2st's fractional ``new_x``/``new_y``, when
    given); otherwise from the median pixel distance of nearest array neighbours.
    """
    from scipy.spatial import cKDTree

    if len(grid) < 2:
        return float("nan")
    d_arr, j = cKDTree(grid).query(grid, k=2)
    d_arr, j = d_arr[:, 1], j[:, 1]
    ok = d_arr > 0
    if not ok.any():
        return float("nan")
    step = d_arr[ok].min()
    fine = grid if fine is None else fine
    design = np.c_[fine, np.ones(len(fine))]
    if len(grid) >= 3 and np.linalg.matrix_rank(design) == 3:
        coef, *_ = np.linalg.lstsq(design, xy, rcond=None)
        return float(np.sqrt(abs(np.linalg.det(coef[:2]))) * step)
    d_px = np.linalg.norm(xy - xy[j], axis=1)
    return float(np.median(d_px[ok] / d_arr[ok]) * step)


def _check_covers(xy: np.ndarray, shape: tuple[int, int, int], *, image: Any, spots: Any) -> None:
    _, h, w = shape
    out = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
    if out.any():
        ratio = max(xy[:, 0].max() / w, xy[:, 1].max() / h)
        raise ValueError(
            f"{int(out.sum())} of {len(xy)} spots of `spots` ({spots}) lie outside `image` ({image}, {w} x {h} px); "
            f"spot pixels reach x={xy[:, 0].max():.0f}, y={xy[:, 1].max():.0f} (about {ratio:.2f}x the image). "
            "`pixel_x`/`pixel_y` must be full-resolution pixels of this image: pass the full-resolution image of "
            "the same section (not a downscaled copy)."
        )


# --- table ----------------------------------------------------------------------------------------------


def _make_table(
    cnt: pd.DataFrame,
    spt: pd.DataFrame,
    xy: np.ndarray,
    *,
    sample_id: str,
    patient: str | None,
    spots_key: str,
    meta: dict,
) -> AnnData:
    import anndata as ad
    from scipy import sparse
    from spatialdata.models import TableModel

    values = cnt.to_numpy()
    if np.issubdtype(values.dtype, np.integer) or np.array_equal(values, np.round(values)):
        values = values.astype(np.int32)
    else:
        logger.warning("read_st: counts of sample %s are not integers; kept as float32", sample_id)
        values = values.astype(np.float32)
    n = len(cnt)
    obs = pd.DataFrame(
        {
            K.REGION: pd.Categorical([spots_key] * n),
            K.INSTANCE: np.arange(n),
            K.SAMPLE: pd.Categorical([sample_id] * n),
            K.PATIENT: pd.Categorical([str(patient if patient is not None else sample_id)] * n),
            K.ARRAY_ROW: spt["y"].to_numpy(),
            K.ARRAY_COL: spt["x"].to_numpy(),
        },
        index=[f"{sample_id}_{s}" for s in spt.index],
    )
    adata = ad.AnnData(X=sparse.csr_matrix(values), obs=obs, var=pd.DataFrame(index=cnt.columns))
    adata.obsm["spatial"] = xy.astype(np.float64)
    adata.uns[K.UNS] = {K.UNS_READER: {sample_id: meta}}
    return TableModel.parse(adata, region=spots_key, region_key=K.REGION, instance_key=K.INSTANCE)
