"""Expression normalisation to the DKAN training target."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from dkan import _keys as K
from dkan._docs import shared_docs
from dkan._utils import grid_coords, uns_get, uns_set
from dkan.pp._grid import detect_grid, neighbour_average
from dkan.pp._select import _as_table, _counts, _sample_labels

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")

_LOGS = ("log10", "log1p", None)
#: Field of ``uns["dkan"]["normalize"]``: SHA-256 of what the target was computed from (see :func:`counts_fingerprint`).
FINGERPRINT = "counts_sha256"


def _panel_genes(adata: AnnData, genes: Sequence[str] | None) -> list[str]:
    if genes is not None:
        genes = [str(g) for g in genes]
        missing = [g for g in genes if g not in adata.var_names]
        if missing:
            raise KeyError(
                f"`genes` names {len(missing)} gene(s) absent from the table, e.g. {missing[:5]}; pass genes of "
                "`var_names` only."
            )
        return genes
    if K.PANEL in adata.var:
        rec = uns_get(adata, K.UNS_PANEL) or {}
        flag = adata.var[K.PANEL].to_numpy(bool)
        ordered = [g for g in rec.get("genes", []) if g in set(adata.var_names[flag])]
        return ordered if len(ordered) == flag.sum() else [str(g) for g in adata.var_names[flag]]
    logger.warning(
        "normalize: no gene panel (`var[%r]`); using all %d genes. Run `dkan.pp.select_genes` first to "
        "normalise over the panel as DKAN does.",
        K.PANEL,
        adata.n_vars,
    )
    return [str(g) for g in adata.var_names]


@shared_docs
def normalize(
    data: SpatialData | AnnData,
    *,
    genes: Sequence[str] | None = None,
    target_sum: float | None = 1e4,
    log: Literal["log10", "log1p"] | None = "log10",
    smooth: bool = True,
    grid: Literal["square", "hex"] | None = None,
    layer: str | None = None,
    table_key: str | None = None,
    key_added: str = K.TARGET,
    inplace: bool = True,
) -> np.ndarray | None:
    """Normalise raw counts to the DKAN training target.

    The defaults reproduce the reference code exactly, per sample (never across samples):

    1. restrict the counts to the panel genes; the library size is the sum over those genes only;
    2. scale each spot to ``target_sum`` (``None``: skip);
    3. take ``log10(1 + x)`` (the reference, via ``scprep.transform.log``), ``log1p`` (natural log, as in
       scanpy and TRIPLEX on HEST) or nothing (``None``);
    4. replace each spot by the mean of itself and the existing spots among its immediate grid neighbours
       (``smooth``): the 8 neighbours at array row/col +-1 on the square legacy ST grid, the 6 neighbours
       (same row, col +-2; rows +-1, col +-1) on the Visium hex grid.

    Spots with zero library size stay zero (before smoothing) and are reported in a warning.

    Parameters
    ----------
    data
        SpatialData (its table is used) or AnnData with raw counts.
    genes
        Genes to normalise over; default the panel of ``var["dkan_panel"]`` (in the recorded panel order),
        else all genes, with a warning.
    target_sum
        Library size every spot is scaled to.
    log
        Log transform, see above.
    smooth
        Average each spot with its grid neighbours (needs ``obs["array_row"]`` and ``obs["array_col"]``).
    grid
        ``"square"`` or ``"hex"``; default: detected per sample from the array coordinates.
    layer
        Layer holding raw (integer) counts; default ``X``. Non-integer values (normalised or log-transformed data)
        are refused with a ValueError.
    {table_key_any}
    key_added
        ``layers`` key of the result.
    inplace
        Write ``layers[key_added]`` and ``uns["dkan"]["normalize"]``; otherwise return the matrix. On a
        SpatialData they go to the panel-sized results table ``f"{table_key}_dkan"`` (created when missing; its
        ``var`` grows by the normalised genes it lacks), never to the count table. On a bare AnnData they are
        written only when the normalised genes are all of its genes (the layer follows ``var`` order); a wider
        AnnData is a TypeError (pass the SpatialData, ``inplace=False`` or ``adata[:, genes].copy()``).

    Returns
    -------
    With ``inplace=False``, the float32 matrix ``(n_obs, n_genes)`` of the normalised genes, columns in panel order
    (``genes`` as given, else the recorded panel order); memory grows with the panel, never with all genes.
    """
    if log not in _LOGS:
        raise ValueError(f"`log={log!r}` is not one of {_LOGS}.")
    if target_sum is not None and not target_sum > 0:
        raise ValueError(f"`target_sum={target_sum}` must be positive (or None to skip scaling).")
    if grid not in ("square", "hex", None):
        raise ValueError(f"`grid={grid!r}` must be 'square', 'hex' or None (detect).")
    adata = _as_table(data, table_key)
    panel = _panel_genes(adata, genes)
    gidx = adata.var_names.get_indexer(panel)
    x = _counts(adata, layer)[:, gidx]
    _require_finite_counts(x, adata, panel, layer=layer, table=_table_name(data, table_key))
    if smooth and not {K.ARRAY_ROW, K.ARRAY_COL} <= set(adata.obs):
        raise KeyError(
            f"`smooth=True` needs grid coordinates in `obs[{K.ARRAY_ROW!r}]` and `obs[{K.ARRAY_COL!r}]`; found "
            f"{list(adata.obs.columns)}. Add them (Visium: from the tissue positions file) or pass `smooth=False`."
        )
    rc_all = grid_coords(adata.obs, table_key=_table_name(data, table_key)) if smooth else None
    out = np.zeros((adata.n_obs, len(panel)), dtype=np.float32)
    labels = _sample_labels(adata)
    grids: dict[str, str] = {}
    n_zero = 0
    for lab in pd.unique(labels):
        rows = np.flatnonzero(labels == lab)
        y, z = _scale_log(x[rows], target_sum, log)
        n_zero += z
        if smooth:
            rc = rc_all[rows]
            grids[str(lab)] = grid or detect_grid(rc)
            y = neighbour_average(rc, grids[str(lab)]) @ y
        out[rows] = y
    if n_zero:
        logger.warning("normalize: %d spot(s) have no counts over the %d genes; set to 0", n_zero, len(panel))
    if not inplace:
        return out
    params = {
        "genes": panel,
        "target_sum": target_sum,
        "log": log,
        "pseudocount": 1.0 if log else None,
        "library_size": "panel genes" if genes is not None or K.PANEL in adata.var else "all genes",
        "smooth": bool(smooth),
        "grid": grids,
        "layer": layer,
        "key_added": key_added,
        "per_sample": True,
        "n_zero_library": int(n_zero),
        FINGERPRINT: _fingerprint(x, adata, labels, rc_all),
    }
    _write(data, adata, table_key, panel, out, key_added=key_added, params=params)
    return None


def counts_fingerprint(
    data: SpatialData | AnnData,
    genes: Sequence[str],
    *,
    layer: str | None = None,
    smooth: bool = True,
    table_key: str | None = None,
) -> str:
    """SHA-256 of what :func:`normalize` reads from a table.

    That is the counts of ``genes`` (in order), the spot names and samples and, with ``smooth``, the grid
    positions. :func:`normalize` records it in ``uns["dkan"]["normalize"]["counts_sha256"]``; a target whose fingerprint
    differs from the table's current one was computed from other counts and is recomputed by ``train`` and
    ``predict``.
    """
    adata = _as_table(data, table_key)
    gidx = adata.var_names.get_indexer([str(g) for g in genes])
    if (gidx < 0).any():
        return "genes missing"
    rc = grid_coords(adata.obs, table_key=None) if smooth else None
    return _fingerprint(_counts(adata, layer)[:, gidx], adata, _sample_labels(adata), rc)


def _fingerprint(x: sparse.csr_matrix, adata: AnnData, labels: np.ndarray, rc: np.ndarray | None) -> str:
    import hashlib

    x = sparse.csr_matrix(x)
    h = hashlib.sha256()
    h.update(np.asarray(x.shape, dtype=np.int64).tobytes())
    for part in (x.indptr, x.indices):
        h.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(x.data, dtype=np.float64).tobytes())
    for names in (adata.obs_names, labels):
        h.update("\x1f".join(map(str, names)).encode())
    h.update(b"no grid" if rc is None else np.ascontiguousarray(rc, dtype=np.int64).tobytes())
    return h.hexdigest()


def _write(
    data: SpatialData | AnnData,
    adata: AnnData,
    table_key: str | None,
    panel: list[str],
    out: np.ndarray,
    *,
    key_added: str,
    params: dict,
) -> None:
    """Write the panel-sized target: to the results table of a SpatialData, or into a bare AnnData of those genes."""
    from dkan._results import check_bare_anndata, ensure_genes, results_table

    if hasattr(data, "tables"):
        rkey, _ = results_table(data, table_key, create=True)
        target = ensure_genes(data, rkey, panel, panel=True)
    else:
        check_bare_anndata(adata, panel, func="dkan.pp.normalize")
        target = adata
    cols = target.var_names.get_indexer(panel)
    if cols.tolist() == list(range(target.n_vars)):
        full = out
    else:
        full = np.full((target.n_obs, target.n_vars), np.nan, dtype=np.float32)
        full[:, cols] = out
    target.layers[key_added] = full
    uns_set(target, K.UNS_NORMALIZE, params)


def _table_name(data: SpatialData | AnnData, table_key: str | None) -> str:
    from dkan._utils import get_table

    return get_table(data, table_key)[0] if hasattr(data, "tables") else "(the AnnData passed)"


def _require_finite_counts(
    x: sparse.csr_matrix, adata: AnnData, genes: list[str], *, layer: str | None, table: str
) -> None:
    """Refuse ``inf``/``NaN`` counts: one would make its spot's library infinite (a NaN target) or silently zero."""
    bad = ~np.isfinite(x.data)
    if not bad.any():
        return
    coo = x.tocoo()
    first = int(np.flatnonzero(~np.isfinite(coo.data))[0])
    where = "X" if layer is None else f"layers[{layer!r}]"
    raise ValueError(
        f"`{where}` of table {table!r} holds {int(bad.sum())} non-finite count(s) among the genes to normalise, "
        f"e.g. {coo.data[first]} at spot {adata.obs_names[coo.row[first]]!r}, gene {genes[coo.col[first]]!r}. "
        "dkan needs finite raw counts: fix or drop those spots/genes (or pass `genes=` without them)."
    )


def _scale_log(x: sparse.csr_matrix, target_sum: float | None, log: str | None) -> tuple[np.ndarray, int]:
    """Library-size scaling and log of one sample; returns the dense result and the number of empty spots.

    Scaling is :func:`scanpy.pp.normalize_total` (empty spots stay zero), the log :func:`scanpy.pp.log1p` with
    ``base=10`` for ``"log10"`` (the reference's ``log10(1 + x)``); in float64, so the float32 result is the same
    as the former hand-written division and log.
    """
    import warnings

    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(np.asarray(x.todense(), dtype=np.float64))
    zero = int((adata.X.sum(axis=1) == 0).sum())
    if target_sum is not None:
        with warnings.catch_warnings():  # normalize() reports empty spots itself, with the gene panel
            warnings.filterwarnings("ignore", message="Some cells have zero counts", category=UserWarning)
            sc.pp.normalize_total(adata, target_sum=target_sum)
    if log is not None:
        sc.pp.log1p(adata, base=10 if log == "log10" else None)
    return np.asarray(adata.X), zero
