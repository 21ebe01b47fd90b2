from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr

from dkan import _metrics as M


def _scipy_r(pred, target):
    out = []
    for g in range(pred.shape[1]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(pearsonr(pred[:, g], target[:, g])[0])
    return np.array(out, dtype=float)


def test_pearson_matches_scipy():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(40, 12))
    pred = 0.5 * target + rng.normal(size=(40, 12))
    r, n_nan = M.pearson_per_gene(pred, target)
    assert r.shape == (12,)
    assert n_nan == 0
    np.testing.assert_allclose(r, _scipy_r(pred, target), rtol=1e-10, atol=1e-12)


def test_pearson_constant_vectors_are_nan_and_counted():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(30, 5))
    pred = target + rng.normal(size=(30, 5))
    pred[:, 1] = 0.1  # constant prediction (a float that is not exact in binary)
    target[:, 3] = 2.0  # constant target
    r, n_nan = M.pearson_per_gene(pred, target)
    assert n_nan == 2
    assert np.isnan(r[1]) and np.isnan(r[3])
    assert not np.any(r == 0.0)
    ref = _scipy_r(pred, target)
    np.testing.assert_array_equal(np.isnan(r), np.isnan(ref))
    np.testing.assert_allclose(r[~np.isnan(r)], ref[~np.isnan(ref)], rtol=1e-10)


def test_pearson_single_spot_and_nonfinite():
    r, n_nan = M.pearson_per_gene(np.ones((1, 3)), np.ones((1, 3)))
    assert n_nan == 3 and np.isnan(r).all()
    pred = np.arange(12.0).reshape(6, 2)
    pred[2, 0] = np.nan
    r, n_nan = M.pearson_per_gene(pred, pred**2)
    assert n_nan == 1 and np.isnan(r[0]) and r[1] > 0.9


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        M.pearson_per_gene(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="same shape"):
        M.mae(np.zeros((5, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="2-D"):
        M.mse(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))


def test_mae_mse_against_loops():
    rng = np.random.default_rng(2)
    p, t = rng.normal(size=(7, 4)), rng.normal(size=(7, 4))
    abs_sum = sq_sum = 0.0
    for i in range(7):
        for j in range(4):
            abs_sum += abs(p[i, j] - t[i, j])
            sq_sum += (p[i, j] - t[i, j]) ** 2
    assert M.mae(p, t) == pytest.approx(abs_sum / 28)
    assert M.mse(p, t) == pytest.approx(sq_sum / 28)


def test_top_heg_known_answer_and_concatenation():
    # gene means: g0=1, g1=5, g2=3, g3=4 -> order g1, g3, g2
    labels = np.array([[1.0, 5.0, 3.0, 4.0], [1.0, 5.0, 3.0, 4.0]])
    assert list(M.top_heg(labels, n=3)) == [1, 3, 2]
    # sections of unequal size: concatenation (reference) != mean of section means
    a = np.array([[10.0, 0.0]])  # 1 spot
    b = np.array([[0.0, 3.0]] * 9)  # 9 spots
    # concatenated means: g0 = 1.0, g1 = 2.7 -> g1 first; mean of section means: g0 = 5 > g1 = 1.5
    assert list(M.top_heg([a, b], n=1)) == [1]


def test_top_hvg_row_normalised_variance():
    # raw variance is largest for g0, but g0 is proportional to the row sum: after row normalisation its
    # share is constant (variance 0) while g2's share varies.
    labels = np.array(
        [
            [10.0, 5.0, 5.0],
            [20.0, 10.0, 10.0],
            [1.0, 0.2, 0.8],
            [1.0, 0.8, 0.2],
        ]
    )
    shares = labels / labels.sum(1, keepdims=True)
    var = [np.mean((shares[:, g] - shares[:, g].mean()) ** 2) for g in range(3)]  # ddof 0, by hand
    expected = list(np.argsort(var)[::-1])
    got = list(M.top_hvg(labels, n=3))
    assert got == expected
    assert np.argmax(labels.var(0)) == 0 and got[-1] == 0


def test_top_hvg_drops_zero_rows():
    labels = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    out = M.top_hvg(labels, n=1)
    assert out[0] in (0, 2)  # finite ranking, not NaN-driven


def _notebook_rank_sum(r_per_fold):
    rank_sum = np.zeros(r_per_fold.shape[1])
    for cor in r_per_fold:
        for i, idx in enumerate(np.argsort(cor)):
            rank_sum[idx] += i
    return rank_sum


def test_hpg_known_answer_and_against_notebook_loop():
    r = np.array([[0.1, 0.9, 0.5, 0.3], [0.2, 0.8, 0.1, 0.6]])
    # ranks fold0: g0=0, g3=1, g2=2, g1=3; fold1: g2=0, g0=1, g3=2, g1=3 -> sums g0=1, g1=6, g2=2, g3=3
    np.testing.assert_array_equal(M.hpg_rank_sum(r), [1, 6, 2, 3])
    assert list(M.top_hpg(r, n=2)) == [1, 3]
    rng = np.random.default_rng(3)
    big = rng.uniform(-1, 1, size=(5, 30))
    big[rng.random(big.shape) < 0.1] = np.nan
    np.testing.assert_array_equal(M.hpg_rank_sum(big), _notebook_rank_sum(big))
    assert set(M.top_hpg(big, n=7)) == set(np.argsort(_notebook_rank_sum(big))[-7:])


def test_hpg_nan_quirk_and_option():
    r = np.array([[0.9, np.nan, 0.1, 0.5], [0.8, np.nan, 0.2, 0.4]])
    # reference: NaN sorts last -> highest rank -> gene 1 is "most predictive"
    assert M.top_hpg(r, n=1, nan_policy="reference")[0] == 1
    np.testing.assert_array_equal(M.hpg_rank_sum(r), [4, 6, 0, 2])
    # lowest: NaN ranks below every finite r
    assert M.top_hpg(r, n=1, nan_policy="lowest")[0] == 0
    np.testing.assert_array_equal(M.hpg_rank_sum(r, nan_policy="lowest"), [6, 0, 2, 4])
    with pytest.raises(ValueError, match="nan_policy"):
        M.top_hpg(r, nan_policy="drop")
    with pytest.raises(ValueError, match="n_folds, n_genes"):
        M.top_hpg(np.zeros(4))


def test_aggregate_fold_nanmean_and_population_std():
    r_sg = np.array([[0.5, np.nan, np.nan], [0.3, 0.4, np.nan]])
    r_f, mae_f, mse_f = M.aggregate_fold(r_sg, np.array([1.0, 3.0]), np.array([2.0, np.nan]))
    np.testing.assert_allclose(r_f[:2], [0.4, 0.4])
    assert np.isnan(r_f[2])  # all-NaN gene stays NaN
    assert mae_f == 2.0 and mse_f == 2.0
    np.testing.assert_allclose(M.fold_pcc(np.array([[0.2, np.nan, 0.4]])), [0.3])
    mean, std = M.mean_std(np.array([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and std == pytest.approx(np.sqrt(1.25))  # ddof=0, not sqrt(5/3)


def test_top_rejects_bad_n():
    with pytest.raises(ValueError, match="positive"):
        M.top_heg(np.ones((3, 3)), n=0)
