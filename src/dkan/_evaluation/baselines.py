"""Baselines on frozen spot features: the training mean, and ridge regression as in HEST-Benchmark.

HEST-Benchmark (``mahmoodlab/HEST: src/hest/bench/benchmark.py`` and ``trainer.py``) fits
``Pipeline([StandardScaler(), PCA(n_components=256, random_state=seed)])`` on the training features, then
``Ridge(solver="lsqr", alpha=100 / (n_features * n_targets), fit_intercept=False, max_iter=1000,
random_state=seed)`` with ``n_features`` counted after PCA. Because the PCA scores of the training set are
centred, the ridge coefficients do not depend on ``fit_intercept`` (up to the lsqr tolerance): with
``fit_intercept=False`` every prediction is shifted by minus the training mean of the targets, which leaves
Pearson r unchanged but inflates MAE and MSE. ``fit_ridge`` therefore fits the intercept by default (same r
as HEST, meaningful errors); pass ``fit_intercept=False`` to reproduce HEST exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _matrix(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array (spots x columns); found shape {a.shape}.")
    if not np.isfinite(a).all():
        raise ValueError(f"`{name}` holds non-finite values; baselines need finite features and targets.")
    return a


@dataclass
class MeanPredictor:
    """Predicts the training mean of each gene for every spot."""

    mean: np.ndarray  #: training mean per gene, shape ``(n_genes,)``
    params: dict[str, Any] = field(default_factory=dict)  #: what was fitted, for the protocol

    def predict(self, X: Any) -> np.ndarray:
        """Return ``(n_spots, n_genes)`` float32 predictions; only ``len(X)`` is used."""
        return np.tile(self.mean.astype(np.float32), (len(X), 1))


@dataclass
class RidgePredictor:
    """Standardise, PCA, ridge: the HEST-Benchmark linear probe."""

    pipeline: Any  #: fitted ``sklearn.pipeline.Pipeline`` (scaler, PCA, Ridge)
    n_features_in: int  #: feature dimension expected by :meth:`predict`
    params: dict[str, Any] = field(default_factory=dict)  #: fitted settings (alpha, n_pcs, intercept, seed)

    def predict(self, X: Any) -> np.ndarray:
        """Return ``(n_spots, n_genes)`` float32 predictions for features ``X`` (spots x features)."""
        x = _matrix(X, "X")
        if x.shape[1] != self.n_features_in:
            raise ValueError(f"`X` has {x.shape[1]} feature columns; the ridge was fitted on {self.n_features_in}.")
        y = self.pipeline.predict(x)
        return np.asarray(y, dtype=np.float32).reshape(len(x), -1)


def fit_mean(Y_train: Any) -> MeanPredictor:
    """Fit the mean baseline: the per-gene mean of the training targets.

    Parameters
    ----------
    Y_train
        Training targets (spots x genes), on the processed scale.

    Returns
    -------
    A :class:`MeanPredictor` with ``.predict(X)``.
    """
    y = _matrix(Y_train, "Y_train")
    if len(y) == 0:
        raise ValueError("`Y_train` has no rows.")
    return MeanPredictor(mean=y.mean(axis=0), params={"baseline": "mean", "n_train": len(y)})


def fit_ridge(
    X_train: Any,
    Y_train: Any,
    *,
    n_pcs: int = 256,
    seed: int = 0,
    fit_intercept: bool = True,
    alpha: float | None = None,
    max_iter: int = 1000,
) -> RidgePredictor:
    """Fit the HEST-Benchmark ridge probe on frozen spot features.

    ``StandardScaler`` -> ``PCA(min(n_pcs, n_samples, n_features))`` -> ``Ridge(solver="lsqr")`` with
    ``alpha = 100 / (n_components * n_genes)``.

    Parameters
    ----------
    X_train
        Frozen spot features (spots x features), e.g. ``obsm["dkan_spot_features"]``.
    Y_train
        Training targets (spots x genes).
    n_pcs
        Number of principal components (HEST: 256), capped by the number of spots and features.
    seed
        Random state of PCA and the solver.
    fit_intercept
        Fit the intercept (default; same Pearson r as HEST, sensible MAE/MSE). HEST uses ``False``.
    alpha
        Override the ridge penalty; None uses HEST's ``100 / (n_components * n_genes)``.
    max_iter
        Maximum ``lsqr`` iterations (HEST: 1000).

    Returns
    -------
    A :class:`RidgePredictor` with ``.predict(X)``.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _matrix(X_train, "X_train"), _matrix(Y_train, "Y_train")
    if len(x) != len(y):
        raise ValueError(f"`X_train` has {len(x)} rows but `Y_train` has {len(y)}; they must match spot for spot.")
    if len(x) < 2:
        raise ValueError(f"`X_train` needs at least 2 spots to standardise and run PCA; found {len(x)}.")
    n_comp = int(min(n_pcs, x.shape[0], x.shape[1]))
    a = float(100.0 / (n_comp * y.shape[1])) if alpha is None else float(alpha)
    pipe = Pipeline(
        [
            ("scaler", StandardScaler()),
            ("pca", PCA(n_components=n_comp, random_state=seed)),
            (
                "ridge",
                Ridge(alpha=a, solver="lsqr", fit_intercept=fit_intercept, max_iter=max_iter, random_state=seed),
            ),
        ]
    )
    pipe.fit(x, y)
    params = {
        "baseline": "ridge",
        "protocol": "HEST-Benchmark (StandardScaler, PCA, Ridge lsqr)",
        "n_pcs": n_comp,
        "alpha": a,
        "fit_intercept": fit_intercept,
        "seed": seed,
        "n_train": len(x),
    }
    return RidgePredictor(pipeline=pipe, n_features_in=x.shape[1], params=params)
