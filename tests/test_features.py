import time

import numpy as np
import pytest
import torch
from conftest import data_path, results

import dkan
from dkan import _keys as K


@pytest.fixture(scope="module")
def small_master():
    """Two toy slides of 4 x 4 spots, tiled with 64 px patches (edge spots have masked region tiles)."""
    sdata = dkan.datasets.toy(n_samples=2, grid_size=4, seed=0)
    dkan.tl.tile(sdata, patch_size=64)
    return sdata


@pytest.fixture
def small(small_master):
    from dkan.datasets import copy_sdata

    return copy_sdata(small_master)


@pytest.fixture(scope="module")
def featurised(small_master):
    from dkan.datasets import copy_sdata

    sdata = copy_sdata(small_master)
    dkan.tl.extract_features(sdata, "dummy", batch_size=8)
    return sdata


def test_shapes_dtypes_masks(featurised):
    a = results(featurised)
    spot, reg, mask = a.obsm[K.SPOT_FEATURES], a.obsm[K.REGION_FEATURES], a.obsm[K.REGION_MASK]
    assert spot.shape == (32, 16) and spot.dtype == np.float32 and np.isfinite(spot).all()
    assert reg.shape == (32, 25, 16) and reg.dtype == np.float32
    assert mask.shape == (32, 25) and mask.dtype == bool
    assert 0 < (~mask).sum() < mask.size  # edge spots have tiles outside the image
    assert np.all(reg[~mask] == 0)  # masked tiles are not encoded
    assert np.all(np.abs(reg[mask]).sum(-1) > 0)
    # patch side is even: the centre tile of the region is the spot patch itself
    np.testing.assert_allclose(reg[:, 12], spot, rtol=1e-5, atol=1e-6)


def test_features_match_direct_encoding(featurised):
    """The stored feature of a spot is the encoder applied to its normalised crop (a conv net: no resizing)."""
    from dkan._features.crops import SpotCrops

    enc = dkan.nn.create_image_encoder("dummy")
    crops = SpotCrops(featurised, normalize=False)
    batch = crops.read_batch([0, 5, 17])
    with torch.inference_mode():
        ref = enc(enc.normalize(batch["patch"].float() / 255.0)).numpy()
    got = results(featurised).obsm[K.SPOT_FEATURES][batch["index"].numpy()]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_fixed_size_encoder_gets_resized_crops(small):
    """An encoder that only takes its input_size (e.g. a ViT without dynamic size) gets resized crops."""
    from dkan._features.crops import SpotCrops

    enc = dkan.nn.create_image_encoder("dummy")
    enc.fixed_size = True
    dkan.tl.extract_features(small, enc, region=False, key_added="fixed")
    rec = results(small).uns[K.UNS]["fixed"]
    assert rec["resized"] is True
    batch = SpotCrops(small, normalize=False).read_batch([0, 3])
    x = torch.nn.functional.interpolate(
        batch["patch"].float() / 255.0, size=(32, 32), mode="bilinear", antialias=True, align_corners=False
    )
    with torch.inference_mode():
        ref = enc(enc.normalize(x)).numpy()
    got = results(small).obsm["fixed"][batch["index"].numpy()]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_provenance(featurised):
    rec = results(featurised).uns[K.UNS][K.UNS_FEATURES]
    enc = dkan.nn.create_image_encoder("dummy")
    assert rec["encoder"] == "dummy" and rec["weights_hash"] == enc.weights_hash
    assert rec["dim"] == 16 and rec["dtype"] == "float32" and rec["region"] is True
    assert rec["patch_size"] == 64 and rec["input_size"] == 32 and rec["resized"] is False
    assert rec["tile"]["patch_size"] == 64 and rec["tile"]["region_grid"] == 5
    assert rec["keys"] == {"spot": K.SPOT_FEATURES, "region": K.REGION_FEATURES, "mask": K.REGION_MASK}


def test_rerun_is_noop_unless_forced(small, monkeypatch):
    from dkan._features import extract as _features

    dkan.tl.extract_features(small, "dummy", batch_size=16, region=False)
    first = results(small).obsm[K.SPOT_FEATURES].copy()

    def boom(*args, **kwargs):
        raise AssertionError("features were recomputed")

    with monkeypatch.context() as m:
        m.setattr(_features, "_encode_all", boom)
        dkan.tl.extract_features(small, "dummy", region=False)  # same settings: nothing to do
        with pytest.raises(AssertionError, match="recomputed"):
            dkan.tl.extract_features(small, "dummy", region=False, force=True)
        with pytest.raises(AssertionError, match="recomputed"):  # region features were not computed yet
            dkan.tl.extract_features(small, "dummy", region=True)
    dkan.tl.extract_features(small, "dummy", batch_size=16, region=False, force=True)
    np.testing.assert_array_equal(results(small).obsm[K.SPOT_FEATURES], first)  # deterministic
    assert K.REGION_FEATURES not in results(small).obsm


