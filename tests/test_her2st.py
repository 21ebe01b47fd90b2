from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from _stfiles import write_section
from conftest import data_path, results

import dkan
from dkan import _keys as K

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]


def _fake_her2st(root):
    """A her2st-like folder: A1 and B1 with images, B2 without."""
    for name, seed in (("A1", 1), ("B1", 2), ("B2", 3)):
        f = write_section(root / "tmp", name, seed=seed, image_ext=".jpg")
        (root / "ST-cnts").mkdir(parents=True, exist_ok=True)
        (root / "ST-spotfiles").mkdir(parents=True, exist_ok=True)
        shutil.move(f["counts"], root / "ST-cnts" / f"{name}.tsv.gz")
        shutil.move(f["spots"], root / "ST-spotfiles" / f"{name}_selection.tsv")
        if name != "B2":
            (root / "ST-imgs" / name[0] / name).mkdir(parents=True)
            shutil.move(f["image"], root / "ST-imgs" / name[0] / name / f"HE_{name}.jpg")
    shutil.rmtree(root / "tmp")


def test_her2st_layout_synthetic(tmp_path):
    _fake_her2st(tmp_path)
    sd = dkan.datasets.her2st(tmp_path)
    assert set(sd.images) == {"A1_image", "B1_image"} and set(sd.shapes) == {"A1_spots", "B1_spots"}
    tab = sd.tables[K.TABLE]
    assert tab.obs[K.SAMPLE].value_counts().to_dict() == {"A1": 12, "B1": 12}
    assert dict(zip(tab.obs[K.SAMPLE], tab.obs[K.PATIENT], strict=True)) == {"A1": "A", "B1": "B"}
    assert sorted(sd.coordinate_systems) == ["A1", "B1"]
    with pytest.raises(ValueError, match=r"\['B2'\].*sections with images: \['A1', 'B1'\]"):
        dkan.datasets.her2st(tmp_path, ["A1", "B2"])
    with pytest.raises(FileNotFoundError, match="ST-cnts"):
        dkan.datasets.her2st(tmp_path / "ST-imgs")


def _check_section(sd, section, root):
    """Counts equal the TSV, spots sit on tissue, the resolution is right."""
    tab = sd.tables[K.TABLE]
    sub = tab[tab.obs[K.SAMPLE] == section]
    raw = pd.read_csv(root / "ST-cnts" / f"{section}.tsv.gz", sep="\t", index_col=0)
    genes = ["ERBB2", "GAPDH", "IGKC", "FN1", "ACTB"]
    rng = np.random.default_rng(0)
    for name in rng.choice(sub.obs_names, 5, replace=False):
        spot = name.removeprefix(f"{section}_")
        np.testing.assert_array_equal(sub[name, genes].X.toarray().ravel(), raw.loc[spot, genes].to_numpy())
    assert (
        sub.X.sum() == raw.loc[[n.removeprefix(f"{section}_") for n in sub.obs_names], tab.var_names].to_numpy().sum()
    )
    # spot crops (read lazily from the dask image) are darker than the background at the image corner
    img = sd.images[f"{section}{K.IMAGE_SUFFIX}"]["scale0"]["image"].data
    h = 40
    crops = [
        img[:, int(y) - h : int(y) + h, int(x) - h : int(x) + h].mean().compute()
        for x, y in sub.obsm["spatial"][rng.choice(sub.n_obs, 8, replace=False)]
    ]
    background = img[:, :200, :200].mean().compute()
    assert np.mean(crops) < background - 25, (np.mean(crops), background)
    meta = tab.uns[K.UNS][K.UNS_READER][section]
    # README: ~0.73 um/px; the spot grid gives 0.69 (290 px per 200 um pitch)
    assert 0.64 < meta["um_per_px"] < 0.78
    radius = sd.shapes[f"{section}{K.SPOTS_SUFFIX}"]["radius"].iloc[0]
    assert radius == pytest.approx(50 / meta["um_per_px"])


def test_her2st_one_section():
    root = data_path("her2st")
    sd = dkan.datasets.her2st(root, "C2")
    assert list(sd.images) == ["C2_image"] and sd.tables[K.TABLE].n_obs == 187
    _check_section(sd, "C2", root)
    with pytest.raises(ValueError, match="sections with images: \\['C2', 'C3', 'C4', 'C5', 'C6'\\]"):
        dkan.datasets.her2st(root, ["A1"])
    # the panel and target of the reference pipeline
    dkan.pp.select_genes(sd, n_genes=250)
    dkan.pp.normalize(sd)
    tab = sd.tables[K.TABLE]
    panel = list(tab.uns[K.UNS][K.UNS_PANEL]["genes"])
    assert len(panel) == 250 and tab.var[K.PANEL].sum() == 250
    res = results(sd)  # targets live in the panel-sized results table
    assert list(res.var_names) == panel
    target = res.layers[K.TARGET]
    assert np.isfinite(target).all() and target.max() < 5  # log10 scale
    assert res.uns[K.UNS][K.UNS_NORMALIZE]["grid"] == {"C2": "square"}


@pytest.mark.slow
def test_her2st_all_sections():
    root = data_path("her2st")
    sd = dkan.datasets.her2st(root)
    assert sorted(sd.images) == [f"{s}_image" for s in SECTIONS]
    tab = sd.tables[K.TABLE]
    assert sorted(tab.obs[K.SAMPLE].unique()) == SECTIONS and set(tab.obs[K.PATIENT]) == {"C"}
    assert tab.uns["spatialdata_attrs"]["region"] == [f"{s}_spots" for s in SECTIONS]
    for s in SECTIONS:
        _check_section(sd, s, root)
