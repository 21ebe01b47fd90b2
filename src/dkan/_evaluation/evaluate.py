"""``dkan.tl.evaluate``: MAE, MSE and Pearson r of predictions against targets, aggregated as the reference."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dkan import _keys as K
from dkan import _metrics as M

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")

METRICS = ("mae", "mse", "pcc_all", "pcc_hpg", "pcc_heg", "pcc_hvg")  #: paper column order
_AGGREGATION = (
    "per group: MAE/MSE over all spots x genes, Pearson r per gene across spots (NaN when constant); "
    "per fold: nanmean over groups of MAE, MSE and r per gene; PCC = nanmean over genes (or a gene set) of the "
    "fold r; summary = mean over folds (population std with several folds)."
)


@dataclass
class EvalResult:
    """Result of :func:`dkan.tl.evaluate`: tidy tables plus a record of what was done.

    Attributes
    ----------
    per_gene
        One row per group and gene: ``fold``, ``group``, ``gene``, ``pearson`` (NaN for constant vectors).
    per_sample
        One row per group: ``fold``, ``group``, ``mae``, ``mse``, ``pcc_all``, ``n_spots``, ``n_nan_genes``.
    per_fold
        One row per fold: ``fold``, ``mae``, ``mse``, ``pcc_all``, ``pcc_heg``, ``pcc_hvg`` and, with several
        folds, ``pcc_hpg``.
    fold_gene
        Fold-level r per gene (nanmean over the fold's groups): ``fold``, ``gene``, ``pearson``.
    summary
        Mean over folds of each ``per_fold`` metric (with one fold: the fold's values).
    protocol
        Parameters, gene sets, dropped genes and groups, and NaN counts.
    genes
        Genes evaluated, in column order.
    labels
        Targets of the evaluated spots (spots x ``genes``), kept so that :func:`combine_folds` can choose
        HEG/HVG on the labels of all folds, as the reference does.
    """

    per_gene: pd.DataFrame
    per_sample: pd.DataFrame
    per_fold: pd.DataFrame
    fold_gene: pd.DataFrame
    summary: pd.Series
    protocol: dict[str, Any]
    genes: list[str]
    labels: np.ndarray = field(repr=False)

    @property
    def folds(self) -> list[str]:
        """Fold labels, in order."""
        return list(self.per_fold["fold"])

    def fold_matrix(self) -> np.ndarray:
        """Fold-level r as an array of shape ``(n_folds, n_genes)`` (rows in :attr:`folds` order)."""
        fg = self.fold_gene
        rows = [fg.loc[fg["fold"] == f].set_index("gene")["pearson"].reindex(self.genes) for f in self.folds]
        return np.vstack([r.to_numpy(dtype=np.float64) for r in rows])


def _resolve_table(data: SpatialData | AnnData, table_key: str | None, pred_layer: str) -> tuple[str, AnnData]:
    """The table to evaluate: an AnnData itself, or dkan's results table of a SpatialData's table.

    The table itself is used when it has no results table, or holds ``layers[pred_layer]`` while its results
    table does not (a table the user filled).
    """
    from anndata import AnnData

    if isinstance(data, AnnData):
        return table_key or "adata", data
    if hasattr(data, "tables"):
        from dkan._results import find_results
        from dkan._utils import get_table

        found = find_results(data, table_key)
        if found is not None and pred_layer in found[1].layers:
            return found
        tkey, table = get_table(data, table_key)
        return (tkey, table) if found is None or pred_layer in table.layers else found
    raise TypeError(f"`sdata_or_adata` must be a SpatialData or an AnnData; found {type(data).__name__}.")


def _refuse_stale_target(data: Any, tname: str, adata: AnnData, target_layer: str) -> None:
    """Refuse dkan's target when the count table's counts changed since :func:`dkan.pp.normalize` wrote it.

    Only for ``layers["dkan_target"]`` of a results table in a SpatialData whose normalisation recorded the counts'
    fingerprint (a user's own layer, an AnnData or an older table is taken as it is).
    """
    from dkan._utils import results_of, uns_get

    if target_layer != K.TARGET or not hasattr(data, "tables") or target_layer not in adata.layers:
        return
    owner = results_of(adata)
    record = uns_get(adata, K.UNS_NORMALIZE)
    if owner is None or owner == tname or owner not in data.tables or not record:
        return
    from dkan.pp._normalize import FINGERPRINT, counts_fingerprint

    if record.get(FINGERPRINT) is None or "genes" not in record:
        return
    now = counts_fingerprint(
        data, list(record["genes"]), layer=record.get("layer"), smooth=bool(record.get("smooth", True)), table_key=owner
    )
    if now != record[FINGERPRINT]:
        raise ValueError(
            f"`target_layer={target_layer!r}` of table `{tname}` was normalised from other counts than table "
            f"`{owner}` holds now (its counts, spots or grid changed since `dkan.pp.normalize`); the scores would "
            f"compare predictions with a stale target. Run `dkan.pp.normalize(sdata, table_key={owner!r})` again "
            "(or `dkan.tl.predict`, which recomputes it), then evaluate."
        )


def _layer(adata: AnnData, key: str, param: str, table: str, hint: str) -> Any:
    if key not in adata.layers:
        raise KeyError(
            f"`{param}={key!r}` not found in `{table}.layers`; available layers: {sorted(adata.layers)}. {hint}"
        )
    return adata.layers[key]


def _dense(x: Any, cols: np.ndarray) -> np.ndarray:
    x = x[:, cols]
    if hasattr(x, "toarray"):
        x = x.toarray()
    return np.asarray(x, dtype=np.float32)


def _select_genes(adata: AnnData, genes: list[str] | None) -> np.ndarray:
    names = adata.var_names
    if genes is not None:
        genes = [genes] if isinstance(genes, str) else list(genes)
        missing = [g for g in genes if g not in names]
        if missing:
            raise KeyError(f"`genes` holds {len(missing)} names not in `var_names`, e.g. {missing[:5]}.")
        return names.get_indexer(genes)
    if K.PANEL in adata.var and adata.var[K.PANEL].astype(bool).any():
        logger.info("evaluate: using the %d genes of `var[%r]`.", int(adata.var[K.PANEL].sum()), K.PANEL)
        return np.flatnonzero(adata.var[K.PANEL].astype(bool).to_numpy())
    return np.arange(adata.n_vars)


def _obs_labels(adata: AnnData, key: str | None, param: str, default: str) -> np.ndarray:
    if key is None:
        return np.full(adata.n_obs, default, dtype=object)
    if key not in adata.obs:
        region_key = adata.uns.get("spatialdata_attrs", {}).get("region_key")
        if param == "groupby" and key == K.SAMPLE and region_key in adata.obs:
            logger.info("evaluate: no `obs[%r]`; grouping by the region column %r instead.", key, region_key)
            return adata.obs[region_key].astype(str).to_numpy()
        raise KeyError(f"`{param}={key!r}` is not a column of `obs`; available columns: {list(adata.obs.columns)}.")
    return adata.obs[key].astype(str).to_numpy()


def _finite_subset(
    pred: np.ndarray, target: np.ndarray, groups: np.ndarray, genes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Rows of groups that have predictions and genes finite on both sides; return masks and what was dropped."""
    no_pred = [g for g in pd.unique(groups) if not np.isfinite(pred[groups == g]).any()]
    rows = ~np.isin(groups, no_pred)
    if not rows.any():
        raise ValueError("`pred_layer` holds no finite value in any group; run `dkan.tl.predict` first.")
    cols = np.isfinite(pred[rows]).all(0) & np.isfinite(target[rows]).all(0)
    if not cols.any():
        raise ValueError("No gene has finite predictions and targets for every evaluated spot.")
    dropped = list(genes[~cols])
    if no_pred:
        logger.warning("evaluate: groups without predictions skipped: %s.", no_pred)
    if dropped:
        logger.info(
            "evaluate: %d genes without finite predictions or targets left out (outside the model panel?), e.g. %s.",
            len(dropped),
            dropped[:5],
        )
    return rows, cols, dropped, no_pred


def _per_group(
    pred: np.ndarray, target: np.ndarray, groups: np.ndarray, folds: np.ndarray, genes: np.ndarray
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Per-group errors and r; returns the per-sample table, the per-gene table and r as (groups, genes)."""
    sample_rows, gene_frames, r_sg = [], [], []
    for g in pd.unique(groups):
        idx = groups == g
        fold_of = pd.unique(folds[idx])
        if len(fold_of) > 1:
            raise ValueError(f"Group {g!r} spans several folds {list(fold_of)}; each group must lie in one fold.")
        p, t = pred[idx], target[idx]
        r, n_nan = M.pearson_per_gene(p, t)
        f = str(fold_of[0])
        sample_rows.append(
            {
                "fold": f,
                "group": str(g),
                "mae": M.mae(p, t),
                "mse": M.mse(p, t),
                "pcc_all": float(M.nanmean(r)),
                "n_spots": int(idx.sum()),
                "n_nan_genes": n_nan,
            }
        )
        gene_frames.append(pd.DataFrame({"fold": f, "group": str(g), "gene": genes, "pearson": r}))
        r_sg.append(r)
    return pd.DataFrame(sample_rows), pd.concat(gene_frames, ignore_index=True), np.vstack(r_sg)


def _fold_level(per_sample: pd.DataFrame, r_sg: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Fold labels, fold r ``(F, G)`` and fold MAE/MSE: nanmean over each fold's groups."""
    folds = list(pd.unique(per_sample["fold"]))
    r_f, mae_f, mse_f = [], [], []
    for f in folds:
        sel = (per_sample["fold"] == f).to_numpy()
        r, a, b = M.aggregate_fold(r_sg[sel], per_sample["mae"].to_numpy()[sel], per_sample["mse"].to_numpy()[sel])
        r_f.append(r)
        mae_f.append(a)
        mse_f.append(b)
    return folds, np.vstack(r_f), np.array(mae_f), np.array(mse_f)


def fold_table(
    folds: list[str],
    r_f: np.ndarray,
    mae_f: np.ndarray,
    mse_f: np.ndarray,
    gene_sets: dict[str, np.ndarray | None],
) -> pd.DataFrame:
    """Per-fold metric table from fold-level r (F, G), errors and gene-set column indices (None: skip)."""
    out = pd.DataFrame({"fold": folds, "mae": mae_f, "mse": mse_f, "pcc_all": M.fold_pcc(r_f)})
    for name in ("hpg", "heg", "hvg"):
        if gene_sets.get(name) is not None:
            out[f"pcc_{name}"] = M.fold_pcc(r_f, gene_sets[name])
    return out[[c for c in ("fold", *METRICS) if c in out]]


def evaluate(
    sdata_or_adata: SpatialData | AnnData,
    *,
    pred_layer: str = K.PRED,
    target_layer: str = K.TARGET,
    groupby: str | None = K.SAMPLE,
    genes: list[str] | None = None,
    table_key: str | None = None,
    fold: str | None = None,
    n_top: int = 50,
    nan_policy: M.NanPolicy = "reference",
) -> EvalResult:
    """Compare predictions with targets: MAE, MSE and PCC (all genes, HEG, HVG and, across folds, HPG).

    Per group (section) s: MAE_s and MSE_s over all spots x genes, and Pearson r_{s,g} across the spots of
    s for each gene (NaN when either vector is constant; counted, never set to zero). Per fold: nanmean
    over its groups. One call is one fold unless ``fold`` names an ``obs`` column. HEG/HVG are chosen on
    the targets of the evaluated spots; :func:`combine_folds` chooses them on all folds' labels instead.

    Parameters
    ----------
    sdata_or_adata
        A SpatialData (the panel-sized results table of its count table, where :func:`dkan.pp.normalize` and
        :func:`dkan.tl.predict` write; see :mod:`dkan._results`) or an AnnData.
    pred_layer
        ``layers`` key of the predictions (NaN for genes outside the model panel).
    target_layer
        ``layers`` key of the normalised observed expression.
    groupby
        ``obs`` column of the evaluation groups (sections); None evaluates all spots as one group. When the
        default ``"sample"`` column is absent, the table's region column (one group per spots element) is used.
    genes
        Genes to evaluate; default: the ``var["dkan_panel"]`` genes when flagged, else all. Genes whose
        predictions or targets are not finite are left out and listed in the protocol.
    table_key
        Count table of a SpatialData (its results table is read) or a results table; inferred when there is one.
    fold
        ``obs`` column of fold labels (each group in one fold); None: one fold.
    n_top
        Size of the HEG, HVG and HPG gene sets.
    nan_policy
        Ranking of NaN r for HPG; see :func:`dkan._metrics.hpg_rank_sum`.

    Returns
    -------
    An :class:`EvalResult`.
    """
    tname, adata = _resolve_table(sdata_or_adata, table_key, pred_layer)
    _refuse_stale_target(sdata_or_adata, tname, adata, target_layer)
    pred_raw = _layer(adata, pred_layer, "pred_layer", tname, "Run `dkan.tl.predict(sdata, model)` first.")
    target_raw = _layer(
        adata,
        target_layer,
        "target_layer",
        tname,
        "Run `dkan.pp.normalize(sdata)` (or `dkan.tl.predict`, which writes it for slides with counts) first.",
    )
    groups = _obs_labels(adata, groupby, "groupby", "all")
    folds = _obs_labels(adata, fold, "fold", "0")
    cols = _select_genes(adata, genes)
    names = np.asarray(adata.var_names[cols], dtype=object)
    pred, target = _dense(pred_raw, cols), _dense(target_raw, cols)
    rows, keep, dropped, no_pred = _finite_subset(pred, target, groups, names)
    pred, target, names = pred[rows][:, keep], target[rows][:, keep], names[keep]
    groups, folds = groups[rows], folds[rows]

    per_sample, per_gene, r_sg = _per_group(pred, target, groups, folds, names)
    fold_labels, r_f, mae_f, mse_f = _fold_level(per_sample, r_sg)
    n = min(n_top, len(names))
    sets = {
        "heg": M.top_heg(target, n),
        "hvg": M.top_hvg(target, n),
        "hpg": M.top_hpg(r_f, n, nan_policy=nan_policy) if len(fold_labels) > 1 else None,
    }
    per_fold = fold_table(fold_labels, r_f, mae_f, mse_f, sets)
    fold_gene = pd.DataFrame(
        {"fold": np.repeat(fold_labels, len(names)), "gene": np.tile(names, len(fold_labels)), "pearson": r_f.ravel()}
    )
    protocol = {
        "table_key": tname,
        "pred_layer": pred_layer,
        "target_layer": target_layer,
        "groupby": groupby,
        "fold": fold,
        "groups": list(per_sample["group"]),
        "n_folds": len(fold_labels),
        "n_genes": len(names),
        "genes_dropped_nonfinite": [str(g) for g in dropped],
        "groups_without_predictions": [str(g) for g in no_pred],
        "n_nan_pearson_group": int(per_sample["n_nan_genes"].sum()),
        "n_nan_pearson_fold": int(np.isnan(r_f).sum()),
        "n_top": n,
        "nan_policy": nan_policy,
        "gene_sets": {k: None if v is None else [str(names[i]) for i in v] for k, v in sets.items()},
        "gene_set_labels": "targets of the evaluated spots",
        "aggregation": _AGGREGATION,
    }
    if protocol["n_nan_pearson_group"]:
        logger.info("evaluate: %d (group, gene) Pearson r are NaN (constant vectors).", protocol["n_nan_pearson_group"])
    summary = per_fold.drop(columns="fold").mean(axis=0)
    summary.name = pred_layer
    return EvalResult(
        per_gene=per_gene,
        per_sample=per_sample,
        per_fold=per_fold,
        fold_gene=fold_gene,
        summary=summary,
        protocol=protocol,
        genes=[str(g) for g in names],
        labels=target,
    )
