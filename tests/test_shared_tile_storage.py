"""Shared-tile region features are stored once per tile ((n_tiles, D) + a per-spot index), never per spot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import results
from test_shared_tiles import G, P, _sdata

import dkan
from dkan import _keys as K
from dkan._features.shared_tiles import gather, snapped_tiles

SMALL_TILES = {"patch_size": 64, "region_grid": 5, "target_mpp": 2.0}
TRAIN = {"config": "small", "progress": False, "max_epochs": 2, "feature_encoder": "dummy", "device": "cpu"}


def test_shared_tiles_are_stored_once_per_tile_with_a_per_spot_index():
    sdata = _sdata()
    dkan.tl.extract_features(sdata, "dummy", shared_tiles=True, device="cpu", progress=False)
    t = results(sdata)
    rec = t.uns[K.UNS][K.UNS_FEATURES]
    tiles, index, mask = t.uns[K.REGION_TILES], t.obsm[K.REGION_INDEX], t.obsm[K.REGION_MASK]
    assert tiles.dtype == np.float32 and tiles.shape == (rec["region_tiles_encoded"], rec["dim"])
    assert index.dtype == np.int32 and index.shape == (t.n_obs, G * G)
    np.testing.assert_array_equal(index >= 0, mask)  # -1 exactly where the region tile leaves the image
    assert index.max() == len(tiles) - 1 and len(np.unique(index[mask])) == len(tiles)  # every tile used
    assert K.REGION_FEATURES not in t.obsm
    assert all(np.ndim(v) < 3 for v in t.obsm.values())  # no (n_spots, 25, D) array anywhere
    assert rec["region_storage"] == "tiles"
    assert rec["keys"] == {"spot": K.SPOT_FEATURES, "mask": K.REGION_MASK, "tiles": K.REGION_TILES,
                           "index": K.REGION_INDEX}  # fmt: skip


def test_gathered_features_are_each_grid_tile_encoded_alone():
    from dkan._features.encoding import Preprocess
    from dkan.nn.image_encoders import create_image_encoder

    sdata = _sdata()
    dkan.tl.extract_features(sdata, "dummy", shared_tiles=True, device="cpu", progress=False)
    t = results(sdata)
    got = gather(t.uns[K.REGION_TILES], t.obsm[K.REGION_INDEX])
    mask = t.obsm[K.REGION_MASK]
    assert got.shape == (t.n_obs, G * G, t.uns[K.UNS][K.UNS_FEATURES]["dim"])
    assert not got[~mask].any()  # zeros outside the image, as spot by spot
    img = np.asarray(sdata.images["s_image"].data)
    idx = snapped_tiles(np.asarray(t.obsm[K.SPOT_PX]), tile_side=P, region_side=G * P, grid=G)[mask]
    crops = np.stack([img[:, gy * P : (gy + 1) * P, gx * P : (gx + 1) * P] for gy, gx in idx])
    enc = create_image_encoder("dummy").eval()
    with torch.inference_mode():
        want = enc(Preprocess(enc, torch.device("cpu"))(torch.from_numpy(crops))).numpy()
    np.testing.assert_allclose(got[mask], want, rtol=1e-6, atol=1e-6)


def _pair():
    """Two equal toy slides with shared-tile features: stored per tile, and the same values gathered per spot."""
    pair = []
    for per_spot in (False, True):
        sdata = dkan.datasets.toy(n_samples=2, grid_size=6, seed=0)
        dkan.tl.tile(sdata, **SMALL_TILES)  # the "small" preset's geometry: training keeps these features
        dkan.tl.extract_features(sdata, "dummy", shared_tiles=True, device="cpu", progress=False)
        t = results(sdata)
        if per_spot:
            t.obsm[K.REGION_FEATURES] = gather(t.uns.pop(K.REGION_TILES), t.obsm.pop(K.REGION_INDEX))
        pair.append(sdata)
    return pair


def _predict(sdata, model):
    dkan.tl.predict(sdata, model, device="cpu", progress=False, overwrite=True)
    return np.asarray(results(sdata).layers[K.PRED])


def test_training_and_predict_on_shared_tiles_equal_the_gathered_per_spot_array():
    tiles, spots = _pair()
    assert K.REGION_FEATURES not in results(tiles).obsm and K.REGION_INDEX not in results(spots).obsm
    torch.manual_seed(0)
    m_tiles = dkan.tl.train(tiles, **TRAIN)
    torch.manual_seed(0)
    m_spots = dkan.tl.train(spots, **TRAIN)
    assert K.REGION_FEATURES not in results(tiles).obsm and K.REGION_TILES in results(tiles).uns  # not recomputed
    assert results(tiles).uns[K.UNS][K.UNS_FEATURES]["region_storage"] == "tiles"
    for (name, a), (_, b) in zip(m_tiles.module.state_dict().items(), m_spots.module.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    np.testing.assert_allclose(_predict(tiles, m_tiles), _predict(spots, m_tiles), rtol=1e-6, atol=1e-6)
    assert K.REGION_FEATURES not in results(tiles).obsm  # predict used the stored tiles too


def test_shared_tiles_survive_a_zarr_round_trip_and_still_predict(tmp_path):
    import spatialdata as sd

    sdata, _ = _pair()
    model = dkan.tl.train(sdata, **TRAIN)
    before = _predict(sdata, model)
    t = results(sdata)
    tiles, index = np.array(t.uns[K.REGION_TILES]), np.array(t.obsm[K.REGION_INDEX])
    sdata.write(tmp_path / "s.zarr")
    back = sd.read_zarr(tmp_path / "s.zarr")
    r = results(back)
    np.testing.assert_array_equal(np.asarray(r.uns[K.REGION_TILES]), tiles)
    np.testing.assert_array_equal(np.asarray(r.obsm[K.REGION_INDEX]), index)
    assert K.REGION_FEATURES not in r.obsm
    np.testing.assert_allclose(_predict(back, model), before, rtol=1e-6, atol=1e-6)


def test_an_index_without_its_tiles_is_a_clear_error():
    from dkan._data.inputs import region_inputs

    sdata, _ = _pair()
    t = results(sdata)
    rows = np.arange(t.n_obs)
    part, index = region_inputs(t, rows, "s0")
    assert part.ndim == 2 and index.shape == (t.n_obs, G * G)
    del t.uns[K.REGION_TILES]
    with pytest.raises(KeyError, match="shared_tiles=True, force=True"):
        region_inputs(t, rows, "s0")


def test_region_features_reads_either_layout_for_the_spots_asked():
    tiles, spots = _pair()
    rows = [3, 0, 7]
    got = dkan.tl.region_features(tiles, rows)
    t = results(tiles)
    assert got.shape == (3, G * G, t.uns[K.REGION_TILES].shape[1]) and got.dtype == np.float32
    np.testing.assert_array_equal(got, gather(t.uns[K.REGION_TILES], t.obsm[K.REGION_INDEX][rows]))
    np.testing.assert_array_equal(dkan.tl.region_features(spots, rows), got)  # same values stored per spot
    assert dkan.tl.region_features(spots).shape[0] == results(spots).n_obs
    bare = dkan.datasets.toy(n_samples=1, grid_size=4, seed=0)
    dkan.tl.extract_features(bare, "dummy", region=False, device="cpu", progress=False)
    with pytest.raises(KeyError, match="region=True"):
        dkan.tl.region_features(bare)
