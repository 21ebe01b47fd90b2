import pickle

import numpy as np
import pytest
import torch
from conftest import data_path, results
from test_tile import EDGE_XY, make_sdata

import dkan
from dkan import _keys as K
from dkan._features.crops import BatchBySample, ChunkReader, SpotCrops, augment, read_window

P = 32


M = 300  # zero margin: a numpy slice of the padded image is the expected zero-padded crop


def crop(img, x, y, side):
    """Expected crop: a plain numpy slice of the zero-padded image, centred on floor(x, y)."""
    padded = np.pad(img, ((0, 0), (M, M), (M, M)))
    y0, x0 = int(np.floor(y)) - side // 2 + M, int(np.floor(x)) - side // 2 + M
    return padded[:, y0 : y0 + side, x0 : x0 + side]


def region_tiles(img, x, y, p=P, g=5):
    """Expected region tiles, cut from a numpy slice of the image."""
    w = crop(img, x, y, g * p)
    return np.stack([w[:, i * p : (i + 1) * p, j * p : (j + 1) * p] for i in range(g) for j in range(g)])


def test_read_window_pads_with_zeros():
    img = np.arange(3 * 10 * 12, dtype=np.uint8).reshape(3, 10, 12)
    w = read_window(img, -2, 9, 5, 6)
    assert w.shape == (3, 5, 6)
    np.testing.assert_array_equal(w[:, 2:, :3], img[:, 0:3, 9:12])
    assert (w[:, :2] == 0).all() and (w[:, :, 3:] == 0).all()
    assert (read_window(img, 50, 50, 4, 4) == 0).all()


@pytest.mark.parametrize("multiscale", [False, True])
def test_crops_equal_numpy_slices(multiscale):
    sd, img = make_sdata(EDGE_XY, multiscale=multiscale)
    dkan.tl.tile(sd, patch_size=P)
    ds = SpotCrops(sd, with_region=True, normalize=False)
    assert len(ds) == len(EDGE_XY)
    for i, (x, y) in enumerate(EDGE_XY):
        item = ds[i]
        np.testing.assert_array_equal(item["patch"].numpy(), crop(img, x, y, P))
        np.testing.assert_array_equal(item["region"].numpy(), region_tiles(img, x, y))
        np.testing.assert_array_equal(item["region_mask"].numpy(), results(sd).obsm[K.REGION_MASK][i])
        assert item["index"] == i and item["sample"] == 0
    # edge spot: zero padding where the window leaves the image, tile mask false there
    item = ds[1]
    assert item["patch"].dtype == torch.uint8 and (item["region"][0] == 0).all() and not item["region_mask"][0]
    np.testing.assert_array_equal(item["patch"].numpy()[:, 9:, 11:], img[:, : 7 + 16, : 5 + 16])
    assert (item["patch"][:, :9, :] == 0).all() and (item["patch"][:, :, :11] == 0).all()
    x, y = EDGE_XY[0]  # interior spot: the plain slice, no padding involved
    np.testing.assert_array_equal(ds[0]["patch"].numpy(), img[:, int(y) - 16 : int(y) + 16, int(x) - 16 : int(x) + 16])


def test_read_batch_matches_items_and_normalises():
    sd, _img = make_sdata(EDGE_XY)
    dkan.tl.tile(sd, patch_size=P)
    raw = SpotCrops(sd, with_region=True, normalize=False)
    ds = SpotCrops(sd, with_region=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    batch = ds.read_batch([4, 0, 2])
    assert batch["patch"].shape == (3, 3, P, P) and batch["region"].shape == (3, 25, 3, P, P)
    assert batch["patch"].dtype == torch.float32 and batch["index"].tolist() == [4, 0, 2]
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    for b, i in enumerate([4, 0, 2]):
        expected = (raw[i]["patch"].float() / 255 - mean) / std
        torch.testing.assert_close(batch["patch"][b], expected)
        torch.testing.assert_close(batch["region"][b], (raw[i]["region"].float() / 255 - mean) / std)
    items = ds.__getitems__([4, 0])
    torch.testing.assert_close(items[1]["patch"], batch["patch"][1])


def test_chunk_reader_small_cache_and_chunks():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (3, 200, 170)).astype(np.uint8)
    import dask.array as da

    arr = da.from_array(img, chunks=(3, 30, 40))
    windows = [(int(y), int(x), 50, 45) for y, x in rng.integers(-60, 200, size=(40, 2))]
    reader = ChunkReader(arr, cache_bytes=3 * 30 * 40 * 10)  # 10 chunks: forces several groups and evictions
    assert not reader._direct
    for win, got in zip(windows, reader.read(windows), strict=True):
        np.testing.assert_array_equal(got, read_window(img, *win))
    assert reader._used <= reader.cache_bytes
    clone = pickle.loads(pickle.dumps(reader))
    assert len(clone._cache) == 0
    np.testing.assert_array_equal(clone.read(windows[:1])[0], read_window(img, *windows[0]))
    split = ChunkReader(da.from_array(img, chunks=(1, 30, 40)), cache_bytes=3 * 30 * 40 * 10)  # channels split
    for win, got in zip(windows, split.read(windows), strict=True):
        np.testing.assert_array_equal(got, read_window(img, *win))


