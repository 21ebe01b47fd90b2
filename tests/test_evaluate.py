from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr

from dkan import _keys as K
from dkan._evaluation.combine import CVSummary, combine_folds
from dkan._evaluation.evaluate import EvalResult, evaluate

SAMPLES = ["s0", "s1", "s2", "s3"]
FOLDS = {"s0": "A", "s1": "A", "s2": "B", "s3": "C"}


def _adata(seed: int = 0, n_per: int = 25, n_genes: int = 12) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    n = n_per * len(SAMPLES)
    target = rng.gamma(2.0, 0.5, size=(n, n_genes)) + np.linspace(0, 2, n_genes)
    pred = target + rng.normal(scale=np.linspace(0.2, 2.0, n_genes), size=(n, n_genes))
    sample = np.repeat(SAMPLES, n_per)
    obs = pd.DataFrame({K.SAMPLE: sample, "fold": [FOLDS[s] for s in sample]}, index=[f"c{i}" for i in range(n)])
    a = ad.AnnData(X=np.zeros((n, n_genes), dtype=np.float32), obs=obs)
    a.var_names = [f"G{j}" for j in range(n_genes)]
    a.layers[K.TARGET] = target.astype(np.float32)
    a.layers[K.PRED] = pred.astype(np.float32)
    return a


def _r(p, t):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(pearsonr(p, t)[0])


def _independent(a: ad.AnnData, samples: list[str]):
    """Explicit loops: per-sample MAE/MSE and r, then nanmean over samples (one fold)."""
    P, T = np.asarray(a.layers[K.PRED], float), np.asarray(a.layers[K.TARGET], float)
    maes, mses, rs = [], [], []
    for s in samples:
        idx = np.flatnonzero(a.obs[K.SAMPLE].to_numpy() == s)
        p, t = P[idx], T[idx]
        maes.append(np.abs(p - t).sum() / p.size)
        mses.append(((p - t) ** 2).sum() / p.size)
        rs.append([_r(p[:, g], t[:, g]) for g in range(P.shape[1])])
    return np.array(maes), np.array(mses), np.array(rs)


def test_evaluate_adata_matches_independent_computation():
    a = _adata()
    res = evaluate(a, n_top=4)
    assert isinstance(res, EvalResult)
    maes, mses, rs = _independent(a, SAMPLES)
    ps = res.per_sample.set_index("group").loc[SAMPLES]
    np.testing.assert_allclose(ps["mae"], maes, rtol=1e-5)
    np.testing.assert_allclose(ps["mse"], mses, rtol=1e-5)
    assert list(ps["n_spots"]) == [25] * 4
    pg = res.per_gene.pivot(index="group", columns="gene", values="pearson").loc[SAMPLES, a.var_names]
    np.testing.assert_allclose(pg.to_numpy(), rs, rtol=1e-5, atol=1e-6)
    r_f = np.nanmean(rs, axis=0)
    assert res.summary["mae"] == pytest.approx(maes.mean(), rel=1e-5)
    assert res.summary["mse"] == pytest.approx(mses.mean(), rel=1e-5)
    assert res.summary["pcc_all"] == pytest.approx(np.nanmean(r_f), rel=1e-5)
    T = np.asarray(a.layers[K.TARGET], float)
    heg = np.argsort(T.mean(0))[-4:]
    assert res.summary["pcc_heg"] == pytest.approx(np.nanmean(r_f[heg]), rel=1e-5)
    assert set(res.protocol["gene_sets"]["heg"]) == {f"G{j}" for j in heg}
    assert "pcc_hpg" not in res.summary  # one fold: no HPG
    assert res.protocol["n_folds"] == 1 and res.protocol["n_nan_pearson_group"] == 0


def test_constant_vectors_are_nan_counted_and_skipped_by_nanmean():
    a = _adata()
    s1 = np.flatnonzero(a.obs[K.SAMPLE] == "s1")
    a.layers[K.PRED][s1, 2] = 1.5  # constant prediction in s1 for G2
    a.layers[K.TARGET][:, 5] = 0.7  # constant target everywhere for G5
    res = evaluate(a)
    pg = res.per_gene.set_index(["group", "gene"])["pearson"]
    assert np.isnan(pg[("s1", "G2")]) and not np.isnan(pg[("s0", "G2")])
    assert all(np.isnan(pg[(s, "G5")]) for s in SAMPLES)
    assert not (res.per_gene["pearson"] == 0).any()
    ns = res.per_sample.set_index("group")["n_nan_genes"]
    assert ns["s1"] == 2 and ns["s0"] == 1
    assert res.protocol["n_nan_pearson_group"] == 5
    assert res.protocol["n_nan_pearson_fold"] == 1  # G5 is NaN in every section
    fg = res.fold_gene.set_index("gene")["pearson"]
    others = [pg[(s, "G2")] for s in ("s0", "s2", "s3")]
    assert fg["G2"] == pytest.approx(np.mean(others))  # nanmean over sections, NaN not counted as 0


