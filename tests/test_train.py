"""End-to-end training, prediction, save/load and refusal of mismatched input on toy slides."""

import numpy as np
import pytest
from conftest import results

import dkan
from dkan import _keys as K
from dkan.datasets import copy_sdata

FAST = {"max_epochs": 1, "feature_encoder": "dummy"}


@pytest.fixture(scope="module")
def split():
    from dkan.demo import split_toy

    return split_toy()


@pytest.fixture(scope="module")
def trained(split):
    """A quickly trained model (dummy image features) for the prediction / save / refusal mechanics."""
    train_sd, _ = split
    model = dkan.tl.train(copy_sdata(train_sd), config="small", progress=False, max_epochs=2, feature_encoder="dummy")
    return train_sd, model


@pytest.fixture(scope="module")
def learned(split):
    """The real pipeline on toy slides: EfficientNet-Lite0 features, MiniLM text, the small preset as users get it."""
    train_sd = copy_sdata(split[0])  # train writes the panel, target, tiles and features into its input
    model = dkan.tl.train(train_sd, config="small", progress=False)
    return train_sd, model


@pytest.fixture(scope="module")
def learned_cheaply(split):
    """The small preset's full training (80 epochs) on seeded random image features: the fast set's learning check.

    EfficientNet-Lite0 feature extraction made up most of the real pipeline's cost; the random conv features still
    carry the toy's colour and texture, so a working model learns from them (held-out PCC 0.53 when measured; a
    model that does not learn stays near 0: 0.10 after 40 epochs, -0.07 after 10).
    """
    train_sd = copy_sdata(split[0])
    model = dkan.tl.train(train_sd, config="small", progress=False, feature_encoder="dummy")
    return train_sd, model


def _assert_beats_the_training_mean(train_sd, model, held, *, min_pcc, max_mse_ratio):
    dkan.tl.predict(held, model, progress=False)
    res = dkan.tl.evaluate(held)
    y_train = results(train_sd)[:, model.genes].layers[K.TARGET]
    y = results(held)[:, model.genes].layers[K.TARGET]
    mse_mean = float(np.mean((y - y_train.mean(0)) ** 2))
    # the training mean is constant per gene (PCC undefined): DKAN must correlate clearly and have lower error
    assert res.summary["pcc_all"] > min_pcc, res.summary
    assert res.summary["mse"] < max_mse_ratio * mse_mean, (res.summary["mse"], mse_mean)


def test_train_runs_missing_steps_and_keeps_history(toy_master):
    sdata = copy_sdata(toy_master)
    model = dkan.tl.train(sdata, config="small", progress=False, **{**FAST, "max_epochs": 2})
    adata = results(sdata)
    for key in (K.SPOT_FEATURES, K.REGION_FEATURES, K.REGION_MASK, K.GRID):
        assert key in adata.obsm
    assert K.TARGET in adata.layers and K.PANEL in sdata.tables[K.TABLE].var
    assert len(model.history) == 2
    assert {"total", "sup", "con", "w_sup", "w_con", "val_pcc"} <= set(model.history[0])
    assert model.meta["features"]["encoder"] == "dummy"
    assert len(model.genes) == adata.var[K.PANEL].sum()


def test_training_is_bit_identical_on_cpu(toy_master):
    a = dkan.tl.train(copy_sdata(toy_master), config="small", progress=False, **FAST)
    b = dkan.tl.train(copy_sdata(toy_master), config="small", progress=False, **FAST)
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items(), strict=True):
        assert ka == kb
        assert np.array_equal(va.numpy(), vb.numpy()), ka


@pytest.mark.slow
def test_trained_model_beats_the_training_mean_on_a_held_out_slide(learned, split):
    """The real pipeline (about 500 s of a fresh suite run): slow; the fast set checks learning cheaply below."""
    train_sd, model = learned
    _assert_beats_the_training_mean(train_sd, model, copy_sdata(split[1]), min_pcc=0.3, max_mse_ratio=0.8)


