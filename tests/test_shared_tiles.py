"""Shared-tile region features: one encoder pass per grid tile, equal to spot-by-spot features where aligned."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import results

import dkan
from dkan import _keys as K
from dkan._features.shared_tiles import gather, snapped_tiles

P, G = 16, 5  # patch side and region grid: region windows of 80 px, origin = floor(centre) - 40


def _sdata(shift: int = 5):
    """A textured 352 px image; spots on a 48 px grid, every other column shifted off the 16 px tile grid."""
    import anndata as ad
    import pandas as pd
    from scipy import sparse
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (3, 352, 352), dtype=np.uint8)
    ii, jj = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    x = 40 + 48 * jj + 0.5 + np.where(jj % 2 == 1, shift, 0)  # even columns: region tiles on the grid
    y = 40 + 48 * ii + 0.5
    n = len(x)
    tf = {"s": Identity()}
    shapes = ShapesModel.parse(np.c_[x, y], geometry=0, radius=np.full(n, 8.0), index=np.arange(n), transformations=tf)
    obs = pd.DataFrame(
        {K.REGION: pd.Categorical(["s_spots"] * n), K.INSTANCE: np.arange(n), K.ARRAY_ROW: ii, K.ARRAY_COL: jj},
        index=[f"s{i}" for i in range(n)],
    )
    table = TableModel.parse(
        ad.AnnData(X=sparse.csr_matrix((n, 2), dtype=np.float32), obs=obs),
        region="s_spots",
        region_key=K.REGION,
        instance_key=K.INSTANCE,
    )
    image = Image2DModel.parse(img, dims=("c", "y", "x"), transformations=tf)
    sdata = SpatialData(images={"s_image": image}, shapes={"s_spots": shapes}, tables={K.TABLE: table})
    dkan.tl.tile(sdata, patch_size=P, region_grid=G, target_mpp=None)
    return sdata


def test_snapped_tiles_round_region_tiles_to_the_grid():
    idx = snapped_tiles(np.array([[40.5, 40.5], [45.5, 40.5], [49.5, 40.5]]), tile_side=P, region_side=G * P, grid=G)
    assert idx.shape == (3, G * G, 2)
    np.testing.assert_array_equal(idx[0, :G, 1], np.arange(G))  # origin 0: tiles 0..4
    np.testing.assert_array_equal(idx[1, :G, 1], np.arange(G))  # origin 5: rounds down to the same tiles
    np.testing.assert_array_equal(idx[2, :G, 1], np.arange(1, G + 1))  # origin 9: rounds up
    np.testing.assert_array_equal(idx[0, ::G, 0], np.arange(G))  # rows, row-major order


def test_shared_tiles_equal_spot_by_spot_where_aligned_and_encode_each_tile_once():
    sdata = _sdata()
    dkan.tl.extract_features(sdata, "dummy", key_added="exact", device="cpu", progress=False)
    dkan.tl.extract_features(sdata, "dummy", key_added="shared", shared_tiles=True, device="cpu", progress=False)
    t = results(sdata)
    np.testing.assert_array_equal(t.obsm["exact"], t.obsm["shared"])  # the spot patch stays exact
    np.testing.assert_array_equal(t.obsm["exact_region_mask"], t.obsm["shared_region_mask"])
    exact, shared = t.obsm["exact_region"], gather(t.uns["shared_region_tiles"], t.obsm["shared_region_index"])
    aligned = t.obs[K.ARRAY_COL].to_numpy() % 2 == 0
    np.testing.assert_allclose(shared[aligned], exact[aligned], rtol=1e-5, atol=1e-5)
    assert not np.allclose(shared[~aligned], exact[~aligned])  # shifted tiles: the nearest grid tile instead
    info = t.uns[K.UNS]["shared"]
    assert info["shared_tiles"] is True
    assert info["region_tiles_served"] == int(t.obsm["shared_region_mask"].sum())
    idx = snapped_tiles(np.asarray(t.obsm[K.SPOT_PX]), tile_side=P, region_side=G * P, grid=G)
    distinct = len(np.unique(idx[t.obsm["shared_region_mask"]], axis=0))
    assert info["region_tiles_encoded"] == distinct < info["region_tiles_served"] / 2  # each grid tile once


def test_stored_kind_is_kept_unless_asked_otherwise():
    sdata = _sdata()
    dkan.tl.extract_features(sdata, "dummy", shared_tiles=True, device="cpu", progress=False)
    t = results(sdata)
    first = t.uns[K.REGION_TILES]
    dkan.tl.extract_features(sdata, "dummy", device="cpu", progress=False)  # None: what is stored is fine
    assert t.uns[K.REGION_TILES] is first and K.REGION_FEATURES not in t.obsm
    dkan.tl.extract_features(sdata, "dummy", shared_tiles=False, device="cpu", progress=False)
    assert t.uns[K.UNS][K.UNS_FEATURES]["shared_tiles"] is False
    assert t.uns[K.UNS][K.UNS_FEATURES]["region_storage"] == "spots"
    assert K.REGION_FEATURES in t.obsm  # the other layout is dropped: one set of region features at a time
    assert K.REGION_TILES not in t.uns and K.REGION_INDEX not in t.obsm


@pytest.mark.parametrize("shared", [True, False])
def test_region_off_ignores_shared(shared):
    sdata = _sdata()
    dkan.tl.extract_features(sdata, "dummy", region=False, shared_tiles=shared, device="cpu", progress=False)
    t = results(sdata)
    assert K.REGION_FEATURES not in t.obsm and K.REGION_INDEX not in t.obsm and K.REGION_TILES not in t.uns
