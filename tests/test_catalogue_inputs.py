"""Catalogue of inputs that are not what they claim (issue 21, items 3-9).

Each case failed before its fix: log-normalised values taken as raw counts, non-finite grid positions, a
16-bit slide served as 8-bit, dropout draws from a model without dropout, a target kept after the counts
changed, non-finite aggregation sizes, an unreadable ``--config`` file, and a model folder whose format field
was edited back to 1. Everything runs on tiny synthetic data, on the CPU, without the network.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import sparse

import dkan
from dkan.cli import main


@pytest.fixture(scope="module")
def small():
    """One tiny toy slide (16 spots, 10 genes)."""
    return dkan.datasets.toy(seed=0, n_samples=1, grid_size=4, n_genes=10)


@pytest.fixture
def sdata(small):
    from dkan.datasets import copy_sdata

    return copy_sdata(small)


# ------------------------------------------------------------------------------ item 3: non-integer counts
def _log_normalised(sd):
    """Replace ``X`` by scanpy-style log1p of library-normalised counts (what users often leave in ``X``)."""
    adata = sd.tables["table"]
    x = adata.X.toarray().astype(np.float64)
    x = np.log1p(x / np.maximum(x.sum(axis=1, keepdims=True), 1) * 1e4)
    adata.layers["counts"] = adata.X.copy()
    adata.X = sparse.csr_matrix(x.astype(np.float32))
    return sd


@pytest.mark.parametrize("step", ["normalize", "select_genes"])
def test_log_normalised_x_is_refused(sdata, step):
    sd = _log_normalised(sdata)
    func = dkan.pp.normalize if step == "normalize" else dkan.pp.select_genes
    with pytest.raises(ValueError, match=r"`X` holds non-integer values \(e\.g\. [0-9.]+") as info:
        func(sd, smooth=False) if step == "normalize" else func(sd, n_genes=3)
    msg = str(info.value)
    assert "log-transformed" in msg and "layer=" in msg and "['counts']" in msg


def test_the_counts_layer_it_names_works(sdata):
    sd = _log_normalised(sdata)
    dkan.pp.normalize(sd, layer="counts", smooth=False)
    assert np.isfinite(sd.tables["table_dkan"].layers["dkan_target"]).all()


def test_non_integer_counts_layer_is_refused(sdata):
    adata = sdata.tables["table"]
    adata.layers["scaled"] = adata.X * 0.37
    with pytest.raises(ValueError, match=r"`layers\['scaled'\]` holds non-integer values"):
        dkan.pp.normalize(sdata, layer="scaled", smooth=False)


def test_integer_counts_stored_as_float_pass(sdata):
    adata = sdata.tables["table"]
    adata.X = sparse.csr_matrix(adata.X.toarray().astype(np.float32))
    dkan.pp.normalize(sdata, smooth=False)


# ------------------------------------------------------------------------------ item 4: non-finite grid positions
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("column", ["array_row", "array_col"])
def test_non_finite_grid_position_is_refused(sdata, column, value):
    adata = sdata.tables["table"]
    col = adata.obs[column].astype(float).to_numpy().copy()
    col[3] = value
    adata.obs[column] = col
    spot = str(adata.obs_names[3])
    with pytest.raises(ValueError, match=rf"`obs\['{column}'\]` of table `table` has 1 missing") as info:
        dkan.pp.normalize(sdata)
    assert spot in str(info.value)
    with pytest.raises(ValueError, match=rf"`obs\['{column}'\]` of table `table`") as info:
        dkan.tl.tile(sdata, patch_size=16)
    assert spot in str(info.value)


# ------------------------------------------------------------------------------ item 8: sizes and the --config file
def _bins_sdata():
    import geopandas as gpd
    import pandas as pd
    from anndata import AnnData
    from shapely.geometry import Point
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    rows, cols = np.divmod(np.arange(36), 6)
    shapes = ShapesModel.parse(
        gpd.GeoDataFrame({"radius": np.full(36, 0.5)}, geometry=[Point(c, r) for r, c in zip(rows, cols, strict=True)])
    )
    obs = pd.DataFrame({"region": pd.Categorical(["bins"] * 36), "bin_id": np.arange(36)})
    obs["array_row"], obs["array_col"] = rows, cols
    table = TableModel.parse(
        AnnData(np.ones((36, 2), np.float32), obs=obs), region="bins", region_key="region", instance_key="bin_id"
    )
    return SpatialData(shapes={"bins": shapes}, tables={"square_008um": table})


@pytest.mark.parametrize(
    ("kw", "exc", "phrase"),
    [
        ({"spot_um": float("nan")}, ValueError, "`spot_um=nan`"),
        ({"spot_um": float("inf")}, ValueError, "`spot_um=inf`"),
        ({"spot_um": "56"}, TypeError, "`spot_um`"),
        ({"bin_um": float("inf")}, ValueError, "`bin_um=inf`"),
    ],
)
def test_aggregate_bins_sizes(kw, exc, phrase):
    with pytest.raises(exc) as info:
        dkan.pp.aggregate_bins(_bins_sdata(), table_key="square_008um", **kw)
    assert phrase in str(info.value)


def test_aggregate_bins_nan_lattice_position():
    sd = _bins_sdata()
    obs = sd.tables["square_008um"].obs
    obs["array_row"] = obs["array_row"].astype(float)
    obs.loc[obs.index[5], "array_row"] = np.nan
    with pytest.raises(ValueError, match=r"`obs\['array_row'\]` of table `square_008um`"):
        dkan.pp.aggregate_bins(sd, table_key="square_008um", spot_um=16)


def test_bad_config_json_is_one_line_naming_the_file(tmp_path, capsys):
    cfg = tmp_path / "bad.json"
    cfg.write_text('{"max_epochs": 3,\n "lr": }')
    assert main(["train", str(tmp_path / "in.zarr"), "--out", str(tmp_path / "m"), "--config", str(cfg), "-q"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert str(cfg) in lines[0] and "line 2, column" in lines[0] and "Traceback" not in err


# ------------------------------------------------------------------------------ item 5: 16-bit slides
def _tiff(path, img):
    import tifffile

    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    return path


def test_16_bit_slide_is_served_as_stated_uint8(tmp_path, caplog):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 65536, size=(300, 400, 3), dtype=np.uint16)
    img[0, :4, 0] = [0, 128, 129, 65535]  # the rounding edges of round(v * 255 / 65535)
    with caplog.at_level("WARNING", logger="dkan"):
        sd = dkan.io.read_wsi(_tiff(tmp_path / "u16.tif", img))
    assert "16-bit" in caplog.text and "round(v * 255 / 65535)" in caplog.text
    from dkan._features.tile import image_levels

    level = image_levels(sd.images["u16_image"])[0]
    got = np.asarray(level.data[:, :100, :150])
    assert level.dtype == np.uint8 and got.dtype == np.uint8  # the declared dtype is the served one
    want = np.rint(img[:100, :150].astype(np.float64) * 255 / 65535).astype(np.uint8).transpose(2, 0, 1)
    np.testing.assert_array_equal(got, want)
    assert got[0, 0, :4].tolist() == [0, 0, 1, 255]


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint32])
def test_other_sample_types_are_refused(tmp_path, dtype):
    path = _tiff(tmp_path / "odd.tif", np.zeros((300, 400, 3), dtype=dtype))
    with pytest.raises(ValueError, match=rf"stores {np.dtype(dtype).name} samples") as info:
        dkan.io.read_wsi(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------ item 6: dropout draws without dropout
def _model(module, genes):
    from dkan._config import DKANConfig
    from dkan.train.fitted import DKANModel

    return DKANModel(module, DKANConfig(), list(genes), np.zeros((len(genes), 4), np.float32), {})


def _dkan(**dropouts):
    from dkan._config import DKANConfig
    from dkan.train.fitted import build_module

    cfg = DKANConfig(**dropouts)
    return build_module(cfg, n_genes=5, gene_dim=8, feature_dim=16, pretrained=False)


NO_DROPOUT = {f"{m}_dropout": 0.0 for m in ("fusion", "slide", "region", "img_cross", "text")}


def test_dropout_draws_from_a_model_without_dropout_are_refused(sdata):
    import torch

    genes = sdata.tables["table"].var_names
    with pytest.raises(ValueError, match=r"`n_samples=5` asks for test-time dropout draws, but the model has no"):
        dkan.tl.predict(sdata, _model(torch.nn.Identity(), genes), n_samples=5)
    ensemble = [_model(torch.nn.Linear(2, 2), genes), _model(torch.nn.Identity(), genes)]
    with pytest.raises(ValueError, match=r"none of the 2 models has .* the ensemble's spread alone"):
        dkan.tl.predict(sdata, ensemble, n_samples=3)
    assert "table_dkan" not in sdata.tables  # refused before anything is written


def test_dropout_only_on_the_training_path_counts_as_none():
    from dkan.tl._ensemble import check_dropout

    genes = [f"g{i}" for i in range(5)]
    only_training = _model(_dkan(**NO_DROPOUT, dropout_expr=0.3, exp_cross_dropout=0.2), genes)
    with pytest.raises(ValueError, match="on its prediction path"):
        check_dropout([only_training], 4)
    check_dropout([only_training], 1)  # one draw: nothing to sample, nothing to refuse
    check_dropout([_model(_dkan(), genes)], 4)  # the default config has dropout


def test_ensemble_members_without_dropout_are_named(caplog):
    from dkan.tl._ensemble import check_dropout

    genes = [f"g{i}" for i in range(5)]
    with caplog.at_level("WARNING", logger="dkan"):
        check_dropout([_model(_dkan(), genes), _model(_dkan(**NO_DROPOUT), genes)], 4)
    assert "model(s) [1] of the ensemble have no dropout" in caplog.text


# ------------------------------------------------------------------------------ item 7: a target from old counts
@pytest.fixture(scope="module")
def tiny_model(small):
    from dkan.datasets import copy_sdata

    return dkan.tl.train(
        copy_sdata(small),
        config="small",
        max_epochs=1,
        feature_encoder="dummy",
        device="cpu",
        progress=False,
        val_fraction=0,
    )


def _bump_counts(sd):
    """Change the counts the way a user fixing a table would (integers stay integers; the target changes)."""
    adata = sd.tables["table"]
    x = adata.X.toarray()
    x[:, 0] += np.arange(adata.n_obs) % 7
    adata.X = sparse.csr_matrix(x)


def test_predict_overwrite_recomputes_a_target_from_changed_counts(small, tiny_model, caplog):
    from dkan.datasets import copy_sdata

    sd = copy_sdata(small)
    tkey = dkan.tl.predict(sd, tiny_model, device="cpu", progress=False)
    old = sd.tables[tkey].layers["dkan_target"].copy()
    _bump_counts(sd)
    fresh = copy_sdata(small)  # the same changed slide, never predicted on
    _bump_counts(fresh)
    dkan.tl.predict(fresh, tiny_model, device="cpu", progress=False)
    with caplog.at_level("WARNING", logger="dkan"):
        dkan.tl.predict(sd, tiny_model, device="cpu", progress=False, overwrite=True)
    target = sd.tables[tkey].layers["dkan_target"]
    assert not np.allclose(target, old)
    np.testing.assert_array_equal(target, fresh.tables[tkey].layers["dkan_target"])
    assert "not those `layers['dkan_target']` was computed from" in caplog.text
    got, want = dkan.tl.evaluate(sd), dkan.tl.evaluate(fresh)
    assert got.summary["mae"] == pytest.approx(want.summary["mae"])  # scored against the new counts
    np.testing.assert_allclose(got.labels, want.labels)


def test_train_recomputes_a_stale_target_with_its_own_settings(sdata, caplog):
    from dkan._data.prepare import ensure_target
    from dkan.pp._normalize import FINGERPRINT

    genes = list(sdata.tables["table"].var_names)
    dkan.pp.normalize(sdata, genes=genes, log="log1p", smooth=False)
    res = sdata.tables["table_dkan"]
    ensure_target(sdata, genes, table_key=None)  # unchanged counts: kept as it is
    assert "not those" not in caplog.text
    _bump_counts(sdata)
    with caplog.at_level("WARNING", logger="dkan"):
        ensure_target(sdata, genes, table_key=None)
    assert "fingerprint differs" in caplog.text
    want = dkan.pp.normalize(sdata, genes=genes, log="log1p", smooth=False, inplace=False)
    np.testing.assert_allclose(res.layers["dkan_target"], want)  # recomputed with log1p, not the default log10
    del res.uns["dkan"]["normalize"][FINGERPRINT]  # a target written before fingerprints: recomputed once
    caplog.clear()
    with caplog.at_level("WARNING", logger="dkan"):
        ensure_target(sdata, genes, table_key=None)
    assert "no fingerprint recorded" in caplog.text
    assert FINGERPRINT in res.uns["dkan"]["normalize"]


# ------------------------------------------------------------------------------ item 9: a format field edited back to 1
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from dkan._config import DKANConfig
    from dkan.train.fitted import DKANModel, build_module

    config = DKANConfig.resolve("small", d=16, feature_encoder="dummy")
    module = build_module(config, n_genes=4, gene_dim=8, feature_dim=16, pretrained=False)
    emb = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    model = DKANModel(module, config, ["G1", "G2", "G3", "G4"], emb, {"features": {"encoder": "dummy", "dim": 16}})
    return model.save(tmp_path_factory.mktemp("model") / "m")


def _as_format_1(src, dst, *, rename: bool, drop: tuple[str, ...] = ("sha256",)):
    """Copy a saved model and edit it back to format 1 with its gene names swapped, as an attacker would."""
    import shutil

    shutil.copytree(src, dst)
    m = json.loads((dst / "dkan.json").read_text())
    m["format"] = 1
    m["genes"][0], m["genes"][1] = m["genes"][1], m["genes"][0]
    if rename:  # the fixed names format 1 used
        for role, name in m["files"].items():
            (dst / name).rename(dst / ("model.safetensors" if role == "weights" else "genes.safetensors"))
    for key in drop:
        m.pop(key, None)
    (dst / "dkan.json").write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize(
    ("rename", "drop", "phrase"),
    [
        (False, ("sha256",), "field `files`"),  # checksums removed, the rest left as format 2 wrote it
        (False, ("sha256", "files"), "file genes."),  # tensor files with format 2's random suffix
        (True, ("sha256",), "field `files`"),
    ],
)
def test_format_1_holding_format_2_files_is_refused(saved, tmp_path, rename, drop, phrase):
    from dkan.train.fitted import DKANModel

    path = _as_format_1(saved, tmp_path / "edited", rename=rename, drop=drop)
    for kwargs in ({}, {"allow_unchecked": True}):
        with pytest.raises(ValueError, match="says format 1, but the folder holds what only format 2 writes") as info:
            DKANModel.load(path, **kwargs)
        assert phrase in str(info.value) and str(path) in str(info.value)


def test_format_1_needs_allow_unchecked(saved, tmp_path):
    from dkan.train.fitted import DKANModel

    path = _as_format_1(saved, tmp_path / "old", rename=True, drop=("sha256", "files"))  # exactly format 1's layout
    with pytest.raises(ValueError, match=r"format-1 model, saved without checksums.*allow_unchecked=True"):
        DKANModel.load(path)
    with pytest.raises(ValueError, match="allow_unchecked=True"):
        dkan.tl.predict(dkan.datasets.toy(seed=0, n_samples=1, grid_size=2, n_genes=4), str(path))
    model = DKANModel.load(path, allow_unchecked=True)  # trusted by the caller: loaded, then saved with checksums
    assert model.genes[:2] == ["G2", "G1"]
    model.save(path, overwrite=True)
    assert DKANModel.load(path).genes[:2] == ["G2", "G1"]


def test_cli_refuses_a_format_1_model_in_one_line(saved, tmp_path, capsys):
    path = _as_format_1(saved, tmp_path / "old", rename=True, drop=("sha256", "files"))
    store = tmp_path / "in.zarr"
    store.mkdir()
    assert main(["predict", str(store), "--model", str(path), "--out", str(tmp_path / "o.zarr"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "allow_unchecked=True" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_evaluate_refuses_a_target_normalised_from_other_counts(small, tiny_model):
    """evaluate alone (no predict in between) must not score against a target the counts no longer give."""
    from dkan.datasets import copy_sdata

    sd = copy_sdata(small)
    dkan.tl.predict(sd, tiny_model, device="cpu", progress=False)
    before = dkan.tl.evaluate(sd).summary["mae"]  # current target: scored
    _bump_counts(sd)
    with pytest.raises(ValueError, match="normalised from other counts") as err:
        dkan.tl.evaluate(sd)
    assert "dkan.pp.normalize" in str(err.value)
    dkan.tl.predict(sd, tiny_model, device="cpu", progress=False, overwrite=True)  # recomputes the target
    assert dkan.tl.evaluate(sd).summary["mae"] != pytest.approx(before)