def test_nan_predictions_outside_panel_are_left_out():
    a = _adata()
    a.layers[K.PRED][:, [3, 7]] = np.nan
    res = evaluate(a)
    assert res.protocol["genes_dropped_nonfinite"] == ["G3", "G7"]
    assert res.genes == [g for g in a.var_names if g not in ("G3", "G7")]
    ref = evaluate(a, genes=res.genes)
    assert ref.summary.equals(res.summary)
    assert np.isfinite(res.summary.to_numpy()).all()


def test_panel_flag_selects_genes_and_groups_without_predictions_skipped():
    a = _adata()
    a.var[K.PANEL] = [j < 6 for j in range(a.n_vars)]
    a.layers[K.PRED][a.obs[K.SAMPLE].to_numpy() == "s3"] = np.nan
    res = evaluate(a)
    assert res.genes == [f"G{j}" for j in range(6)]
    assert res.protocol["groups_without_predictions"] == ["s3"]
    assert list(res.per_sample["group"]) == ["s0", "s1", "s2"]


def test_folds_and_combine_folds_agree_with_reference_notebook():
    a = _adata(seed=4)
    res = evaluate(a, fold="fold", n_top=4)
    assert res.folds == ["A", "B", "C"]
    assert "pcc_hpg" in res.per_fold
    # independent re-implementation of metric.ipynb on fold values
    maes, mses, rs = _independent(a, SAMPLES)
    fold_rows = {"A": [0, 1], "B": [2], "C": [3]}
    mae_f = np.array([np.nanmean(maes[i]) for i in fold_rows.values()])
    mse_f = np.array([np.nanmean(mses[i]) for i in fold_rows.values()])
    cor = np.stack([np.nanmean(rs[i], axis=0) for i in fold_rows.values()])
    rank_sum = np.zeros(cor.shape[1])
    for c in cor:
        for i, idx in enumerate(np.argsort(c)):
            rank_sum[idx] += i
    hpg = np.argsort(rank_sum)[-4:]
    T = np.asarray(a.layers[K.TARGET], float)
    heg = np.argsort(T.mean(0))[-4:][::-1]
    hvg = np.argsort((T / T.sum(1, keepdims=True)).var(0))[-4:][::-1]
    expected = {
        "mae": mae_f,
        "mse": mse_f,
        "pcc_all": np.nanmean(cor, axis=1),
        "pcc_hpg": np.nanmean(cor[:, hpg], axis=1),
        "pcc_heg": np.nanmean(cor[:, heg], axis=1),
        "pcc_hvg": np.nanmean(cor[:, hvg], axis=1),
    }
    for k, v in expected.items():
        np.testing.assert_allclose(res.per_fold[k], v, rtol=1e-5, err_msg=k)
        assert res.summary[k] == pytest.approx(np.mean(v), rel=1e-5)
    # the same folds evaluated separately and combined
    parts = {f: evaluate(a[a.obs["fold"] == f].copy()) for f in ("A", "B", "C")}
    cv = combine_folds(parts, n_top=4)
    assert isinstance(cv, CVSummary)
    row = cv.summary.iloc[0]
    for k, v in expected.items():
        assert row[f"{k}_mean"] == pytest.approx(np.mean(v), rel=1e-5), k
        assert row[f"{k}_std"] == pytest.approx(np.std(v), rel=1e-5), k  # population std
    assert list(cv.per_fold["fold"]) == ["A", "B", "C"]
    assert cv.protocol["n_label_spots"] == a.n_obs


