"""Cross-validation end to end on toy slides: folds, baselines, ablations, summary table."""

import numpy as np
import pytest

import dkan
from dkan.datasets import copy_sdata
from dkan.tl._cv import make_folds


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
    # the default blends DKAN with the probes; the network alone is its own row
    rows = ["DKAN", "no_text", "DKAN_network", "mean", "ridge_hest", "ridge", "ridge_ctx", "knn"]
    assert set(res.predictions) == set(rows)
    for p in res.predictions.values():
        assert p.shape == (432, len(res.genes)) and np.isfinite(p).all()
    table = res.table()
    assert list(table.index) == rows
    assert "PCC-ALL" in table.columns
    per_fold = res.summary.per_fold
    assert len(per_fold) == 8 * 3
    # each tuned probe records its parameter per fold; 2 training samples per fold -> the spatial block split
    for name, key in (("ridge", "alpha"), ("ridge_ctx", "alpha"), ("knn", "k")):
        assert len(res.baseline_params[name]) == 3
        assert all(key in p and "spatial blocks" in p["inner_split"] for p in res.baseline_params[name])
    # the mean baseline predicts a constant per gene: its PCC is undefined, never silently 0
    assert per_fold.loc[per_fold.method == "mean", "pcc_all"].isna().all()
    assert len(res.histories["DKAN"]) == 3 and len(res.histories["DKAN"][0]) == 2


def test_cross_validate_rejects_unknown_ablation(toy):
    with pytest.raises(ValueError, match="Unknown ablations"):
        dkan.tl.cross_validate(toy, ablations=("nope",))


def test_shuffled_text_control_gives_every_gene_another_genes_text():
    from dkan.tl._cv import shuffle_gene_text

    emb = np.arange(20, dtype=np.float32).reshape(10, 2)
    for seed in range(20):
        out = shuffle_gene_text(emb, seed=seed)
        assert sorted(map(tuple, out.tolist())) == sorted(map(tuple, emb.tolist()))  # same rows
        assert not (out == emb).all(axis=1).any()  # none in its own place


def test_cross_validate_runs_the_shuffled_text_control(toy_master):
    res = dkan.tl.cross_validate(
        copy_sdata(toy_master),
        groupby="sample",
        config="small",
        ablations=("shuffled_text",),
        baselines=(),
        progress=False,
        max_epochs=1,
        feature_encoder="dummy",
    )
    assert set(res.predictions) == {"DKAN", "shuffled_text", "DKAN_network"}
    assert not np.allclose(res.predictions["DKAN"], res.predictions["shuffled_text"])


def test_cross_validate_takes_gene_info_and_warns_on_ensembl_ids(toy_master, caplog, monkeypatch):
    """cross_validate prepares its inputs as train does: `gene_info=` reaches the descriptions, Ensembl ids warn."""
    import logging

    from dkan._data import prepare as prep

    seen = {}

    def fake_prepare(*args, describe_kwargs=None, **kwargs):
        seen["describe_kwargs"] = describe_kwargs
        raise RuntimeError("stop after the preparation")

    monkeypatch.setattr(prep, "prepare_training", fake_prepare)
    sdata = copy_sdata(toy_master)
    table = sdata.tables["table"]
    table.var_names = [f"ENSG{i:011d}" for i in range(table.n_vars)]
    with caplog.at_level(logging.WARNING, logger="dkan"), pytest.raises(RuntimeError, match="stop after"):
        dkan.tl.cross_validate(sdata, groupby="sample", gene_info="gi.gz", progress=False, feature_encoder="dummy")
    assert seen["describe_kwargs"] == {"gene_info": "gi.gz"}
    assert "Ensembl ids" in caplog.text
