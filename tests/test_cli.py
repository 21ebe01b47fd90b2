from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest

from dkan import _keys as K
from dkan.cli import build_parser, main, parse_overrides
from dkan.io._store_write import update_in_place, write_new_store

RES = f"{K.TABLE}{K.RESULTS_SUFFIX}"  # dkan's results table of the toy table
FAST = ["--set", "max_epochs=1", "--set", "feature_encoder=dummy", "--device", "cpu", "--no-progress", "-q"]


def _read(path):
    import spatialdata as sd

    return sd.read_zarr(path)


@pytest.fixture
def store(tmp_path):
    """A small toy store (2 samples x 36 spots) with gene embeddings already computed, for speed."""
    import dkan
    from dkan._results import ensure_genes, results_table
    from dkan._utils import uns_set

    sdata = dkan.datasets.toy(n_samples=2, grid_size=6, seed=0)
    rkey, _ = results_table(sdata, create=True)  # the results table holds the embeddings
    adata = ensure_genes(sdata, rkey, list(sdata.tables[K.TABLE].var_names))
    adata.varm[K.GENE_EMBEDDING] = np.random.default_rng(0).normal(size=(adata.n_vars, 16)).astype(np.float32)
    uns_set(adata, K.UNS_GENE_EMBEDDING, {"encoder": "minilm", "pooling": "mean", "dim": 16})
    path = tmp_path / "toy.zarr"
    sdata.write(path)
    return path


def test_parse_overrides():
    got = parse_overrides(["max_epochs=3", "lr=1e-3", "amp=false", "target_mpp=null", "feature_encoder=dummy", "x=a=b"])
    assert got == {
        "max_epochs": 3,
        "lr": 1e-3,
        "amp": False,
        "target_mpp": None,
        "feature_encoder": "dummy",
        "x": "a=b",
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["max_epochs"])


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("train", ["--out", "--config", "--set", "--descriptions", "--checkpoint", "--resume", "--overwrite"]),
        ("predict", ["--model", "--out", "--in-place", "--key-added", "--batch-size", "--shared-tiles", "--overwrite"]),
    ],
)
def test_help_explains_every_option(command, options, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in [*options, "--table-key", "--image-key", "--device", "--no-progress", "--quiet", "--debug"]:
        assert opt in text
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = subparsers.choices[command]._actions
    assert all(a.help for a in actions), [a.dest for a in actions if not a.help]


def test_python_dash_m_runs():
    res = subprocess.run([sys.executable, "-m", "dkan", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "predict" in res.stdout


def test_out_and_in_place_are_exclusive(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(tmp_path / "a.zarr"), "--model", "m", "--out", "b.zarr", "--in-place"])
    assert exc.value.code == 2


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "m"), "-q"]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "m").mkdir()
    assert main(["train", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "m"), "-q"]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_write_new_store_is_complete_or_absent(store, tmp_path):
    toy = _read(store)
    out = write_new_store(toy, tmp_path / "out.zarr")
    assert set(_read(out).images) == set(toy.images)
    with pytest.raises(FileExistsError):
        write_new_store(toy, out)
    toy.tables[K.TABLE].layers["extra"] = np.ones(toy.tables[K.TABLE].shape, np.float32)
    write_new_store(toy, out, overwrite=True)
    assert "extra" in _read(out).tables[K.TABLE].layers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr", "toy.zarr"]  # no temporary or old copies


def test_update_in_place_rewrites_the_table(store):
    sdata = _read(store)
    adata = sdata.tables[K.TABLE]
    adata.layers[K.PRED] = np.full(adata.shape, 0.5, np.float32)
    update_in_place(sdata, K.TABLE)
    again = _read(store)
    np.testing.assert_array_equal(again.tables[K.TABLE].layers[K.PRED], 0.5)
    assert again.tables[K.TABLE].n_obs == adata.n_obs
    assert sorted(p.name for p in store.parent.iterdir()) == ["toy.zarr"]  # backup removed


def test_train_then_predict_round_trip(store, tmp_path):
    import dkan

    model_dir, out = tmp_path / "model", tmp_path / "pred.zarr"
    assert main(["train", str(store), "--out", str(model_dir), *FAST]) == 0
    assert dkan.DKANModel.load(model_dir).history  # a loadable model with one epoch of history
    assert K.TARGET not in _read(store).tables[RES].layers  # the input store is left untouched

    run = ["--model", str(model_dir), "--device", "cpu", "--no-progress", "-q"]
    assert main(["predict", str(store), "--out", str(out), *run]) == 0
    pred = _read(out).tables[RES]
    assert pred.layers[K.PRED].shape == pred.shape
    assert np.isfinite(pred.layers[K.PRED]).all()  # the toy panel is every gene
    assert main(["predict", str(store), "--out", str(out), *run]) == 1  # exists, no --overwrite

    assert main(["predict", str(store), "--in-place", "--key-added", "p2", *run]) == 0
    table = _read(store).tables[RES]
    np.testing.assert_allclose(table.layers["p2"], pred.layers[K.PRED], rtol=1e-5)
    assert main(["predict", str(store), "--in-place", "--key-added", "p2", *run]) == 1  # layer exists, no --overwrite
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["model", "pred.zarr", "toy.zarr"]
