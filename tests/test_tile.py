import numpy as np
import pandas as pd
import pytest
from conftest import data_path, results

import dkan
from dkan import _keys as K

CS = "slide1"


def make_sdata(
    xy,
    *,
    shape=(3, 300, 400),
    multiscale=False,
    dtype=np.uint8,
    seed=0,
    um_per_px=0.5,
    array=None,
    image_cs=CS,
    spots_scale=None,
    chunks=(3, 64, 64),
):
    """A one-sample SpatialData: random image, circles at pixel positions ``xy`` (x, y), a table annotating them."""
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=shape).astype(dtype)
    image = Image2DModel.parse(
        img,
        dims=("c", "y", "x"),
        scale_factors=[2] if multiscale else None,
        transformations={image_cs: Identity()},
        chunks=chunks,
    )
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    n = len(xy)
    # spots may live in another unit (e.g. µm) with a Scale to the slide system
    t = Identity() if spots_scale is None else Scale([spots_scale, spots_scale], axes=("x", "y"))
    spot_xy = xy if spots_scale is None else xy / spots_scale
    order = rng.permutation(n)  # shapes stored in another order than the table: alignment goes by instance id
    shapes = ShapesModel.parse(spot_xy[order], geometry=0, radius=np.full(n, 5.0), index=order, transformations={CS: t})
    obs = pd.DataFrame(
        {K.REGION: pd.Categorical(["s_spots"] * n), K.INSTANCE: np.arange(n), K.SAMPLE: "s"},
        index=[f"spot{i}" for i in range(n)],
    )
    if array is not None:
        obs[K.ARRAY_ROW], obs[K.ARRAY_COL] = np.asarray(array)[:, 0], np.asarray(array)[:, 1]
    table = TableModel.parse(
        ad.AnnData(np.ones((n, 2), dtype=np.float32), obs=obs),
        region="s_spots",
        region_key=K.REGION,
        instance_key=K.INSTANCE,
    )
    if um_per_px is not None:
        table.uns[K.UNS] = {K.UNS_READER: {"s": {"um_per_px": um_per_px}}}
    sd = SpatialData(images={"s_image": image}, shapes={"s_spots": shapes}, tables={"table": table})
    return sd, img


def reference_mask(x, y, shape_yx, patch, grid=5):
    """The reference's make_masking_table (ring thresholds), written independently."""
    r = patch // 2
    mask = np.ones(grid * grid, dtype=bool)
    for ind, window in ((0, grid), (1, grid - 2)):
        if ind >= grid // 2:
            break
        if y - r * window < 0:
            mask[grid * ind : grid * ind + grid] = False
        if y + r * window > shape_yx[0]:
            mask[grid * grid - grid * (ind + 1) : grid * grid - grid * ind] = False
        if x - r * window < 0:
            mask[[i + ind for i in range(grid * grid) if i % grid == 0]] = False
        if x + r * window > shape_yx[1]:
            mask[[i - ind for i in range(grid * grid) if i % grid == grid - 1]] = False
    return mask


EDGE_XY = [(200.3, 150.7), (5.2, 7.9), (398.0, 299.5), (30.0, 280.0), (120.0, 12.0), (370.5, 40.2)]


@pytest.mark.parametrize("multiscale", [False, True])
def test_tile_geometry_and_mask(multiscale):
    sd, _ = make_sdata(EDGE_XY, multiscale=multiscale)
    dkan.tl.tile(sd, patch_size=32)
    t = results(sd)
    np.testing.assert_allclose(t.obsm[K.SPOT_PX], np.array(EDGE_XY))
    mask = t.obsm[K.REGION_MASK]
    assert mask.shape == (6, 25) and mask.dtype == bool
    for i, (x, y) in enumerate(EDGE_XY):
        np.testing.assert_array_equal(mask[i], reference_mask(int(x), int(y), (300, 400), 32))
    assert mask[0].all() and not mask[1].all() and mask[:, 12].all()
    rec = t.uns[K.UNS][K.UNS_TILE]
    assert rec["patch_size"] == 32 and rec["region_grid"] == 5 and rec["target_mpp"] is None
    s = rec["samples"]["s"]
    assert (s["level"], s["downsample"], s["mpp"], s["image_key"], s["spots_key"]) == (
        0,
        1.0,
        0.5,
        "s_image",
        "s_spots",
    )


