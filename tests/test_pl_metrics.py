from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import PathPatch, Rectangle

from dkan import _keys as K
from dkan._evaluation.combine import combine_folds
from dkan._evaluation.evaluate import evaluate
from dkan.pl._metrics import metrics
from dkan.pl._utils import finish_figure

METHODS = ["dkan", "ridge", "mean_noise"]


@pytest.fixture(scope="module")
def cv():
    rng = np.random.default_rng(0)
    n, g = 60, 10
    target = rng.gamma(2.0, 1.0, size=(n, g))
    obs = pd.DataFrame({K.SAMPLE: np.repeat(["a", "b", "c"], 20)}, index=[str(i) for i in range(n)])
    a = ad.AnnData(X=np.zeros((n, g), np.float32), obs=obs)
    a.var_names = [f"G{j}" for j in range(g)]
    a.layers[K.TARGET] = target
    a.layers["dkan"] = target + rng.normal(scale=0.5, size=(n, g))
    a.layers["ridge"] = target + rng.normal(scale=2.0, size=(n, g))
    a.layers["mean_noise"] = rng.normal(size=(n, g))
    res = {m: evaluate(a, pred_layer=m, fold=K.SAMPLE, n_top=3) for m in METHODS}
    plt.close("all")
    return combine_folds(res, n_top=3)


def test_box_one_box_per_method(cv):
    fig = metrics(cv, kind="box", return_fig=True, figsize=(4, 3), dpi=50)
    ax = fig.axes[0]
    boxes = [p for p in ax.patches if isinstance(p, PathPatch)]
    assert len(boxes) == len(METHODS)
    assert [t.get_text() for t in ax.get_xticklabels()] == METHODS
    assert "Pearson" in ax.get_ylabel()
    assert "3 folds" in ax.get_title()
    assert fig.get_size_inches() == pytest.approx((4, 3))
    plt.close(fig)


def test_bar_heights_are_fold_means(cv, tmp_path):
    fig, ax = plt.subplots()
    out = metrics(cv, kind="bar", metric="pcc_heg", ax=ax, save=tmp_path / "m.png")
    assert out is None
    assert (tmp_path / "m.png").stat().st_size > 0
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == len(METHODS)
    np.testing.assert_allclose([b.get_height() for b in bars], cv.summary.loc[METHODS, "pcc_heg_mean"])
    assert [t.get_text() for t in ax.get_xticklabels()] == METHODS
    plt.close(fig)


def test_accepts_eval_result_and_rejects_bad_input(cv):
    rng = np.random.default_rng(1)
    t = rng.normal(size=(20, 4))
    a = ad.AnnData(X=np.zeros((20, 4)), obs=pd.DataFrame({K.SAMPLE: ["x"] * 20}, index=[str(i) for i in range(20)]))
    a.layers[K.TARGET], a.layers[K.PRED] = t, t + rng.normal(size=t.shape)
    fig = metrics(evaluate(a), return_fig=True)
    assert [x.get_text() for x in fig.axes[0].get_xticklabels()] == [K.PRED]
    plt.close(fig)
    with pytest.raises(ValueError, match="kind"):
        metrics(cv, kind="violin")
    with pytest.raises(ValueError, match="metric"):
        metrics(cv, kind="bar", metric="r2")
    with pytest.raises(TypeError, match="result"):
        metrics("not a result")


def test_finish_figure(tmp_path):
    fig, _ = plt.subplots()
    assert finish_figure(fig, return_fig=False, save=None) is None
    assert finish_figure(fig, return_fig=True, save=tmp_path / "f.pdf") is fig
    assert (tmp_path / "f.pdf").exists()
    plt.close(fig)
