"""Gene panel, HEG and HVG chosen per fold on the training samples only (issue 20, item 2)."""

import numpy as np
from scipy import sparse

import dkan
from dkan import _keys as K
from dkan._config import DKANConfig
from dkan._evaluation.folds import training_gene_sets, training_panel
from dkan.datasets import copy_sdata
from dkan.tl._cv import _fold_panels


def _boost_sample(sdata, sample: str, genes: list[str]) -> None:
    """Make ``genes`` dominate the counts of one sample only."""
    t = sdata.tables["table"]
    x = t.X.toarray() if sparse.issparse(t.X) else np.asarray(t.X)
    rows = t.obs[K.SAMPLE].astype(str).to_numpy() == sample
    cols = t.var_names.get_indexer(genes)
    x[np.ix_(rows, cols)] += 10_000
    t.X = sparse.csr_matrix(x)


def test_training_panel_ignores_spots_outside_the_training_rows(toy):
    t = toy.tables["table"]
    rows = np.flatnonzero(t.obs[K.SAMPLE].astype(str).to_numpy() != "s0")
    before = training_panel([t], [rows], 10)
    _boost_sample(toy, "s0", list(t.var_names[-5:]))
    assert training_panel([t], [rows], 10) == before
    everything = training_panel([t], [np.arange(t.n_obs)], 10)
    assert set(t.var_names[-5:]) <= set(everything)  # the boost is visible when the sample is included


def test_fold_panels_never_see_the_test_sample(toy_master):
    cfg = DKANConfig.resolve("small", n_genes=10)
    a, b = copy_sdata(toy_master), copy_sdata(toy_master)
    boosted = list(b.tables["table"].var_names[-5:])
    _boost_sample(b, "s0", boosted)
    plan_a = _fold_panels(a, cfg, "sample", None, 0, None, None)
    plan_b = _fold_panels(b, cfg, "sample", None, 0, None, None)
    assert plan_a["panels"][0] == plan_b["panels"][0]  # fold 0 tests s0: its panel cannot move
    assert plan_a["panels"][1] != plan_b["panels"][1]  # s0 trains fold 1: there it can
    assert set(boosted) <= set(plan_b["panels"][1])
    union = set().union(*map(set, plan_b["panels"]))
    assert set(b.tables["table"].var_names[b.tables["table"].var[K.PANEL]]) == union


def test_given_panel_is_kept_unless_per_fold_is_asked(toy):
    dkan.pp.select_genes(toy.tables["table"], n_genes=10)
    cfg = DKANConfig.resolve("small", n_genes=10)
    assert _fold_panels(toy, cfg, "sample", None, 0, None, None) is None
    assert _fold_panels(toy, cfg, "sample", None, 0, None, False) is None
    assert len(_fold_panels(toy, cfg, "sample", None, 0, None, True)["panels"]) == 3


def test_training_gene_sets_follow_the_training_labels():
    y = np.zeros((20, 4))
    y[:, 2] = 5.0  # highly expressed
    y[:, 1] = np.r_[np.zeros(10), np.ones(10)]  # most variable after row normalisation
    sets = training_gene_sets(y, ["a", "b", "c", "d"], n_top=1)
    assert sets == {"heg": ["c"], "hvg": ["b"]}


def test_cross_validate_chooses_panel_and_gene_sets_per_fold(toy_master):
    sdata = copy_sdata(toy_master)
    res = dkan.tl.cross_validate(
        sdata,
        groupby="sample",
        config="small",
        baselines=("mean", "ridge"),
        progress=False,
        max_epochs=1,
        feature_encoder="dummy",
        n_genes=10,
    )
    assert res.fold_genes is not None and len(res.fold_genes) == 3
    assert all(len(p) == 10 for p in res.fold_genes)
    assert set(res.genes) == set().union(*map(set, res.fold_genes))
    for f, panel in enumerate(res.fold_genes):
        rows = res.obs["fold"].to_numpy() == f
        inside = np.isin(res.genes, panel)
        for p in res.predictions.values():
            assert np.isfinite(p[rows][:, inside]).all() and np.isnan(p[rows][:, ~inside]).all()
    sets = res.summary.gene_sets
    assert sets["panel"] == res.fold_genes and len(sets["heg"]) == 3
    assert all(set(h) <= set(p) for h, p in zip(sets["heg"], res.fold_genes, strict=True))
    assert "training sections only" in res.summary.protocol["gene_sets"]
    assert list(res.table().index) == ["DKAN", "DKAN_network", "mean", "ridge"]
    assert np.isfinite(res.summary.per_fold.loc[lambda d: d.method == "ridge", "pcc_all"]).all()
