"""Results tables draw with scanpy's and squidpy's spatial plots with no manual size (issue 24, part 3)."""

import dask.array as da
import matplotlib.pyplot as plt
import numpy as np
import pytest

import dkan
from dkan import _keys as K
from dkan._scanpy_spatial import MAX_SIDE, small_images
from dkan.datasets import copy_sdata

FAST = {"max_epochs": 1, "feature_encoder": "dummy", "n_genes": 8}


@pytest.fixture(scope="module")
def predicted():
    sd = dkan.datasets.toy(seed=0, n_samples=2, grid_size=6, n_genes=20)
    model = dkan.tl.train(
        sd, config="small", progress=False, descriptions=dkan.datasets.toy_gene_descriptions(), **FAST
    )
    key = dkan.tl.predict(sd, model, progress=False, overwrite=True)
    return sd, model, key


def test_results_table_carries_scanpy_spatial_metadata(predicted):
    sd, _, key = predicted
    res = sd.tables[key]
    assert set(res.uns[K.UNS_SPATIAL]) == {"s0", "s1"}
    assert list(res.obs[K.LIBRARY_ID].cat.categories) == ["s0", "s1"]
    lib = res.uns[K.UNS_SPATIAL]["s0"]
    full = sd.images["s0_image"]["scale0"]["image"]
    for name, img in lib["images"].items():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert max(img.shape[:2]) <= MAX_SIDE[name]
        assert lib["scalefactors"][f"tissue_{name}_scalef"] == pytest.approx(img.shape[1] / full.shape[-1])
    radius = sd.shapes["s0_spots"]["radius"].iloc[0]
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(2 * radius)
    np.testing.assert_allclose(res.obsm[K.SPATIAL], sd.tables[K.TABLE].obsm["spatial"])  # toy: pixels = coords


def test_scanpy_spatial_metadata_survives_a_zarr_round_trip(predicted, tmp_path):
    import spatialdata as sdx

    sd, _, key = predicted
    sd.write(tmp_path / "s.zarr")
    back = sdx.read_zarr(tmp_path / "s.zarr").tables[key]
    np.testing.assert_array_equal(
        back.uns[K.UNS_SPATIAL]["s1"]["images"]["hires"], sd.tables[key].uns[K.UNS_SPATIAL]["s1"]["images"]["hires"]
    )
    assert back.obs[K.LIBRARY_ID].tolist() == sd.tables[key].obs[K.LIBRARY_ID].tolist()


def test_scanpy_spatial_draws_the_predictions_over_the_image(predicted):
    import scanpy as sc

    sd, model, key = predicted
    res = sd.tables[key]
    one = res[res.obs[K.LIBRARY_ID] == "s1"].copy()
    one.uns[K.UNS_SPATIAL] = {"s1": one.uns[K.UNS_SPATIAL]["s1"]}
    axes = sc.pl.spatial(one, color=model.genes[0], layer=K.PRED, show=False)
    assert len(axes[0].images) == 1  # drawn over the H&E
    axes = sc.pl.spatial(res, color=model.genes[0], layer=K.PRED, library_id="s0", show=False)
    assert len(axes[0].collections) >= 1
    plt.close("all")


def test_squidpy_spatial_scatter_draws_the_predictions(predicted):
    sq = pytest.importorskip("squidpy")
    sd, model, key = predicted
    sq.pl.spatial_scatter(sd.tables[key], color=model.genes[0], layer=K.PRED, library_key=K.LIBRARY_ID)
    assert len(plt.gcf().axes) >= 2
    plt.close("all")


def test_he_only_prediction_table_plots_with_scanpy(predicted):
    import scanpy as sc

    sd, model, _ = predicted
    he = copy_sdata(sd)
    for name in list(he.tables):
        del he.tables[name]
    del he.images["s1_image"], he.shapes["s1_spots"], he.shapes["s0_spots"]
    key = dkan.tl.predict(he, model, image_key="s0_image", um_per_px=2.0, progress=False)
    axes = sc.pl.spatial(he.tables[key], color=model.genes[0], layer=K.PRED, show=False)
    assert len(axes[0].images) == 1
    plt.close("all")


def test_small_images_never_read_the_full_resolution_level():
    import xarray as xr

    def boom(block):
        raise AssertionError("the full-resolution level was read")

    full = da.zeros((3, 6000, 4000), dtype=np.uint8, chunks=(3, 1000, 1000)).map_blocks(boom, dtype=np.uint8)
    coarse = np.full((3, 1500, 1000), 200, dtype=np.uint8)
    tree = xr.DataTree.from_dict(
        {
            "scale0": xr.Dataset({"image": xr.DataArray(full, dims=("c", "y", "x"))}),
            "scale1": xr.Dataset({"image": xr.DataArray(coarse, dims=("c", "y", "x"))}),
        }
    )
    images, (w, h) = small_images(tree)
    assert (w, h) == (4000, 6000)
    assert images["hires"].shape == (750, 500, 3) and images["lowres"].shape[0] <= MAX_SIDE["lowres"]
    assert (images["hires"] == 200).all()


def test_results_without_an_image_still_plot_at_the_right_size(predicted):
    import scanpy as sc

    from dkan._scanpy_spatial import add_spatial_uns

    sd, model, key = predicted
    bare = copy_sdata(sd)
    del bare.images["s0_image"], bare.images["s1_image"]
    add_spatial_uns(bare, K.TABLE, key)
    lib = bare.tables[key].uns[K.UNS_SPATIAL]["s0"]
    assert (lib["images"]["hires"] == 255).all() and lib["scalefactors"]["spot_diameter_fullres"] > 0
    one = bare.tables[key][bare.tables[key].obs[K.LIBRARY_ID] == "s0"].copy()
    one.uns[K.UNS_SPATIAL] = {"s0": lib}
    axes = sc.pl.spatial(one, color=model.genes[0], layer=K.PRED, show=False)
    assert len(axes[0].collections) >= 1
    plt.close("all")
