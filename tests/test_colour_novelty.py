"""Colour novelty (issue 23): a stain or scanner colour change, which the frozen features barely see, is flagged."""

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
SHIFT = np.array([70, -50, 40])[:, None, None]  # the her2st benchmark's shift (R, G, B)


def _recolour(sdata, fn):
    """Every image of ``sdata`` replaced by ``fn(uint8 array (c, y, x))`` (the novelty benchmark's helper)."""
    with benchmark_modules("novelty_her2st") as (novelty,):
        return novelty.recolour(sdata, fn)


def _results(sdata):
    return sdata.tables[f"{K.TABLE}{K.RESULTS_SUFFIX}"]


# ------------------------------------------------------------------------------------------ numerics
def test_optical_density_of_white_is_zero_and_follows_beer_lambert():
    patches = np.full((2, 3, 4, 4), 255, dtype=np.uint8)
    patches[1, 0] = 25  # red channel of the second patch: OD -log10(26 / 256)
    patches[1, 2, :2] = 0  # half of its blue channel black: OD -log10(1 / 256) there
    od = T.optical_density(patches)
    assert od.shape == (2, 3) and od.dtype == np.float32
    np.testing.assert_array_equal(od[0], 0.0)
    np.testing.assert_allclose(od[1], [-np.log10(26 / 256), 0.0, -np.log10(1 / 256) / 2], rtol=1e-6)
    with pytest.raises(ValueError, match="uint8 patches"):
        T.optical_density(patches.astype(np.float32))


def test_colour_reference_flags_another_hue_but_not_more_or_less_stain():
    rng = np.random.default_rng(0)
    hue = np.array([0.25, 0.35, 0.15])  # H&E-like optical densities per R, G, B
    train = hue * rng.uniform(0.5, 1.5, size=(500, 1)) + rng.normal(0, 0.01, size=(500, 3))
    ref = T.fit_colour(train)
    assert ref["threshold"].shape == (1,) and (T.colour_novelty(ref, train) > 1).mean() <= 0.011
    darker = hue * rng.uniform(1.2, 1.8, size=(200, 1)) + rng.normal(0, 0.01, size=(200, 3))  # same stain, more
    assert (T.colour_novelty(ref, darker) > 1).mean() < 0.05
    other = np.array([0.15, 0.40, 0.25]) * rng.uniform(0.5, 1.5, size=(200, 1))  # another stain's hue
    assert (T.colour_novelty(ref, other) > 1).all()
    assert (T.colour_novelty(ref, np.zeros((3, 3))) > 1).all()  # blank (white) patches
    with pytest.raises(ValueError, match=r"\(n >= 3, 3\)"):
        T.fit_colour(train[:, :2])


# ------------------------------------------------------------------------------------------ in the package
@pytest.fixture(scope="module")
def split():
    from dkan.demo import split_toy

    return split_toy()


@pytest.fixture(scope="module")
def model(split):
    return dkan.tl.train(copy_sdata(split[0]), config="small", progress=False, **FAST)


def test_extract_features_stores_each_patch_colour():
    sdata = dkan.datasets.toy(n_samples=1, grid_size=4, seed=1)
    dkan.tl.extract_features(sdata, "dummy", region=False, progress=False)
    colour = _results(sdata).obsm[K.SPOT_COLOUR]
    assert colour.shape == (16, 3) and colour.dtype == np.float32
    assert np.isfinite(colour).all() and (colour > 0).all()  # tissue absorbs light in every channel
    blank = _recolour(dkan.datasets.toy(n_samples=1, grid_size=4, seed=1), lambda a: np.full_like(a, 255))
    dkan.tl.extract_features(blank, "dummy", region=False, progress=False)
    np.testing.assert_array_equal(_results(blank).obsm[K.SPOT_COLOUR], 0.0)


def test_training_records_a_colour_reference(model):
    assert model.trust["colour.mean"].shape == (2,) and model.trust["colour.precision"].shape == (2, 2)
    settings = model.meta[K.UNS_TRUST]["colour"]
    assert settings["quantile"] == pytest.approx(0.99) and settings["threshold"] > 0 and settings["n_spots"] == 432


