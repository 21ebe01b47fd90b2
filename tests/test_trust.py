"""Trust signals (issue 23): calibrated intervals, per-gene validation PCC, novelty of unfamiliar input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import benchmark_modules

import dkan
from dkan import _keys as K
from dkan import _trust as T
from dkan.datasets import copy_sdata

FAST = {"max_epochs": 2, "feature_encoder": "dummy", "n_genes": 30}
LOWER, UPPER, STD = (f"{K.PRED}{s}" for s in (K.LOWER_SUFFIX, K.UPPER_SUFFIX, K.STD_SUFFIX))


# ------------------------------------------------------------------------------------------ numerics
def _heteroscedastic(rng, n, g, *, understate=4.0):
    """Residuals with a known per-spot spread, and a reported spread ``understate`` times too small."""
    true_sd = rng.uniform(0.2, 2.0, size=(n, g)) * rng.uniform(0.5, 3.0, size=g)
    return rng.normal(0.0, true_sd), true_sd / understate


@pytest.mark.parametrize("level", [0.68, 0.9, 0.95])
def test_conformal_intervals_reach_nominal_coverage_on_new_residuals(level):
    rng = np.random.default_rng(0)
    res, sigma = _heteroscedastic(rng, 1000, 6)
    calib = T.fit_conformal(res, sigma)
    new_res, new_sigma = _heteroscedastic(rng, 20000, 6)
    q, ok = T.interval_factor(calib, level)
    assert ok
    half = np.maximum(new_sigma, calib["floor"]) * q
    cover = (np.abs(new_res) <= half).mean(0)
    np.testing.assert_allclose(cover, level, atol=0.025)
    raw = (np.abs(new_res) <= 1.6449 * new_sigma).mean()  # the uncalibrated "90 %" interval covers far less
    assert raw < 0.5


def test_calibrated_sigma_matches_the_error_scale():
    rng = np.random.default_rng(1)
    res, sigma = _heteroscedastic(rng, 2000, 4)
    calib = T.fit_conformal(res, sigma)
    new_res, new_sigma = _heteroscedastic(rng, 20000, 4)
    sd = T.calibrated_sigma(new_sigma, calib)
    np.testing.assert_allclose(np.sqrt(np.mean((new_res / sd) ** 2, axis=0)), 1.0, atol=0.05)
    assert (np.abs(new_res) <= sd).mean() == pytest.approx(0.683, abs=0.03)  # Gaussian errors: +-1 sd ~ 68 %


def test_conformal_level_uses_the_finite_sample_rank_and_says_when_unattainable():
    assert T.conformal_level(0.9, 9) == (1.0, True)  # ceil(10 * 0.9) = 9 of 9
    assert T.conformal_level(0.5, 9) == (pytest.approx(5 / 9), True)
    level, ok = T.conformal_level(0.9, 5)  # ceil(6 * 0.9) = 6 > 5: unbounded, the largest score is used
    assert (level, ok) == (1.0, False)


def test_fit_conformal_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        T.fit_conformal(np.zeros((5, 2)), np.ones((5, 3)))


def test_novelty_flags_shifted_features_and_few_familiar_ones():
    rng = np.random.default_rng(2)
    mix = rng.normal(size=(8, 64))
    train = rng.normal(size=(1500, 8)) @ mix + 0.1 * rng.normal(size=(1500, 64))
    ref = T.fit_novelty(train, max_reference=600, k=10)
    assert ref["reference"].shape == (600, 65) and ref["own"].shape == (600,) and ref["version"][0] == 2
    same = rng.normal(size=(1000, 8)) @ mix + 0.1 * rng.normal(size=(1000, 64))
    shifted = same + 3.0 * rng.normal(size=64)  # one offset for every spot: another stain or scanner
    other = 3.0 * rng.normal(size=(1000, 64))  # the training scale, in directions the training spots never vary
    thr = ref["threshold"][0]
    assert (T.novelty_scores(ref, same) > thr).mean() < 0.05
    assert (T.novelty_scores(ref, shifted) > thr).mean() > 0.95
    assert (T.novelty_scores(ref, other) > thr).mean() > 0.95
    with pytest.raises(ValueError, match="do not match"):
        T.novelty_scores(ref, same[:, :10])


def _relu_features(rng, n, mix):
    """Non-negative, heavy-tailed features like a CNN's pooled activations: a few tissue factors, rectified."""
    return np.maximum(rng.gamma(2.0, 1.0, size=(n, mix.shape[0])) @ mix + 0.3 * rng.normal(size=(n, mix.shape[1])), 0)


