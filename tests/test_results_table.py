"""Results live in one panel-sized table; the count table is not widened (issue 13, item 3)."""

import anndata as ad
import numpy as np
import pytest

import dkan
from dkan import _keys as K
from dkan._results import results_key, results_table
from dkan._utils import get_table
from dkan.datasets import copy_sdata

FAST = {"max_epochs": 1, "feature_encoder": "dummy", "n_genes": 12}


def _snapshot(table: ad.AnnData) -> dict:
    return {
        "layers": sorted(table.layers),
        "obsm": sorted(table.obsm),
        "varm": sorted(table.varm),
        "var": [c for c in table.var.columns if c != K.PANEL],
        "shape": table.shape,
        "obs": list(table.obs.columns),
    }


@pytest.fixture(scope="module")
def pipeline():
    """select_genes + normalize + tile + extract_features + embed_genes + train + predict on toy slides."""
    sd = dkan.datasets.toy(seed=0, n_samples=2, grid_size=8, n_genes=30)
    before = _snapshot(sd.tables[K.TABLE])
    dkan.pp.select_genes(sd, n_genes=12)
    dkan.pp.normalize(sd)
    dkan.tl.tile(sd)
    dkan.tl.extract_features(sd, encoder="dummy", progress=False)
    dkan.tl.embed_genes(sd, progress=False)
    model = dkan.tl.train(sd, config="small", progress=False, **FAST)
    key = dkan.tl.predict(sd, model, progress=False, overwrite=True)
    return sd, before, model, key


def test_count_table_is_not_widened_and_results_are_panel_sized(pipeline):
    sd, before, model, key = pipeline
    table = sd.tables[K.TABLE]
    assert _snapshot(table) == before  # only var["dkan_panel"] was added
    assert K.PANEL in table.var
    panel = list(table.uns[K.UNS][K.UNS_PANEL]["genes"])
    assert key == results_key(K.TABLE) == f"{K.TABLE}{K.RESULTS_SUFFIX}"
    res = sd.tables[key]
    assert list(res.var_names) == panel  # panel order
    assert set(model.genes) == set(panel)
    n, p = table.n_obs, len(panel)
    for layer in (K.TARGET, K.PRED):
        assert res.layers[layer].shape == (n, p)
        assert np.isfinite(res.layers[layer]).all()  # no NaN columns of genes outside the panel
    assert res.varm[K.GENE_EMBEDDING].shape[0] == p
    assert np.isfinite(res.varm[K.GENE_EMBEDDING]).all()
    for k in (K.SPOT_FEATURES, K.REGION_FEATURES, K.REGION_MASK, K.SPOT_PX, K.GRID):
        assert res.obsm[k].shape[0] == n
    assert set(res.uns[K.UNS]) >= {K.UNS_NORMALIZE, K.UNS_TILE, K.UNS_FEATURES, K.UNS_GENE_EMBEDDING, K.UNS_PREDICT}


def test_results_table_annotates_the_same_spots(pipeline):
    sd, _, _, key = pipeline
    table, res = sd.tables[K.TABLE], sd.tables[key]
    assert res.obs_names.equals(table.obs_names)
    assert res.uns["spatialdata_attrs"] == table.uns["spatialdata_attrs"]
    for col in (K.SAMPLE, K.ARRAY_ROW, K.ARRAY_COL, K.REGION, K.INSTANCE):
        assert (res.obs[col].astype(str).to_numpy() == table.obs[col].astype(str).to_numpy()).all()
    np.testing.assert_array_equal(res.obsm[K.SPATIAL], table.obsm[K.SPATIAL])


def test_table_inference_skips_the_results_table(pipeline):
    sd, _, _, key = pipeline
    assert set(sd.tables) == {K.TABLE, key}
    assert get_table(sd)[0] == K.TABLE
    assert results_table(sd)[0] == key
    assert results_table(sd, key)[0] == key  # naming the results table directly works too


def test_evaluate_and_spatial_pred_find_the_predictions(pipeline):
    import matplotlib

    matplotlib.use("Agg")
    sd, _, model, key = pipeline
    result = dkan.tl.evaluate(sd)
    assert result.protocol["table_key"] == key
    assert result.protocol["n_genes"] == len(model.genes)
    fig = dkan.pl.spatial_pred(sd, model.genes[0], return_fig=True)
    assert fig is not None
    assert dkan.pl.spatial_pred(sd, model.genes[0], table_key=K.TABLE, return_fig=True) is not None