def test_a_colour_shifted_slide_is_flagged_by_colour_and_its_own_slides_are_not(model, split, caplog):
    for sdata, most in ((copy_sdata(split[0]), 0.02), (copy_sdata(split[1]), 0.05)):
        obs = sdata.tables[dkan.tl.predict(sdata, model, progress=False)].obs
        assert (obs[K.COLOUR_NOVELTY] > 1).mean() <= most
    shifted = _recolour(copy_sdata(split[1]), lambda a: a.astype(int) + SHIFT)
    with caplog.at_level(logging.WARNING, logger="dkan"):
        tkey = dkan.tl.predict(shifted, model, progress=False)
    obs = shifted.tables[tkey].obs
    assert (obs[K.COLOUR_NOVELTY] > 1).all() and obs[K.NOVEL].all()
    record = shifted.tables[tkey].uns[K.UNS][K.UNS_PREDICT]
    assert record["colour_novel_fraction"] == {"s3": 1.0} and record["novel_fraction"] == {"s3": 1.0}
    warned = [r.getMessage() for r in caplog.records if "unlike the training data" in r.getMessage()]
    assert len(warned) == 1 and "colour 100%" in warned[0]


def test_a_model_without_a_colour_reference_still_predicts_and_says_so(model, split, caplog):
    new = copy_sdata(split[1])
    dkan.tl.predict(new, model, progress=False)
    assert K.COLOUR_NOVELTY in _results(new).obs
    saved = dict(model.trust)
    model.trust = {k: v for k, v in saved.items() if not k.startswith("colour.")}  # a model saved before it
    try:
        with caplog.at_level(logging.INFO, logger="dkan"):
            tkey = dkan.tl.predict(new, model, progress=False, overwrite=True)
    finally:
        model.trust = saved
    obs = new.tables[tkey].obs
    assert K.COLOUR_NOVELTY not in obs  # the earlier prediction's column is dropped, not left to mislead
    assert np.isfinite(obs[K.NOVELTY]).all() and K.NOVEL in obs
    assert any("no colour reference" in r.getMessage() for r in caplog.records)
    assert new.tables[tkey].uns[K.UNS][K.UNS_PREDICT]["colour_novel_fraction"] is None


def test_features_cached_without_colours_skip_the_colour_signal_with_a_note(model, split, caplog):
    new = copy_sdata(split[1])
    dkan.tl.predict(new, model, progress=False)  # features with the model's geometry, and colour novelty
    del _results(new).obsm[K.SPOT_COLOUR]  # as cached by an earlier dkan
    with caplog.at_level(logging.INFO, logger="dkan"):
        tkey = dkan.tl.predict(new, model, progress=False, overwrite=True)
    assert K.COLOUR_NOVELTY not in new.tables[tkey].obs and np.isfinite(new.tables[tkey].obs[K.NOVELTY]).all()
    notes = [r.getMessage() for r in caplog.records]
    assert any("up to date" in m for m in notes)  # the features were not recomputed
    assert any("No colour novelty for sample(s) s3" in m and "force=True" in m for m in notes)
    old = copy_sdata(split[0])
    dkan.tl.tile(old, patch_size=model.config.patch_size, target_mpp=model.config.target_mpp)
    dkan.tl.extract_features(old, "dummy", progress=False)
    del _results(old).obsm[K.SPOT_COLOUR]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dkan"):
        m = dkan.tl.train(old, config="small", progress=False, **{**FAST, "max_epochs": 1})
    assert not any(k.startswith("colour.") for k in m.trust) and m.meta[K.UNS_TRUST]["colour"] is None
    assert any("No colour reference" in r.getMessage() for r in caplog.records)


def test_the_colour_reference_survives_save_and_load(model, split, tmp_path):
    from dkan.train.fitted import DKANModel

    loaded = DKANModel.load(model.save(tmp_path / "m"))
    for k in ("colour.mean", "colour.precision", "colour.threshold", "colour.quantile", "colour.n"):
        np.testing.assert_array_equal(loaded.trust[k], model.trust[k])
    scores = []
    for m in (model, loaded):
        shifted = _recolour(copy_sdata(split[1]), lambda a: a.astype(int) + SHIFT // 2)
        scores.append(shifted.tables[dkan.tl.predict(shifted, m, progress=False)].obs[K.COLOUR_NOVELTY].to_numpy())
    np.testing.assert_array_equal(scores[0], scores[1])