def test_model_learns_from_cheap_features_on_a_held_out_slide(learned_cheaply, split):
    train_sd, model = learned_cheaply
    _assert_beats_the_training_mean(train_sd, model, copy_sdata(split[1]), min_pcc=0.3, max_mse_ratio=0.85)


def test_predict_writes_layer_and_save_load_roundtrip(trained, split, tmp_path):
    _, model = trained
    new = copy_sdata(split[1])
    tkey = dkan.tl.predict(new, model, progress=False)
    pred = new.tables[tkey].layers[K.PRED]
    assert pred.dtype == np.float32 and pred.shape == new.tables[tkey].shape
    in_panel = new.tables[tkey].var_names.isin(model.genes)
    assert np.isfinite(pred[:, in_panel]).all()
    assert K.TARGET in new.tables[tkey].layers
    with pytest.raises(ValueError, match="overwrite"):
        dkan.tl.predict(new, model, progress=False)

    path = model.save(tmp_path / "m")
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")
    loaded = dkan.DKANModel.load(path)
    assert loaded.genes == model.genes and loaded.config == model.config
    dkan.tl.predict(new, loaded, key_added="again", progress=False)
    np.testing.assert_array_equal(new.tables[tkey].layers["again"], pred)
    model.save(tmp_path / "m", overwrite=True)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_predict_refuses_other_features(trained, split):
    _, model = trained
    new = copy_sdata(split[1])
    from dkan._results import results_table

    _, adata = results_table(new, create=True)  # features live in the results table
    adata.obsm[K.SPOT_FEATURES] = np.zeros((adata.n_obs, 3), dtype=np.float32)
    adata.uns[K.UNS][K.UNS_FEATURES] = {"encoder": "other", "weights_hash": "x", "dim": 3}
    with pytest.raises(ValueError, match="differ"):
        dkan.tl.predict(new, model, progress=False)


def test_unknown_config_key(toy):
    with pytest.raises(TypeError, match="Valid names"):
        dkan.tl.train(toy, config="small", not_a_field=1)


def test_predict_on_he_only_slide_makes_pseudo_spots(trained, split):
    from spatialdata import SpatialData

    _, model = trained
    image_key = next(iter(split[1].images))
    he = SpatialData(images={image_key: split[1].images[image_key]})
    tkey = dkan.tl.predict(he, model, um_per_px=2.0, progress=False)
    table = he.tables[tkey]
    assert list(table.var_names) == model.genes
    assert table.n_obs > 50 and np.isfinite(table.layers[K.PRED]).all()
    assert len(he.shapes) == 1


def test_trainable_patch_branch_trains_predicts_and_round_trips(split, tmp_path):
    """``patch_trainable=True`` (the reference presets): crops read per step, encoder weights learned and saved."""
    train_sd, held_sd = split
    cfg = {**FAST, "max_epochs": 2, "patch_trainable": True, "patch_encoder": "dummy"}
    model = dkan.tl.train(copy_sdata(train_sd), config="small", progress=False, **cfg)
    enc = model.module.patch_encoder
    assert enc is not None
    fresh = dkan.nn.create_image_encoder("dummy")
    pairs = zip(enc.parameters(), fresh.parameters(), strict=True)
    moved = [not np.allclose(a.detach().numpy(), b.detach().numpy()) for a, b in pairs]
    assert any(moved), "the patch encoder's weights did not change in training"
    new = copy_sdata(held_sd)
    dkan.tl.predict(new, model, progress=False)
    pred = results(new)[:, model.genes].layers[K.PRED]
    assert np.isfinite(pred).all() and pred.std(0).mean() > 0
    model.save(tmp_path / "m")
    again = copy_sdata(held_sd)
    dkan.tl.predict(again, dkan.DKANModel.load(tmp_path / "m"), progress=False)
    np.testing.assert_allclose(results(again)[:, model.genes].layers[K.PRED], pred, atol=1e-5)
