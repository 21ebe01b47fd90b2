"""Catalogue, robust round two (issue 21 items 1-2): batches that survive a bad slide, stores never lost.

A slide that cannot be read or decoded, at any stage, fails alone; ``dkan predict`` on it prints one line.
Stores written with ``--out --overwrite`` are at every instant the old or the new store, and what a killed run
leaves (temporary stores, a store set aside, an in-place backup, safetensors' temporary files) is cleaned up or
finished by the next run. Kill tests SIGKILL a subprocess at a chosen step (by patching that step).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import dkan
from dkan.io import _store_write as sw
from dkan.tl._slide_errors import SlideError, is_slide_error  # SlideError is also dkan.tl.SlideError

FAST = ["--device", "cpu", "--no-progress", "-q"]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """A good synthetic slide and a copy of another cut short: its header reads, its JPEG tiles do not decode."""
    folder = tmp_path_factory.mktemp("slides")
    opts = {"width": 1200, "height": 900, "um_per_px": 0.5, "tile": 128, "n_blobs": 3}
    good = dkan.datasets.synthetic_wsi(folder / "good.tif", **opts)
    full = dkan.datasets.synthetic_wsi(folder / "full.tif", seed=1, **opts)
    data = full.read_bytes()
    bad = folder / "truncated.tif"
    bad.write_bytes(data[: int(len(data) * 0.6)])
    full.unlink()
    return good, bad


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sdata = dkan.datasets.toy(n_samples=2, grid_size=6, seed=0)
    model = dkan.tl.train(sdata, config="small", progress=False, max_epochs=1, feature_encoder="dummy", device="cpu")
    return model.save(tmp_path_factory.mktemp("model") / "model")


def _toy(grid_size: int):
    return dkan.datasets.toy(seed=0, n_samples=1, grid_size=grid_size, n_genes=10)


def _n_obs(store: Path) -> int:
    import spatialdata as sd

    return sd.read_zarr(store).tables["table"].n_obs


def _env() -> dict[str, str]:
    """The environment of a subprocess that imports this dkan."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(dkan.__file__).parents[1]), *sys.path])}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------ item 1
def test_truncated_slide_fails_alone_and_the_batch_goes_on(slides, model_dir, tmp_path):
    good, bad = slides
    out_dir = tmp_path / "preds"
    report = dkan.tl.predict_slides([bad, good], model_dir, out_dir=out_dir, errors="skip", device="cpu")
    assert list(report["status"]) == ["failed", "written"]
    assert "truncated.tif" in report["error"].iloc[0] and "Jpeg" in report["error"].iloc[0]
    assert sorted(p.name for p in out_dir.iterdir()) == ["good.zarr"]
    with pytest.raises(SlideError, match=r"truncated\.tif") as info:
        dkan.tl.predict_slides([bad], model_dir, out_dir=out_dir, progress=False, device="cpu")
    assert type(info.value.__cause__).__module__.startswith("imagecodecs")
    assert info.value.slide == str(bad) and info.value.stage in ("spots", "features")  # decoded lazily


def test_cli_predict_truncated_slide_is_one_line(slides, model_dir, tmp_path):
    """In a process of its own: zarr's event loop used to add tracebacks at exit."""
    _, bad = slides
    out = tmp_path / "pred.zarr"
    cmd = [sys.executable, "-m", "dkan", "predict", str(bad), "--model", str(model_dir), "--out", str(out), *FAST]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dkan: error: Slide") and "truncated.tif" in lines[0], proc.stderr
    assert not out.exists() and not _hidden(tmp_path)


def test_reruns_recover_a_store_set_aside_by_a_killed_swap(slides, model_dir, tmp_path):
    """``predict_slides`` puts a set-aside store back before deciding to skip; ``dkan predict`` before replacing."""
    from dkan.cli import main

    good, _ = slides
    out_dir = tmp_path / "preds"
    dkan.tl.predict_slides([good], model_dir, out_dir=out_dir, progress=False, device="cpu")
    store = out_dir / "good.zarr"
    store.rename(out_dir / ".good.zarr.old-0123abcd")  # a killed swap of an earlier dkan (no host and pid)
    (out_dir / ".good.zarr.tmp-0123abcd").mkdir()  # and the store it was writing
    again = dkan.tl.predict_slides([good], model_dir, out_dir=out_dir, progress=False, device="cpu")
    assert list(again["status"]) == ["skipped"] and store.is_dir() and not _hidden(out_dir)
    store.rename(out_dir / ".good.zarr.old-0123abcd")
    args = ["predict", str(good), "--model", str(model_dir), "--out", str(store), "--overwrite", *FAST]
    assert main(args) == 0
    assert store.is_dir() and not _hidden(out_dir)


