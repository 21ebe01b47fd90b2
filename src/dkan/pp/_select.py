"""Gene panel selection: the genes a DKAN model predicts."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from dkan import _keys as K
from dkan._docs import shared_docs
from dkan._utils import check_int, get_table, uns_set

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")

_FLAVORS = ("reference", "hvg", "svg")


def _as_table(data: SpatialData | AnnData, table_key: str | None) -> AnnData:
    """The AnnData to work on: ``data`` itself, or a table of a SpatialData."""
    from anndata import AnnData

    if isinstance(data, AnnData):
        return data
    if not hasattr(data, "tables"):
        raise TypeError(f"Expected a SpatialData or AnnData, got {type(data).__name__}.")
    return get_table(data, table_key)[1]


def _counts(adata: AnnData, layer: str | None) -> sparse.csr_matrix:
    """A canonical float64 CSR copy of the counts (``X`` or ``layers[layer]``); refuses negative or fractional ones."""
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"`layer={layer!r}` not found; available layers: {sorted(adata.layers)}.")
    x = adata.X if layer is None else adata.layers[layer]
    # A copy of every array, then canonical (sorted, summed duplicates). Without copy=True scipy shares the
    # index arrays of an int CSR with the float copy, and the in-place sort that many operations trigger on a
    # non-canonical matrix (as concatenated tables often are) would scramble the user's counts.
    x = sparse.csr_matrix(x, dtype=np.float64, copy=True)
    x.sum_duplicates()
    where = "X" if layer is None else f"layers[{layer!r}]"
    if x.nnz and (x.data < 0).any():
        raise ValueError(f"`{where}` has negative values; dkan needs raw counts there. Pass `layer=` with counts.")
    _require_integer_counts(x.data, where=where, layers=list(adata.layers))
    return x


#: Values this far from the nearest integer (relative to the value, at least 1) are not counts.
_INTEGER_TOL = 1e-6


def _require_integer_counts(values: np.ndarray, *, where: str, layers: list[str]) -> None:
    """Refuse non-integer "raw counts" (normalised or log-transformed values), checked in chunks of the nonzeros.

    Normalising such values again (library size, log) gives a target on another scale without any error, so
    they are refused with the layers that might hold the counts.
    """
    step = 1 << 22
    for start in range(0, len(values), step):
        chunk = values[start : start + step]
        off = np.abs(chunk - np.rint(chunk)) > _INTEGER_TOL * np.maximum(1.0, np.abs(chunk))
        if not off.any():
            continue
        examples = ", ".join(f"{v:.4g}" for v in np.unique(chunk[off])[:3])
        looks = "log-transformed" if float(chunk.max()) < 30 else "normalised or scaled"
        raise ValueError(
            f"`{where}` holds non-integer values (e.g. {examples}) that look {looks}, not raw counts; dkan "
            "normalises raw integer counts itself. Pass `layer=` naming a layer of raw counts to "
            f"`dkan.pp.select_genes`/`dkan.pp.normalize` (layers here: {sorted(layers)}), or put the raw counts in "
            "`X` (which `train` and `predict` read unless `normalize` ran with `layer=`). Counts that are fractional "
            "by design (e.g. ambient-corrected) can be rounded into a layer first, e.g. "
            "`table.layers['counts'] = table.X.rint()` (sparse `X`) or `np.rint(table.X)` (dense)."
        )


def _valid_genes(adata: AnnData) -> np.ndarray:
    """Boolean mask of genes with a usable, unique name (duplicated or missing names are excluded)."""
    names = pd.Series(adata.var_names.astype(str), index=range(adata.n_vars))
    missing = names.str.strip().isin(["", "nan", "None", "NA"]).to_numpy()
    dup = names.duplicated(keep=False).to_numpy()
    if missing.any() or dup.any():
        logger.warning(
            "select_genes: excluding %d gene(s) with missing names and %d with duplicated names (e.g. %s); "
            "run `table.var_names_make_unique()` to keep them",
            int(missing.sum()),
            int(dup.sum()),
            list(names[dup].unique()[:3]),
        )
    return ~(missing | dup)


@shared_docs
def select_genes(
    data: SpatialData | AnnData,
    *,
    n_genes: int = 250,
    flavor: Literal["reference", "hvg", "svg"] = "reference",
    min_fraction: float = 0.1,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    table_key: str | None = None,
    key_added: str = K.PANEL,
    inplace: bool = True,
    gene_symbols: str | None = None,
) -> pd.DataFrame | None:
    """Choose the gene panel a model predicts.

    Genes detected (count > 0) in at least ``min_fraction`` of all spots (over all samples) are candidates;
    genes with duplicated or missing names are never selected. The candidates are then ranked by

    - ``"reference"`` (the DKAN/TRIPLEX rule): total counts over all spots;
    - ``"hvg"``: normalised dispersion of Seurat's method (:func:`scanpy.pp.highly_variable_genes` with
      ``flavor="seurat"``) on a library-size-normalised (1e4), ``log1p`` copy of the counts, per sample
      (``batch_key``) when there are several; ranked by the number of samples where the gene is highly
      variable, then by mean normalised dispersion;
    - ``"svg"``: Moran's I (:func:`squidpy.gr.spatial_autocorr`) on the same log-normalised copy, computed
      per sample on a spatial nearest-neighbour graph (8 neighbours on a square grid, 6 on a hex grid) of
      ``obsm["spatial"]``, averaged over samples;

    and the ``n_genes`` best form the panel, in descending rank order.

    Parameters
    ----------
    data
        SpatialData (its table is used) or AnnData with raw counts.
    n_genes
        Panel size.
    flavor
        Ranking rule, see above.
    min_fraction
        Minimum fraction of spots in which a candidate gene is detected.
    genes
        A fixed panel (e.g. a trained model's), in order; skips selection. Genes absent from the table are
        reported and left out of the ``var`` flag, but kept in the recorded order.
    layer
        Layer holding raw (integer) counts; default ``X``. Non-integer values are refused (ValueError).
    {table_key_any}
    key_added
        ``var`` column of the panel flag.
    inplace
        Write ``var[key_added]`` and ``uns["dkan"]["panel"]`` (the flavor, parameters and the ordered gene
        list); otherwise return the result.
    gene_symbols
        ``var`` column holding gene symbols, when ``var_names`` are other ids (e.g. Ensembl ids): ``genes`` and
        the recorded panel are then symbols (scanpy's name for the same option).

    Returns
    -------
    With ``inplace=False``, a DataFrame indexed by gene with columns ``key_added`` (bool), ``rank``
    (0 = best, NaN outside the panel), ``score`` (the ranking statistic) and ``detected_fraction``.
    """
    if flavor not in _FLAVORS:
        raise ValueError(f"`flavor={flavor!r}` is not one of {_FLAVORS}.")
    adata = _as_table(data, table_key)
    if gene_symbols is not None:
        from dkan._symbols import use_symbols

        with use_symbols(adata, gene_symbols):
            return select_genes(
                adata,
                n_genes=n_genes,
                flavor=flavor,
                min_fraction=min_fraction,
                genes=genes,
                layer=layer,
                key_added=key_added,
                inplace=inplace,
            )
    if genes is not None:
        return _fixed_panel(adata, list(genes), key_added=key_added, inplace=inplace)
    n_genes = check_int(n_genes, "n_genes")
    if isinstance(min_fraction, bool) or not isinstance(min_fraction, int | float | np.integer | np.floating):
        raise TypeError(f"`min_fraction` must be a number in [0, 1]; found {type(min_fraction).__name__}.")
    if not 0 <= min_fraction <= 1:
        raise ValueError(f"`min_fraction={min_fraction}` must lie in [0, 1].")
    x = _counts(adata, layer)
    detected = np.asarray((x > 0).mean(axis=0)).ravel() if adata.n_obs else np.zeros(adata.n_vars)
    candidate = _valid_genes(adata) & (detected >= min_fraction)
    n_cand = int(candidate.sum())
    if n_genes > n_cand:
        raise ValueError(
            f"`n_genes={n_genes}` but only {n_cand} of {adata.n_vars} genes are uniquely named and detected in "
            f">= {min_fraction:.0%} of spots; lower `n_genes` or `min_fraction`."
        )
    idx = np.flatnonzero(candidate)
    if flavor == "reference":
        score = np.asarray(x[:, idx].sum(axis=0)).ravel()
        order = np.lexsort((np.arange(len(idx)), -score))
    elif flavor == "hvg":
        score, order = _rank_hvg(adata, x, idx, n_genes)
    else:
        score, order = _rank_svg(adata, x, idx)
    chosen = idx[order[:n_genes]]
    result = pd.DataFrame(
        {key_added: False, "rank": np.nan, "score": np.nan, "detected_fraction": detected}, index=adata.var_names
    )
    result.iloc[idx, result.columns.get_loc("score")] = score
    result.iloc[chosen, result.columns.get_loc(key_added)] = True
    result.iloc[chosen, result.columns.get_loc("rank")] = np.arange(n_genes, dtype=float)
    panel = [str(g) for g in adata.var_names[chosen]]
    logger.info("select_genes: %d-gene panel (%s) from %d candidates; top: %s", n_genes, flavor, n_cand, panel[:5])
    if not inplace:
        return result
    adata.var[key_added] = result[key_added].to_numpy()
    params = {"flavor": flavor, "n_genes": int(n_genes), "min_fraction": float(min_fraction), "layer": layer}
    uns_set(adata, K.UNS_PANEL, {**params, "key_added": key_added, "n_candidates": n_cand, "genes": panel})
    return None


def _fixed_panel(adata: AnnData, genes: list[str], *, key_added: str, inplace: bool) -> pd.DataFrame | None:
    if not genes:
        raise ValueError("`genes` is empty; pass the panel's gene names, or `genes=None` to select them.")
    if len(set(genes)) != len(genes):
        raise ValueError("`genes` lists some genes twice; a panel must be unique.")
    present = pd.Index(adata.var_names).get_indexer(genes)
    missing = [g for g, i in zip(genes, present, strict=True) if i < 0]
    if missing:
        logger.warning("select_genes: %d panel gene(s) are not in the table, e.g. %s", len(missing), missing[:5])
    flag = np.zeros(adata.n_vars, bool)
    rank = np.full(adata.n_vars, np.nan)
    ok = present >= 0
    flag[present[ok]] = True
    rank[present[ok]] = np.flatnonzero(ok)
    if not inplace:
        return pd.DataFrame({key_added: flag, "rank": rank}, index=adata.var_names)
    adata.var[key_added] = flag
    uns_set(
        adata,
        K.UNS_PANEL,
        {"flavor": "given", "n_genes": len(genes), "key_added": key_added, "genes": genes, "missing": missing},
    )
    return None


def _log_normalised(adata: AnnData, x: sparse.csr_matrix, idx: np.ndarray) -> AnnData:
    """A light AnnData of ``log1p(1e4 * counts / library size)`` over the candidate genes (library: all genes)."""
    import anndata as ad

    lib = np.asarray(x.sum(axis=1)).ravel()
    scale = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
    y = sparse.diags(scale) @ x[:, idx]
    y = y.tocsr()
    y.data = np.log1p(y.data)
    tmp = ad.AnnData(X=y, obs=pd.DataFrame(index=adata.obs_names), var=pd.DataFrame(index=adata.var_names[idx]))
    if "spatial" in adata.obsm:
        tmp.obsm["spatial"] = np.asarray(adata.obsm["spatial"])
    return tmp


def _sample_labels(adata: AnnData) -> np.ndarray:
    """Per-spot sample label: ``obs["sample"]``, else the table's region column, else one sample."""
    if K.SAMPLE in adata.obs:
        return adata.obs[K.SAMPLE].astype(str).to_numpy()
    attrs = adata.uns.get("spatialdata_attrs") or {}
    rk = attrs.get("region_key")
    if rk is not None and rk in adata.obs:
        return adata.obs[rk].astype(str).to_numpy()
    return np.full(adata.n_obs, "sample")


def _rank_hvg(adata: AnnData, x: sparse.csr_matrix, idx: np.ndarray, n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    import scanpy as sc

    tmp = _log_normalised(adata, x, idx)
    labels = _sample_labels(adata)
    batch = None
    if len(np.unique(labels)) > 1:
        tmp.obs["batch"] = pd.Categorical(labels)
        batch = "batch"
    res = sc.pp.highly_variable_genes(tmp, flavor="seurat", n_top_genes=n_genes, batch_key=batch, inplace=False)
    if set(res.index) == set(tmp.var_names):  # align to the candidate order whatever scanpy returns
        res = res.reindex(tmp.var_names)
    disp = np.nan_to_num(res["dispersions_norm"].to_numpy(dtype=float), nan=-np.inf)
    nb = res["highly_variable_nbatches"].to_numpy() if batch else np.zeros(len(idx))
    order = np.lexsort((np.arange(len(idx)), -disp, -nb))
    return res["dispersions_norm"].to_numpy(dtype=float), order


def _rank_svg(adata: AnnData, x: sparse.csr_matrix, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    try:
        import squidpy as sq
    except ImportError as err:  # an optional dependency: only this flavour needs it
        raise ImportError(
            "`flavor='svg'` needs squidpy (Moran's I); install it with `pip install 'dkan[svg]'` or pick "
            "`flavor='hvg'`."
        ) from err

    from dkan._utils import grid_coords
    from dkan.pp._grid import detect_grid

    if "spatial" not in adata.obsm:
        raise KeyError("`flavor='svg'` needs spot coordinates in `obsm['spatial']`; the table has none.")
    tmp = _log_normalised(adata, x, idx)
    labels = _sample_labels(adata)
    scores = []
    for lab in pd.unique(labels):
        sub = tmp[labels == lab].copy()
        if sub.n_obs < 3:
            logger.warning("select_genes: sample %s has %d spots; skipped for Moran's I", lab, sub.n_obs)
            continue
        grid = "hex"
        if {K.ARRAY_ROW, K.ARRAY_COL} <= set(adata.obs):
            grid = detect_grid(grid_coords(adata.obs.loc[labels == lab], table_key=None))
        n_neighs = min(8 if grid == "square" else 6, sub.n_obs - 1)
        # k nearest neighbours in Euclidean space; the same graph as the deprecated
        # `spatial_neighbors(coord_type="generic", n_neighs=...)` (squidpy >= 1.8.2, the `svg` extra's floor)
        sq.gr.spatial_neighbors_knn(sub, spatial_key="spatial", n_neighs=n_neighs)
        df = sq.gr.spatial_autocorr(sub, mode="moran", n_perms=None, copy=True, show_progress_bar=False)
        scores.append(df["I"].reindex(sub.var_names).to_numpy(dtype=float))
    if not scores:
        raise ValueError("`flavor='svg'` needs at least one sample with 3 or more spots.")
    stack = np.vstack(scores)
    n_ok = np.isfinite(stack).sum(axis=0)
    score = np.where(n_ok > 0, np.nansum(stack, axis=0) / np.maximum(n_ok, 1), np.nan)
    order = np.lexsort((np.arange(len(idx)), -np.nan_to_num(score, nan=-np.inf)))
    return score, order
