"""Metric helpers of ``benchmarks/trust_her2st.py``: uncertainty quality, ensembles and genes outside the panel.

All functions take numpy arrays ``(n_spots, n_genes)`` and check their input (same shape, finite values,
non-negative standard deviations), raising ``ValueError`` naming the argument otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats


def _check(name: str, a: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"Expected `{name}` to be a 2-d array (spots x genes), found shape {a.shape}.")
    if shape is not None and a.shape != shape:
        raise ValueError(f"`{name}` has shape {a.shape}, expected {shape} (the shape of the predictions).")
    if not np.isfinite(a).all():
        raise ValueError(f"`{name}` holds {int((~np.isfinite(a)).sum())} non-finite values; drop or fill them first.")
    return a


def coverage(mean: np.ndarray, std: np.ndarray, target: np.ndarray, k: float) -> float:
    """Fraction of ``target`` entries inside ``mean ± k * std`` (a Gaussian gives 0.683 for k=1, 0.954 for k=2)."""
    mean = _check("mean", mean)
    std = _check("std", std, mean.shape)
    target = _check("target", target, mean.shape)
    if (std < 0).any():
        raise ValueError(f"`std` holds {int((std < 0).sum())} negative values; a standard deviation is >= 0.")
    if not k > 0:
        raise ValueError(f"Expected `k` > 0, found {k!r}.")
    return float(np.mean(np.abs(target - mean) <= k * std))


def _corr(x: np.ndarray, y: np.ndarray, method: str) -> float:
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    if method == "pearson":
        return float(np.corrcoef(x, y)[0, 1])
    return float(stats.spearmanr(x, y).statistic)


def per_gene_corr(x: np.ndarray, y: np.ndarray, method: str = "pearson") -> np.ndarray:
    """Correlation of the columns of ``x`` and ``y`` (one per gene; NaN where a column is constant)."""
    if method not in ("pearson", "spearman"):
        raise ValueError(f"Expected `method` 'pearson' or 'spearman', found {method!r}.")
    x = _check("x", x)
    y = _check("y", y, x.shape)
    return np.array([_corr(x[:, g], y[:, g], method) for g in range(x.shape[1])])


def uncertainty_metrics(mean: np.ndarray, std: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """How well a predicted standard deviation tracks the error of the mean prediction.

    Pearson and Spearman correlation of ``std`` with ``|target - mean|`` pooled over spots x genes and averaged
    over genes (per-gene correlation across spots, NaN genes skipped), the mean predicted std and mean absolute
    error, and the coverage of the ±1σ / ±2σ intervals.
    """
    mean = _check("mean", mean)
    std = _check("std", std, mean.shape)
    err = np.abs(_check("target", target, mean.shape) - mean)
    out = {}
    for method in ("pearson", "spearman"):
        out[f"{method} pooled"] = _corr(std.ravel(), err.ravel(), method)
        out[f"{method} per gene"] = float(np.nanmean(per_gene_corr(std, err, method)))
    out["mean std"] = float(std.mean())
    out["mean |error|"] = float(err.mean())
    out["cover 1σ"] = coverage(mean, std, target, 1.0)
    out["cover 2σ"] = coverage(mean, std, target, 2.0)
    return out


def ensemble(preds: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof=1, as ``dkan.tl.predict`` writes) over the members' predictions."""
    if len(preds) < 2:
        raise ValueError(f"An ensemble needs at least 2 members' predictions, found {len(preds)}.")
    first = _check("preds[0]", preds[0])
    arr = np.stack([first] + [_check(f"preds[{i}]", p, first.shape) for i, p in enumerate(preds[1:], 1)])
    return arr.mean(0).astype(np.float32), arr.std(0, ddof=1).astype(np.float32)


def holdout_genes(n_genes: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random ``fraction`` of ``n_genes`` genes (at least one, never all)."""
    if not 0 < fraction < 1:
        raise ValueError(f"Expected `fraction` in (0, 1), found {fraction!r}.")
    k = min(n_genes - 1, max(1, round(fraction * n_genes)))
    if k < 1:
        raise ValueError(f"Cannot hold out genes from a panel of {n_genes}; it needs at least 2.")
    return np.sort(np.random.default_rng(seed).choice(n_genes, size=k, replace=False))


def nearest_seen(unseen_emb: np.ndarray, seen_emb: np.ndarray) -> np.ndarray:
    """For each unseen gene, the index of the seen gene whose embedding has the highest cosine similarity."""
    u = _check("unseen_emb", unseen_emb)
    s = _check("seen_emb", seen_emb)
    if u.shape[1] != s.shape[1]:
        raise ValueError(f"`unseen_emb` has width {u.shape[1]} but `seen_emb` {s.shape[1]}; use one text encoder.")
    un = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    sn = s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    return np.argmax(un @ sn.T, axis=1)


def gene_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Mean over genes of the per-gene Pearson correlation (NaN for constant predictions) and the MSE."""
    pred = _check("pred", pred)
    target = _check("target", target, pred.shape)
    pcc = per_gene_corr(pred, target)
    return {
        "PCC (mean over genes)": float(np.nanmean(pcc)) if np.isfinite(pcc).any() else float("nan"),
        "MSE": float(np.mean((pred - target) ** 2)),
    }