def test_program_errors_still_stop_the_batch(slides, model_dir, tmp_path, monkeypatch):
    """An error that is not about the slide (here a bug in the predictor) is not swallowed by errors='skip'."""
    good, _ = slides

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a slide")

    monkeypatch.setattr("dkan.tl._predict.predict", broken)  # predict_slides calls it from its module
    with pytest.raises(RuntimeError, match="a bug"):
        dkan.tl.predict_slides([good], model_dir, out_dir=tmp_path, errors="skip", progress=False, device="cpu")


def test_an_invalid_model_stops_the_batch(slides, tmp_path):
    """Not a slide's failure: ``errors="skip"`` does not turn a bad model into one failed row per slide."""
    good, _ = slides
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(FileNotFoundError, match="no saved dkan model"):
        dkan.tl.predict_slides([good], tmp_path / "not_a_model", out_dir=tmp_path / "o", errors="skip")


def _chained() -> BaseException:
    import zlib

    try:
        try:
            zlib.decompress(b"not zlib")
        except zlib.error as err:
            raise RuntimeError("dask task failed") from err
    except RuntimeError as err:
        return err
    raise AssertionError


@pytest.mark.parametrize(
    ("err", "slide"),
    [
        (OSError("disk"), True),
        (ValueError("bad"), True),
        (_chained(), True),  # a decoder error re-raised by another layer
        (RuntimeError("cuda"), False),
        (AttributeError("bug"), False),
        (AssertionError(), False),
    ],
)
def test_is_slide_error(err, slide):
    assert is_slide_error(err) is slide


# ------------------------------------------------------------------------------------------------ item 2: kills
_SCRIPT = """
import os, signal, sys
import dkan
from dkan.io import _store_write as sw

out, mode = sys.argv[1], sys.argv[2]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
new = dkan.datasets.toy(seed=0, n_samples=1, grid_size=5, n_genes=10)
if mode == "between_renames":  # a file system that cannot swap: killed after the old store was set aside
    sw._exchange = lambda a, b: False
    real, calls = sw._move, []
    def move(src, dst):
        calls.append(src)
        if len(calls) == 2:
            die()
        real(src, dst)
    sw._move = move
elif mode == "after_swap":  # killed after the swap, before the old store (now the temporary) is removed
    real_exchange = sw._exchange
    sw._exchange = lambda a, b: real_exchange(a, b) and die()
elif mode == "while_writing":  # killed while the new store is written
    import spatialdata as sd
    real_write = sd.SpatialData.write
    def write(self, path, **kw):
        real_write(self, path, **kw)
        die()
    sd.SpatialData.write = write
elif mode == "in_place":  # killed between removing the table element and writing the new one
    import spatialdata as sd
    from dkan.cli import update_in_place
    sdata = sd.read_zarr(out)
    sdata.tables["table"].obs["marker"] = 1
    sd.SpatialData.write_element = die
    update_in_place(sdata, "table")
elif mode == "new_element":  # killed while a new element is written in place (its files half there)
    import glob
    import spatialdata as sd
    from dkan.cli import update_in_place
    sdata = sd.read_zarr(out)
    sdata.tables["extra"] = sdata.tables["table"].copy()
    real_write = sd.SpatialData.write_element
    def write_element(self, name, **kw):
        real_write(self, name, **kw)
        for f in glob.glob(os.path.join(out, "tables", name, "obs", "**", "*"), recursive=True)[:3]:
            if os.path.isfile(f):
                os.remove(f)
        die()
    sd.SpatialData.write_element = write_element
    update_in_place(sdata, "table", added=["extra"])
sw.write_new_store(new, out, overwrite=True)
"""


