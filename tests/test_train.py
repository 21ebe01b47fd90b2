"""End-to-end training, prediction, save/load and refusal of mismatched input on toy slides."""

import numpy as np
import pytest

import dkan
from dkan import _keys as K
from dkan.datasets import copy_sdata

FAST = {"max_epochs": 3, "feature_encoder": "dummy", "text_encoder": "minilm"}


@pytest.fixture(scope="module")
def trained(toy_master):
    sdata = copy_sdata(toy_master)
    model = dkan.tl.train(sdata, config="small", progress=False, **FAST)
    return sdata, model


def test_train_runs_missing_steps_and_keeps_history(trained):
    sdata, model = trained
    adata = sdata.tables[K.TABLE]
    for key in (K.SPOT_FEATURES, K.REGION_FEATURES, K.REGION_MASK, K.GRID):
        assert key in adata.obsm
    assert K.TARGET in adata.layers and K.PANEL in adata.var
    assert len(model.history) == FAST["max_epochs"]
    assert {"total", "sup", "con", "w_sup", "w_con", "val_pcc"} <= set(model.history[0])
    assert model.meta["features"]["encoder"] == "dummy"
    assert len(model.genes) == adata.var[K.PANEL].sum()


def test_training_is_bit_identical_on_cpu(toy_master):
    a = dkan.tl.train(copy_sdata(toy_master), config="small", progress=False, **{**FAST, "max_epochs": 1})
    b = dkan.tl.train(copy_sdata(toy_master), config="small", progress=False, **{**FAST, "max_epochs": 1})
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items(), strict=True):
        assert ka == kb
        assert np.array_equal(va.numpy(), vb.numpy()), ka


def test_predict_writes_layer_and_save_load_roundtrip(trained, toy_master, tmp_path):
    _, model = trained
    new = copy_sdata(toy_master)
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


def test_predict_refuses_other_features(trained, toy_master):
    _, model = trained
    new = copy_sdata(toy_master)
    adata = new.tables[K.TABLE]
    adata.obsm[K.SPOT_FEATURES] = np.zeros((adata.n_obs, 3), dtype=np.float32)
    adata.uns[K.UNS][K.UNS_FEATURES] = {"encoder": "other", "weights_hash": "x", "dim": 3}
    with pytest.raises(ValueError, match="differ"):
        dkan.tl.predict(new, model, progress=False)


def test_unknown_config_key(toy):
    with pytest.raises(TypeError, match="Valid names"):
        dkan.tl.train(toy, config="small", not_a_field=1)
