import numpy as np
import pytest
from conftest import data_path

import dkan
from dkan import _keys as K
from dkan._features.levels import image_levels
from dkan._features.make_spots import grid_layout, tissue_mask


def he_like_sdata(multiscale=False, tissue=True):
    """White slide (light grey noise) with a pink-purple 'tissue' disc; returns the SpatialData and the disc mask."""
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale

    rng = np.random.default_rng(0)
    h, w = 400, 600
    img = np.clip(rng.normal(235, 4, (3, h, w)), 0, 255)
    yy, xx = np.mgrid[:h, :w]
    disc = ((yy - 200) ** 2 + (xx - 250) ** 2 < 130**2) & tissue
    tissue = np.array([190, 110, 170])[:, None] + rng.normal(0, 12, (3, disc.sum()))
    img[:, disc] = np.clip(tissue, 0, 255)
    image = Image2DModel.parse(
        img.astype(np.uint8),
        dims=("c", "y", "x"),
        scale_factors=[2] if multiscale else None,
        transformations={"slide": Identity(), "um": Scale([2.0, 2.0], axes=("x", "y"))},
    )
    return SpatialData(images={"he_image": image}), disc


def _handwritten_tissue_mask(rgb):
    """The detector dkan used before scikit-image (hand-written Otsu, 3 x 3 closing 3 times), kept as reference."""
    from scipy import ndimage

    img = rgb.astype(np.float32)
    mx, mn = img.max(axis=0), img.min(axis=0)
    sat = (mx - mn) / np.maximum(mx, 1.0)
    hist, edges = np.histogram(sat.ravel(), bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = (w0 * w1 * (m0 - m1) ** 2)[:-1]
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    threshold = (centres[best[0]] + centres[best[-1] + 1]) / 2
    mask = (sat > max(threshold, 0.1)) & (mx > 30)
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3), bool), iterations=3)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        mask = np.r_[False, sizes >= 0.01 * sizes.max()][labels]
    return mask


def test_tissue_mask_finds_the_disc():
    sd, disc = he_like_sdata()
    mask = tissue_mask(np.asarray(sd["he_image"].data))
    assert (mask == disc).mean() > 0.98


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tissue_mask_matches_the_handwritten_detector(seed):
    """scikit-image's Otsu threshold is the centre of the last background bin, the old one the edge above it
    (half a bin, 1/512 of the saturation range, higher); its closing does not erode tissue touching the image
    border (the old one treated outside pixels as background). Away from the border the masks agree to 0.1 %."""
    rng = np.random.default_rng(seed)
    h, w = 300, 420
    img = np.clip(rng.normal(232, 6, (3, h, w)), 0, 255)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(4):  # irregular blobs of several stain intensities, some holes
        cy, cx, r = rng.uniform(40, h - 40), rng.uniform(40, w - 40), rng.uniform(20, 70)
        blob = (yy - cy) ** 2 + ((xx - cx) * rng.uniform(0.6, 1.4)) ** 2 < r**2
        colour = np.array([200, 120, 180]) * rng.uniform(0.7, 1.0)
        img[:, blob] = np.clip(colour[:, None] + rng.normal(0, 15, (3, blob.sum())), 0, 255)
    rgb = img.astype(np.uint8)
    new, old = tissue_mask(rgb), _handwritten_tissue_mask(rgb)
    inner = (slice(3, -3), slice(3, -3))
    assert (new[inner] != old[inner]).mean() < 1e-3
    assert 0.05 < new.mean() < 0.9


def test_tissue_mask_of_a_blank_slide_is_empty():
    rng = np.random.default_rng(0)
    blank = np.clip(rng.normal(235, 3, (3, 64, 80)), 0, 255).astype(np.uint8)
    assert not tissue_mask(blank).any()
    assert not tissue_mask(np.full((3, 16, 16), 240, np.uint8)).any()  # constant: threshold undefined, no tissue


def test_grid_layout():
    xy, row, col = grid_layout(100.0, 80.0, 10.0, "hex")
    assert ((row + col) % 2 == 0).all()
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(d.min(axis=1), 10.0)  # every spot has neighbours at exactly one pitch
    assert (xy >= 0).all() and (xy[:, 0] < 100).all() and (xy[:, 1] < 80).all()
    xy, row, col = grid_layout(100.0, 80.0, 10.0, "square")
    assert len(xy) == 10 * 8 and set(np.diff(np.unique(xy[:, 0]))) == {10.0}
    with pytest.raises(ValueError, match="hex"):
        grid_layout(10, 10, 1, "triangle")


