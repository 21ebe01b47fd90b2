"""The HEST-1k layout (Jaume et al. 2024, github.com/mahmoodlab/HEST) as SpatialData.

A HEST folder holds, per sample ``id``: ``st/{id}.h5ad`` (spots x genes, raw counts, spot centres in full-resolution
pixels of the slide in ``obsm["spatial"]``), ``wsis/{id}.tif`` (the H&E slide as a pyramidal TIFF) and
``metadata/{id}.json`` (pixel size, spot geometry, technology, patient, organ, ...). Other folders (patches,
thumbnails, tissue_seg, cellvit_seg, transcripts, ...) are not read.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dkan import _keys as K

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")

#: Metadata keys of the pixel size (µm/px of the slide's full resolution), in the order they are used.
PIXEL_SIZE_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
#: Spot diameter / centre-to-centre distance (µm) by HEST ``st_technology`` when the metadata lacks them.
_SPOT_GEOMETRY_UM = {"visium": (55.0, 100.0), "spatial transcriptomics": (100.0, 200.0)}
#: Measured spot pitch over the pitch the metadata implies, outside which the pixel size is taken as wrong.
PITCH_TOLERANCE = (0.8, 1.25)


def read_hest(
    root: str | PathLike[str],
    sample_ids: str | Sequence[str] | None = None,
    *,
    um_per_px: float | Mapping[str, float] | None = None,
    join: Literal["inner", "outer"] = "inner",
    chunk_size: int = 1024,
) -> SpatialData:
    """Read samples of a HEST-1k folder into one SpatialData, lazily (no slide pixel is decoded here).

    Per sample ``id``: the slide ``wsis/{id}.tif`` becomes the lazy multiscale image ``f"{id}_image"`` (read as by
    :func:`dkan.io.read_wsi`, with the pixel size from the metadata recorded the same way: a scale to the
    coordinate system ``f"{id}_um"``); the spots of ``st/{id}.h5ad`` become circles ``f"{id}_spots"`` at
    ``obsm["spatial"]`` (full-resolution pixels) with the radius ``spot_diameter / 2`` converted to pixels; all
    samples share one table ``"table"`` of raw counts annotating the circles, as :func:`dkan.datasets.her2st`.

    The pixel size is ``pixel_size_um_estimated`` of ``metadata/{id}.json`` (HEST's own working value), else
    ``pixel_size_um_embedded``. It is checked against the spots: the median distance between neighbouring spot
    centres must match ``inter_spot_dist`` (µm) within 0.8-1.25x; a missing, implausible or inconsistent pixel
    size is a ValueError naming the file.

    Parameters
    ----------
    root
        The HEST folder (holding ``st/``, ``wsis/`` and ``metadata/``).
    sample_ids
        Sample ids to read (e.g. ``["TENX95", "NCBI783"]``); default: every ``st/*.h5ad``, sorted.
    um_per_px
        Pixel size (µm/px) overriding the metadata: one value for all samples or ``{id: value}``. The spot-pitch
        check is then skipped for those samples.
    join
        ``"inner"`` keeps the genes shared by all samples, ``"outer"`` all genes (missing counts are 0).
    chunk_size
        Side of the image's dask chunks in pixels.

    Returns
    -------
    A SpatialData with, per sample, an image and spot circles in the coordinate systems ``id`` (slide pixels) and
    ``f"{id}_um"``, and table ``"table"`` (raw counts in ``X``; ``obs`` columns ``sample``, ``patient``,
    ``array_row``, ``array_col`` and ``in_tissue`` when present; ``obsm["spatial"]`` in slide pixels; the HEST
    metadata used in ``uns["dkan"]["reader"][id]``).

    Raises
    ------
    FileNotFoundError
        ``root`` or a sample's h5ad, slide or metadata file is missing.
    ValueError
        A pixel size or spot geometry is missing or wrong, or the spots lie outside the slide.
    """
    from dkan.io._concat import _concat_samples

    root = Path(root)
    ids = hest_sample_ids(root) if sample_ids is None else [sample_ids] if isinstance(sample_ids, str) else sample_ids
    ids = [str(s) for s in ids]
    if not ids:
        raise ValueError(f"No sample to read: `{root / 'st'}` holds no `.h5ad` file.")
    sdatas = [_read_sample(root, s, um_per_px=_override(um_per_px, s), chunk_size=chunk_size) for s in ids]
    return sdatas[0] if len(sdatas) == 1 else _concat_samples(sdatas, join=join)


def hest_sample_ids(root: str | PathLike[str]) -> list[str]:
    """Ids of the samples of a HEST folder: the names of ``st/*.h5ad``, sorted."""
    st = Path(root) / "st"
    if not st.is_dir():
        raise FileNotFoundError(f"`{root}` is not a HEST folder: it has no `st/` folder (with `{{id}}.h5ad` files).")
    return sorted(p.name.removesuffix(".h5ad") for p in st.glob("*.h5ad"))


def _override(um_per_px: float | Mapping[str, float] | None, sample_id: str) -> float | None:
    if isinstance(um_per_px, Mapping):
        value = um_per_px.get(sample_id)
        return None if value is None else float(value)
    return None if um_per_px is None else float(um_per_px)


def _paths(root: Path, sample_id: str) -> dict[str, Path]:
    paths = {
        "st": root / "st" / f"{sample_id}.h5ad",
        "wsi": root / "wsis" / f"{sample_id}.tif",
        "metadata": root / "metadata" / f"{sample_id}.json",
    }
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"HEST sample {sample_id!r} lacks {missing}; each sample needs `st/{{id}}.h5ad`, `wsis/{{id}}.tif` and "
            "`metadata/{id}.json` (download all three, e.g. with HEST's `allow_patterns`)."
        )
    return paths


def _read_sample(root: Path, sample_id: str, *, um_per_px: float | None, chunk_size: int) -> SpatialData:
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel

    from dkan.io._wsi import read_wsi, transformations_for

    paths = _paths(root, sample_id)
    meta = _read_metadata(paths["metadata"])
    adata = ad.read_h5ad(paths["st"])
    xy = _spot_pixels(adata, paths["st"])
    diameter_um, pitch_um = spot_geometry(meta, paths["metadata"])
    mpp, source = (um_per_px, "um_per_px argument") if um_per_px is not None else pixel_size(meta, paths["metadata"])
    pitch_px = _median_pitch_px(xy)
    if um_per_px is None:
        _check_pitch(pitch_px, pitch_um / mpp, mpp=mpp, source=source, path=paths["metadata"])
    image = read_wsi(paths["wsi"], sample_id=sample_id, um_per_px=mpp, chunk_size=chunk_size)
    ((image_key, img),) = image.images.items()
    _check_inside(xy, img["scale0"]["image"].shape, st=paths["st"], wsi=paths["wsi"])
    radius_px = diameter_um / 2 / mpp
    ids = np.arange(len(xy))
    spots_key = f"{sample_id}{K.SPOTS_SUFFIX}"
    shapes = ShapesModel.parse(
        xy,
        geometry=0,
        radius=np.full(len(xy), radius_px),
        index=ids,
        transformations=transformations_for(sample_id, mpp),
    )
    reader = {
        "layout": "hest",
        "um_per_px": float(mpp),
        "pixel_size_source": source,
        "spot_pitch_px": float(pitch_px),
        "spot_radius_px": float(radius_px),
        "spot_diameter_um": float(diameter_um),
        "spot_pitch_um": float(pitch_um),
        **{k: str(meta[k]) for k in ("st_technology", "organ", "species", "oncotree_code") if _present(meta.get(k))},
        **{k: str(p) for k, p in paths.items()},
    }
    table = _table(adata, xy, sample_id=sample_id, patient=meta.get("patient"), spots_key=spots_key, reader=reader)
    logger.info("read_hest: sample %s, %d spots x %d genes, %.4g µm/px (%s)", sample_id, *table.shape, mpp, source)
    return SpatialData(images={image_key: img}, shapes={spots_key: shapes}, tables={K.TABLE: table})


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot read HEST metadata `{path}` as JSON ({err}).") from err
    if not isinstance(meta, dict):
        raise ValueError(f"HEST metadata `{path}` is not a JSON object; found {type(meta).__name__}.")
    return meta


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value != ""


def pixel_size(meta: Mapping[str, Any], path: Path | str) -> tuple[float, str]:
    """µm per full-resolution pixel from HEST metadata, and the key it came from; a clear error when missing/wrong."""
    from dkan.io._wsi import PLAUSIBLE_UM_PER_PX

    lo, hi = PLAUSIBLE_UM_PER_PX
    fix = "Correct the metadata file or pass `um_per_px=` (one value, or `{sample_id: value}`) to `read_hest`."
    for key in PIXEL_SIZE_KEYS:
        value = meta.get(key)
        if not _present(value):
            continue
        try:
            mpp = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"HEST metadata `{path}` has `{key}` = {value!r}, not a number. {fix}") from None
        if not (math.isfinite(mpp) and lo <= mpp <= hi):
            raise ValueError(
                f"HEST metadata `{path}` has `{key}` = {value!r} µm/px, outside the plausible [{lo}, {hi}]. {fix}"
            )
        return mpp, key
    raise ValueError(f"HEST metadata `{path}` records no pixel size (neither of {list(PIXEL_SIZE_KEYS)}). {fix}")


def spot_geometry(meta: Mapping[str, Any], path: Path | str) -> tuple[float, float]:
    """Spot diameter and centre-to-centre distance in µm from HEST metadata (technology defaults when absent)."""
    tech = str(meta.get("st_technology") or "").strip().lower()
    default = _SPOT_GEOMETRY_UM.get(tech)
    out = []
    for key, k in (("spot_diameter", 0), ("inter_spot_dist", 1)):
        value = meta.get(key)
        if _present(value):
            try:
                value = float(value)
            except (TypeError, ValueError):
                value = float("nan")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"HEST metadata `{path}` has `{key}` = {meta.get(key)!r}; expected a length in µm.")
        elif default is not None:
            value = default[k]
        else:
            raise ValueError(
                f"HEST metadata `{path}` has no `{key}` (µm) and its `st_technology` ({tech or 'none'}) has no known "
                f"default; add `{key}` to the file (Visium: spot_diameter 55, inter_spot_dist 100)."
            )
        out.append(value)
    return out[0], out[1]


def _spot_pixels(adata: AnnData, path: Path) -> np.ndarray:
    if "spatial" not in adata.obsm:
        raise ValueError(f"`{path}` has no `obsm['spatial']` (spot centres in full-resolution slide pixels).")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) == 0 or not np.isfinite(xy).all():
        raise ValueError(f"`obsm['spatial']` of `{path}` must be finite (n_spots, 2) pixels; found shape {xy.shape}.")
    return xy


def _median_pitch_px(xy: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        return float("nan")
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


def _check_pitch(measured: float, expected: float, *, mpp: float, source: str, path: Path) -> None:
    lo, hi = PITCH_TOLERANCE
    if not math.isfinite(measured) or lo <= measured / expected <= hi:
        return
    raise ValueError(
        f"The pixel size of `{path}` ({source} = {mpp:.4g} µm/px) is wrong for its spots: neighbouring spot centres "
        f"are {measured:.1f} px apart, but `inter_spot_dist` at this pixel size means {expected:.1f} px "
        f"(about {mpp * measured / expected:.4g} µm/px would fit). Correct the metadata or pass `um_per_px=`."
    )


def _check_inside(xy: np.ndarray, shape: tuple[int, ...], *, st: Path, wsi: Path) -> None:
    h, w = shape[-2:]
    out = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
    if out.mean() > 0.01:
        raise ValueError(
            f"{int(out.sum())} of {len(xy)} spots of `{st}` lie outside the slide `{wsi}` ({w} x {h} px): "
            "`obsm['spatial']` must be full-resolution pixels of this slide."
        )


def _table(
    adata: AnnData, xy: np.ndarray, *, sample_id: str, patient: Any, spots_key: str, reader: dict[str, Any]
) -> AnnData:
    import anndata as ad
    import pandas as pd
    from scipy import sparse
    from spatialdata.models import TableModel

    x = adata.X if adata.X is not None else sparse.csr_matrix(adata.shape, dtype=np.float32)
    x = sparse.csr_matrix(x)
    if x.nnz and not np.allclose(x.data, np.round(x.data)):
        logger.warning(
            "read_hest: counts of sample %s are not integers; HEST's st/*.h5ad should hold raw counts.", sample_id
        )
    n = adata.n_obs
    obs = pd.DataFrame(
        {
            K.REGION: pd.Categorical([spots_key] * n),
            K.INSTANCE: np.arange(n),
            K.SAMPLE: pd.Categorical([sample_id] * n),
            K.PATIENT: pd.Categorical([str(patient) if _present(patient) else sample_id] * n),
        },
        index=[f"{sample_id}_{b}" for b in adata.obs_names],
    )
    for col in (K.ARRAY_ROW, K.ARRAY_COL, "in_tissue"):
        if col in adata.obs:
            obs[col] = adata.obs[col].to_numpy()
    var = pd.DataFrame(index=pd.Index(adata.var_names.astype(str), dtype=object))
    out = ad.AnnData(X=x, obs=obs, var=var, obsm={"spatial": xy}, uns={K.UNS: {K.UNS_READER: {sample_id: reader}}})
    if out.var_names.has_duplicates:
        logger.warning("read_hest: sample %s repeats gene names; made unique with suffixes '-1', '-2', ...", sample_id)
        out.var_names_make_unique()
    return TableModel.parse(out, region=spots_key, region_key=K.REGION, instance_key=K.INSTANCE)
