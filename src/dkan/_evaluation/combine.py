"""Combine per-fold :class:`~dkan._evaluation.evaluate.EvalResult` objects into cross-validation tables."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dkan import _metrics as M
from dkan._evaluation.evaluate import METRICS, EvalResult, fold_table

logger = logging.getLogger("dkan")

_LABELS = {
    "mae": "MAE",
    "mse": "MSE",
    "pcc_all": "PCC-ALL",
    "pcc_hpg": "PCC-HPG",
    "pcc_heg": "PCC-HEG",
    "pcc_hvg": "PCC-HVG",
}


@dataclass
class CVSummary:
    """Cross-validated metrics of one or several methods on the same folds.

    Attributes
    ----------
    per_fold
        One row per method and fold: ``method``, ``fold``, ``mae``, ``mse``, ``pcc_all``, ``pcc_hpg``,
        ``pcc_heg``, ``pcc_hvg``.
    summary
        One row per method (the index): ``{metric}_mean`` and ``{metric}_std`` (population std, ``ddof=0``).
    per_gene
        Fold-level r per gene: ``method``, ``fold``, ``gene``, ``pearson``.
    gene_sets
        ``{"heg": [...], "hvg": [...], "hpg": {method: [...]}}`` (gene names).
    protocol
        How the numbers were made (label source, gene counts, NaN counts, ...).
    """

    per_fold: pd.DataFrame
    summary: pd.DataFrame
    per_gene: pd.DataFrame
    gene_sets: dict[str, Any]
    protocol: dict[str, Any]

    @property
    def methods(self) -> list[str]:
        """Method names, in input order."""
        return list(self.summary.index)

    def table(self, *, digits: int = 3) -> pd.DataFrame:
        """Return the method x metric table of ``"mean ± std"`` strings, in the paper's column order.

        Parameters
        ----------
        digits
            Decimals shown.

        Returns
        -------
        A DataFrame of strings indexed by method.
        """
        out = pd.DataFrame(index=self.summary.index)
        for m in METRICS:
            mean, std = self.summary[f"{m}_mean"], self.summary[f"{m}_std"]
            out[_LABELS[m]] = [f"{a:.{digits}f} ± {b:.{digits}f}" for a, b in zip(mean, std, strict=True)]
        return out


def _as_folds(
    obj: EvalResult | Sequence[EvalResult] | Mapping[Any, EvalResult], param: str
) -> list[tuple[str | None, EvalResult]]:
    if isinstance(obj, EvalResult):
        return [(None, obj)]
    if isinstance(obj, Mapping):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, Sequence) and not isinstance(obj, str):
        items = [(None, v) for v in obj]
    else:
        raise TypeError(f"`{param}` must hold EvalResult objects (one, a sequence or a mapping); found {type(obj)}.")
    bad = [type(v).__name__ for _, v in items if not isinstance(v, EvalResult)]
    if bad or not items:
        raise TypeError(f"`{param}` must hold EvalResult objects from `dkan.tl.evaluate`; found {bad or 'nothing'}.")
    return items


def _by_method(results: Any) -> dict[str, list[tuple[str | None, EvalResult]]]:
    """Normalise the input to ``{method: [(fold key or None, result), ...]}``."""
    if isinstance(results, Mapping) and results:
        vals = list(results.values())
        one_fold_each = all(isinstance(v, EvalResult) and len(v.folds) == 1 for v in vals)
        if not one_fold_each:
            return {str(m): _as_folds(v, f"results[{m!r}]") for m, v in results.items()}
    folds = _as_folds(results, "results")
    return {str(folds[0][1].protocol.get("pred_layer", "method")): folds}


def _expand(items: list[tuple[str | None, EvalResult]]) -> list[tuple[str, EvalResult, int]]:
    """Each fold of each result as ``(label, result, row in result.per_fold)``."""
    out = []
    for pos, (key, res) in enumerate(items):
        base = key if key is not None else (str(pos) if len(items) > 1 else None)
        for i, f in enumerate(res.folds):
            if base is None:
                label = f
            else:
                label = base if len(res.folds) == 1 else f"{base}/{f}"
            out.append((label, res, i))
    labels = [x[0] for x in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Fold labels repeat within a method: {labels}; pass a mapping fold -> EvalResult.")
    return out


def _common_genes(methods: dict[str, list[tuple[str | None, EvalResult]]]) -> list[str]:
    results = [r for items in methods.values() for _, r in items]
    common = set(results[0].genes)
    for r in results[1:]:
        common &= set(r.genes)
    genes = [g for g in results[0].genes if g in common]
    if not genes:
        raise ValueError("The results share no gene; evaluate every fold and method on the same panel.")
    n_all = len(set().union(*(r.genes for r in results)))
    if n_all > len(genes):
        logger.warning("combine_folds: %d genes not evaluated in every result are left out.", n_all - len(genes))
    return genes


def _label_matrix(labels: Any, genes: list[str], first: list[tuple[str | None, EvalResult]]) -> np.ndarray:
    if labels is None:
        mats = []
        for _, res in first:
            pos = pd.Index(res.genes).get_indexer(genes)
            mats.append(np.asarray(res.labels, dtype=np.float64)[:, pos])
        return np.concatenate(mats, axis=0)
    if isinstance(labels, pd.DataFrame):
        missing = [g for g in genes if g not in labels.columns]
        if missing:
            raise KeyError(f"`labels` lacks {len(missing)} evaluated genes as columns, e.g. {missing[:5]}.")
        return labels[genes].to_numpy(dtype=np.float64)
    arr = np.concatenate([np.asarray(x, float) for x in labels]) if isinstance(labels, list) else np.asarray(labels)
    if arr.ndim != 2 or arr.shape[1] != len(genes):
        raise ValueError(
            f"`labels` must have one column per evaluated gene ({len(genes)}); found shape {arr.shape}. "
            "Pass a DataFrame with gene names as columns to align by name."
        )
    return arr.astype(np.float64)


def combine_folds(
    results: Any,
    *,
    labels: np.ndarray | pd.DataFrame | Sequence[np.ndarray] | None = None,
    n_top: int = 50,
    nan_policy: M.NanPolicy = "reference",
) -> CVSummary:
    """Per-fold metrics and mean ± population std across folds, exactly as the DKAN reference reports them.

    MAE and MSE: fold values. PCC-ALL: nanmean over genes of the fold r. HEG and HVG: chosen once on the
    processed labels of all folds concatenated (shared by every method). HPG: for each method, the genes
    with the largest sums over folds of their rank by ascending fold r (selected on the test results, as
    in the reference; NaN handling per ``nan_policy``). Each PCC-* is the mean over folds of the nanmean
    over the set; std is ``np.std`` (``ddof=0``).

    Parameters
    ----------
    results
        One method's folds: an :class:`EvalResult` (several folds via ``evaluate(..., fold=...)``), a
        sequence of them, or a mapping ``fold -> EvalResult`` whose values hold one fold each. Several
        methods: a mapping ``method -> any of these`` (wrap a lone single-fold result in a list).
    labels
        Processed labels (spots x genes) for HEG/HVG: an array in the evaluated gene order, a list of such
        arrays, or a DataFrame with gene columns. Default: the targets stored in the first method's results.
    n_top
        Size of the HEG, HVG and HPG sets.
    nan_policy
        ``"reference"`` (NaN r ranks highest, the authors' quirk) or ``"lowest"``.

    Returns
    -------
    A :class:`CVSummary`; ``.table()`` gives the method x metric table.
    """
    methods = _by_method(results)
    genes = _common_genes(methods)
    label_mat = _label_matrix(labels, genes, next(iter(methods.values())))
    n = min(n_top, len(genes))
    heg, hvg = M.top_heg(label_mat, n), M.top_hvg(label_mat, n)
    fold_frames, gene_frames, hpg_sets, n_nan = [], [], {}, {}
    for method, items in methods.items():
        folds = _expand(items)
        r_f = np.vstack([_fold_r(res, i, genes) for _, res, i in folds])
        mae_f = np.array([res.per_fold["mae"].iloc[i] for _, res, i in folds], dtype=np.float64)
        mse_f = np.array([res.per_fold["mse"].iloc[i] for _, res, i in folds], dtype=np.float64)
        hpg = M.top_hpg(r_f, n, nan_policy=nan_policy) if len(folds) > 1 else None
        labels_f = [f for f, _, _ in folds]
        table = fold_table(labels_f, r_f, mae_f, mse_f, {"heg": heg, "hvg": hvg, "hpg": hpg})
        if hpg is None:
            table.insert(table.columns.get_loc("pcc_all") + 1, "pcc_hpg", np.nan)
        table.insert(0, "method", method)
        fold_frames.append(table)
        gene_frames.append(
            pd.DataFrame(
                {
                    "method": method,
                    "fold": np.repeat(labels_f, len(genes)),
                    "gene": np.tile(genes, len(folds)),
                    "pearson": r_f.ravel(),
                }
            )
        )
        hpg_sets[method] = None if hpg is None else [genes[j] for j in hpg]
        n_nan[method] = int(np.isnan(r_f).sum())
    per_fold = pd.concat(fold_frames, ignore_index=True)
    return CVSummary(
        per_fold=per_fold,
        summary=_summarise(per_fold, list(methods)),
        per_gene=pd.concat(gene_frames, ignore_index=True),
        gene_sets={"heg": [genes[j] for j in heg], "hvg": [genes[j] for j in hvg], "hpg": hpg_sets},
        protocol={
            "methods": list(methods),
            "n_folds": {m: len(_expand(v)) for m, v in methods.items()},
            "n_genes": len(genes),
            "n_top": n,
            "nan_policy": nan_policy,
            "label_source": "labels argument" if labels is not None else "targets of all folds, concatenated",
            "n_label_spots": int(label_mat.shape[0]),
            "n_nan_pearson_fold": n_nan,
            "std": "population (np.std, ddof=0) across folds",
            "hpg": "chosen per method on its own test folds (optimistic, as in the reference)",
        },
    )


def _fold_r(res: EvalResult, i: int, genes: list[str]) -> np.ndarray:
    return res.fold_matrix()[i, pd.Index(res.genes).get_indexer(genes)]


def _summarise(per_fold: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    rows = {}
    for method in methods:
        sub = per_fold[per_fold["method"] == method]
        row = {}
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = M.mean_std(sub[m].to_numpy())
        rows[method] = row
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "method"
    return out
