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


def test_novel_fraction_counts_colour_flags_like_predict():
    """A fold's novel share: frozen-feature flags, or colour flags when the model and the test sample have colours."""
    rng = np.random.default_rng(0)
    train_spot = rng.gamma(2.0, 1.0, size=(300, 8))
    arrays = {f"novelty.{k}": v for k, v in dkan._trust.fit_novelty(train_spot).items()}
    he = np.array([0.35, 0.55, 0.3])  # optical densities of an H&E-like patch (R, G, B)
    train_od = he * rng.uniform(0.6, 1.4, size=(300, 1)) + rng.normal(0, 0.01, size=(300, 3))
    arrays |= {f"colour.{k}": v for k, v in dkan._trust.fit_colour(train_od).items()}
    test = _Sample("test", np.zeros((200, 2), np.float32), train_spot[:200])
    plain = CT._novelty(arrays, [test])["novel_fraction"]  # no colours on the sample: features only
    test.colour = (he[::-1] * rng.uniform(0.6, 1.4, size=(200, 1))).astype(np.float32)  # another hue
    shifted = CT._novelty(arrays, [test])["novel_fraction"]
    assert plain < 0.1 and shifted > 0.9
    no_ref = {k: v for k, v in arrays.items() if not k.startswith("colour.")}
    assert CT._novelty(no_ref, [test])["novel_fraction"] == plain  # no colour reference: features only