def test_different_encoder_refused_unless_overwrite(small):
    dkan.tl.extract_features(small, "dummy", region=False)
    with pytest.raises(ValueError, match="overwrite=True"):
        dkan.tl.extract_features(small, dkan.nn.create_image_encoder("dummy", seed=3), region=False)
    dkan.tl.extract_features(small, "dummy", region=False, key_added="alt")  # another key is fine
    dkan.tl.extract_features(small, dkan.nn.create_image_encoder("dummy", dim=8), region=False, overwrite=True)
    a = results(small)
    assert a.obsm[K.SPOT_FEATURES].shape == (32, 8) and a.obsm["alt"].shape == (32, 16)
    assert a.uns[K.UNS][K.UNS_FEATURES]["dim"] == 8
    assert a.uns[K.UNS]["alt"]["encoder"] == "dummy"


def test_overwrite_drops_stale_region_features(small):
    dkan.tl.extract_features(small, "dummy", key_added="f")
    dkan.tl.extract_features(
        small, dkan.nn.create_image_encoder("dummy", dim=4), key_added="f", region=False, overwrite=True
    )
    a = results(small)
    assert a.obsm["f"].shape == (32, 4) and "f_region" not in a.obsm and "f_region_mask" not in a.obsm


def test_key_added_names(small):
    dkan.tl.extract_features(small, "dummy", key_added="feat")
    a = results(small)
    assert a.obsm["feat"].shape == (32, 16) and a.obsm["feat_region"].shape == (32, 25, 16)
    np.testing.assert_array_equal(a.obsm["feat_region_mask"], a.obsm[K.REGION_MASK])
    assert K.SPOT_FEATURES not in a.obsm and a.uns[K.UNS]["feat"]["keys"]["region"] == "feat_region"


def test_bad_batch_size(small):
    with pytest.raises(ValueError, match="batch_size"):
        dkan.tl.extract_features(small, "dummy", batch_size=0)


def test_efficientnet_on_few_spots():
    sdata = dkan.datasets.toy(n_samples=1, grid_size=2, seed=1)
    dkan.tl.tile(sdata, patch_size=48)
    dkan.tl.extract_features(sdata, batch_size=4, region=False)  # default encoder, a conv net: 48 px crops as is
    a = results(sdata)
    rec = a.uns[K.UNS][K.UNS_FEATURES]
    assert rec["encoder"] == "efficientnet_lite0" and rec["weights_hash"].startswith("57934424")
    assert rec["resized"] is False and rec["mean"] == pytest.approx([127 / 255] * 3)
    x = a.obsm[K.SPOT_FEATURES]
    assert x.shape == (4, 1280) and np.isfinite(x).all() and (x >= 0).all()  # ReLU6 before the pooling
    assert np.corrcoef(x)[np.triu_indices(4, 1)].max() < 1 - 1e-6  # different spots, different features


@pytest.mark.slow
def test_her2st_features_carry_signal():
    """EfficientNet-Lite0 spot features of the five her2st sections predict held-out-section expression."""
    import scanpy as sc
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    sdata = dkan.datasets.her2st(data_path("her2st"))
    dkan.tl.tile(sdata)
    dkan.tl.extract_features(sdata, batch_size=32, region=False)
    a = results(sdata)
    x = np.asarray(a.obsm[K.SPOT_FEATURES])
    assert x.shape == (a.n_obs, 1280) and np.isfinite(x).all()
    b = sdata.tables[K.TABLE].copy()  # the counts (features are in the results table `a`)
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    y_all = b.X.toarray() if hasattr(b.X, "toarray") else np.asarray(b.X)
    top = np.argsort(-y_all.mean(0))[:50]
    y = y_all[:, top]
    sections = a.obs[K.SAMPLE].astype(str).to_numpy()
    assert len(np.unique(sections)) == 5
    pccs = []
    for held in np.unique(sections):
        tr, te = sections != held, sections == held
        scaler = StandardScaler().fit(x[tr])
        model = RidgeCV(alphas=np.logspace(0, 5, 11)).fit(scaler.transform(x[tr]), y[tr])
        pred = model.predict(scaler.transform(x[te]))
        ok = y[te].std(0) > 0
        r = [np.corrcoef(pred[:, g], y[te][:, g])[0, 1] for g in np.flatnonzero(ok)]
        pccs.append(float(np.nanmean(r)))
    mean_pcc = float(np.mean(pccs))
    print(
        f"\nher2st ridge on EfficientNet-Lite0 spot features: per-section mean PCC {np.round(pccs, 3).tolist()}, "
        f"overall {mean_pcc:.3f}; {a.n_obs} spots; {time.perf_counter() - t0:.0f} s"
    )
    assert mean_pcc > 0
