"""The HEST-1k layout reader (issue 24, part 2) on a small synthetic folder."""

import json
import shutil

import anndata as ad
import dask.array as da
import numpy as np
import pytest

import dkan
from dkan import _keys as K

FAST = {"max_epochs": 2, "feature_encoder": "dummy", "n_genes": 8}


@pytest.fixture(scope="module")
def hest_root(tmp_path_factory):
    return dkan.datasets.synthetic_hest(tmp_path_factory.mktemp("hest") / "hest", n_samples=3, grid_size=6)


def _copy(hest_root, tmp_path):
    return shutil.copytree(hest_root, tmp_path / "copy")


def _edit_meta(root, sample_id, **changes):
    path = root / "metadata" / f"{sample_id}.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def test_read_hest_layout_and_pixel_size(hest_root):
    sd = dkan.io.read_hest(hest_root)
    assert sorted(sd.images) == ["SYNTH0_image", "SYNTH1_image", "SYNTH2_image"]
    meta = json.loads((hest_root / "metadata" / "SYNTH1.json").read_text())
    mpp = meta["pixel_size_um_estimated"]
    image = sd.images["SYNTH1_image"]
    assert isinstance(image["scale0"]["image"].data, da.Array)  # lazy: nothing decoded yet
    assert len(image.children) >= 2  # the TIFF's pyramid levels
    assert dkan.io.image_um_per_px(image) == pytest.approx(mpp)
    shapes = sd.shapes["SYNTH1_spots"]
    np.testing.assert_allclose(shapes["radius"], meta["spot_diameter"] / 2 / mpp)
    table = sd.tables[K.TABLE]
    st = ad.read_h5ad(hest_root / "st" / "SYNTH1.h5ad")
    rows = (table.obs[K.SAMPLE] == "SYNTH1").to_numpy()
    np.testing.assert_allclose(table.obsm["spatial"][rows], st.obsm["spatial"])
    np.testing.assert_array_equal(table[rows].X.toarray(), st.X.toarray())
    assert set(table.obs[K.PATIENT]) == {"P0", "P1"}
    reader = table.uns[K.UNS][K.UNS_READER]["SYNTH1"]
    assert reader["um_per_px"] == pytest.approx(mpp) and reader["pixel_size_source"] == "pixel_size_um_estimated"
    assert reader["st_technology"] == "Visium"
    one = dkan.io.read_hest(hest_root, "SYNTH2")
    assert list(one.images) == ["SYNTH2_image"] and one.tables[K.TABLE].n_obs == 36


def test_train_and_predict_on_a_hest_cohort(hest_root):
    sd = dkan.io.read_hest(hest_root, ["SYNTH0", "SYNTH1", "SYNTH2"])
    model = dkan.tl.train(
        sd, config="small", descriptions=dkan.datasets.toy_gene_descriptions(), progress=False, **FAST
    )
    assert len(model.history) >= 1
    held = dkan.io.read_hest(hest_root, "SYNTH2")
    key = dkan.tl.predict(held, model, progress=False)
    pred = held.tables[key][:, model.genes].layers[K.PRED]
    assert pred.shape == (36, len(model.genes)) and np.isfinite(pred).all()
    scalefactors = held.tables[key].uns["spatial"]["SYNTH2"]["scalefactors"]  # scanpy-ready, slide pixels
    assert scalefactors["spot_diameter_fullres"] == pytest.approx(2 * held.shapes["SYNTH2_spots"]["radius"].iloc[0])


def test_missing_pixel_size_is_a_clear_error(hest_root, tmp_path):
    root = _copy(hest_root, tmp_path)
    _edit_meta(root, "SYNTH0", pixel_size_um_estimated=None, pixel_size_um_embedded=None)
    with pytest.raises(ValueError, match=r"SYNTH0\.json` records no pixel size.*um_per_px="):
        dkan.io.read_hest(root)
    mpp = json.loads((hest_root / "metadata" / "SYNTH0.json").read_text())["pixel_size_um_estimated"]
    sd = dkan.io.read_hest(root, "SYNTH0", um_per_px={"SYNTH0": mpp})
    assert dkan.io.image_um_per_px(sd.images["SYNTH0_image"]) == pytest.approx(mpp)


def test_embedded_pixel_size_is_used_when_no_estimate(hest_root, tmp_path):
    root = _copy(hest_root, tmp_path)
    mpp = json.loads((hest_root / "metadata" / "SYNTH0.json").read_text())["pixel_size_um_estimated"]
    _edit_meta(root, "SYNTH0", pixel_size_um_estimated=None, pixel_size_um_embedded=mpp)
    sd = dkan.io.read_hest(root, "SYNTH0")
    assert sd.tables[K.TABLE].uns[K.UNS][K.UNS_READER]["SYNTH0"]["pixel_size_source"] == "pixel_size_um_embedded"


@pytest.mark.parametrize(
    ("value", "match"),
    [(1.0, r"wrong for its spots.*48\.0 px apart"), (5000.0, "outside the plausible"), ("n/a", "not a number")],
)
def test_wrong_pixel_size_is_a_clear_error(hest_root, tmp_path, value, match):
    root = _copy(hest_root, tmp_path)
    _edit_meta(root, "SYNTH1", pixel_size_um_estimated=value)
    with pytest.raises(ValueError, match=match):
        dkan.io.read_hest(root, "SYNTH1")


def test_missing_files_and_geometry(hest_root, tmp_path):
    root = _copy(hest_root, tmp_path)
    (root / "metadata" / "SYNTH2.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"SYNTH2.*metadata/SYNTH2\.json"):
        dkan.io.read_hest(root)
    with pytest.raises(FileNotFoundError, match="no `st/` folder"):
        dkan.io.read_hest(tmp_path)
    _edit_meta(root, "SYNTH0", spot_diameter=None, st_technology="Slide-seq")
    with pytest.raises(ValueError, match="no `spot_diameter`"):
        dkan.io.read_hest(root, "SYNTH0")
    _edit_meta(root, "SYNTH0", st_technology="Visium")  # technology default: 55 µm
    sd = dkan.io.read_hest(root, "SYNTH0")
    assert sd.tables[K.TABLE].uns[K.UNS][K.UNS_READER]["SYNTH0"]["spot_diameter_um"] == 55.0
    with pytest.raises(FileExistsError):
        dkan.datasets.synthetic_hest(root)
