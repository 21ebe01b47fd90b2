"""Visium HD: square bins summed into spot-sized pseudo-spots that dkan tiles, trains and predicts on."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import results

import dkan
from dkan import _keys as K

BIN_PX = 16  # 8 µm bins at 0.5 µm/px
N_BINS = 60


def hd_like(drop_corner: bool = True, seed: int = 0):
    """The layout spatialdata_io.visium_hd writes: square bins (polygons) in full-resolution pixels, a table
    ``square_008um`` annotating them (``array_row``, ``array_col``, ``location_id``), and the H&E image."""
    import anndata as ad
    import pandas as pd
    from geopandas import GeoDataFrame
    from scipy import sparse
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    rng = np.random.default_rng(seed)
    rr, cc = np.meshgrid(np.arange(N_BINS), np.arange(N_BINS), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    keep = ~((rr >= 50) & (cc >= 50)) if drop_corner else np.ones(len(rr), bool)  # a corner outside the tissue
    rr, cc = rr[keep], cc[keep]
    n = len(rr)
    xy = np.c_[cc * BIN_PX + BIN_PX / 2 + 40, rr * BIN_PX + BIN_PX / 2 + 40]  # 40 px margin to the image edge
    tf = {"ds": Identity()}
    circles = ShapesModel.parse(xy, geometry=0, radius=np.full(n, BIN_PX / 2), index=np.arange(n), transformations=tf)
    squares = ShapesModel.parse(GeoDataFrame(geometry=circles.buffer(BIN_PX / 2, cap_style=3)), transformations=tf)
    genes = [f"G{i}" for i in range(12)]
    obs = pd.DataFrame(
        {
            "in_tissue": 1,
            K.ARRAY_ROW: rr,
            K.ARRAY_COL: cc,
            "location_id": np.arange(n),
            "region": pd.Categorical(["ds_square_008um"] * n),
        },
        index=[f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(rr, cc, strict=True)],
    )
    counts = sparse.csr_matrix(rng.poisson(0.3, (n, len(genes))).astype(np.float32))
    table = TableModel.parse(
        ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes)),
        region="ds_square_008um",
        region_key="region",
        instance_key="location_id",
    )
    side = N_BINS * BIN_PX + 80
    img = rng.integers(120, 230, (3, side, side), dtype=np.uint8)
    image = Image2DModel.parse(img, dims=("c", "y", "x"), transformations=tf)
    return SpatialData(
        images={"ds_full_image": image}, shapes={"ds_square_008um": squares}, tables={"square_008um": table}
    )


def test_bins_sum_into_spot_sized_blocks():
    sdata = hd_like()
    bins = sdata.tables["square_008um"]
    shapes_key, tkey = dkan.pp.aggregate_bins(sdata, table_key="square_008um", spot_um=56)
    assert (shapes_key, tkey) == ("ds_square_008um_dkan_56um", "ds_square_008um_dkan_56um_table")
    spots = sdata.tables[tkey]
    # 60 bins / 7: blocks 0-7 are full, block 8 holds 4 bins a side (28 of 49 bins: kept, 16: dropped)
    for _, row in spots.obs.iterrows():
        r, c = row[K.ARRAY_ROW], row[K.ARRAY_COL]
        members = (bins.obs[K.ARRAY_ROW] // 7 == r) & (bins.obs[K.ARRAY_COL] // 7 == c)
        assert row["n_bins"] == members.sum() >= 0.5 * 49
    assert not ((spots.obs[K.ARRAY_ROW] == 8) & (spots.obs[K.ARRAY_COL] == 8)).any()
    np.testing.assert_array_equal(spots.X.sum(axis=0), bins.X.sum(axis=0) - _dropped_counts(bins, spots))
    first = spots.obs.index.get_loc("ds_square_008um_dkan_56um_0_0")
    members = (bins.obs[K.ARRAY_ROW] < 7) & (bins.obs[K.ARRAY_COL] < 7)
    np.testing.assert_array_equal(
        spots.X[first].toarray().ravel(), np.asarray(bins.X[members.to_numpy()].sum(0)).ravel()
    )
    circles = sdata.shapes[shapes_key]
    np.testing.assert_allclose(circles["radius"], 7 * BIN_PX / 2)
    centre = circles.geometry.iloc[first]
    assert (centre.x, centre.y) == pytest.approx((40 + 3.5 * BIN_PX, 40 + 3.5 * BIN_PX))
    assert spots.uns[K.UNS][K.UNS_READER][shapes_key]["um_per_px"] == pytest.approx(0.5)
    assert np.issubdtype(spots.X.dtype, np.integer)


def _dropped_counts(bins, spots):
    kept = set(zip(spots.obs[K.ARRAY_ROW], spots.obs[K.ARRAY_COL], strict=True))
    blocks = zip(bins.obs[K.ARRAY_ROW] // 7, bins.obs[K.ARRAY_COL] // 7, strict=True)
    dropped = np.array([b not in kept for b in blocks])
    return np.asarray(bins.X[dropped].sum(axis=0))


def test_pseudo_spots_train_and_predict():
    sdata = hd_like()
    _, tkey = dkan.pp.aggregate_bins(sdata, table_key="square_008um", spot_um=56)
    del sdata["square_008um"]  # dkan works on the pseudo-spot table; the bins stay in the user's own store
    dkan.tl.tile(sdata, table_key=tkey, patch_size=32, target_mpp=2.0)
    rec = results(sdata, tkey).uns[K.UNS][K.UNS_TILE]["samples"]["ds_square_008um_dkan_56um"]
    assert rec["grid_kind"] == "square" and rec["mpp"] == pytest.approx(0.5) and rec["resample"] == pytest.approx(4)
    model = dkan.tl.train(sdata, config="small", max_epochs=1, feature_encoder="dummy", device="cpu", progress=False)
    dkan.tl.predict(sdata, model, progress=False, overwrite=True)
    table = results(sdata, tkey)
    assert np.isfinite(table.layers[K.PRED][:, table.var_names.get_indexer(model.genes)]).all()


def test_bad_bin_input():
    sdata = hd_like()
    with pytest.raises(ValueError, match="bin_um"):
        dkan.pp.aggregate_bins(sdata, table_key="square_008um", bin_um=-1)
    sdata.tables["bins"] = sdata.tables.pop("square_008um")
    sdata.tables["bins"].obs["region"] = sdata.tables["bins"].obs["region"].cat.rename_categories(["ds_bins"])
    sdata.shapes["ds_bins"] = sdata.shapes.pop("ds_square_008um")
    sdata.tables["bins"].uns["spatialdata_attrs"]["region"] = "ds_bins"
    with pytest.raises(ValueError, match="pass `bin_um=`"):
        dkan.pp.aggregate_bins(sdata, table_key="bins")
    dkan.pp.aggregate_bins(sdata, table_key="bins", bin_um=8)
    with pytest.raises(KeyError, match="overwrite"):
        dkan.pp.aggregate_bins(sdata, table_key="bins", bin_um=8)
    sdata.tables["bins"].obs = sdata.tables["bins"].obs.drop(columns=[K.ARRAY_ROW])
    with pytest.raises(KeyError, match="array_row"):
        dkan.pp.aggregate_bins(sdata, table_key="bins", bin_um=8, overwrite=True)
