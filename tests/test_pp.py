from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import data_path, results
from scipy import sparse

import dkan
from dkan import _keys as K
from dkan.pp._grid import detect_grid, neighbour_average


def _adata(counts, genes=None, rows=None, cols=None, samples=None):
    counts = np.asarray(counts)
    n, g = counts.shape
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n)])
    if rows is not None:
        obs[K.ARRAY_ROW], obs[K.ARRAY_COL] = rows, cols
    if samples is not None:
        obs[K.SAMPLE] = samples
    var = pd.DataFrame(index=genes or [f"g{j}" for j in range(g)])
    a = ad.AnnData(sparse.csr_matrix(counts), obs=obs, var=var)
    if rows is not None:
        a.obsm["spatial"] = np.c_[cols, rows].astype(float) * 10
    return a


# --- select_genes ---------------------------------------------------------------------------------------


def test_select_reference_rule():
    # 10 spots; g0: huge but in 1 spot (10% -> kept at 0.1, dropped at 0.2); g1..g4 in all spots with totals 40..10
    c = np.zeros((10, 6), int)
    c[0, 0] = 1000
    for j, v in zip(range(1, 5), (4, 3, 2, 1), strict=True):
        c[:, j] = v
    c[:5, 5] = 100  # g5: in half of the spots, total 500
    a = _adata(c)
    dkan.pp.select_genes(a, n_genes=3)
    assert list(a.uns[K.UNS][K.UNS_PANEL]["genes"]) == ["g0", "g5", "g1"]
    assert a.var[K.PANEL].tolist() == [True, True, False, False, False, True]
    res = dkan.pp.select_genes(a, n_genes=3, min_fraction=0.2, inplace=False, key_added="p")
    assert res.sort_values("rank").index[:3].tolist() == ["g5", "g1", "g2"]
    assert res.loc["g0", "detected_fraction"] == pytest.approx(0.1) and np.isnan(res.loc["g0", "score"])
    assert "p" not in a.var  # inplace=False leaves the table alone
    rec = a.uns[K.UNS][K.UNS_PANEL]
    assert rec["flavor"] == "reference" and rec["n_genes"] == 3 and rec["min_fraction"] == 0.1


def test_select_excludes_bad_names_and_checks_size(caplog):
    a = _adata(np.ones((4, 4), int), genes=["A", "B", "B", "nan"])
    with caplog.at_level(logging.WARNING, logger="dkan"):
        dkan.pp.select_genes(a, n_genes=1)
    assert "duplicated" in caplog.text
    assert a.var_names[a.var[K.PANEL].to_numpy()].tolist() == ["A"]
    with pytest.raises(ValueError, match=r"`n_genes=2` but only 1 of 4 genes"):
        dkan.pp.select_genes(a, n_genes=2)
    with pytest.raises(ValueError, match="flavor"):
        dkan.pp.select_genes(a, n_genes=1, flavor="mean")
    with pytest.raises(KeyError, match="layer='counts'"):
        dkan.pp.select_genes(a, n_genes=1, layer="counts")


def test_select_fixed_panel():
    a = _adata(np.ones((3, 3), int))
    dkan.pp.select_genes(a, genes=["g2", "g0", "gX"])
    assert a.var[K.PANEL].tolist() == [True, False, True]
    assert list(a.uns[K.UNS][K.UNS_PANEL]["genes"]) == ["g2", "g0", "gX"]


def test_select_hvg_and_svg_on_toy(toy):
    tab = toy.tables[K.TABLE]
    for flavor in ("hvg", "svg"):
        res = dkan.pp.select_genes(toy, n_genes=8, flavor=flavor, inplace=False)
        assert res[K.PANEL].sum() == 8 and set(res["rank"].dropna()) == set(range(8))
    dkan.pp.select_genes(toy, n_genes=8, flavor="svg")
    assert tab.var[K.PANEL].sum() == 8 and tab.uns[K.UNS][K.UNS_PANEL]["flavor"] == "svg"


def test_select_svg_prefers_spatial_genes():
    rng = np.random.default_rng(0)
    rows, cols = (v.ravel() for v in np.mgrid[0:12, 0:12])
    smooth = rng.poisson(1 + 20 * (cols / 11))  # a left-right gradient
    noise = rng.permutation(smooth)  # same values, no spatial structure
    base = rng.poisson(50, size=len(rows))
    a = _adata(np.c_[noise, smooth, base], genes=["noise", "smooth", "base"], rows=rows, cols=cols)
    res = dkan.pp.select_genes(a, n_genes=1, flavor="svg", inplace=False)
    assert res[K.PANEL].idxmax() == "smooth"
    assert res.loc["smooth", "score"] > 0.3 > 0.15 > abs(res.loc["noise", "score"])


# --- normalize ------------------------------------------------------------------------------------------