def test_tile_follows_transformations():
    # spots stored in µm (2 µm per unit -> Scale 2 to the slide system), image in pixels
    sd, _ = make_sdata(EDGE_XY, spots_scale=2.0)
    dkan.tl.tile(sd, patch_size=32)
    np.testing.assert_allclose(results(sd).obsm[K.SPOT_PX], np.array(EDGE_XY))


def test_tile_not_inplace_and_key_added():
    sd, _ = make_sdata(EDGE_XY)
    out = dkan.tl.tile(sd, patch_size=32, inplace=False)
    assert list(sd.tables) == ["table"] and out["region_mask"].shape == (6, 25)
    dkan.tl.tile(sd, patch_size=16, region_grid=3, key_added="small")
    t = results(sd)
    assert t.obsm[f"{K.REGION_MASK}_small"].shape == (6, 9)
    assert t.uns[K.UNS]["small"]["keys"]["grid"] == f"{K.GRID}_small"


def test_grid_square_hex_irregular():
    rng = np.random.default_rng(1)
    # square ST grid with offsets
    rc = np.array([(r, c) for r in range(3, 7) for c in range(10, 14)])
    xy = np.c_[rc[:, 1] * 20.0, rc[:, 0] * 20.0]
    sd, _ = make_sdata(xy, array=rc)
    dkan.tl.tile(sd, patch_size=16)
    g = results(sd).obsm[K.GRID]
    np.testing.assert_array_equal(g, rc - rc.min(axis=0))
    assert g.dtype == np.int64 and results(sd).uns[K.UNS][K.UNS_TILE]["samples"]["s"]["grid_kind"] == "square"
    # Visium hex: (row + col) even
    hexrc = np.array([(r, 2 * c + r % 2) for r in range(4) for c in range(5)])
    xy = np.c_[hexrc[:, 1] * 10.0 + 50, hexrc[:, 0] * 17.0 + 50]
    sd, _ = make_sdata(xy, array=hexrc)
    dkan.tl.tile(sd, patch_size=16)
    g = results(sd).obsm[K.GRID]
    np.testing.assert_array_equal(g, np.c_[hexrc[:, 0], hexrc[:, 1] // 2])
    assert results(sd).uns[K.UNS][K.UNS_TILE]["samples"]["s"]["grid_kind"] == "hex"
    # irregular: jittered hex-like layout without array coords -> unique positions, order-free
    xy = xy + rng.normal(0, 1.0, xy.shape)
    perm = rng.permutation(len(xy))
    sd, _ = make_sdata(xy[perm])
    dkan.tl.tile(sd, patch_size=16)
    g = results(sd).obsm[K.GRID]
    assert len(np.unique(g, axis=0)) == len(g) and g.min() == 0
    # rows increase with y, columns with x
    assert np.corrcoef(g[:, 0], xy[perm, 1])[0, 1] > 0.95 and np.corrcoef(g[:, 1], xy[perm, 0])[0, 1] > 0.95


def test_target_mpp_picks_level():
    sd, _ = make_sdata(EDGE_XY[:1], multiscale=True, shape=(3, 300, 400), um_per_px=0.5)
    dkan.tl.tile(sd, patch_size=32, target_mpp=1.0)
    s = results(sd).uns[K.UNS][K.UNS_TILE]["samples"]["s"]
    assert (s["level"], s["resample"], s["mpp"]) == (1, 1.0, 1.0)
    np.testing.assert_allclose(results(sd).obsm[K.SPOT_PX], np.array(EDGE_XY[:1]) / 2)
    dkan.tl.tile(sd, patch_size=32, target_mpp=0.75)
    s = results(sd).uns[K.UNS][K.UNS_TILE]["samples"]["s"]
    assert s["level"] == 0 and s["resample"] == pytest.approx(1.5) and s["patch_side"] == 48
    sd, _ = make_sdata(EDGE_XY[:1], um_per_px=None)  # Visium rule: 55 µm / (2 * radius 5 px)
    dkan.tl.tile(sd, patch_size=32, target_mpp=11.0)
    s = results(sd).uns[K.UNS][K.UNS_TILE]["samples"]["s"]
    assert s["mpp"] == pytest.approx(5.5) and s["resample"] == pytest.approx(2.0)


def test_bad_inputs():
    sd, _ = make_sdata([(500.0, 10.0), (10.0, 10.0)])
    with pytest.raises(ValueError, match="outside image"):
        dkan.tl.tile(sd, patch_size=32)
    sd, _ = make_sdata(EDGE_XY)
    with pytest.raises(ValueError, match="larger than image"):
        dkan.tl.tile(sd, patch_size=512)
    sd, _ = make_sdata(EDGE_XY, shape=(4, 100, 100), chunks=(4, 64, 64))
    with pytest.raises(ValueError, match="RGB"):
        dkan.tl.tile(sd, patch_size=16)
    sd, _ = make_sdata(EDGE_XY, dtype=np.float32)
    with pytest.raises(TypeError, match="uint8"):
        dkan.tl.tile(sd, patch_size=16)
    sd, _ = make_sdata(EDGE_XY, image_cs="elsewhere")
    with pytest.raises((ValueError, KeyError), match="coordinate system"):
        dkan.tl.tile(sd, patch_size=16)
    sd, _ = make_sdata(EDGE_XY)
    sd["table"].obs[K.REGION] = pd.Categorical(["other"] * 6)
    with pytest.raises(ValueError, match="at least one spot"):
        dkan.tl.tile(sd, patch_size=16)
    with pytest.raises(ValueError, match="positive"):
        dkan.tl.tile(make_sdata(EDGE_XY)[0], patch_size=0)


def test_tile_toy(toy):
    dkan.tl.tile(toy, patch_size=64)
    t = results(toy)
    assert np.isfinite(t.obsm[K.SPOT_PX]).all() and (t.obsm[K.GRID] >= 0).all()
    assert set(t.uns[K.UNS][K.UNS_TILE]["samples"]) == {"s0", "s1", "s2"}
    for name in ("s0", "s1", "s2"):
        g = t.obsm[K.GRID][t.obs[K.SAMPLE].to_numpy() == name]
        assert len(np.unique(g, axis=0)) == len(g)


def test_tile_visium_layout():
    import spatialdata_io
    from spatialdata.transformations import get_transformation

    from dkan._features.crops import SpotCrops, read_window

    path = data_path("visium_tiny")
    sd = spatialdata_io.visium(path, dataset_id="tiny")
    img_key = "tiny_hires_image"
    dkan.tl.tile(sd, image_key=img_key, patch_size=32)
    t = results(sd)
    # expected: full-res spot centres through the image's inverse Scale into hires pixels
    scale = get_transformation(sd[img_key], "tiny").to_affine_matrix(("x", "y"), ("x", "y"))[0, 0]
    shapes = sd["tiny"].loc[t.obs[K.INSTANCE].to_numpy()]
    expected = np.c_[shapes.geometry.x, shapes.geometry.y] / scale
    np.testing.assert_allclose(t.obsm[K.SPOT_PX], expected, rtol=1e-9)
    rec = t.uns[K.UNS][K.UNS_TILE]["samples"]["tiny"]
    assert rec["grid_kind"] == "hex"
    np.testing.assert_allclose(rec["mpp"], 55 / (2 * shapes["radius"].iloc[0] / scale), rtol=1e-6)
    img = np.asarray(sd[img_key].data)[:3]  # RGBA PNG: alpha ignored
    ds = SpotCrops(sd, normalize=False)
    for i in (0, 17, 99):
        x, y = np.floor(expected[i]).astype(int)
        np.testing.assert_array_equal(ds[i]["patch"].numpy(), read_window(img, y - 16, x - 16, 32, 32))
        assert ds[i]["index"] == i
