"""dkan.datasets.synthetic_visium: Space Ranger folders that spatialdata-io reads with the full-resolution image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import results

import dkan
from dkan import _keys as K

spatialdata_io = pytest.importorskip(
    "spatialdata_io", reason="spatialdata-io (the `io` extra: pip install 'dkan[io]') reads the Visium folders"
)

TUTORIAL = Path(__file__).resolve().parents[1] / "tutorials" / "visium.ipynb"
GRID = 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return dkan.datasets.synthetic_visium(tmp_path_factory.mktemp("visium"), n_samples=2, grid_size=GRID, seed=3)


@pytest.fixture(scope="module")
def toy_sd():
    return dkan.datasets.toy(n_samples=2, grid_size=GRID, n_genes=40, seed=3)


def _read(folder: Path, **kwargs):
    return spatialdata_io.visium(folder, dataset_id=folder.name, fullres_image_file="fullres_image.tif", **kwargs)


def _map(transformation, spots) -> np.ndarray:
    """Spot centres (x, y) through a spatialdata transformation."""
    m = transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    xy = spots.geometry.get_coordinates().to_numpy()
    return xy @ m[:2, :2].T + m[:2, 2]


def _toy_rows(toy_sd, sample: str):
    """The toy spots that the Visium folder keeps (even array_row + array_col), in toy order."""
    tab = toy_sd.tables[K.TABLE]
    rows = tab[tab.obs[K.SAMPLE].astype(str) == sample]
    return rows[((rows.obs[K.ARRAY_ROW] + rows.obs[K.ARRAY_COL]) % 2 == 0).to_numpy()]


def test_space_ranger_layout(folders):
    assert [f.name for f in folders] == ["s0", "s1"]
    for name in ("filtered_feature_bc_matrix.h5", "fullres_image.tif", "spatial/tissue_positions.csv"):
        assert (folders[0] / name).is_file(), name
    scale = json.loads((folders[0] / "spatial" / "scalefactors_json.json").read_text())
    assert set(scale) == {
        "spot_diameter_fullres",
        "tissue_hires_scalef",
        "fiducial_diameter_fullres",
        "tissue_lowres_scalef",
    }
    assert scale["spot_diameter_fullres"] == pytest.approx(27.5)  # 55 µm at 2 µm/px


def test_reads_with_full_resolution_image_symbols_and_ensembl_ids(folders, toy_sd):
    from dkan._symbols import looks_like_ensembl

    sd = _read(folders[0])
    assert {"s0_full_image", "s0_hires_image", "s0_lowres_image"} <= set(sd.images)
    full = sd.images["s0_full_image"]["scale0"]["image"]
    toy_img = toy_sd.images["s0_image"]["scale0"]["image"]
    np.testing.assert_array_equal(np.asarray(full), np.asarray(toy_img))  # lossless TIFF of the toy's image
    tab = sd.tables["table"]
    rows = _toy_rows(toy_sd, "s0")
    assert tab.n_obs == rows.n_obs == GRID * GRID // 2
    assert list(tab.var_names) == list(rows.var_names)  # scanpy's 10x reader names genes by symbol ...
    assert looks_like_ensembl(list(tab.var["gene_ids"]), fraction=1.0)  # ... and keeps the Ensembl ids
    assert tab.var.loc["ERBB2", "gene_ids"] == "ENSG00000141736"
    np.testing.assert_array_equal(tab.X.toarray(), rows.X.toarray())
    # Visium's array convention: every array_row + array_col is even
    assert ((tab.obs["array_row"] + tab.obs["array_col"]) % 2 == 0).all()


def test_spots_land_on_the_toy_texture(folders, toy_sd):
    from spatialdata.transformations import get_transformation_between_coordinate_systems

    sd = _read(folders[1])
    spots = sd.shapes["s1"]
    full = np.asarray(sd.images["s1_full_image"]["scale0"]["image"])
    xy = _map(get_transformation_between_coordinate_systems(sd, spots, sd.images["s1_full_image"]), spots)
    rows = _toy_rows(toy_sd, "s1")
    np.testing.assert_allclose(xy, rows.obsm["spatial"])
    toy_img = np.asarray(toy_sd.images["s1_image"]["scale0"]["image"])
    x, y = np.rint(xy[5]).astype(int)
    np.testing.assert_array_equal(
        full[:, y - 16 : y + 16, x - 16 : x + 16], toy_img[:, y - 16 : y + 16, x - 16 : x + 16]
    )
    # the hires PNG is the same slide at `tissue_hires_scalef`
    hires = sd.images["s1_hires_image"]
    assert hires.shape[1] == round(full.shape[1] * 0.5)
    hxy = _map(
        get_transformation_between_coordinate_systems(sd, spots, hires, intermediate_coordinate_systems="s1"), spots
    )
    np.testing.assert_allclose(hxy, xy * 0.5)


def test_dkan_tiles_the_full_image_on_a_hex_grid(folders, toy_sd):
    sd = _read(folders[0])
    dkan.tl.tile(sd, patch_size=32, target_mpp=2.0)
    tab = results(sd)
    rec = tab.uns[K.UNS][K.UNS_TILE]["samples"]["s0"]
    assert rec["image_key"] == "s0_full_image"  # the full-resolution image is the one cropped, at level 0
    assert rec["level"] == 0 and rec["mpp"] == pytest.approx(2.0)  # µm/px from the 55 µm spot diameter
    assert rec["grid_kind"] == "hex"
    np.testing.assert_allclose(tab.obsm[K.SPOT_PX], _toy_rows(toy_sd, "s0").obsm["spatial"], atol=1)


def test_refuses_to_overwrite_and_bad_scale(tmp_path):
    (tmp_path / "s0").mkdir()
    with pytest.raises(FileExistsError, match="already exist"):
        dkan.datasets.synthetic_visium(tmp_path, grid_size=4)
    with pytest.raises(ValueError, match="hires_scalef"):
        dkan.datasets.synthetic_visium(tmp_path / "new", grid_size=4, hires_scalef=2.0)


def test_ensembl_table_of_every_toy_gene():
    from dkan.datasets._toy import TOY_GENES
    from dkan.datasets._visium import _ENSEMBL_IDS

    assert len(_ENSEMBL_IDS) == len(TOY_GENES) == len(set(_ENSEMBL_IDS))


def test_quick_train_and_predict_with_ensembl_var_names(folders):
    sd_train, sd_new = _read(folders[0]), _read(folders[1])
    model = dkan.tl.train(sd_train, config="small", max_epochs=1, feature_encoder="dummy", progress=False)
    tab = sd_new.tables["table"]  # a table indexed by Ensembl ids, symbols in a column (e.g. from another reader)
    tab.var["gene_symbols"] = tab.var_names.astype(str)
    tab.var_names = tab.var["gene_ids"].astype(str).to_numpy()
    key = dkan.tl.predict(sd_new, model, gene_symbols="gene_symbols", progress=False)
    pred = sd_new.tables[key].layers[K.PRED]
    assert pred.shape == (tab.n_obs, len(model.genes)) and np.isfinite(pred).all()
    assert tab.var_names[0].startswith("ENSG")  # the user's names come back
    assert list(sd_new.tables[key].var_names) == list(model.genes)  # the results table speaks the model's symbols


def test_visium_tutorial_is_stored_with_outputs():
    import nbformat

    nb = nbformat.read(TUTORIAL, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "visium.ipynb has cells that were not run"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any({"image/png", "image/jpeg"} & set(o.get("data", {})) for o in outputs)
    text = "\n".join(c.source for c in nb.cells)
    assert "synthetic" in text.lower() and "fullres_image_file" in text and "spatialdata_io.visium" in text