def test_novelty_flags_weak_and_featureless_input_near_the_reference_mean():
    """The version-1 failure on real data: a blank slide (features near 0) or faint tissue (a scaled-down copy)
    lies near the centre of the standardised cloud, nearer to the reference spots than they are to each other."""
    rng = np.random.default_rng(5)
    mix = np.abs(rng.normal(size=(6, 96))) * (rng.random((6, 96)) < 0.3)
    train = _relu_features(rng, 1500, mix)
    same = _relu_features(rng, 600, mix)
    blank = np.abs(0.05 * rng.normal(size=(600, 96)))  # featureless: every activation near zero
    faint = 0.02 * same  # the same tissue, far weaker than any training spot
    ref = T.fit_novelty(train, k=10)
    thr = ref["threshold"][0]
    assert (T.novelty_scores(ref, same) > thr).mean() < 0.05
    for odd in (blank, faint):
        assert (T.novelty_scores(ref, odd) > thr).mean() > 0.95
    old = T.fit_novelty_v1(train, k=10)  # the version-1 scorer calls them familiar
    for odd in (blank, faint):
        assert (T.novelty_scores(old, odd) > old["threshold"][0]).mean() < 0.5


def test_a_version_1_novelty_reference_still_scores():
    rng = np.random.default_rng(3)
    train = rng.normal(size=(300, 20))
    old = T.fit_novelty_v1(train, k=5)
    assert T.novelty_version(old) == 1 and T.novelty_version(T.fit_novelty(train)) == 2
    scores = T.novelty_scores(old, train[:50])
    assert scores.shape == (50,) and (scores < old["threshold"][0]).mean() > 0.9
    assert (T.novelty_scores(old, train[:50] + 50.0) > old["threshold"][0]).all()


# ------------------------------------------------------------------------------------------ in the package
@pytest.fixture(scope="module")
def split():
    from dkan.demo import split_toy

    return split_toy()


@pytest.fixture(scope="module")
def model(split):
    return dkan.tl.train(copy_sdata(split[0]), config="small", progress=False, **FAST)


def _recolour(sdata, fn):
    """Every image of ``sdata`` replaced by ``fn(uint8 array (c, y, x))`` (the novelty benchmark's helper)."""
    with benchmark_modules("novelty_her2st") as (novelty,):
        return novelty.recolour(sdata, fn)


def test_training_records_calibration_pcc_and_novelty(model):
    g = len(model.genes)
    assert model.trust["calibration.quantiles"].shape == (len(T.LEVELS), g)
    assert model.trust["calibration.rms"].shape == (g,) and (model.trust["calibration.rms"] > 0).all()
    assert model.trust["val_pcc"].shape == (g,)
    assert model.meta[K.UNS_TRUST]["calibration"]["sigma"] == "mc_dropout"  # the small preset has dropout
    assert model.meta[K.UNS_TRUST]["novelty"]["threshold"] > 0


