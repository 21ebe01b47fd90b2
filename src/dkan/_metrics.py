"""Pure numpy kernels for evaluation: per-gene Pearson r, errors, gene-set rules and fold aggregation.

These follow the DKAN authors' evaluation (``evaluation/metric.ipynb`` and ``DKAN.py: test_step``), see
``dkan-reference.md`` section 4. Nothing here knows about AnnData or SpatialData.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np

NanPolicy = Literal["reference", "lowest"]


def _as_2d(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array (spots x genes); found shape {a.shape}.")
    return a


def _check_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_2d(pred, "pred"), _as_2d(target, "target")
    if p.shape != t.shape:
        raise ValueError(
            f"`pred` and `target` must have the same shape (spots x genes); found {p.shape} and {t.shape}."
        )
    return p, t


def nanmean(x: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """``np.nanmean`` without the "Mean of empty slice" warning (all-NaN slices give NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def pearson_per_gene(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, int]:
    """Pearson correlation across spots, one value per gene.

    Matches ``scipy.stats.pearsonr`` column by column: a column that is constant on either side (all
    values exactly equal, as scipy tests it), has fewer than two spots or holds a non-finite value gives
    NaN, never zero.

    Parameters
    ----------
    pred
        Predictions, spots x genes.
    target
        Observed values, same shape.

    Returns
    -------
    ``(r, n_nan)``: r of shape ``(n_genes,)`` and the number of NaN entries in it.
    """
    p, t = _check_pair(pred, target)
    n = p.shape[0]
    r = np.full(p.shape[1], np.nan)
    if n < 2:
        return r, int(r.size)
    ok = np.isfinite(p).all(0) & np.isfinite(t).all(0)
    ok &= ~(p == p[:1]).all(0) & ~(t == t[:1]).all(0)
    pc = p[:, ok] - p[:, ok].mean(0)
    tc = t[:, ok] - t[:, ok].mean(0)
    denom = np.sqrt((pc * pc).sum(0)) * np.sqrt((tc * tc).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        vals = (pc * tc).sum(0) / denom
    vals[denom == 0] = np.nan
    r[ok] = np.clip(vals, -1.0, 1.0)
    return r, int(np.isnan(r).sum())


def mae(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute error over all entries (spots x genes), as torch ``l1_loss``."""
    p, t = _check_pair(pred, target)
    return float(np.mean(np.abs(p - t)))


def mse(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean squared error over all entries (spots x genes), as torch ``mse_loss``."""
    p, t = _check_pair(pred, target)
    return float(np.mean((p - t) ** 2))


def _concat(labels: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    if isinstance(labels, np.ndarray):
        return _as_2d(labels, "labels")
    return np.concatenate([_as_2d(x, "labels") for x in labels], axis=0)


def _top(score: np.ndarray, n: int) -> np.ndarray:
    """Return the indices of the ``n`` largest scores, largest first (the reference's ``argsort(s)[-n:][::-1]``)."""
    if n < 1:
        raise ValueError(f"`n` must be a positive number of genes; found {n}.")
    return np.argsort(score)[-n:][::-1].copy()


def top_heg(labels: np.ndarray | Sequence[np.ndarray], n: int = 50) -> np.ndarray:
    """Highly expressed genes: the ``n`` genes with the largest mean of the processed labels.

    Parameters
    ----------
    labels
        Processed labels (spots x genes), or a sequence of such arrays (one per section), concatenated
        along spots as the reference concatenates every section of the dataset.
    n
        Number of genes.

    Returns
    -------
    Gene (column) indices, highest mean first.
    """
    return _top(_concat(labels).mean(axis=0), n)


def top_hvg(labels: np.ndarray | Sequence[np.ndarray], n: int = 50) -> np.ndarray:
    """Highly variable genes: each spot divided by its row sum, then the ``n`` largest per-gene variances.

    Variance is the population variance (``ddof=0``) as in the reference. Spots whose row sum is zero would
    turn every variance into NaN in the reference; they are left out here.

    Parameters
    ----------
    labels
        Processed labels (spots x genes) or a sequence of them (concatenated along spots).
    n
        Number of genes.

    Returns
    -------
    Gene (column) indices, highest variance first.
    """
    y = _concat(labels)
    s = y.sum(axis=1, keepdims=True)
    keep = (s[:, 0] != 0) & np.isfinite(s[:, 0])
    return _top((y[keep] / s[keep]).var(axis=0, ddof=0), n)


def hpg_rank_sum(r_per_fold: np.ndarray, *, nan_policy: NanPolicy = "reference") -> np.ndarray:
    """Sum over folds of each gene's rank by ascending r (rank = position in ``np.argsort``).

    Parameters
    ----------
    r_per_fold
        Per-fold, per-gene Pearson r, shape ``(n_folds, n_genes)``.
    nan_policy
        ``"reference"``: NaN sorts last in ``np.argsort``, so a gene with NaN r gets the *highest* rank of
        its fold, as in the authors' notebook (a quirk that favours undefined genes). ``"lowest"``: NaN
        genes get the lowest ranks instead.

    Returns
    -------
    Rank sums, shape ``(n_genes,)``.
    """
    r = np.asarray(r_per_fold, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"`r_per_fold` must have shape (n_folds, n_genes); found shape {r.shape}.")
    if nan_policy not in ("reference", "lowest"):
        raise ValueError(f"`nan_policy` must be 'reference' or 'lowest'; found {nan_policy!r}.")
    if nan_policy == "lowest":
        r = np.where(np.isnan(r), -np.inf, r)
    ranks = np.empty_like(r)
    cols = np.arange(r.shape[1], dtype=np.float64)
    for f in range(r.shape[0]):
        ranks[f, np.argsort(r[f])] = cols
    return ranks.sum(axis=0)


def top_hpg(r_per_fold: np.ndarray, n: int = 50, *, nan_policy: NanPolicy = "reference") -> np.ndarray:
    """Highly predictive genes: the ``n`` largest rank sums of :func:`hpg_rank_sum`.

    The genes are selected on the test results themselves, as in the reference.

    Parameters
    ----------
    r_per_fold
        Per-fold, per-gene Pearson r, shape ``(n_folds, n_genes)``.
    n
        Number of genes.
    nan_policy
        How NaN r is ranked; see :func:`hpg_rank_sum`.

    Returns
    -------
    Gene indices, largest rank sum first.
    """
    return _top(hpg_rank_sum(r_per_fold, nan_policy=nan_policy), n)


def aggregate_fold(r_sg: np.ndarray, mae_s: np.ndarray, mse_s: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Fold values from per-section values: ``nanmean`` over sections of r (per gene), MAE and MSE.

    Parameters
    ----------
    r_sg
        Per-section, per-gene r, shape ``(n_sections, n_genes)``.
    mae_s, mse_s
        Per-section errors, shape ``(n_sections,)``.

    Returns
    -------
    ``(r_f, mae_f, mse_f)`` with ``r_f`` of shape ``(n_genes,)``.
    """
    r_f = nanmean(np.atleast_2d(np.asarray(r_sg, dtype=np.float64)), axis=0)
    return np.asarray(r_f), float(nanmean(np.asarray(mae_s, float))), float(nanmean(np.asarray(mse_s, float)))


def fold_pcc(r_f: np.ndarray, genes: np.ndarray | None = None) -> np.ndarray:
    """PCC of each fold: ``nanmean`` of r over all genes or the given gene indices.

    Parameters
    ----------
    r_f
        Per-fold r, shape ``(n_folds, n_genes)``.
    genes
        Column indices of a gene set, or None for all genes.

    Returns
    -------
    One value per fold.
    """
    r = np.atleast_2d(np.asarray(r_f, dtype=np.float64))
    if genes is not None:
        r = r[:, np.asarray(genes, dtype=int)]
    return np.asarray(nanmean(r, axis=1))


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and population standard deviation (``np.std``, ``ddof=0``) across folds, as the paper reports."""
    v = np.asarray(values, dtype=np.float64)
    return float(np.mean(v)), float(np.std(v))
