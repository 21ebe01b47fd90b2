"""The results table: one panel-sized table per count table that holds everything dkan computes for its spots.

A count table (the user's AnnData of spots x genes) is never widened: dkan adds only ``var["dkan_panel"]`` (and
the panel record in its ``uns``). Targets, predictions, gene embeddings, frozen features, tile geometry and their
provenance live in the table ``f"{table_key}_dkan"`` instead, whose ``var`` is the gene panel (in panel order,
plus any genes a prediction asked for) and whose rows are the count table's rows (same ``obs_names``, same
region / instance columns, so it annotates the same spots). Memory is O(spots x panel), not O(spots x genes).

A table created by dkan on an H&E-only slide (:func:`dkan.tl.make_spots`, :func:`dkan.tl.predict`) has no
counts; it is its own results table. Both kinds carry ``uns["dkan"]["results_of"]`` (the count table's name),
which :func:`dkan._utils.get_table` uses to skip results tables when it infers the count table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from dkan import _keys as K
from dkan._utils import get_table, results_of, table_attrs

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")

#: ``obs`` columns copied from the count table (besides its region and instance columns).
OBS_COLUMNS = (K.SAMPLE, K.PATIENT, K.ARRAY_ROW, K.ARRAY_COL)


def results_key(table_key: str) -> str:
    """Name of the results table of count table ``table_key``."""
    return f"{table_key}{K.RESULTS_SUFFIX}"


def mark(adata: AnnData, owner: str) -> None:
    """Mark ``adata`` as the results table of count table ``owner``."""
    adata.uns.setdefault(K.UNS, {})[K.UNS_RESULTS_OF] = owner


def results_table(sdata: SpatialData, table_key: str | None = None, *, create: bool = False) -> tuple[str, AnnData]:
    """Return ``(name, table)`` of the results table of a count table, creating it when asked.

    Parameters
    ----------
    sdata
        The SpatialData.
    table_key
        The count table (inferred when the SpatialData holds one besides dkan's results tables), or the name of a
        results table itself.
    create
        Create an empty results table (``var`` = the count table's panel, no layers) when there is none.

    Returns
    -------
    The results table's name and the table (an element of ``sdata.tables``).
    """
    tkey, table = get_table(sdata, table_key)
    owner = results_of(table)
    if owner is not None and (owner == tkey or owner in sdata.tables):
        return tkey, table  # an H&E-only table dkan made, or a results table named directly
    rkey = results_key(tkey)
    if rkey in sdata.tables:
        res = sdata.tables[rkey]
        if results_of(res) != tkey:
            raise ValueError(
                f"Table `{rkey}` exists but is not dkan's results table of `{tkey}` (`uns['{K.UNS}']['"
                f"{K.UNS_RESULTS_OF}']` = {results_of(res)!r}); rename or delete it: `del sdata.tables[{rkey!r}]`."
            )
        _check_rows(res, table, rkey, tkey)
        return rkey, res
    if not create:
        raise KeyError(
            f"Table `{tkey}` has no results table `{rkey}` yet; run `dkan.pp.normalize`, `dkan.tl.tile`, "
            "`dkan.tl.extract_features` or `dkan.tl.predict` first."
        )
    sdata.tables[rkey] = _new(table, tkey, panel_of(table))
    logger.info("Created the results table `%s` (panel-sized) for the spots of table `%s`.", rkey, tkey)
    return rkey, sdata.tables[rkey]


def find_results(sdata: SpatialData, table_key: str | None = None) -> tuple[str, AnnData] | None:
    """The results table of ``table_key`` when it exists, else None (never creates one)."""
    try:
        return results_table(sdata, table_key, create=False)
    except KeyError:
        return None


def panel_of(table: AnnData) -> list[str]:
    """The panel genes of a count table, in the recorded panel order (empty without ``var["dkan_panel"]``)."""
    if K.PANEL not in table.var:
        return []
    flag = table.var[K.PANEL].to_numpy(bool)
    chosen = set(table.var_names[flag])
    rec = table.uns.get(K.UNS, {}).get(K.UNS_PANEL) or {}
    ordered = [str(g) for g in rec.get("genes", []) if g in chosen]
    return ordered if len(ordered) == len(chosen) else [str(g) for g in table.var_names[flag]]


def ensure_genes(sdata: SpatialData, key: str, genes: Sequence[str], *, panel: bool | None = None) -> AnnData:
    """Grow the results table ``key`` so that ``var`` holds ``genes`` (appended in order); returns the table.

    Existing layers keep their values and get NaN columns, ``varm`` NaN rows, ``X`` zero columns. New genes get
    ``var["dkan_panel"] = panel`` (``None``: False); with ``panel=True`` existing genes among ``genes`` are
    flagged too.
    """
    res = sdata.tables[key]
    genes = [str(g) for g in dict.fromkeys(genes)]
    new = [g for g in genes if g not in res.var_names]
    if new:
        res = _grown(res, new)
        sdata.tables[key] = res
        res = sdata.tables[key]
    if K.PANEL not in res.var:
        res.var[K.PANEL] = False
    if panel:
        res.var.loc[genes, K.PANEL] = True
    return res


def _grown(res: AnnData, new: list[str]) -> AnnData:
    """A copy of ``res`` with ``new`` genes appended (NaN layers / varm, zero X)."""
    import anndata as ad
    import pandas as pd
    from scipy import sparse
    from spatialdata.models import TableModel

    n, k = res.n_obs, len(new)
    added = pd.DataFrame(index=pd.Index(new, dtype=object))
    if K.PANEL in res.var:
        added[K.PANEL] = False  # keeps the column boolean
    var = pd.concat([res.var, added])
    layers = {name: np.hstack([_dense(x), np.full((n, k), np.nan, np.float32)]) for name, x in res.layers.items()}
    varm = {
        name: np.vstack([np.asarray(m), np.full((k, *np.shape(m)[1:]), np.nan, np.float32)])
        for name, m in res.varm.items()
    }
    x = sparse.hstack([sparse.csr_matrix(res.X) if res.X is not None else sparse.csr_matrix((n, res.n_vars)),
                       sparse.csr_matrix((n, k), dtype=np.float32)]).tocsr()  # fmt: skip
    uns = dict(res.uns)
    attrs = uns.pop("spatialdata_attrs")
    out = ad.AnnData(
        X=x.astype(np.float32), obs=res.obs.copy(), var=var, obsm=dict(res.obsm), varm=varm, layers=layers, uns=uns
    )
    return TableModel.parse(
        out, region=attrs["region"], region_key=attrs["region_key"], instance_key=attrs["instance_key"]
    )


def _dense(x: object) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


def _new(table: AnnData, tkey: str, genes: list[str]) -> AnnData:
    """An empty results table over the rows of ``table`` with ``var`` = ``genes``."""
    import anndata as ad
    import pandas as pd
    from scipy import sparse
    from spatialdata.models import TableModel

    regions, region_key, instance_key = table_attrs(table, table_key=tkey)
    cols = [c for c in dict.fromkeys([region_key, instance_key, *OBS_COLUMNS]) if c in table.obs]
    obsm = {K.SPATIAL: np.asarray(table.obsm[K.SPATIAL])} if K.SPATIAL in table.obsm else {}
    var = pd.DataFrame({K.PANEL: np.ones(len(genes), dtype=bool)}, index=pd.Index(genes, dtype=object))
    out = ad.AnnData(
        X=sparse.csr_matrix((table.n_obs, len(genes)), dtype=np.float32),
        obs=table.obs[cols].copy(),
        var=var,
        obsm=obsm,
        uns={K.UNS: {K.UNS_RESULTS_OF: tkey}},
    )
    return TableModel.parse(out, region=regions, region_key=region_key, instance_key=instance_key)


def _check_rows(res: AnnData, table: AnnData, rkey: str, tkey: str) -> None:
    """Refuse a results table whose rows are no longer the count table's rows."""
    if res.n_obs != table.n_obs or not res.obs_names.equals(table.obs_names):
        raise ValueError(
            f"The results table `{rkey}` ({res.n_obs} rows) no longer matches the spots of table `{tkey}` "
            f"({table.n_obs} rows): the count table was changed after dkan wrote its results. Delete the stale "
            f"results with `del sdata.tables[{rkey!r}]` and rerun the dkan steps."
        )


def check_bare_anndata(adata: AnnData, genes: Sequence[str], *, func: str) -> None:
    """Refuse writing a panel-sized result into a bare AnnData whose ``var`` is wider than ``genes``."""
    if set(map(str, genes)) == set(map(str, adata.var_names)):
        return
    raise TypeError(
        f"`{func}(adata, inplace=True)` on a bare AnnData with {adata.n_vars} genes would widen it with a "
        f"{len(genes)}-gene result padded with NaN; dkan keeps results panel-sized. Pass the SpatialData (results go "
        f"to its panel-sized table `<table_key>{K.RESULTS_SUFFIX}`), use `inplace=False` to get the "
        f"(n_obs x {len(genes)}) matrix, or call it on `adata[:, genes].copy()`."
    )
