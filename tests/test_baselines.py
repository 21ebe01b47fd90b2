from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from dkan import _keys as K
from dkan._evaluation.baselines import fit_mean, fit_ridge
from dkan._evaluation.evaluate import evaluate


def _linear(seed=0, n=300, d=40, g=6):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    W = rng.normal(size=(d, g)) / np.sqrt(d)
    Y = 3.0 + X @ W + 0.3 * rng.normal(size=(n, g))  # offset: the intercept matters for MAE/MSE
    return X, Y


def test_ridge_beats_mean_on_linear_data():
    X, Y = _linear()
    tr, te = slice(0, 200), slice(200, None)
    mean = fit_mean(Y[tr])
    ridge = fit_ridge(X[tr], Y[tr], n_pcs=256, seed=0)
    assert ridge.params["n_pcs"] == 40  # min(256, n_samples, n_features)
    assert ridge.params["alpha"] == pytest.approx(100 / (40 * 6))
    obs = pd.DataFrame({K.SAMPLE: ["t"] * 100}, index=[str(i) for i in range(100)])
    a = ad.AnnData(X=np.zeros((100, 6), np.float32), obs=obs)
    a.layers[K.TARGET] = Y[te].astype(np.float32)
    a.layers["mean_pred"] = mean.predict(X[te])
    a.layers["ridge_pred"] = ridge.predict(X[te])
    r_mean = evaluate(a, pred_layer="mean_pred")
    r_ridge = evaluate(a, pred_layer="ridge_pred")
    assert r_ridge.summary["mse"] < 0.5 * r_mean.summary["mse"]
    assert r_ridge.summary["pcc_all"] > 0.8
    assert np.isnan(r_mean.summary["pcc_all"])  # constant predictions: NaN, not 0
    assert r_mean.per_sample["n_nan_genes"].iloc[0] == 6


def test_mean_predictor_is_training_mean():
    Y = np.arange(12.0).reshape(4, 3)
    pred = fit_mean(Y).predict(np.zeros((5, 7)))
    assert pred.shape == (5, 3) and pred.dtype == np.float32
    np.testing.assert_allclose(pred, np.tile([4.5, 5.5, 6.5], (5, 1)))


def test_hest_intercept_changes_errors_not_correlation():
    X, Y = _linear(seed=1)
    with_b = fit_ridge(X[:200], Y[:200]).predict(X[200:])
    hest = fit_ridge(X[:200], Y[:200], fit_intercept=False).predict(X[200:])
    for g in range(Y.shape[1]):
        assert np.corrcoef(with_b[:, g], hest[:, g])[0, 1] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(with_b - hest, np.tile(Y[:200].mean(0), (100, 1)), atol=1e-2)  # lsqr tolerance


def test_pcs_capped_by_samples_and_errors():
    rng = np.random.default_rng(2)
    ridge = fit_ridge(rng.normal(size=(10, 50)), rng.normal(size=(10, 3)))
    assert ridge.params["n_pcs"] == 10
    with pytest.raises(ValueError, match="feature columns"):
        ridge.predict(np.zeros((2, 49)))
    with pytest.raises(ValueError, match="must match spot for spot"):
        fit_ridge(np.zeros((5, 4)), np.zeros((6, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        fit_mean(np.array([[1.0, np.nan]]))