def _manual(c, rows, cols, offsets, target=1e4, log=np.log10):
    y = c / c.sum(1, keepdims=True) * target
    y = log(1 + y)
    pos = {(r, k): i for i, (r, k) in enumerate(zip(rows, cols, strict=True))}
    out = np.empty_like(y)
    for i, (r, k) in enumerate(zip(rows, cols, strict=True)):
        nb = [i] + [pos[(r + dr, k + dc)] for dr, dc in offsets if (r + dr, k + dc) in pos]
        out[i] = y[nb].mean(0)
    return out


SQUARE = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]


def test_normalize_reference_square_grid():
    rng = np.random.default_rng(1)
    rows, cols = (v.ravel() for v in np.mgrid[0:4, 0:5])
    keep = np.ones(20, bool)
    keep[7] = False  # a hole in the grid
    rows, cols = rows[keep], cols[keep]
    c = rng.poisson(5, size=(19, 6)) + 1
    a = _adata(c, rows=rows, cols=cols)
    dkan.pp.select_genes(a, genes=["g3", "g0", "g1", "g5"])
    out = dkan.pp.normalize(a, inplace=False)
    assert out.dtype == np.float32 and out.shape == (19, 4)  # spots x panel, in panel order
    expect = _manual(c[:, [3, 0, 1, 5]], rows, cols, SQUARE)  # library size over the panel only
    np.testing.assert_allclose(out, expect, rtol=1e-5)
    with pytest.raises(TypeError, match="widen"):  # a bare AnnData wider than the panel is never widened
        dkan.pp.normalize(a)
    assert K.TARGET not in a.layers
    a = a[:, ["g3", "g0", "g1", "g5"]].copy()  # the panel alone: written in place
    dkan.pp.normalize(a)
    np.testing.assert_allclose(a.layers[K.TARGET], expect, rtol=1e-5)
    rec = a.uns[K.UNS][K.UNS_NORMALIZE]
    assert rec["log"] == "log10" and rec["target_sum"] == 1e4 and rec["grid"] == {"sample": "square"}
    assert list(rec["genes"]) == ["g3", "g0", "g1", "g5"]


def test_normalize_switches_and_samples():
    rng = np.random.default_rng(2)
    rows, cols = (v.ravel() for v in np.mgrid[0:3, 0:3])
    c = rng.poisson(5, size=(18, 3)) + 1
    a = _adata(c, rows=np.r_[rows, rows], cols=np.r_[cols, cols], samples=["s0"] * 9 + ["s1"] * 9)
    out = dkan.pp.normalize(a, genes=["g0", "g1", "g2"], inplace=False)
    assert K.TARGET not in a.layers
    # per sample: the two samples share coordinates but are smoothed separately
    for s in (slice(0, 9), slice(9, 18)):
        np.testing.assert_allclose(out[s], _manual(c[s], rows, cols, SQUARE), rtol=1e-5)
    plain = dkan.pp.normalize(a, genes=["g0", "g1", "g2"], smooth=False, log="log1p", target_sum=None, inplace=False)
    np.testing.assert_allclose(plain, np.log1p(c), rtol=1e-6)
    raw = dkan.pp.normalize(a, genes=["g0", "g1", "g2"], smooth=False, log=None, inplace=False)
    np.testing.assert_allclose(raw.sum(1), 1e4, rtol=1e-5)


def test_normalize_hex_grid():
    # Visium coordinates: row + col even; neighbours at (0, +-2) and (+-1, +-1)
    rows = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    cols = np.array([0, 2, 4, 1, 3, 0, 2, 4])
    assert detect_grid(np.c_[rows, cols]) == "hex"
    assert detect_grid(np.c_[[0, 0, 1], [0, 1, 1]]) == "square"
    w = neighbour_average(np.c_[rows, cols], "hex")
    assert (w.getnnz(axis=1) - 1).tolist() == [2, 4, 2, 5, 5, 2, 4, 2]
    c = np.random.default_rng(3).poisson(4, size=(8, 3)) + 1
    a = _adata(c, rows=rows, cols=cols)
    out = dkan.pp.normalize(a, genes=["g0", "g1", "g2"], inplace=False)
    hexo = [(0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1)]
    np.testing.assert_allclose(out, _manual(c, rows, cols, hexo), rtol=1e-5)
    sq = dkan.pp.normalize(a, genes=["g0", "g1", "g2"], grid="square", inplace=False)
    assert not np.allclose(sq, out)


