"""Parts now done by maintained libraries (issue 15): same output as the former hand-written code."""

from __future__ import annotations

import numpy as np
import pytest

import dkan
from dkan import _keys as K


@pytest.mark.parametrize("target_sum", [1e4, 50.0, None])
@pytest.mark.parametrize("log", ["log10", "log1p", None])
def test_normalize_through_scanpy_gives_the_former_numbers(target_sum, log):
    """scanpy's normalize_total / log1p(base=10) in float64 give bit-identical float32 targets."""
    sdata = dkan.datasets.toy(n_samples=2, grid_size=5, n_genes=15, seed=3)
    adata = sdata.tables[K.TABLE]
    x = np.asarray(adata.X.todense(), dtype=np.float64)
    x[[0, 7]] = 0  # spots with no counts stay zero
    adata.X = type(adata.X)(x.astype(adata.X.dtype))
    got = dkan.pp.normalize(sdata, target_sum=target_sum, log=log, smooth=False, inplace=False)
    labels = adata.obs[K.SAMPLE].to_numpy()
    expected = np.empty(x.shape, np.float32)
    for lab in np.unique(labels):  # the former hand-written formula, per sample
        y = x[labels == lab]
        lib = y.sum(axis=1, keepdims=True)
        if target_sum is not None:
            y = np.divide(y * target_sum, lib, out=np.zeros_like(y), where=lib > 0)
        y = np.log10(1.0 + y) if log == "log10" else np.log1p(y) if log == "log1p" else y
        expected[labels == lab] = y
    np.testing.assert_array_equal(got, expected)


def _split_toy(drop_genes: int = 5) -> list:
    sdata = dkan.datasets.toy(n_samples=3, grid_size=5, n_genes=12, seed=0)
    parts = [sdata.subset([f"s{i}_image", f"s{i}_spots"], filter_tables=True) for i in range(3)]
    parts[2].tables[K.TABLE] = parts[2].tables[K.TABLE][:, drop_genes:].copy()  # fewer genes: inner != outer
    return parts


@pytest.mark.parametrize("join", ["inner", "outer"])
def test_concat_through_spatialdata_concatenate_keeps_the_former_table(join):
    """Same elements, counts, obs, var and dkan metadata as the former anndata.concat-based merge."""
    import anndata as ad

    from dkan.io._concat import _concat_samples

    parts = _split_toy()
    out = _concat_samples(parts, join=join)
    table = out.tables[K.TABLE]
    expected = ad.concat([p.tables[K.TABLE] for p in parts], join=join, fill_value=0, merge="same")
    assert sorted(out.images) == [f"s{i}_image" for i in range(3)]
    assert sorted(out.shapes) == [f"s{i}_spots" for i in range(3)]
    assert list(table.obs_names) == list(expected.obs_names)
    assert list(table.var_names) == list(expected.var_names)
    assert (table.X != expected.X).nnz == 0
    assert list(table.obs[K.REGION].cat.categories) == [f"s{i}_spots" for i in range(3)]
    assert table.obs[K.SAMPLE].dtype == "category"
    assert table.uns["spatialdata_attrs"]["region"] == [f"s{i}_spots" for i in range(3)]
    assert set(table.uns[K.UNS][K.UNS_READER]) == {"s0", "s1", "s2"}
    assert table.n_vars == (7 if join == "inner" else 12)


def test_concat_renamed_region_columns_and_clashing_names():
    from spatialdata.models import TableModel

    from dkan.io._concat import _concat_samples

    parts = _split_toy(drop_genes=0)
    t = parts[1].tables[K.TABLE].copy()
    t.obs = t.obs.rename(columns={K.REGION: "library", K.INSTANCE: "cell"})
    t.uns.pop("spatialdata_attrs")
    parts[1].tables[K.TABLE] = TableModel.parse(t, region="s1_spots", region_key="library", instance_key="cell")
    table = _concat_samples(parts).tables[K.TABLE]
    assert (table.obs[K.REGION] == "s1_spots").sum() == t.n_obs
    with pytest.raises(ValueError, match="s0_image"):
        _concat_samples([parts[0], parts[0]])