@pytest.mark.parametrize("tf", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1), (0, 1, 1)])
def test_augmentation_preserves_content(tf):
    sd, _img = make_sdata(EDGE_XY)
    dkan.tl.tile(sd, patch_size=P)
    ds = SpotCrops(sd, with_region=True, normalize=False)
    base = ds.read_batch([1, 3])
    aug = ds.read_batch([1, 3], transforms=np.array([tf, tf]))
    for b in range(2):
        np.testing.assert_array_equal(aug["patch"][b].numpy(), augment(base["patch"][b].numpy(), *tf))
        g = 5
        window = base["region"][b].numpy().reshape(g, g, 3, P, P).transpose(2, 0, 3, 1, 4).reshape(3, g * P, g * P)
        expected = augment(window, *tf).reshape(3, g, P, g, P).transpose(1, 3, 0, 2, 4).reshape(g * g, 3, P, P)
        np.testing.assert_array_equal(aug["region"][b].numpy(), expected)
        mask = augment(base["region_mask"][b].numpy().reshape(g, g), *tf).reshape(-1)
        np.testing.assert_array_equal(aug["region_mask"][b].numpy(), mask)
    if tf == (0, 0, 1):  # a 90° rotation is np.rot90 of the unaugmented crop
        np.testing.assert_array_equal(aug["patch"][0].numpy(), np.rot90(base["patch"][0].numpy(), 1, axes=(1, 2)))


def test_random_augmentation_seeded():
    sd, _ = make_sdata(EDGE_XY)
    dkan.tl.tile(sd, patch_size=P)
    base = SpotCrops(sd, normalize=False).read_batch(range(6))["patch"].numpy()
    a = SpotCrops(sd, normalize=False, augment=True, seed=5).read_batch(range(6))["patch"].numpy()
    b = SpotCrops(sd, normalize=False, augment=True, seed=5).read_batch(range(6))["patch"].numpy()
    np.testing.assert_array_equal(a, b)
    dihedral = [(h, v, r) for h in (0, 1) for v in (0, 1) for r in (0, 1)]
    for i in range(6):  # every augmented crop is a flip/rotation of the original
        assert any(np.array_equal(a[i], augment(base[i], *t)) for t in dihedral)
    assert not np.array_equal(a, base)


def test_resampled_crops():
    sd, img = make_sdata(EDGE_XY[:1], multiscale=True, um_per_px=0.5)
    dkan.tl.tile(sd, patch_size=P, target_mpp=0.75)  # level 0, windows 1.5x larger, resized to P
    item = SpotCrops(sd, with_region=True, normalize=False)[0]
    x, y = (int(v) for v in EDGE_XY[0])
    window = torch.from_numpy(read_window(img, y - 24, x - 24, 48, 48)).float()[None]
    expected = torch.nn.functional.interpolate(window, size=(P, P), mode="bilinear", antialias=True)[0]
    assert item["patch"].shape == (3, P, P) and item["region"].shape == (25, 3, P, P)
    assert (item["patch"].float() - expected.round()).abs().max() <= 1
    # the region's centre tile is the patch (resampling differs only at the tile border)
    inner = (slice(None), slice(2, -2), slice(2, -2))
    torch.testing.assert_close(item["region"][12][inner].float(), item["patch"][inner].float(), atol=2, rtol=0)


