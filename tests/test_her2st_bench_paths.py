"""benchmarks/accuracy_her2st.py and its report on toy data: per-fold panels, tuned probes, worker merge, text."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from conftest import benchmark_modules

import dkan
from dkan.datasets import copy_sdata
from dkan.tl._cv import BASELINES


@pytest.fixture(scope="module")
def bench():
    with benchmark_modules("accuracy_her2st", "_her2st_report") as mods:
        yield mods


@pytest.fixture(scope="module")
def toy_cv(toy_master):
    return dkan.tl.cross_validate(
        copy_sdata(toy_master),
        groupby="sample",
        config="small",
        ablations=("no_text",),
        progress=False,
        max_epochs=1,
        feature_encoder="dummy",
        n_genes=10,
        panel_per_fold=True,
    )


def test_default_baselines_are_all_of_them(bench):
    acc, _ = bench
    args = acc.parse_args([])
    assert acc.names(args.baselines, BASELINES, "baselines") == BASELINES


def _worker_outputs(res, name: str, baselines: tuple[str, ...]) -> dict:
    keep = {m: p for m, p in res.predictions.items() if m in baselines or m == name}
    return {
        "name": name,
        "preds": keep,
        "history": res.histories[name],
        "obs": res.obs,
        "genes": res.genes,
        "folds": res.folds,
        "target": res.target,
        "fold_genes": res.fold_genes,
        "gene_sets": res.summary.gene_sets,
        "baseline_params": {m: p for m, p in res.baseline_params.items() if m in baselines},
        "train_times": [],
    }


def test_parallel_merge_reproduces_the_in_process_summary(bench, toy_cv):
    acc, _ = bench
    outs = [_worker_outputs(toy_cv, "DKAN", BASELINES), _worker_outputs(toy_cv, "no_text", ())]
    outs[1]["preds"] = {"no_text": toy_cv.predictions["no_text"]}
    merged = acc.merge_outputs(outs, BASELINES)
    a = merged.summary.per_fold.set_index(["method", "fold"]).sort_index()
    b = toy_cv.summary.per_fold.set_index(["method", "fold"]).sort_index()
    np.testing.assert_allclose(a.to_numpy(float), b.loc[a.index].to_numpy(float), equal_nan=True)
    assert merged.baseline_params == toy_cv.baseline_params
    outs[1]["fold_genes"] = [list(reversed(p)) for p in toy_cv.fold_genes]
    with pytest.raises(RuntimeError, match="fold panels"):
        acc.merge_outputs(outs, BASELINES)


def test_worker_rows_keep_each_variants_network_row(bench):
    acc, _ = bench
    rows = acc.variant_rows({"DKAN": 1, "DKAN_network": 2, "ridge": 3}, "no_text")
    assert rows == {"no_text": 1, "no_text_network": 2, "ridge": 3}  # no clash with the DKAN worker's DKAN_network
    assert acc.variant_rows({"DKAN": 1, "DKAN_network": 2}, "DKAN") == {"DKAN": 1, "DKAN_network": 2}


def test_report_states_the_per_fold_rule_and_the_probe_choices(bench, toy_cv, tmp_path):
    _, rep = bench
    cfg = dkan.DKANConfig.resolve("small", n_genes=10)
    out = {
        "res": toy_cv, "cfg": cfg, "overrides": {}, "device": "cpu", "text_sources": {}, "load": ("0", "0"),
        "times": {"total": 1.0}, "train_times": [1.0], "sections": toy_cv.obs["sample"].value_counts().to_dict(),
        "validation": {f"fold{i}": "blocks of the training samples" for i in range(3)},
    }  # fmt: skip
    text = rep.report(out, argparse.Namespace(preset="small"))
    assert "chosen on the fold's training sections only" in text and "never the test section" in text
    assert "test fold0: blocks of the training samples" in text
    assert "ridge_hest" in text and "## Tuned probes: parameter chosen per fold" in text
    assert "ridge_ctx (alpha)" in text and "knn (k)" in text
    checks = rep.target_check(toy_cv)
    assert any("(best tuned probe)" in line for line in checks)
    assert any("ridge_hest" in line for line in checks)
    rep.dump_json(tmp_path / "r.json", toy_cv)
    payload = json.loads((tmp_path / "r.json").read_text())
    assert len(payload["baseline_params"]["knn"]) == 3 and len(payload["fold_genes"]) == 3


def test_per_fold_summary_plots(toy_cv):
    fig = dkan.pl.metrics(toy_cv.summary, return_fig=True)
    assert fig is not None
    assert dkan.pl.metrics(toy_cv.summary, kind="bar", metric="pcc_heg", return_fig=True) is not None


def test_blend_rows_are_the_mean_of_their_members_and_scored(bench, toy_cv):
    import dataclasses

    acc, rep = bench
    p = toy_cv.predictions
    # the default blends: DKAN already is the mean of its network and the two probes; only the probes' mix is derived
    np.testing.assert_allclose(p["DKAN"], (p["DKAN_network"] + p["ridge_ctx"] + p["knn"]) / 3, rtol=1e-5, atol=1e-6)
    res = acc.add_blends(toy_cv)
    assert "probes" in res.summary.summary.index and "DKAN+probes" not in res.predictions
    np.testing.assert_allclose(res.predictions["probes"], (p["ridge_ctx"] + p["knn"]) / 2, rtol=1e-6, equal_nan=True)
    assert any(line.startswith("- DKAN_network") for line in rep.target_check(res))
    # a network-alone run (probe_blend=False): the X+probes rows are derived from its rows
    plain = {k: v for k, v in p.items() if k != "DKAN_network"} | {"DKAN": p["DKAN_network"]}
    res = acc.add_blends(dataclasses.replace(toy_cv, predictions=plain))
    methods = set(res.summary.summary.index)
    assert {"probes", "DKAN+probes", "no_text+probes"} <= methods
    assert "shuffled_text+probes" not in methods  # toy_cv has no shuffled_text row
    want = (plain["DKAN"] + plain["ridge_ctx"] + plain["knn"]) / 3
    np.testing.assert_allclose(res.predictions["DKAN+probes"], want, rtol=1e-6, equal_nan=True)
    lines = rep.target_check(res)
    assert any(line.startswith("- DKAN+probes") and " probes on PCC-ALL" in line for line in lines)
    assert any(line.startswith("- MSE: DKAN+probes") for line in lines)


def test_the_report_names_the_commit_of_the_start_of_the_run(bench, monkeypatch):
    _, rep = bench
    heads = iter(["aaaaaaa", "bbbbbbb"])

    class Done:
        def __init__(self, out):
            self.stdout = out

    def run(cmd, **kw):
        return Done("" if "status" in cmd else next(heads))

    rep.git_commit.cache_clear()
    monkeypatch.setattr(rep.subprocess, "run", run)
    try:
        assert rep.git_commit() == "aaaaaaa"  # as the run starts
        assert rep.git_commit() == "aaaaaaa"  # when the report is written, after a commit made meanwhile
    finally:
        rep.git_commit.cache_clear()
