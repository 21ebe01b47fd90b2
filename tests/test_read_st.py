from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _stfiles import PITCH_PX, write_section
from conftest import data_path
from PIL import Image

import dkan
from dkan import _keys as K


def _read(f, **kw):
    return dkan.io.read_st(f["counts"], f["spots"], f["image"], sample_id="S1", **kw)


def test_read_st_layout(tmp_path):
    import dask.array as da
    from spatialdata.transformations import Identity, get_transformation

    f = write_section(tmp_path)
    sd = _read(f, patient="P7")
    img, shp, tab = sd.images["S1_image"], sd.shapes["S1_spots"], sd.tables[K.TABLE]
    assert set(sd.images) == {f"S1{K.IMAGE_SUFFIX}"} and set(sd.shapes) == {f"S1{K.SPOTS_SUFFIX}"}
    assert isinstance(get_transformation(img, "S1"), Identity) and isinstance(get_transformation(shp, "S1"), Identity)
    # lazy multiscale image with the file's pixels
    lvl0 = img["scale0"]["image"]
    assert lvl0.dims == ("c", "y", "x") and isinstance(lvl0.data, da.Array)
    np.testing.assert_array_equal(lvl0.data[:, 20:60, 10:90].compute(), np.moveaxis(f["img"], -1, 0)[:, 20:60, 10:90])
    assert len(img.children) == 5
    # table: 12 selected spots sorted by (y, x), counts equal to the file
    attrs = tab.uns["spatialdata_attrs"]
    assert attrs == {"region": "S1_spots", "region_key": K.REGION, "instance_key": K.INSTANCE}
    assert tab.n_obs == 12 and tab.X.dtype == np.int32
    rows = tab.obs[[K.ARRAY_ROW, K.ARRAY_COL]].to_numpy()
    assert (np.lexsort((rows[:, 1], rows[:, 0])) == np.arange(12)).all()
    ids = [f"{c}x{r}" for r, c in rows]
    np.testing.assert_array_equal(tab.X.toarray(), f["table"].loc[ids].to_numpy())
    assert list(tab.var_names) == list(f["table"].columns)
    assert set(tab.obs[K.SAMPLE]) == {"S1"} and set(tab.obs[K.PATIENT]) == {"P7"}
    # spot circles at the pixel coordinates, linked through the instance key
    xy = np.c_[shp.geometry.x, shp.geometry.y][tab.obs[K.INSTANCE].to_numpy()]
    np.testing.assert_allclose(xy, tab.obsm["spatial"])
    spot = pd.read_csv(f["spots"], sep="\t").set_index(["x", "y"]).loc[list(zip(rows[:, 1], rows[:, 0], strict=True))]
    np.testing.assert_allclose(tab.obsm["spatial"], spot[["pixel_x", "pixel_y"]].to_numpy())
    # resolution from the 40 px pitch: 200 um / 40 px = 5 um/px, radius 50 um = 10 px
    meta = tab.uns[K.UNS][K.UNS_READER]["S1"]
    assert meta["um_per_px"] == pytest.approx(5.0, rel=0.02)
    assert meta["spot_pitch_px"] == pytest.approx(PITCH_PX, rel=0.02)
    np.testing.assert_allclose(shp["radius"], 50 / meta["um_per_px"])


def test_read_st_overrides_and_single_scale(tmp_path):
    f = write_section(tmp_path)
    sd = _read(f, um_per_px=2.0, spot_diameter_um=55.0, scale_factors=None)
    assert sd.shapes["S1_spots"]["radius"].iloc[0] == pytest.approx(13.75)
    assert sd.images["S1_image"].dims == ("c", "y", "x")
    assert sd.tables[K.TABLE].obs[K.PATIENT].iloc[0] == "S1"  # patient defaults to the sample