def test_several_sdata_and_batch_by_sample(toy):
    sd2, _ = make_sdata(EDGE_XY)
    dkan.tl.tile(toy, patch_size=P)
    dkan.tl.tile(sd2, patch_size=P)
    ds = SpotCrops([toy, sd2], normalize=False)
    assert ds.sample_names == ["s0", "s1", "s2", "s"] and len(ds) == 3 * 144 + 6
    assert [len(s) for s in ds.samples] == [144, 144, 144, 6]
    item = ds[len(ds) - 1]
    assert item["sample"] == 3 and item["index"] == 5
    sampler = BatchBySample(ds, 50, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 * 3 + 1
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(len(ds)))
    for b in batches:
        assert len({int(ds.read_batch(b[:1])["sample"][0])} | {int(s) for s in ds.read_batch(b)["sample"]}) == 1
    again = list(BatchBySample(ds, 50, seed=1))
    assert [list(b) for b in again] == [list(b) for b in batches]
    assert [list(b) for b in sampler] != [list(b) for b in batches]  # next epoch reshuffles
    assert len(BatchBySample(ds, 50, drop_last=True)) == 3 * 2
    loader = torch.utils.data.DataLoader(ds, batch_sampler=BatchBySample(ds, 8, seed=0))
    first = next(iter(loader))
    assert first["patch"].shape == (8, 3, P, P) and len(set(first["sample"].tolist())) == 1
    with pytest.raises(ValueError, match="tiled with"):
        dkan.tl.tile(sd2, patch_size=16)
        SpotCrops([toy, sd2])


def test_crops_tile_on_demand(toy):
    ds = SpotCrops(toy, normalize=False)  # no geometry yet: tiles with defaults
    assert K.SPOT_PX in results(toy).obsm and ds.patch_size == 224
    assert ds[0]["patch"].shape == (3, 224, 224) and "region" not in ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[5]["patch"], ds[5]["patch"])


def test_her2st_crop_equals_pil_crop():
    import pandas as pd
    from PIL import Image

    path = data_path("her2st")
    sd = dkan.datasets.her2st(path, sections=["C2"], scale_factors=None)
    dkan.tl.tile(sd)
    ds = SpotCrops(sd, normalize=False)
    spots = pd.read_csv(path / "ST-spotfiles" / "C2_selection.tsv", sep="\t")
    jpeg = next((path / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(jpeg) as im:
        obs = sd["table"].obs
        for i in (0, len(obs) // 2, len(obs) - 1):
            row = spots[(spots.x == obs[K.ARRAY_COL].iloc[i]) & (spots.y == obs[K.ARRAY_ROW].iloc[i])].iloc[0]
            x, y = int(row.pixel_x), int(row.pixel_y)
            expected = np.asarray(im.crop((x - 112, y - 112, x + 112, y + 112))).transpose(2, 0, 1)
            np.testing.assert_array_equal(ds[i]["patch"].numpy(), expected)


def test_iter_batches_prefetch_matches_read_batch():
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    rng = np.random.default_rng(2)
    xy = rng.uniform(0, [400, 300], size=(40, 2))
    sd, img = make_sdata(xy)
    # small chunks and a tiny cache: prefetching, eviction and assembly interleave
    sd.images["s_image"] = Image2DModel.parse(
        da.from_array(img, chunks=(3, 40, 50)), dims=("c", "y", "x"), transformations={"slide1": Identity()}
    )
    dkan.tl.tile(sd, patch_size=P)
    ds = SpotCrops(sd, with_region=True, normalize=False, cache_bytes=3 * 40 * 50 * 30)
    order = rng.permutation(len(ds))
    got = list(ds.iter_batches(order, 7, prefetch=True))
    assert [len(b["patch"]) for b in got] == [7] * 5 + [5]
    for b, idx in zip(got, [order[i : i + 7] for i in range(0, 40, 7)], strict=True):
        assert b["index"].tolist() == idx.tolist()
        for k, i in enumerate(idx):
            np.testing.assert_array_equal(b["region"][k].numpy(), region_tiles(img, *xy[i]))
            np.testing.assert_array_equal(b["patch"][k].numpy(), crop(img, *xy[i], P))


def test_strip_cache_holds_the_rows_a_window_spans_within_bounds():
    import dask.array as da

    from dkan._features.windows import strip_cache_bytes

    img = da.zeros((3, 40_000, 40_000), dtype=np.uint8, chunks=(3, 1024, 1024))
    # a 1120 px window spans up to 3 chunk rows; one more row and rounding up: 4 rows of 3 x 1024 x 40000 bytes
    assert strip_cache_bytes(img, 1120) == 4 * 3 * 1024 * 40_000
    assert strip_cache_bytes(img, 100_000) == 2**30  # capped: never near the image's size
    small = da.zeros((3, 500, 500), dtype=np.uint8, chunks=(3, 100, 100))
    assert strip_cache_bytes(small, 64) == 256 * 2**20  # the floor
    assert strip_cache_bytes(np.zeros((3, 10, 10), np.uint8), 64) == 256 * 2**20  # not chunked


def test_dataset_classes_are_public():
    assert dkan.tl.SpotCrops is SpotCrops and dkan.tl.BatchBySample is BatchBySample
    assert {"SpotCrops", "BatchBySample"} <= set(dir(dkan.tl))