def test_predict_with_an_interval_writes_calibrated_layers(model, split):
    new = copy_sdata(split[1])
    tkey = dkan.tl.predict(new, model, interval=0.9, progress=False)
    table = new.tables[tkey]
    pred, lo, hi, sd = (table.layers[k] for k in (K.PRED, LOWER, UPPER, STD))
    assert lo.shape == hi.shape == sd.shape == pred.shape == table.shape
    assert np.isfinite(lo).all() and (lo <= pred).all() and (pred <= hi).all() and (sd > 0).all()
    rec = table.uns[K.UNS][K.UNS_PREDICT]
    assert rec["interval"] == 0.9 and rec["std_calibrated"] and rec["n_samples"] == 10
    np.testing.assert_allclose(table.var[K.VAL_PCC].to_numpy(), model.trust["val_pcc"][table.var_names.get_indexer(
        model.genes)], rtol=1e-6)  # fmt: skip
    assert table.obs[K.NOVELTY].dtype == np.float32 and table.obs[K.NOVEL].dtype == bool
    # a wider interval is wider, and the calibrated std is the raw dropout spread times the per-gene factor
    wide = copy_sdata(split[1])
    dkan.tl.predict(wide, model, interval=0.99, progress=False)
    assert (wide.tables[tkey].layers[UPPER] - wide.tables[tkey].layers[LOWER] >= hi - lo - 1e-6).all()
    raw = copy_sdata(split[1])
    dkan.tl.predict(raw, model, n_samples=10, progress=False)
    floor, rms = model.trust["calibration.floor"], model.trust["calibration.rms"]
    np.testing.assert_allclose(sd, np.maximum(raw.tables[tkey].layers[STD], floor) * rms, rtol=1e-5)


def test_interval_is_refused_for_models_without_calibration(model, split, tmp_path):
    from dkan.train.fitted import DKANModel

    old = DKANModel(model.module, model.config, model.genes, model.gene_embeddings, model.meta, model.history)
    old.meta.pop(K.UNS_TRUST, None)
    old.save(tmp_path / "old")  # what a format-2 folder written before the trust signals holds
    loaded = DKANModel.load(tmp_path / "old")
    assert loaded.trust == {}
    new = copy_sdata(split[1])
    with pytest.raises(ValueError, match=r"no calibration.*Train the model again"):
        dkan.tl.predict(new, loaded, interval=0.9, progress=False)
    assert not any(k.endswith("_dkan") for k in new.tables)  # a refused call writes nothing
    tkey = dkan.tl.predict(new, loaded, progress=False)  # without an interval it still predicts
    assert K.NOVEL not in new.tables[tkey].obs and K.VAL_PCC not in new.tables[tkey].var
    with pytest.raises(ValueError, match="validation PCC"):
        dkan.tl.reliable_genes(loaded)


def test_a_later_prediction_without_the_signals_drops_the_earlier_ones(model, split):
    from dkan.train.fitted import DKANModel

    new = copy_sdata(split[1])
    tkey = dkan.tl.predict(new, model, interval=0.9, progress=False)
    old = DKANModel(model.module, model.config, model.genes, model.gene_embeddings, model.meta, model.history)
    dkan.tl.predict(new, old, overwrite=True, progress=False)
    table = new.tables[tkey]
    assert K.VAL_PCC not in table.var and K.NOVEL not in table.obs  # they belonged to the other model
    assert LOWER not in table.layers and UPPER not in table.layers


def test_genes_outside_the_panel_get_no_interval(model, split):
    outside = [g for g in split[0].tables[K.TABLE].var_names if g not in model.genes][:1]
    new = copy_sdata(split[1])
    texts = {g: f"{g} is a gene expressed in breast tissue." for g in outside}
    tkey = dkan.tl.predict(new, model, interval=0.9, genes=outside, descriptions=texts, progress=False)
    table = new.tables[tkey]
    col = table.var_names.get_indexer(outside)
    assert np.isnan(table.layers[LOWER][:, col]).all() and np.isfinite(table.layers[STD][:, col]).all()
    assert np.isnan(table.var[K.VAL_PCC].to_numpy()[col]).all()


def test_training_features_are_a_capped_draw_over_all_samples():
    import torch

    from dkan.tl._trust import _training_features
    from dkan.train.data import SampleInputs

    samples = [
        SampleInputs(f"s{i}", torch.full((n, 2), float(i)), None, None, torch.zeros(n, 2, dtype=torch.long))
        for i, n in enumerate((30, 50, 20))
    ]
    assert _training_features(samples, 1000, 0).shape == (100, 2)
    few = _training_features(samples, 40, 0)
    assert few.shape == (40, 2) and set(np.unique(few[:, 0])) == {0.0, 1.0, 2.0}