def test_predict_with_extra_genes_grows_var(pipeline):
    sd, _, model, _ = pipeline
    new = copy_sdata(sd)
    res = new.tables[results_key(K.TABLE)]
    target = np.array(res.layers[K.TARGET])
    outside = [g for g in new.tables[K.TABLE].var_names if g not in model.genes][:2]
    texts = {g: f"{g} is a gene of breast stroma." for g in outside}
    key = dkan.tl.predict(new, model, genes=outside, descriptions=texts, overwrite=True, progress=False)
    res = new.tables[key]
    p = len(model.genes)
    assert list(res.var_names[p:]) == outside and set(res.var_names[:p]) == set(model.genes)
    assert res.var[K.PANEL].tolist() == [True] * p + [False] * len(outside)
    np.testing.assert_array_equal(res.layers[K.TARGET][:, :p], target)  # kept its values
    assert np.isnan(res.layers[K.TARGET][:, p:]).all()  # new columns: NaN
    assert np.isfinite(res.layers[K.PRED]).all()
    assert np.isnan(res.varm[K.GENE_EMBEDDING][p:]).all()
    assert new.tables[K.TABLE].shape == sd.tables[K.TABLE].shape


def test_he_only_predict_creates_one_panel_sized_table(pipeline):
    sd, _, model, _ = pipeline
    he = copy_sdata(sd)
    for name in list(he.tables):
        del he.tables[name]
    key = dkan.tl.predict(he, model, image_key=next(iter(he.images)), um_per_px=2.0, progress=False)
    assert list(he.tables) == [key]
    res = he.tables[key]
    assert set(res.var_names) == set(model.genes) and res.n_vars == len(model.genes)
    assert res.layers[K.PRED].shape == (res.n_obs, len(model.genes))
    assert results_table(he)[0] == key  # it is its own results table


def test_write_read_round_trip_keeps_both_tables(pipeline, tmp_path):
    import spatialdata as sdx

    sd, _, _, key = pipeline
    sd.write(tmp_path / "s.zarr")
    back = sdx.read_zarr(tmp_path / "s.zarr")
    assert set(back.tables) == {K.TABLE, key}
    assert get_table(back)[0] == K.TABLE
    np.testing.assert_allclose(back.tables[key].layers[K.PRED], sd.tables[key].layers[K.PRED])
    assert dkan.tl.evaluate(back).summary["pcc_all"] == pytest.approx(dkan.tl.evaluate(sd).summary["pcc_all"])


def test_normalize_anndata_is_never_widened(toy):
    table = toy.tables[K.TABLE]
    dkan.pp.select_genes(table, n_genes=10)
    out = dkan.pp.normalize(table, inplace=False)
    assert out.shape == (table.n_obs, 10)  # panel-sized, not n_obs x n_vars
    with pytest.raises(TypeError, match="inplace=False"):
        dkan.pp.normalize(table)
    assert K.TARGET not in table.layers
    small = table[:, table.var[K.PANEL].to_numpy(bool)].copy()
    dkan.pp.normalize(small)  # the genes are all of its var: written in place
    assert small.layers[K.TARGET].shape == (small.n_obs, 10)


def test_normalize_on_sdata_matches_inplace_false(toy):
    dkan.pp.select_genes(toy, n_genes=10)
    out = dkan.pp.normalize(toy, inplace=False)
    assert list(toy.tables) == [K.TABLE]  # inplace=False writes nothing
    dkan.pp.normalize(toy)
    np.testing.assert_array_equal(results_table(toy)[1].layers[K.TARGET], out)


def test_embed_genes_embeds_the_panel_by_default(toy):
    dkan.pp.select_genes(toy, n_genes=6)
    dkan.tl.embed_genes(toy, progress=False)
    res = results_table(toy)[1]
    assert res.varm[K.GENE_EMBEDDING].shape[0] == 6
    assert res.uns[K.UNS][K.UNS_GENE_EMBEDDING].get("genes") is None  # every row embedded
    assert K.GENE_EMBEDDING not in toy.tables[K.TABLE].varm


def test_stale_results_table_is_refused(toy):
    dkan.pp.select_genes(toy, n_genes=6)
    dkan.pp.normalize(toy)
    toy.tables[K.TABLE] = toy.tables[K.TABLE][:-3].copy()
    with pytest.raises(ValueError, match="no longer matches"):
        results_table(toy)


def test_predict_target_uses_the_counts_layer_the_model_was_trained_on(toy):
    from scipy import sparse

    from dkan._data.prepare import ensure_model_target

    table = toy.tables[K.TABLE]
    table.layers["counts"] = table.X.copy()
    table.X = sparse.csr_matrix(np.asarray(table.X.todense()) + 1.0)  # X is not the counts
    genes = list(table.var_names[:10])
    norm = {"target_sum": 1e4, "log": "log10", "library_size": "panel genes", "layer": "counts"}
    assert ensure_model_target(toy, genes, norm, table_key=K.TABLE)
    expect = dkan.pp.normalize(toy, genes=genes, layer="counts", inplace=False)
    np.testing.assert_array_equal(results_table(toy)[1][:, genes].layers[K.TARGET], expect)
    assert not np.allclose(dkan.pp.normalize(toy, genes=genes, inplace=False), expect)
