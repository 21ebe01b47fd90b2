"""benchmarks/_trust.py: the metric helpers of the trust benchmark on arrays whose answers are known."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "_trust.py"
_spec = importlib.util.spec_from_file_location("_trust_bench", _PATH)
trust = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trust)


def test_coverage_counts_targets_inside_the_interval():
    mean = np.zeros((2, 2))
    std = np.ones((2, 2))
    target = np.array([[0.5, -1.0], [1.5, -3.0]])  # |err| 0.5, 1.0 (on the edge: inside), 1.5, 3.0
    assert trust.coverage(mean, std, target, 1.0) == 0.5
    assert trust.coverage(mean, std, target, 2.0) == 0.75


def test_coverage_of_gaussian_errors_is_68_and_95_percent():
    rng = np.random.default_rng(0)
    std = rng.uniform(0.5, 2.0, size=(4000, 10))
    target = rng.normal(0.0, std)
    out = trust.uncertainty_metrics(np.zeros_like(std), std, target)
    assert out["cover 1σ"] == pytest.approx(0.683, abs=0.01)
    assert out["cover 2σ"] == pytest.approx(0.954, abs=0.01)
    assert out["spearman pooled"] > 0.2  # larger std, larger errors


def test_uncertainty_correlation_is_one_when_std_equals_the_error_and_nan_free():
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(50, 4))
    err = rng.uniform(0.1, 1.0, size=(50, 4))
    out = trust.uncertainty_metrics(mean, err, mean + err)
    for key in ("pearson pooled", "pearson per gene", "spearman pooled", "spearman per gene"):
        assert out[key] == pytest.approx(1.0)
    assert trust.coverage(np.zeros_like(err), err, err, 1.0) == 1.0  # |error| == std is inside
    assert trust.coverage(np.zeros_like(err), err, 1.5 * err, 1.0) == 0.0
    anti = trust.uncertainty_metrics(mean, 1.0 / err, mean + err)
    assert anti["spearman pooled"] == pytest.approx(-1.0)


@pytest.mark.parametrize(
    ("mean", "std", "target", "match"),
    [
        (np.zeros((3, 2)), np.ones((3, 3)), np.zeros((3, 2)), "`std` has shape"),
        (np.zeros((3, 2)), -np.ones((3, 2)), np.zeros((3, 2)), "negative"),
        (np.zeros((3, 2)), np.full((3, 2), np.nan), np.zeros((3, 2)), "non-finite"),
        (np.zeros(3), np.ones(3), np.zeros(3), "2-d array"),
    ],
)
def test_coverage_rejects_wrong_input(mean, std, target, match):
    with pytest.raises(ValueError, match=match):
        trust.coverage(mean, std, target, 1.0)


def test_ensemble_mean_and_sample_std():
    a, b, c = np.zeros((2, 2)), np.ones((2, 2)), np.full((2, 2), 2.0)
    mean, std = trust.ensemble([a, b, c])
    np.testing.assert_allclose(mean, 1.0)
    np.testing.assert_allclose(std, 1.0)  # ddof=1
    with pytest.raises(ValueError, match="at least 2"):
        trust.ensemble([a])
    with pytest.raises(ValueError, match="shape"):
        trust.ensemble([a, np.zeros((2, 3))])


def test_holdout_genes_is_seeded_and_sized():
    a = trust.holdout_genes(250, 0.2, seed=0)
    assert len(a) == 50 and len(set(a)) == 50 and (np.diff(a) > 0).all()
    np.testing.assert_array_equal(a, trust.holdout_genes(250, 0.2, seed=0))
    assert not np.array_equal(a, trust.holdout_genes(250, 0.2, seed=1))
    with pytest.raises(ValueError, match="fraction"):
        trust.holdout_genes(250, 1.0, seed=0)


def test_nearest_seen_uses_cosine_not_euclidean():
    seen = np.array([[10.0, 0.0], [0.5, 0.6]])
    unseen = np.array([[1.0, 0.1], [0.0, 1.0]])
    np.testing.assert_array_equal(trust.nearest_seen(unseen, seen), [0, 1])  # euclidean would pick 1 for row 0
    with pytest.raises(ValueError, match="width"):
        trust.nearest_seen(np.ones((1, 3)), seen)


def test_gene_metrics_pcc_and_mse():
    y = np.array([[0.0, 1.0], [1.0, 3.0], [2.0, 2.0]])
    out = trust.gene_metrics(2 * y + 1, y)
    assert out["PCC (mean over genes)"] == pytest.approx(1.0)
    assert out["MSE"] == pytest.approx(np.mean((y + 1) ** 2))
    const = trust.gene_metrics(np.zeros_like(y), y)
    assert np.isnan(const["PCC (mean over genes)"]) and const["MSE"] == pytest.approx(np.mean(y**2))
    with pytest.raises(ValueError, match="method"):
        trust.per_gene_corr(y, y, method="kendall")
