"""``dkan predict --shared-tiles``: shared-tile region features for a slide file or a store, then predictions."""

from __future__ import annotations

import numpy as np
import pytest

import dkan
from dkan import _keys as K
from dkan._features.shared_tiles import gather
from dkan.cli import main

FAST = ["--device", "cpu", "--no-progress", "-q"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sdata = dkan.datasets.toy(n_samples=2, grid_size=6, seed=0)
    model = dkan.tl.train(sdata, config="small", progress=False, max_epochs=1, feature_encoder="dummy", device="cpu")
    return model.save(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("wsi") / "slide.tif"
    return dkan.datasets.synthetic_wsi(path, width=1200, height=900, um_per_px=0.5, tile=128, n_blobs=3)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "toy.zarr"
    dkan.datasets.toy(n_samples=1, grid_size=6, seed=3).write(path)
    return path


def _predicted(out):
    import spatialdata as sd

    from dkan._results import results_table

    back = sd.read_zarr(out)
    table = results_table(back)[1]  # predictions and features live in the results table (dkan._results)
    assert np.isfinite(table.layers[K.PRED]).all() and table.layers[K.PRED].shape[0] == table.n_obs
    return table, table.uns[K.UNS][K.UNS_FEATURES]


@pytest.mark.parametrize("source", ["slide", "store"])
def test_shared_tiles_flag_reaches_the_features_and_still_predicts(source, slide, store, model_dir, tmp_path, request):
    src = request.getfixturevalue(source)
    runs = {}
    for flag in (["--shared-tiles", "0"], ["--shared-tiles"]):
        out = tmp_path / f"pred{len(flag)}.zarr"  # 0: spot by spot, 1: shared tiles
        assert main(["predict", str(src), "--model", str(model_dir), "--out", str(out), *flag, *FAST]) == 0
        runs[len(flag) == 1] = _predicted(out)
    (plain, rec_plain), (shared, rec_shared) = runs[False], runs[True]
    assert rec_plain["shared_tiles"] is False or not rec_plain["shared_tiles"]
    assert bool(rec_shared["shared_tiles"]) is True
    assert 0 < rec_shared["region_tiles_encoded"] < rec_shared["region_tiles_served"]
    assert "region_tiles_encoded" not in rec_plain
    assert shared.n_obs == plain.n_obs and list(shared.var_names) == list(plain.var_names)
    assert K.REGION_FEATURES not in shared.obsm and rec_shared["region_storage"] == "tiles"  # once per tile
    region = gather(shared.uns[K.REGION_TILES], shared.obsm[K.REGION_INDEX])
    assert region.shape[:2] == (shared.n_obs, 25) and np.abs(region).sum() > 0


def test_shared_tiles_takes_a_grid_subdivision(store, model_dir, tmp_path):
    recs = {}
    for n in ("1", "2"):
        out = tmp_path / f"pred{n}.zarr"
        args = ["predict", str(store), "--model", str(model_dir), "--out", str(out), "--shared-tiles", n]
        assert main([*args, *FAST]) == 0
        recs[n] = _predicted(out)[1]
    assert recs["1"]["subdivide"] == 1 and recs["2"]["subdivide"] == 2
    assert recs["2"]["region_tiles_encoded"] > recs["1"]["region_tiles_encoded"]  # tiles half a tile apart


@pytest.mark.parametrize("source", ["slide", "store"])
def test_whole_slide_files_default_to_half_tile_shared_tiles(source, slide, store, model_dir, tmp_path, request):
    out = tmp_path / "pred.zarr"
    src = request.getfixturevalue(source)
    assert main(["predict", str(src), "--model", str(model_dir), "--out", str(out), *FAST]) == 0
    rec = _predicted(out)[1]
    if source == "slide":  # a slide file: shared tiles half a tile apart unless asked otherwise
        assert rec["shared_tiles"] is True and rec["subdivide"] == 2 and rec["region_storage"] == "tiles"
    else:  # a store (real spots): spot by spot, as before
        assert not rec["shared_tiles"] and rec["region_storage"] == "spots"
    report = dkan.tl.predict_slides([src], model_dir, out_dir=tmp_path / "lib", device="cpu", progress=False)
    back = _predicted(report["out"].iloc[0])[1]
    assert back["region_storage"] == rec["region_storage"] and back.get("subdivide") == rec.get("subdivide")
