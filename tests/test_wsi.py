"""Whole-slide files: reading through tiffslide, the recorded pixel size, and slide -> prediction store."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tifffile

import dkan
from dkan import _keys as K
from dkan._features.levels import image_levels
from dkan.cli import main

MPP = 0.5
FAST = ["--device", "cpu", "--no-progress", "-q"]


def _slide(path, **kwargs):
    opts = {"width": 1200, "height": 900, "um_per_px": MPP, "tile": 128, "n_blobs": 3}
    return dkan.datasets.synthetic_wsi(path, **{**opts, **kwargs})


def _plain_tiff(path, resolution=None, unit=None, shape=(600, 800, 3), value=240):
    img = np.full(shape, value, np.uint8)
    extra = {} if resolution is None else {"resolution": resolution, "resolutionunit": unit}
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb", compression="jpeg", **extra)
    return path


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return _slide(tmp_path_factory.mktemp("wsi") / "slide_a.tif")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sdata = dkan.datasets.toy(n_samples=2, grid_size=6, seed=0)
    model = dkan.tl.train(sdata, config="small", progress=False, max_epochs=1, feature_encoder="dummy", device="cpu")
    return model.save(tmp_path_factory.mktemp("model") / "model")


def test_read_wsi_records_pixel_size_and_crops_equal_direct_reads(slide):
    sdata = dkan.io.read_wsi(slide)
    image = sdata.images["slide_a" + K.IMAGE_SUFFIX]
    assert dkan.io.image_um_per_px(image) == pytest.approx(MPP)
    levels = image_levels(image)
    with tifffile.TiffFile(slide) as tf:
        direct = [lv.asarray() for lv in tf.series[0].levels]
    assert [lv.shape for lv in levels] == [(3, *d.shape[:2]) for d in direct]
    for lv, ref in zip(levels, direct, strict=True):
        assert all(c % 128 == 0 for c in lv.data.chunks[1][:-1] + lv.data.chunks[2][:-1])  # aligned to file tiles
        for y0, x0, h, w in [(0, 0, 64, 64), (100, 120, 200, 150), (lv.shape[1] - 70, lv.shape[2] - 90, 70, 90)]:
            crop = np.asarray(lv.data[:, y0 : y0 + h, x0 : x0 + w])
            np.testing.assert_array_equal(crop, ref[y0 : y0 + h, x0 : x0 + w].transpose(2, 0, 1))
    clone = pickle.loads(pickle.dumps(levels[0].data))  # picklable into DataLoader workers
    np.testing.assert_array_equal(np.asarray(clone[:, :50, :50]), np.asarray(levels[0].data[:, :50, :50]))


def test_make_spots_and_tile_find_the_pixel_size(slide):
    sdata = dkan.io.read_wsi(slide)
    shapes_key, table_key = dkan.tl.make_spots(sdata)  # no um_per_px typed
    table = sdata.tables[table_key]
    assert table.uns[K.UNS][K.UNS_READER]["slide_a"]["um_per_px"] == pytest.approx(MPP)
    r = sdata.shapes[shapes_key]["radius"].to_numpy()
    np.testing.assert_allclose(r, 55.0 / 2 / MPP)
    del table.uns[K.UNS][K.UNS_READER]  # tile falls back to the pixel size recorded on the image
    dkan.tl.tile(sdata, table_key=table_key, target_mpp=1.0, patch_size=32)
    rec = table.uns[K.UNS][K.UNS_TILE]["samples"]["slide_a"]
    assert rec["level"] == 1 and rec["mpp"] == pytest.approx(1.0)


def test_bad_slides_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dkan.io.read_wsi(tmp_path / "missing.svs")
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide at all" * 10)
    with pytest.raises(ValueError, match="Cannot open"):
        dkan.io.read_wsi(junk)
    bare = _plain_tiff(tmp_path / "bare.tif")
    with pytest.raises(ValueError, match=r"records no pixel size.*um_per_px"):
        dkan.io.read_wsi(bare)
    sdata = dkan.io.read_wsi(bare, um_per_px=0.25)
    assert dkan.io.image_um_per_px(sdata.images["bare_image"]) == pytest.approx(0.25)
    dpi72 = _plain_tiff(tmp_path / "dpi72.tif", resolution=(72, 72), unit="INCH")
    with pytest.raises(ValueError, match=r"implausible.*--um-per-px"):
        dkan.io.read_wsi(dpi72)
    with pytest.raises(ValueError, match="plausible range"):
        dkan.io.read_wsi(bare, um_per_px=300)


def test_ome_tiff_pixel_size_comes_from_the_ome_xml(tmp_path):
    img = np.full((600, 800, 3), 200, np.uint8)
    meta = {"axes": "YXS", "PhysicalSizeX": 250, "PhysicalSizeY": 250, "PhysicalSizeXUnit": "nm"}
    path = tmp_path / "ome.ome.tif"
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb", metadata=meta)  # no resolution tags
    sdata = dkan.io.read_wsi(path)
    assert dkan.io.image_um_per_px(sdata.images["ome_image"]) == pytest.approx(0.25)


def test_blank_slide_has_no_tissue(tmp_path):
    blank = _plain_tiff(tmp_path / "blank.tif", resolution=(2e4, 2e4), unit="CENTIMETER")
    sdata = dkan.io.read_wsi(blank)
    with pytest.raises(ValueError, match="No pseudo-spot fell on tissue"):
        dkan.tl.make_spots(sdata)


def test_cli_predict_from_slide_file_to_store(slide, model_dir, tmp_path, capsys):
    import spatialdata as sd

    out = tmp_path / "pred.zarr"
    assert main(["predict", str(slide), "--model", str(model_dir), "--out", str(out), *FAST]) == 0
    back = sd.read_zarr(out)
    (tkey,) = back.tables.keys()
    table = back.tables[tkey]
    model = dkan.DKANModel.load(model_dir)
    assert list(table.var_names) == list(model.genes)
    assert table.n_obs > 10 and np.isfinite(table.layers[K.PRED]).all()
    assert not back.images  # a decoded whole slide is not copied into the store; its path is recorded
    assert table.uns[K.UNS][K.UNS_SOURCE]["slide"] == str(slide.resolve())
    assert dkan.io.add_slide_image(back) == ["slide_a" + K.IMAGE_SUFFIX]
    assert dkan.io.image_um_per_px(back.images["slide_a" + K.IMAGE_SUFFIX]) == pytest.approx(MPP)
    with_image = tmp_path / "pred_image.zarr"
    args = ["predict", str(slide), "--model", str(model_dir), "--out", str(with_image), "--with-image", *FAST]
    assert main(args) == 0
    assert "slide_a" + K.IMAGE_SUFFIX in sd.read_zarr(with_image).images
    # an existing output is refused and left as it is
    assert main(["predict", str(slide), "--model", str(model_dir), "--out", str(out), *FAST]) == 1
    assert "exists" in capsys.readouterr().err
    # --in-place makes no sense for a slide file
    assert main(["predict", str(slide), "--model", str(model_dir), "--in-place", *FAST]) == 1
    assert "slide file" in capsys.readouterr().err


def test_cli_predict_without_pixel_size_writes_nothing(tmp_path, model_dir, capsys):
    bare = _plain_tiff(tmp_path / "bare.tif")
    out = tmp_path / "bare_pred.zarr"
    assert main(["predict", str(bare), "--model", str(model_dir), "--out", str(out), *FAST]) == 1
    assert "--um-per-px" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.tif"]


def test_predict_slides_writes_each_slide_and_skips_finished(slide, model_dir, tmp_path):
    second = _slide(tmp_path / "slide_b.tif", seed=1)
    junk = tmp_path / "slide_c.svs"
    junk.write_bytes(b"broken")
    out_dir = tmp_path / "preds"
    report = dkan.tl.predict_slides([slide, second, junk], model_dir, out_dir=out_dir, errors="skip", device="cpu")
    assert list(report["status"]) == ["written", "written", "failed"]
    assert "Cannot open" in report["error"].iloc[2]
    assert sorted(p.name for p in out_dir.iterdir()) == ["slide_a.zarr", "slide_b.zarr"]  # no temporary leftovers
    again = dkan.tl.predict_slides([slide, second], model_dir, out_dir=out_dir, device="cpu", progress=False)
    assert list(again["status"]) == ["skipped", "skipped"]
    with pytest.raises(ValueError, match="Cannot open"):
        dkan.tl.predict_slides([junk], model_dir, out_dir=out_dir, progress=False)
    with pytest.raises(ValueError, match="same output"):
        dkan.tl.predict_slides([slide, slide], model_dir, out_dir=out_dir, progress=False)
    # shared grid tiles: the same slide with fewer encoder passes, predictions of every spot
    shared = dkan.tl.predict_slides([slide], model_dir, out_dir=tmp_path / "shared", shared_tiles=True, progress=False)
    assert shared["status"].iloc[0] == "written" and shared["n_spots"].iloc[0] == report["n_spots"].iloc[0]
    assert shared["encoder_passes"].iloc[0] < report["encoder_passes"].iloc[0]


# --- read_st images: lazy per level -----------------------------------------------------------------------------


def _st_section(tmp_path, ext):
    from _stfiles import write_section

    return write_section(tmp_path, "S1", size=(1000, 800), image_ext=ext)


def test_read_st_jpeg_lower_levels_never_decode_full_resolution(tmp_path, monkeypatch):
    from dkan.io import _image

    files = _st_section(tmp_path, ".jpg")
    sdata = dkan.io.read_st(files["counts"], files["spots"], files["image"], sample_id="S1", scale_factors=(2, 2))
    levels = image_levels(sdata.images["S1_image"])
    assert [lv.shape for lv in levels] == [(3, 800, 1000), (3, 400, 500), (3, 200, 250)]

    def refuse(self):
        raise AssertionError("the full-resolution image was decoded")

    monkeypatch.setattr(_image.LazyImage, "_load", refuse)
    low = np.asarray(levels[2].data).astype(float)  # decoded at 1/4 size, full resolution untouched
    monkeypatch.undo()
    full = np.asarray(levels[0].data).astype(float)
    box = full.reshape(3, 200, 4, 250, 4).mean(axis=(2, 4))
    assert np.abs(low - box).mean() < 3.0  # same picture (JPEG DCT scaling vs box mean of decoded pixels)


def test_read_st_tiled_tiff_is_read_a_tile_at_a_time(tmp_path, monkeypatch):
    from dkan.io import _image

    files = _st_section(tmp_path, ".png")
    tif = tmp_path / "S1.tif"
    with tifffile.TiffWriter(tif) as tw:  # the same picture as a pyramidal tiled TIFF
        tw.write(files["img"], tile=(128, 128), photometric="rgb", subifds=1)
        tw.write(files["img"][::2, ::2], tile=(128, 128), photometric="rgb", subfiletype=1)
    sdata = dkan.io.read_st(files["counts"], files["spots"], tif, sample_id="S1")
    levels = image_levels(sdata.images["S1_image"])
    assert [lv.shape for lv in levels] == [(3, 800, 1000), (3, 400, 500)]  # the file's own pyramid
    monkeypatch.setattr(_image.LazyImage, "_load", lambda self: pytest.fail("the whole image was decoded"))
    crop = np.asarray(levels[0].data[:, 100:300, 50:400])
    np.testing.assert_array_equal(crop, files["img"][100:300, 50:400].transpose(2, 0, 1))
