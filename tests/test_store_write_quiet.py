from __future__ import annotations

import warnings

import dkan
from dkan.io._store_write import write_new_store


def _autoshard(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "autoshard" in str(w.message)]


def test_new_store_is_written_without_zarr_autoshard_notices(tmp_path):
    sdata = dkan.datasets.toy(n_samples=1, grid_size=4, seed=0)
    with warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        sdata.write(tmp_path / "plain.zarr")
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        write_new_store(sdata, tmp_path / "ours.zarr")
    assert _autoshard(plain), "this zarr emits no autoshard notice any more; the filter can go"
    assert not _autoshard(ours)
    assert (tmp_path / "ours.zarr").is_dir()