def test_interval_arguments_are_checked(model, split):
    new = copy_sdata(split[1])
    with pytest.raises(ValueError, match="coverage level"):
        dkan.tl.predict(new, model, interval=90, progress=False)
    with pytest.raises(ValueError, match="single model"):
        dkan.tl.predict(new, [model, model], interval=0.9, progress=False)


def test_trust_signals_survive_save_and_load(model, tmp_path):
    from dkan.train.fitted import DKANModel

    loaded = DKANModel.load(model.save(tmp_path / "m"))
    assert set(loaded.trust) == set(model.trust)
    for k, v in model.trust.items():
        np.testing.assert_array_equal(loaded.trust[k], v)
    assert loaded.meta[K.UNS_TRUST] == model.meta[K.UNS_TRUST]


def test_reliable_genes_from_the_model_and_from_predictions(model, split):
    pcc = dict(zip(model.genes, model.trust["val_pcc"], strict=True))
    cut = float(np.median(model.trust["val_pcc"]))  # a threshold inside the recorded range
    genes = dkan.tl.reliable_genes(model, min_pcc=cut)
    assert genes == sorted((g for g, v in pcc.items() if v >= cut), key=lambda g: -pcc[g])
    assert 0 < len(genes) < len(model.genes)
    new = copy_sdata(split[1])
    dkan.tl.predict(new, model, progress=False)
    assert dkan.tl.reliable_genes(new, min_pcc=cut) == genes
    with pytest.raises(TypeError, match="min_pcc"):
        dkan.tl.reliable_genes(model, min_pcc="0.3")


def test_training_slides_are_familiar_and_blank_or_shifted_slides_novel(model, split, caplog):
    same = copy_sdata(split[0])
    tkey = dkan.tl.predict(same, model, progress=False)
    assert same.tables[tkey].obs[K.NOVEL].mean() < 0.05
    held = copy_sdata(split[1])  # another toy slide from the same generator
    assert held.tables[dkan.tl.predict(held, model, progress=False)].obs[K.NOVEL].mean() < 0.2
    shift = np.array([90, -60, 40])[:, None, None]  # a strong colour cast: another stain or scanner
    for change in (lambda a: np.full_like(a, 255), lambda a: a.astype(int) + shift):
        odd = _recolour(copy_sdata(split[1]), change)
        with caplog.at_level(logging.WARNING, logger="dkan"):
            caplog.clear()
            tkey = dkan.tl.predict(odd, model, progress=False)
        assert odd.tables[tkey].obs[K.NOVEL].mean() > 0.9
        warned = [r for r in caplog.records if "unlike the training data" in r.getMessage()]
        assert len(warned) == 1 and "% of spots" in warned[0].getMessage()


def test_spatial_pred_shows_validation_pcc_and_novel_spots(model, split):
    import matplotlib.pyplot as plt

    new = copy_sdata(split[1])
    dkan.tl.predict(new, model, progress=False)
    gene = model.genes[0]
    fig = dkan.pl.spatial_pred(new, gene, show_novel=True, return_fig=True)
    title = fig.axes[1].get_title()
    assert f"validation PCC = {model.trust['val_pcc'][0]:.2f}" in title and "novel spots:" in title
    plt.close(fig)
    del new.tables[f"{K.TABLE}{K.RESULTS_SUFFIX}"].obs[K.NOVEL]
    with pytest.raises(KeyError, match="show_novel"):
        dkan.pl.spatial_pred(new, gene, show_novel=True)
    plt.close("all")


