"""Trust signals in cross-validation (issue 23): per fold, fitted on training samples, measured on test samples."""

import numpy as np
import pytest

import dkan
from dkan._evaluation import trust as CT
from dkan.datasets import copy_sdata


@pytest.fixture(scope="module")
def cv(toy_master):
    return dkan.tl.cross_validate(
        copy_sdata(toy_master), groupby="sample", config="small", baselines=(), ablations=("no_text",),
        progress=False, max_epochs=1, feature_encoder="dummy", n_genes=10, panel_per_fold=True, trust=True,
    )  # fmt: skip


def test_cv_result_holds_trust_figures_per_fold(cv):
    assert cv.trust is not None and len(cv.trust) == len(cv.folds) == 3  # DKAN only, not the ablation
    for f, t in enumerate(cv.trust):
        g = len(cv.fold_genes[f])
        assert t["val_pcc"].shape == t["heldout_pcc"].shape == (g,)
        for key in ("coverage_68", "coverage_95", "novel_fraction"):
            assert 0.0 <= t[key] <= 1.0
        assert t["coverage_95"] >= t["coverage_68"]
        assert t["n_reliable"] + t["n_rest"] <= g
        assert list(t["novel_fractions"]) == cv.folds[f]  # the test sample only
    table = CT.trust_table(cv.trust, cv.folds)
    assert list(table.index) == ["test s0", "test s1", "test s2", "mean"]
    assert table.loc["mean", "coverage_68"] == pytest.approx(np.mean([t["coverage_68"] for t in cv.trust]))


def test_held_out_pcc_is_that_of_the_test_sample_prediction(cv):
    from dkan import _trust as T

    pred, target = cv.predictions["DKAN"], cv.target
    for f, t in enumerate(cv.trust):
        rows = (cv.obs["fold"] == f).to_numpy()
        cols = [cv.genes.index(g) for g in cv.fold_genes[f]]
        expected = T.pearson_per_gene(pred[rows][:, cols], target[rows][:, cols])
        np.testing.assert_allclose(t["heldout_pcc"], expected, rtol=1e-5, equal_nan=True)


def test_no_trust_figures_unless_asked(toy_master):
    res = dkan.tl.cross_validate(
        copy_sdata(toy_master), groupby="sample", config="small", baselines=(), progress=False, max_epochs=1,
        feature_encoder="dummy", n_genes=10,
    )  # fmt: skip
    assert res.trust is None


class _Sample:
    def __init__(self, name, target, spot):
        import torch

        self.name, self.target, self.spot = name, torch.as_tensor(target), torch.as_tensor(spot)

    def __len__(self):
        return len(self.target)


def test_coverage_is_computed_on_the_test_targets_only():
    """A residual-calibrated model: the interval is pred +- q per gene; coverage counts test entries within it."""
    rng = np.random.default_rng(0)
    val_res = rng.normal(size=(2000, 2))
    calib = dkan._trust.fit_conformal(val_res, np.ones_like(val_res))
    arrays = {f"calibration.{k}": v for k, v in calib.items()} | {"val_pcc": np.array([0.5, 0.1], np.float32)}
    settings = {"calibration": {"sigma": "residual", "draws": 1}}
    y = rng.normal(size=(4000, 2)).astype(np.float32)
    pred = np.zeros_like(y)
    wide = _Sample("test", y, rng.normal(size=(4000, 3)))
    out = CT.fold_trust(None, settings, arrays, [wide], [pred], np.zeros((2, 4)), None, None)
    assert out["coverage_68"] == pytest.approx(0.68, abs=0.03)
    assert out["coverage_95"] == pytest.approx(0.95, abs=0.015)
    far = CT.fold_trust(None, settings, arrays, [wide], [pred + 10], np.zeros((2, 4)), None, None)
    assert far["coverage_95"] == 0.0  # every test value lies outside the shifted interval
    assert np.isnan(out["novel_fraction"])  # no novelty reference given


def test_reliability_compares_flagged_genes_with_the_rest():
    val = np.array([0.6, 0.5, 0.35, 0.1, 0.0, np.nan])
    held = np.array([0.5, 0.4, 0.3, 0.2, 0.1, 0.9])
    out = CT.reliability(val, held)
    assert out["spearman"] == pytest.approx(1.0)
    assert out["n_reliable"] == 3 and out["n_rest"] == 2  # the NaN gene counts in neither
    assert out["reliable_pcc"] == pytest.approx(0.4) and out["rest_pcc"] == pytest.approx(0.15)
