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
