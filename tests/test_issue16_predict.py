"""Issue 16: the evaluation target keeps the model's scale; Ensembl-named tables and a `var` column of symbols."""

import logging

import numpy as np
import pytest
from conftest import results

import dkan
from dkan import _keys as K
from dkan.datasets import copy_sdata


@pytest.fixture(scope="module")
def split():
    from dkan.demo import split_toy

    return split_toy()


@pytest.fixture(scope="module")
def model(split):
    return dkan.tl.train(copy_sdata(split[0]), config="small", progress=False, max_epochs=1, feature_encoder="dummy")


def _drop_genes(sdata, genes):
    table = sdata.tables[K.TABLE]
    sdata.tables[K.TABLE] = table[:, ~table.var_names.isin(genes)].copy()
    return sdata


def test_target_is_never_rescaled_when_part_of_the_panel_is_missing(model, split, caplog):
    full = copy_sdata(split[1])
    dkan.tl.predict(full, model, progress=False)
    half = _drop_genes(copy_sdata(split[1]), model.genes[::2])
    with caplog.at_level(logging.WARNING, logger="dkan"):
        dkan.tl.predict(half, model, progress=False)
    shared = [g for g in model.genes if g in half.tables[K.TABLE].var_names]
    a, b = results(full)[:, shared], results(half)[:, shared]
    np.testing.assert_allclose(a.layers[K.PRED], b.layers[K.PRED], rtol=1e-5)  # identical predictions
    if K.TARGET in b.layers:  # written: on exactly the scale of the full panel
        np.testing.assert_allclose(np.nanmean(a.layers[K.TARGET]), np.nanmean(b.layers[K.TARGET]), rtol=1e-6)
    else:  # refused, with the reason, and evaluation cannot run against a rescaled target
        assert "lacks" in caplog.text and "library size" in caplog.text
        assert b.uns[K.UNS][K.UNS_PREDICT]["target_written"] is False
        with pytest.raises(KeyError, match=K.TARGET):
            dkan.tl.evaluate(half)
    assert results(full).uns[K.UNS][K.UNS_PREDICT]["target_written"] is True


def test_target_without_library_scaling_is_written_over_the_genes_present(model, split):
    import copy

    unscaled = copy.deepcopy(model)
    unscaled.meta["normalize"] = {**model.meta["normalize"], "target_sum": None}
    half = _drop_genes(copy_sdata(split[1]), model.genes[::2])
    dkan.tl.predict(half, unscaled, progress=False)
    full = copy_sdata(split[1])
    dkan.tl.predict(full, unscaled, progress=False)
    shared = [g for g in model.genes if g in half.tables[K.TABLE].var_names]
    np.testing.assert_allclose(
        results(full)[:, shared].layers[K.TARGET], results(half)[:, shared].layers[K.TARGET], rtol=1e-6
    )


def _ensembl_table(sdata, with_symbols: bool):
    table = sdata.tables[K.TABLE]
    symbols = table.var_names.copy()
    table.var_names = [f"ENSG{i:011d}" for i in range(table.n_vars)]
    if with_symbols:
        table.var["gene_symbols"] = list(symbols)
    return sdata


def test_ensembl_var_names_error_says_so_and_how_to_map(model, split):
    sdata = _ensembl_table(copy_sdata(split[1]), with_symbols=False)
    with pytest.raises(ValueError, match=r"look like Ensembl gene ids.*gene_symbols="):
        dkan.tl.predict(sdata, model, progress=False)
    sdata = _ensembl_table(copy_sdata(split[1]), with_symbols=True)
    with pytest.raises(ValueError, match="gene_symbols='gene_symbols'"):
        dkan.tl.predict(sdata, model, progress=False)


def test_predict_matches_genes_through_a_symbol_column(model, split):
    ref = copy_sdata(split[1])
    dkan.tl.predict(ref, model, progress=False)
    sdata = _ensembl_table(copy_sdata(split[1]), with_symbols=True)
    ids = list(sdata.tables[K.TABLE].var_names)
    dkan.tl.predict(sdata, model, gene_symbols="gene_symbols", progress=False)
    table = sdata.tables[K.TABLE]
    assert list(table.var_names) == ids  # the user's names come back
    res, ref_res = results(sdata), results(ref)  # results tables speak the model's symbols
    assert list(res.var_names) == list(ref_res.var_names)
    np.testing.assert_allclose(res.layers[K.PRED], ref_res.layers[K.PRED], rtol=1e-5)
    np.testing.assert_allclose(res.layers[K.TARGET], ref_res.layers[K.TARGET], rtol=1e-6)
    with pytest.raises(KeyError, match="not a column of `var`"):
        dkan.tl.predict(sdata, model, gene_symbols="symbol", overwrite=True, progress=False)
