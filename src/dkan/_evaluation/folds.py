"""Gene panel and gene sets chosen per fold on the training samples only (never on the test samples).

The reference chooses its panel and its HEG/HVG sets on every section of a dataset, test sections included. Here
each fold chooses them on its training samples: the panel by the reference rule of :func:`dkan.pp.select_genes`
over the training spots' counts, HEG and HVG (:func:`~dkan._metrics.top_heg`, ``top_hvg``) on the
training spots' normalised targets over that panel. Test-section metrics are then computed over the fold's panel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dkan import _keys as K

if TYPE_CHECKING:
    from anndata import AnnData

    from dkan._evaluation.combine import CVSummary

logger = logging.getLogger("dkan")

#: The rule, as the reports and docs state it.
RULE = (
    "chosen per fold on the training sections only: the panel by the reference rule (detected in >= 10 % of the "
    "training spots, top by total counts over them), HEG and HVG on the training spots' normalised targets"
)


def training_panel(
    tables: Sequence[AnnData], rows: Sequence[np.ndarray], n_genes: int, *, layer: str | None = None
) -> list[str]:
    """The reference-rule panel of the training spots: ``rows[t]`` of count table ``tables[t]`` (genes shared by all).

    Parameters
    ----------
    tables
        Count tables.
    rows
        Per table, the integer rows (spots) of the training samples; empty arrays are allowed.
    n_genes
        Panel size (capped by the genes shared by the tables).
    layer
        Layer of raw counts; default ``X``.

    Returns
    -------
    Panel genes in rank order.
    """
    import anndata as ad

    from dkan.pp._select import select_genes

    parts = []
    for t, r in zip(tables, rows, strict=True):
        r = np.asarray(r, dtype=np.int64)
        if len(r):
            x = t.layers[layer] if layer is not None else t.X
            parts.append(
                ad.AnnData(X=x[r], var=pd.DataFrame(index=t.var_names), obs=pd.DataFrame(index=t.obs_names[r]))
            )
    if not parts:
        raise ValueError("`rows` select no training spot; a fold needs training samples to choose its panel.")
    both = ad.concat(parts, join="inner") if len(parts) > 1 else parts[0]
    both.obs_names_make_unique()
    n = min(n_genes, both.n_vars)
    select_genes(both, n_genes=n, flavor="reference")
    return list(both.var_names[both.var[K.PANEL].to_numpy(bool)])


def training_gene_sets(train_labels: np.ndarray, genes: Sequence[str], n_top: int = 50) -> dict[str, list[str]]:
    """HEG and HVG chosen on the training labels (spots x ``genes``) of a fold."""
    from dkan import _metrics as M

    y = np.asarray(train_labels, dtype=np.float64)
    n = min(n_top, len(genes))
    return {"heg": [genes[j] for j in M.top_heg(y, n)], "hvg": [genes[j] for j in M.top_hvg(y, n)]}


def summarise_folds(
    preds: dict[str, np.ndarray],
    target: np.ndarray,
    obs: pd.DataFrame,
    genes: list[str],
    fold_genes: list[list[str]],
    fold_sets: list[dict[str, list[str]]],
    *,
    n_top: int = 50,
) -> CVSummary:
    """Per-fold metrics over each fold's own panel, HEG/HVG from each fold's training sets, HPG on shared genes.

    ``preds`` and ``target`` are ``(n_spots, len(genes))`` with NaN outside a fold's panel; ``obs`` has
    ``sample`` and ``fold`` columns. HPG (test-selected, as in the reference) uses the genes of every fold's panel.
    """
    import anndata as ad

    from dkan import _metrics as M
    from dkan._evaluation.combine import CVSummary, _summarise
    from dkan._evaluation.evaluate import evaluate

    col = {g: j for j, g in enumerate(genes)}
    shared = [g for g in genes if all(g in set(fg) for fg in fold_genes)]
    frames, gene_frames, hpg_sets = [], [], {}
    for method, p in preds.items():
        rows, r_shared = [], []
        for f, (fg, sets) in enumerate(zip(fold_genes, fold_sets, strict=True)):
            spots = obs["fold"].to_numpy() == f
            cols = [col[g] for g in fg]
            sub = obs[spots].reset_index(drop=True)
            adata = ad.AnnData(
                X=target[spots][:, cols], obs=sub.set_axis(sub.index.astype(str)), var=pd.DataFrame(index=fg)
            )
            adata.layers["pred"], adata.layers["target"] = p[spots][:, cols], target[spots][:, cols]
            res = evaluate(adata, pred_layer="pred", target_layer="target", groupby=K.SAMPLE, n_top=n_top)
            r = pd.Series(res.fold_matrix()[0], index=res.genes)
            row = {"fold": str(f), **{m: float(res.per_fold[m].iloc[0]) for m in ("mae", "mse", "pcc_all")}}
            for name in ("heg", "hvg"):
                row[f"pcc_{name}"] = _nanmean(r.reindex(sets[name]).to_numpy())
            rows.append(row)
            r_shared.append(r.reindex(shared).to_numpy())
            gene_frames.append(
                pd.DataFrame({"method": method, "fold": str(f), "gene": r.index, "pearson": r.to_numpy()})
            )
        r_f = np.vstack(r_shared)
        hpg = M.top_hpg(r_f, min(n_top, len(shared))) if len(fold_genes) > 1 and shared else None
        table = pd.DataFrame(rows)
        table["pcc_hpg"] = M.fold_pcc(r_f, hpg) if hpg is not None else np.nan
        table.insert(0, "method", method)
        frames.append(table[["method", "fold", "mae", "mse", "pcc_all", "pcc_hpg", "pcc_heg", "pcc_hvg"]])
        hpg_sets[method] = None if hpg is None else [shared[j] for j in hpg]
    per_fold = pd.concat(frames, ignore_index=True)
    return CVSummary(
        per_fold=per_fold,
        summary=_summarise(per_fold, list(preds)),
        per_gene=pd.concat(gene_frames, ignore_index=True),
        gene_sets={
            "panel": fold_genes,
            "heg": [s["heg"] for s in fold_sets],
            "hvg": [s["hvg"] for s in fold_sets],
            "hpg": hpg_sets,
        },
        protocol={
            "methods": list(preds),
            "n_folds": {m: len(fold_genes) for m in preds},
            "n_genes": [len(g) for g in fold_genes],
            "n_top": n_top,
            "gene_sets": RULE,
            "hpg": f"chosen per method on its own test folds, over the {len(shared)} genes in every fold's panel",
            "std": "population (np.std, ddof=0) across folds",
        },
    )


def fold_targets(
    sdatas: Sequence[Any], samples_rows: Sequence[tuple[int, np.ndarray]], genes: list[str], *, table_key: str | None
) -> list[np.ndarray]:
    """Normalised targets over ``genes`` (library size over those genes) of each sample ``(sdata index, rows)``."""
    from dkan.pp._normalize import normalize

    full = [normalize(sd, genes=genes, table_key=table_key, inplace=False) for sd in sdatas]
    return [np.asarray(full[k][rows], dtype=np.float32) for k, rows in samples_rows]


def _nanmean(values: np.ndarray) -> float:
    """``nanmean`` without the warning: NaN when no value is finite (e.g. a constant predictor)."""
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