def _killed(tmp_path: Path, out: Path, mode: str) -> None:
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    proc = subprocess.run([sys.executable, str(script), str(out), mode], env=_env(), capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


@pytest.fixture
def old_store(tmp_path):
    out = tmp_path / "X.zarr"
    _toy(4).write(out)
    return out


def test_killed_between_renames_restores_the_old_store(old_store, tmp_path):
    _killed(tmp_path, old_store, "between_renames")
    assert not old_store.exists() and any(name.startswith(".X.zarr.old-") for name in _hidden(tmp_path))
    sw.recover_store(old_store)  # what every later write or predict_slides run on X does first
    assert _n_obs(old_store) == 16 and _hidden(tmp_path) == []


def test_killed_after_swap_keeps_the_new_store_and_cleans(old_store, tmp_path):
    _killed(tmp_path, old_store, "after_swap")
    assert _n_obs(old_store) == 25  # the new store, in place in one step
    assert any(name.startswith(".X.zarr.tmp-") for name in _hidden(tmp_path))
    sw.write_new_store(_toy(3), old_store, overwrite=True)
    assert _n_obs(old_store) == 9 and _hidden(tmp_path) == []


def test_killed_while_writing_leaves_the_old_store_and_next_run_cleans(old_store, tmp_path):
    _killed(tmp_path, old_store, "while_writing")
    assert _n_obs(old_store) == 16 and len(_hidden(tmp_path)) == 1
    sw.recover_store(old_store)
    assert _hidden(tmp_path) == []


def test_killed_in_place_update_is_finished_by_the_next_run(old_store, tmp_path):
    import spatialdata as sd

    _killed(tmp_path, old_store, "in_place")
    assert _hidden(tmp_path) == [".X.zarr.table.dkan-backup.zarr"]
    assert sw.restore_backups(old_store) == ["table"]
    table = sd.read_zarr(old_store).tables["table"]
    assert table.n_obs == 16 and (table.obs["marker"] == 1).all() and _hidden(tmp_path) == []


def test_killed_while_writing_a_new_element_in_place_is_removed_by_the_next_run(old_store, tmp_path):
    import spatialdata as sd

    _killed(tmp_path, old_store, "new_element")
    assert ".X.zarr.extra.dkan-pending" in _hidden(tmp_path) and (old_store / "tables" / "extra").is_dir()
    assert sw.restore_backups(old_store) == []  # no table update to finish; the half-written element goes
    back = sd.read_zarr(old_store)
    assert "extra" not in back.tables and back.tables["table"].n_obs == 16 and _hidden(tmp_path) == []


def test_in_place_update_leaves_no_pending_marker(old_store, tmp_path):
    import spatialdata as sd

    sdata = sd.read_zarr(old_store)
    sdata.tables["extra"] = sdata.tables["table"].copy()
    sw.update_in_place(sdata, "table", added=["extra"])
    assert "extra" in sd.read_zarr(old_store).tables and _hidden(tmp_path) == []


def test_cli_in_place_run_finishes_a_killed_update_first(tmp_path, model_dir):
    import spatialdata as sd

    from dkan.cli import main

    store = tmp_path / "S.zarr"
    dkan.datasets.toy(seed=0, n_samples=1, grid_size=4).write(store)
    _killed(tmp_path, store, "in_place")
    assert main(["predict", str(store), "--model", str(model_dir), "--in-place", *FAST]) == 0
    back = sd.read_zarr(store)
    assert (back.tables["table"].obs["marker"] == 1).all()  # the killed update, finished
    assert any(key.endswith("_dkan") for key in back.tables) and _hidden(tmp_path) == []


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "from_a").touch()
    if not sw._exchange(a, b):
        pytest.skip("this file system or C library has no renameat2(RENAME_EXCHANGE); the two-rename path is tested")
    assert (b / "from_a").exists() and not (a / "from_a").exists()


def test_leftovers_of_live_writers_and_other_hosts_are_kept(tmp_path):
    out = tmp_path / "X.zarr"
    live = tmp_path / f".X.zarr.tmp-{sw._host()}-{os.getppid()}-0123abcd"
    other = tmp_path / ".X.zarr.old-otherhost-1-0123abcd"
    legacy = tmp_path / ".X.zarr.tmp-0123abcd"
    for p in (live, other, legacy):
        p.mkdir()
    sw.recover_store(out)
    assert _hidden(tmp_path) == sorted([live.name, other.name]) and not out.exists()


# ------------------------------------------------------------------------------------------------ model folders
def test_model_save_removes_safetensors_temporaries(tmp_path):
    """safetensors writes ``.tmpXXXXXX`` then renames it (seen with strace); a SIGKILL in between leaves it."""
    from dkan._config import DKANConfig
    from dkan.train.fitted import DKANModel, build_module

    config = DKANConfig.resolve("small", d=16, feature_encoder="dummy")
    module = build_module(config, n_genes=2, gene_dim=8, feature_dim=16, pretrained=False)
    meta = {"features": {"encoder": "dummy", "dim": 16}}
    model = DKANModel(module, config, ["A", "B"], np.zeros((2, 8), np.float32), meta)
    path = model.save(tmp_path / "m")
    left = path / ".tmpAb12Cd"
    left.write_bytes(b"\x00" * 64)  # what the killed write left
    keep = path / ".tmp_notes"
    keep.write_text("the user's")
    assert DKANModel.load(path).genes == ["A", "B"]  # a load reads past it and removes nothing
    model.save(path, overwrite=True)
    assert not left.exists() and keep.exists()