def test_combine_folds_methods_table():
    a = _adata(seed=5)
    rng = np.random.default_rng(9)
    a.layers["noise_pred"] = rng.normal(size=a.shape).astype(np.float32)
    per_method = {
        "dkan": evaluate(a, fold="fold", n_top=3),
        "noise": evaluate(a, pred_layer="noise_pred", fold="fold", n_top=3),
    }
    cv = combine_folds(per_method, n_top=3)
    assert cv.methods == ["dkan", "noise"]
    table = cv.table(digits=2)
    assert list(table.columns) == ["MAE", "MSE", "PCC-ALL", "PCC-HPG", "PCC-HEG", "PCC-HVG"]
    assert " ± " in table.loc["dkan", "PCC-ALL"]
    assert cv.summary.loc["dkan", "pcc_all_mean"] > cv.summary.loc["noise", "pcc_all_mean"] + 0.3
    assert set(cv.gene_sets["hpg"]) == {"dkan", "noise"}
    assert len(cv.gene_sets["heg"]) == 3
    assert set(cv.per_gene["method"]) == {"dkan", "noise"}
    # nested mapping method -> {fold: result} gives the same numbers
    nested = {
        m: {f: evaluate(a[a.obs["fold"] == f].copy(), pred_layer=lay) for f in "ABC"}
        for m, lay in (("dkan", K.PRED), ("noise", "noise_pred"))
    }
    cv2 = combine_folds(nested, n_top=3)
    pd.testing.assert_frame_equal(cv.summary, cv2.summary, rtol=1e-6)


def test_combine_folds_labels_argument():
    a = _adata(seed=6)
    res = evaluate(a, fold="fold", n_top=2)
    T = np.asarray(a.layers[K.TARGET], float)
    labels = pd.DataFrame(T[:, ::-1], columns=list(a.var_names)[::-1])
    cv = combine_folds(res, labels=labels, n_top=2)
    assert cv.gene_sets["heg"] == combine_folds(res, n_top=2).gene_sets["heg"]
    with pytest.raises(ValueError, match="one column per evaluated gene"):
        combine_folds(res, labels=T[:, :3])
    with pytest.raises(TypeError, match="EvalResult"):
        combine_folds([1, 2])


def test_evaluate_on_spatialdata_table():
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    a = _adata(n_per=10)
    sdata_shapes = {}
    a.obs[K.REGION] = pd.Categorical([f"{s}_spots" for s in a.obs[K.SAMPLE]])
    a.obs[K.INSTANCE] = np.tile(np.arange(10), len(SAMPLES))
    for s in SAMPLES:
        xy = np.c_[np.arange(10.0), np.zeros(10)]
        sdata_shapes[f"{s}_spots"] = ShapesModel.parse(xy, geometry=0, radius=np.ones(10))
    table = TableModel.parse(a, region=[f"{s}_spots" for s in SAMPLES], region_key=K.REGION, instance_key=K.INSTANCE)
    sdata = SpatialData(shapes=sdata_shapes, tables={"table": table})
    res = evaluate(sdata)
    ref = evaluate(a)
    del sdata.tables["table"].obs[K.SAMPLE]  # falls back to the region column: one group per spots element
    by_region = evaluate(sdata)
    assert list(by_region.per_sample["group"]) == [f"{s}_spots" for s in SAMPLES]
    np.testing.assert_allclose(by_region.per_sample["mae"], ref.per_sample["mae"])
    assert res.protocol["table_key"] == "table"
    pd.testing.assert_series_equal(res.summary, ref.summary)
    with pytest.raises(KeyError, match="not_a_table"):
        evaluate(sdata, table_key="not_a_table")


def test_errors_name_the_problem_and_the_fix():
    a = _adata()
    with pytest.raises(KeyError, match=r"pred_layer='missing'.*dkan\.tl\.predict"):
        evaluate(a, pred_layer="missing")
    del a.layers[K.TARGET]
    with pytest.raises(KeyError, match=r"target_layer='dkan_target'.*dkan\.pp\.normalize"):
        evaluate(a)
    a = _adata()
    with pytest.raises(KeyError, match=r"groupby='patient'.*available columns"):
        evaluate(a, groupby="patient")
    with pytest.raises(KeyError, match="fold='nope'"):
        evaluate(a, fold="nope")
    with pytest.raises(KeyError, match="not in `var_names`"):
        evaluate(a, genes=["G0", "NOPE"])
    a.obs["bad_fold"] = np.arange(a.n_obs) % 2
    with pytest.raises(ValueError, match="spans several folds"):
        evaluate(a, fold="bad_fold")
    with pytest.raises(TypeError, match="SpatialData or an AnnData"):
        evaluate(np.zeros((3, 3)))
    a.layers[K.PRED][:] = np.nan
    with pytest.raises(ValueError, match="no finite value"):
        evaluate(a)


def test_groupby_none_is_one_group():
    a = _adata()
    res = evaluate(a, groupby=None)
    assert list(res.per_sample["group"]) == ["all"]
    P, T = np.asarray(a.layers[K.PRED], float), np.asarray(a.layers[K.TARGET], float)
    r = [_r(P[:, g], T[:, g]) for g in range(P.shape[1])]
    assert res.summary["pcc_all"] == pytest.approx(np.mean(r), rel=1e-5)