def test_a_model_with_the_version_1_novelty_reference_predicts_it_with_a_note(model, split, caplog):
    saved = dict(model.trust)
    feats = np.random.default_rng(0).normal(size=(50, len(model.trust["novelty.reference"][0]) - 1))
    v1 = T.fit_novelty_v1(feats, k=5)
    model.trust = {**{k: v for k, v in saved.items() if not k.startswith("novelty.")}}
    model.trust.update({f"novelty.{k}": v for k, v in v1.items()})
    try:
        new = copy_sdata(split[1])
        with caplog.at_level(logging.INFO, logger="dkan"):
            tkey = dkan.tl.predict(new, model, progress=False)
        assert any("version-1 novelty reference" in r.getMessage() for r in caplog.records)
        assert np.isfinite(new.tables[tkey].obs[K.NOVELTY]).all()
    finally:
        model.trust = saved
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dkan"):
        dkan.tl.predict(copy_sdata(split[1]), model, progress=False)
    assert not any("version-1" in r.getMessage() for r in caplog.records)


def test_no_validation_data_gives_novelty_but_no_calibration(split):
    m = dkan.tl.train(copy_sdata(split[0]), config="small", progress=False, **{**FAST, "val_fraction": 0.0})
    assert "val_pcc" not in m.trust and "calibration" not in m.meta[K.UNS_TRUST]
    assert "novelty.reference" in m.trust


@pytest.fixture(scope="module")
def her2st_model():
    """Real data: a small her2st model (C2, C3), and a loader of its held-out section C4 (same patient)."""
    from conftest import data_path

    her2st = data_path("her2st")
    model = dkan.tl.train(
        dkan.datasets.her2st(her2st, sections=["C2", "C3"], progress=False),
        config="small", progress=False, max_epochs=1, n_genes=20,
    )  # fmt: skip
    return model, lambda: dkan.datasets.her2st(her2st, sections=["C4"], progress=False)


def _novel_fraction(sdata, model):
    tkey = dkan.tl.predict(sdata, model, progress=False)
    return float(sdata.tables[tkey].obs[K.NOVEL].mean())


@pytest.mark.slow
def test_her2st_model_flags_the_mouse_bulb_and_a_blank_slide_but_not_its_own_patient(her2st_model):
    from conftest import data_path

    model, c4 = her2st_model
    mob = data_path("stutility_mob")
    assert _novel_fraction(c4(), model) < 0.2
    assert _novel_fraction(_recolour(c4(), lambda a: np.full_like(a, 255)), model) > 0.5
    mouse = dkan.io.read_st(mob / "MOB1.tsv", mob / "alignment_table_MOB1.tsv", mob / "MOB1.jpg", sample_id="MOB1")
    table = mouse.tables[K.TABLE]
    table.X = np.zeros(table.shape, dtype=np.float32)  # mouse Ensembl ids share no gene with the model: image only
    assert _novel_fraction(mouse, model) > 0.5


@pytest.mark.slow
def test_her2st_model_flags_a_stain_shift(her2st_model):
    # the frozen efficientnet_lite0 features barely move under this shift (~5 % flagged): the colour signal does it
    model, c4 = her2st_model
    shift = np.array([70, -50, 40])[:, None, None]
    assert _novel_fraction(_recolour(c4(), lambda a: a.astype(int) + shift), model) > 0.5


def test_a_model_without_dropout_is_calibrated_with_a_per_gene_residual_scale(split):
    no_dropout = {f"{m}_dropout": 0.0 for m in ("fusion", "slide", "region", "img_cross", "exp_cross", "text")}
    m = dkan.tl.train(
        copy_sdata(split[0]), config="small", progress=False, **FAST, **no_dropout, dropout_expr=0.0
    )  # fmt: skip
    assert m.meta[K.UNS_TRUST]["calibration"]["sigma"] == "residual"
    new = copy_sdata(split[1])
    tkey = dkan.tl.predict(new, m, interval=0.9, progress=False)
    table = new.tables[tkey]
    assert table.uns[K.UNS][K.UNS_PREDICT]["n_samples"] == 1  # no extra forward passes
    sd = table.layers[STD]
    np.testing.assert_allclose(sd, np.broadcast_to(m.trust["calibration.rms"], sd.shape), rtol=1e-6)
    half = (table.layers[UPPER] - table.layers[LOWER]) / 2
    assert np.allclose(half, half[:1]) and (half > 0).all()  # one width per gene
