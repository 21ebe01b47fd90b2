"""Cross-validation end to end on toy slides: folds, baselines, ablations, summary table."""

import numpy as np
import pytest

import dkan
from dkan.datasets import copy_sdata
from dkan.tl._evaluation.cv import make_folds


def test_make_folds():
    assert make_folds(["a", "a", "b", "c"], n_folds=None, seed=0) == [["a"], ["b"], ["c"]]
    folds = make_folds(list("abcd"), n_folds=2, seed=0)
    assert sorted(g for f in folds for g in f) == list("abcd") and len(folds) == 2
    with pytest.raises(ValueError, match="at least 2 groups"):
        make_folds(["a", "a"], n_folds=None, seed=0)
    with pytest.raises(ValueError, match="n_folds"):
        make_folds(list("ab"), n_folds=3, seed=0)


def test_cross_validate_toy(toy_master):
    sdata = copy_sdata(toy_master)
    res = dkan.tl.cross_validate(
        sdata,
        groupby="sample",
        config="small",
        ablations=("no_text",),
        progress=False,
        max_epochs=2,
        feature_encoder="dummy",
    )
    assert res.folds == [["s0"], ["s1"], ["s2"]]
    assert set(res.predictions) == {"DKAN", "no_text", "mean", "ridge"}
    for p in res.predictions.values():
        assert p.shape == (432, len(res.genes)) and np.isfinite(p).all()
    table = res.table()
    assert list(table.index) == ["DKAN", "no_text", "mean", "ridge"]
    assert "PCC-ALL" in table.columns
    per_fold = res.summary.per_fold
    assert len(per_fold) == 4 * 3
    # the mean baseline predicts a constant per gene: its PCC is undefined, never silently 0
    assert per_fold.loc[per_fold.method == "mean", "pcc_all"].isna().all()
    assert len(res.histories["DKAN"]) == 3 and len(res.histories["DKAN"][0]) == 2


def test_cross_validate_rejects_unknown_ablation(toy):
    with pytest.raises(ValueError, match="Unknown ablations"):
        dkan.tl.cross_validate(toy, ablations=("nope",))