def test_read_st_is_lazy_and_lifts_pil_limit_locally(tmp_path, monkeypatch):
    from dkan.io import _image

    f = write_section(tmp_path, image_ext=".jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 220 x 180 image is now a "decompression bomb"
    with pytest.raises(Image.DecompressionBombError), Image.open(f["image"]) as im:
        im.load()
    calls = []
    load = _image.LazyImage._load
    monkeypatch.setattr(_image.LazyImage, "_load", lambda self: calls.append(1) or load(self))
    sd = _read(f)
    assert not calls  # nothing decoded while reading
    crop = sd.images["S1_image"]["scale0"]["image"].data[:, :50, :50].compute()
    assert crop.shape == (3, 50, 50) and calls
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored


def test_read_st_variants(tmp_path):
    f = write_section(tmp_path, gz=False)
    # genes x spots counts are transposed
    t = pd.read_csv(f["counts"], sep="\t", index_col=0)
    t.T.to_csv(tmp_path / "t.tsv", sep="\t")
    # spot file with only new_x/new_y (fractional) coordinates
    s = pd.read_csv(f["spots"], sep="\t").drop(columns=["x", "y"])
    s.to_csv(tmp_path / "s.csv", index=False)  # comma-separated
    sd = dkan.io.read_st(tmp_path / "t.tsv", tmp_path / "s.csv", f["image"], sample_id="S1")
    ref = _read(f).tables[K.TABLE]
    np.testing.assert_array_equal(sd.tables[K.TABLE].X.toarray(), ref.X.toarray())
    # unselected spots can be kept: the extra one has no counts, so the result is the same
    assert _read(f, selected_only=False).tables[K.TABLE].n_obs == 12


def test_read_st_bad_inputs(tmp_path):
    f = write_section(tmp_path)
    # counts whose spots match no spot-file row
    s = pd.read_csv(f["spots"], sep="\t")
    s.assign(x=s.x + 100).to_csv(tmp_path / "far.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="matches a row of `spots`"):
        dkan.io.read_st(f["counts"], tmp_path / "far.tsv", f["image"], sample_id="S1")
    # missing columns
    s.drop(columns=["pixel_y"]).to_csv(tmp_path / "nocol.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['pixel_y'\]"):
        dkan.io.read_st(f["counts"], tmp_path / "nocol.tsv", f["image"], sample_id="S1")
    # an image that does not cover the spots (a downscaled copy)
    Image.open(f["image"]).resize((110, 90)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"lie outside `image`.*full-resolution"):
        dkan.io.read_st(f["counts"], f["spots"], tmp_path / "small.png", sample_id="S1")
    # duplicated genes
    c = pd.read_csv(f["counts"], sep="\t", index_col=0)
    c.columns = ["G1", "G2", "G2", "G4", "G5"]
    c.to_csv(tmp_path / "dup.tsv", sep="\t")
    with pytest.raises(ValueError, match="duplicated gene"):
        dkan.io.read_st(tmp_path / "dup.tsv", f["spots"], f["image"], sample_id="S1")
    # rows that are not spot names
    c.columns = ["G1", "G2", "G3", "G4", "G5"]
    c.index = [f"spot{i}" for i in range(len(c))]
    c.to_csv(tmp_path / "names.tsv", sep="\t")
    with pytest.raises(ValueError, match="not spot names"):
        dkan.io.read_st(tmp_path / "names.tsv", f["spots"], f["image"], sample_id="S1")
    with pytest.raises(FileNotFoundError, match="`image`"):
        dkan.io.read_st(f["counts"], f["spots"], tmp_path / "none.jpg", sample_id="S1")


def test_concat_samples(tmp_path):
    from dkan.io._concat import _concat_samples

    a = write_section(tmp_path / "a", "A1", genes=("G1", "G2", "G3"), seed=1)
    b = write_section(tmp_path / "b", "B1", genes=("G2", "G3", "G4"), seed=2, nx=3)
    sa = dkan.io.read_st(a["counts"], a["spots"], a["image"], sample_id="A1", patient="A")
    sb = dkan.io.read_st(b["counts"], b["spots"], b["image"], sample_id="B1", patient="B")
    sd = _concat_samples([sa, sb])
    tab = sd.tables[K.TABLE]
    assert list(tab.var_names) == ["G2", "G3"] and tab.n_obs == 12 + 9
    assert list(tab.obs[K.REGION].cat.categories) == ["A1_spots", "B1_spots"]
    assert tab.uns["spatialdata_attrs"]["region"] == ["A1_spots", "B1_spots"]
    assert set(tab.uns[K.UNS][K.UNS_READER]) == {"A1", "B1"}
    np.testing.assert_array_equal(
        tab[tab.obs[K.SAMPLE] == "B1"].X.toarray(), sb.tables[K.TABLE][:, ["G2", "G3"]].X.toarray()
    )
    outer = _concat_samples([sa, sb], join="outer").tables[K.TABLE]
    assert outer.n_vars == 4 and outer[outer.obs[K.SAMPLE] == "A1", "G4"].X.sum() == 0
    with pytest.raises(ValueError, match="occurs in several inputs"):
        _concat_samples([sa, sa])


def test_read_st_stutility_mob():
    root = data_path("stutility_mob")
    sd = dkan.io.read_st(root / "MOB1.tsv", root / "alignment_table_MOB1.tsv", root / "MOB1.jpg", sample_id="MOB1")
    tab = sd.tables[K.TABLE]
    spots = pd.read_csv(root / "alignment_table_MOB1.tsv", sep="\t")
    assert tab.n_obs == int(spots["selected"].sum()) == 379 and tab.n_vars == 1000
    raw = pd.read_csv(root / "MOB1.tsv", sep="\t", index_col=0, usecols=[0, 1, 2, 3])
    for name in tab.obs_names[::97]:
        spot = name.removeprefix("MOB1_")
        np.testing.assert_array_equal(tab[name, raw.columns].X.toarray().ravel(), raw.loc[spot].to_numpy())
    h, w = sd.images["MOB1_image"]["scale0"]["image"].shape[1:]
    xy = tab.obsm["spatial"]
    assert (xy >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()


def test_read_st_zarr_roundtrip(tmp_path):
    import spatialdata as sd

    f = write_section(tmp_path / "f")
    s = _read(f)
    s.write(tmp_path / "x.zarr")
    r = sd.read_zarr(tmp_path / "x.zarr")
    lvl = r.images["S1_image"]["scale0"]["image"]
    np.testing.assert_array_equal(lvl.values, np.moveaxis(f["img"], -1, 0))
    assert r.tables[K.TABLE].uns[K.UNS][K.UNS_READER]["S1"]["um_per_px"] == pytest.approx(5.0, rel=0.02)


def test_read_st_refuses_a_spot_file_that_misses_too_many_spots(tmp_path, caplog):
    f = write_section(tmp_path, nx=6, ny=5, size=(300, 260))  # 30 spots
    s = pd.read_csv(f["spots"], sep="\t")
    s.iloc[10:].to_csv(tmp_path / "other.tsv", sep="\t", index=False)  # 10 of 30 spots (33 %) have no row
    with pytest.raises(ValueError, match=r"10 of 30 spots \(33%\).*S1\.tsv\.gz.*other\.tsv.*max_unmatched=0\.1"):
        dkan.io.read_st(f["counts"], tmp_path / "other.tsv", f["image"], sample_id="S1")
    sd = dkan.io.read_st(f["counts"], tmp_path / "other.tsv", f["image"], sample_id="S1", max_unmatched=0.5)
    assert sd.tables[K.TABLE].n_obs == 20
    s.iloc[2:].to_csv(tmp_path / "few.tsv", sep="\t", index=False)  # 2 of 30 (7 %): a warning, not an error
    with caplog.at_level("WARNING", logger="dkan"):
        sd = dkan.io.read_st(f["counts"], tmp_path / "few.tsv", f["image"], sample_id="S1")
    assert sd.tables[K.TABLE].n_obs == 28 and "2 of 30 spots" in caplog.text
    s.assign(selected=np.r_[np.zeros(10), np.ones(len(s) - 10)]).to_csv(tmp_path / "unsel.tsv", sep="\t", index=False)
    sd = dkan.io.read_st(f["counts"], tmp_path / "unsel.tsv", f["image"], sample_id="S1")  # unselected: dropped
    assert sd.tables[K.TABLE].n_obs == 20
    with pytest.raises(ValueError, match="`max_unmatched` is a fraction"):
        dkan.io.read_st(f["counts"], f["spots"], f["image"], sample_id="S1", max_unmatched=10)