@pytest.mark.parametrize("multiscale", [False, True])
def test_make_spots_on_tissue_then_tile_and_crop(multiscale):
    from spatialdata.transformations import get_transformation

    sd, disc = he_like_sdata(multiscale)
    shapes_key, table_key = dkan.tl.make_spots(sd, um_per_px=1.0, spacing_um=20.0, diameter_um=10.0)
    assert shapes_key == f"he_image{K.PSEUDO_SPOTS_SUFFIX}" and table_key == f"{shapes_key}_table"
    shapes, table = sd[shapes_key], sd[table_key]
    assert set(get_transformation(shapes, get_all=True)) == {"slide", "um"}
    xy = np.c_[shapes.geometry.x, shapes.geometry.y]
    assert disc[xy[:, 1].astype(int), xy[:, 0].astype(int)].all()  # all on tissue
    n_expected = disc.sum() / (20.0**2 * np.sqrt(3) / 2)  # tissue area / area per hex spot
    assert 0.85 * n_expected < len(xy) < 1.15 * n_expected
    np.testing.assert_allclose(shapes["radius"], 5.0)
    assert table.n_obs == len(xy) and table.n_vars == 0
    assert table.uns["spatialdata_attrs"]["region"] == shapes_key
    assert (table.obs[K.SAMPLE] == "he").all() and table.uns[K.UNS][K.UNS_READER]["he"]["um_per_px"] == 1.0
    dkan.tl.tile(sd, table_key=table_key, patch_size=16)
    rec = table.uns[K.UNS][K.UNS_TILE]["samples"]["he"]
    assert rec["grid_kind"] == "hex" and rec["mpp"] == 1.0
    assert len(np.unique(table.obsm[K.GRID], axis=0)) == table.n_obs
    from dkan._features.crops import SpotCrops

    ds = SpotCrops(sd, table_key=table_key, normalize=False)
    patch = ds[0]["patch"].numpy()
    x, y = np.floor(xy[0]).astype(int)
    img = np.asarray(image_levels(sd["he_image"])[0])
    np.testing.assert_array_equal(patch, img[:, y - 8 : y + 8, x - 8 : x + 8])


def test_make_spots_options_and_errors():
    from spatialdata.transformations import Identity, set_transformation

    sd, _disc = he_like_sdata()
    _, t0 = dkan.tl.make_spots(sd, key_added="from_um")  # the image's "um" coordinate system records 2 µm/px
    assert sd[t0].uns["dkan"]["reader"]["he"]["um_per_px"] == 2.0
    del sd["from_um"], sd[t0]
    set_transformation(sd.images["he_image"], {"slide": Identity()}, set_all=True)  # no pixel size recorded
    with pytest.raises(ValueError, match="um_per_px"):
        dkan.tl.make_spots(sd)
    k, t = dkan.tl.make_spots(sd, um_per_px=1.0, spacing_um=40.0, grid="square", tissue_only=False, key_added="all")
    assert (k, t) == ("all", "all_table")
    assert sd[t].n_obs == 15 * 10
    with pytest.raises(KeyError, match="overwrite"):
        dkan.tl.make_spots(sd, um_per_px=1.0, key_added="all")
    dkan.tl.make_spots(sd, um_per_px=1.0, spacing_um=40.0, key_added="all", overwrite=True)
    assert 0 < sd[t].n_obs < 150
    blank, _ = he_like_sdata(tissue=False)
    with pytest.raises(ValueError, match="tissue"):
        dkan.tl.make_spots(blank, um_per_px=1.0, spacing_um=40.0)


def test_make_spots_her2st_covers_tissue_avoids_background():
    from scipy.spatial import cKDTree

    sd = dkan.datasets.her2st(data_path("her2st"), sections=["C2"], scale_factors=None)
    um = sd["table"].uns[K.UNS][K.UNS_READER]["C2"]["um_per_px"]
    shapes_key, _table_key = dkan.tl.make_spots(sd, image_key="C2_image", um_per_px=um, spacing_um=200.0)
    pseudo = sd[shapes_key]
    real = sd["C2_spots"]
    pxy = np.c_[pseudo.geometry.x, pseudo.geometry.y]
    rxy = np.c_[real.geometry.x, real.geometry.y]
    # real ST spots lie on tissue: nearly all have a pseudo-spot within one pitch
    dist, _ = cKDTree(pxy).query(rxy)
    assert (dist < 200.0 / um).mean() > 0.95
    # and pseudo-spots do not spread far beyond the tissue
    dist_back, _ = cKDTree(rxy).query(pxy)
    assert (dist_back < 2 * 200.0 / um).mean() > 0.9
    # pseudo-spot patches are darker than the slide's background (image corners)
    img = sd["C2_image"].data
    means = [float(img[:, int(y) - 30 : int(y) + 30, int(x) - 30 : int(x) + 30].mean().compute()) for x, y in pxy[::10]]
    background = float(np.mean([img[:, :300, :300].mean().compute(), img[:, -300:, -300:].mean().compute()]))
    assert np.mean(means) < background - 20