def test_normalize_bad_inputs(caplog):
    c = np.array([[1, 2], [0, 0], [3, 1]])
    a = _adata(c, rows=[0, 0, 0], cols=[0, 1, 2])
    with caplog.at_level(logging.WARNING, logger="dkan"):
        out = dkan.pp.normalize(a, smooth=False, inplace=False)
    assert "no gene panel" in caplog.text and "1 spot(s) have no counts" in caplog.text
    np.testing.assert_array_equal(out[1], 0)
    with pytest.raises(KeyError, match="absent from the table"):
        dkan.pp.normalize(a, genes=["g0", "zz"])
    with pytest.raises(ValueError, match="log='ln'"):
        dkan.pp.normalize(a, log="ln")
    b = _adata(c)
    with pytest.raises(KeyError, match="smooth=False"):
        dkan.pp.normalize(b)
    d = _adata(c, rows=[0, 0, 1], cols=[0, 0, 1])
    with pytest.raises(ValueError, match="share array coordinates"):
        dkan.pp.normalize(d)


def test_pp_on_toy(toy):
    dkan.pp.select_genes(toy, n_genes=20)
    dkan.pp.normalize(toy)
    tab = toy.tables[K.TABLE]
    assert K.TARGET not in tab.layers  # the count table is not widened
    res = results(toy)
    assert res.layers[K.TARGET].shape == (tab.n_obs, 20) and np.isfinite(res.layers[K.TARGET]).all()


def test_pp_on_visium():
    import spatialdata_io

    sd = spatialdata_io.visium(data_path("visium_tiny"), dataset_id="tiny")
    tab = sd.tables["table"]
    assert {K.ARRAY_ROW, K.ARRAY_COL} <= set(tab.obs)  # spatialdata-io keeps Visium's grid coordinates
    dkan.pp.select_genes(sd, n_genes=10, min_fraction=0.05)
    dkan.pp.normalize(sd)
    res = results(sd)
    assert res.uns[K.UNS][K.UNS_NORMALIZE]["grid"] == {"tiny": "hex"}
    target = res.layers[K.TARGET]
    assert target.shape == (100, 10) and np.isfinite(target).all() and (target >= 0).all()
    res = dkan.pp.select_genes(sd, n_genes=5, min_fraction=0.05, flavor="svg", inplace=False)
    assert res[K.PANEL].sum() == 5


def _non_canonical_counts(seed: int = 0):
    """An int CSR whose column indices are unsorted within rows, as concatenated tables often are."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    dense = rng.poisson(2.0, size=(30, 12)).astype(np.int32)
    coo = sp.coo_matrix(dense)
    order = rng.permutation(coo.nnz)
    x = sp.csr_matrix((coo.data[order], (coo.row[order], coo.col[order])), shape=dense.shape)
    x = sp.csr_matrix((x.data, x.indices, x.indptr), shape=dense.shape)  # keep the unsorted layout
    if x.has_sorted_indices:  # scipy sorted it while building: scramble the row contents ourselves
        for r in range(dense.shape[0]):
            a, b = x.indptr[r], x.indptr[r + 1]
            p = rng.permutation(b - a)
            x.indices[a:b], x.data[a:b] = x.indices[a:b][p], x.data[a:b][p]
        x.has_sorted_indices = False
    return x, dense


def test_select_and_normalize_never_change_non_canonical_counts():
    import anndata as ad

    x, dense = _non_canonical_counts()
    assert not x.has_sorted_indices
    adata = ad.AnnData(x, obs=pd.DataFrame(index=[f"s{i}" for i in range(30)]))
    adata.var_names = [f"G{i}" for i in range(12)]
    dkan.pp.select_genes(adata, n_genes=5, min_fraction=0.0)
    out = dkan.pp.normalize(adata, smooth=False, inplace=False)
    np.testing.assert_array_equal(adata.X.toarray(), dense)  # the user's counts are untouched
    idx = adata.var_names.get_indexer(adata.uns[K.UNS][K.UNS_PANEL]["genes"])  # panel order
    lib = dense[:, idx].sum(1, keepdims=True)
    expect = np.log10(1 + 1e4 * dense[:, idx] / lib)
    np.testing.assert_allclose(out, expect, rtol=1e-5)


def test_select_svg_uses_squidpy_knn_without_deprecation(toy):
    """select_genes(flavor="svg") calls `spatial_neighbors_knn`, not the deprecated `spatial_neighbors`, and the
    graph (hence the Moran's I ranking) is the one the old `coord_type="generic", n_neighs=6` call built."""
    import warnings

    sq = pytest.importorskip("squidpy", reason="squidpy is the optional extra `dkan[svg]`")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        res = dkan.pp.select_genes(toy, n_genes=8, flavor="svg", inplace=False)
    assert res[K.PANEL].sum() == 8
    if not hasattr(sq.gr, "spatial_neighbors"):  # removed in squidpy 1.9: nothing left to compare with
        return
    tab = toy.tables[K.TABLE]
    new = sq.gr.spatial_neighbors_knn(tab, spatial_key="spatial", n_neighs=6, copy=True)
    with pytest.warns(FutureWarning, match="deprecated"):
        old = sq.gr.spatial_neighbors(tab, spatial_key="spatial", coord_type="generic", n_neighs=6, copy=True)
    for a, b in zip(new, old, strict=True):
        assert (a != b).nnz == 0
