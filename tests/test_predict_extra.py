"""`predict` for genes outside the training panel and with a per-spot standard deviation (issue 14, items 3, 4)."""

import numpy as np
import pytest
import torch
from conftest import results

import dkan
from dkan import _keys as K
from dkan.datasets import copy_sdata
from dkan.nn.inference import Predictor
from dkan.train.fitted import DKANModel

FAST = {"max_epochs": 2, "feature_encoder": "dummy", "n_genes": 30}
STD = f"{K.PRED}{K.STD_SUFFIX}"


@pytest.fixture(scope="module")
def split():
    from dkan.demo import split_toy

    return split_toy()


@pytest.fixture(scope="module")
def models(split):
    """Two quick models on the same toy slides (30 of 40 genes in the panel), different seeds."""
    train_sd = copy_sdata(split[0])
    a = dkan.tl.train(train_sd, config="small", progress=False, **FAST)
    b = dkan.tl.train(train_sd, config="small", progress=False, seed=7, **FAST)
    outside = [g for g in train_sd.tables[K.TABLE].var_names if g not in a.genes]
    return a, b, outside


def _descriptions(genes):
    return {g: f"{g} is a gene expressed in breast tissue stroma and epithelium." for g in genes}


def test_predict_genes_outside_the_panel_from_their_descriptions(models, split):
    model, _, outside = models
    assert len(outside) >= 2
    new = copy_sdata(split[1])
    tkey = dkan.tl.predict(new, model, genes=outside[:2], descriptions=_descriptions(outside[:2]), progress=False)
    table = new.tables[tkey]
    pred = table.layers[K.PRED]
    assert pred.shape == table.shape
    cols = table.var_names.get_indexer(outside[:2])
    assert np.isfinite(pred[:, cols]).all()
    assert np.isfinite(pred[:, table.var_names.isin(model.genes)]).all()
    assert not table.var_names.isin(outside[2:]).any()  # not asked for: not added to the results table
    assert table.uns[K.UNS][K.UNS_PREDICT]["new_genes"] == outside[:2]
    # the panel's predictions do not change when new genes are queried
    ref = copy_sdata(split[1])
    dkan.tl.predict(ref, model, progress=False)
    np.testing.assert_allclose(
        ref.tables[tkey][:, model.genes].layers[K.PRED], table[:, model.genes].layers[K.PRED], rtol=1e-5, atol=1e-5
    )


def test_new_genes_are_queried_independently_of_each_other(models):
    model, _, _ = models
    module = model.module.eval()
    g = torch.Generator().manual_seed(0)
    extra = torch.randn(3, model.gene_embeddings.shape[1], generator=g)
    n, d = 4, model.meta["features"]["dim"]
    batch = {
        "patch_tokens": torch.randn(n, 1, d, generator=g),
        "region": torch.randn(n, 25, d, generator=g),
        "region_mask": torch.ones(n, 25, dtype=torch.bool),
        "slide": torch.randn(n, d, generator=g),
        "grid": torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], 1),
        "slide_index": torch.arange(n),
        "genes": torch.as_tensor(model.gene_embeddings),
    }
    with torch.no_grad():
        both = Predictor(module, new_genes=extra)(batch)["pred"]
        one = Predictor(module, new_genes=extra[1:2])(batch)["pred"]
        plain = module(batch)["pred"]
    assert both.shape == (n, len(model.genes) + 3)
    # same gene alone or among others; float32 sums differ in the last bits with the thread count
    torch.testing.assert_close(both[:, len(model.genes) + 1], one[:, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[:, : len(model.genes)], plain)


def test_new_genes_without_embedding_or_description_are_errors(models, split):
    model, _, outside = models
    new = copy_sdata(split[1])
    with pytest.raises(KeyError, match="descriptions"):  # no varm embedding on this table, no descriptions
        dkan.tl.predict(new, model, genes=outside[:1], progress=False)
    with pytest.raises(KeyError, match="no text"):
        dkan.tl.predict(new, model, genes=outside[:2], descriptions=_descriptions(outside[:1]), progress=False)
    with pytest.raises(TypeError, match="list of gene symbols"):
        dkan.tl.predict(new, model, genes="FN1", progress=False)
    assert list(new.tables) == [K.TABLE]  # nothing written by a refused call (no results table either)


def test_new_genes_use_the_table_embeddings_of_the_models_encoder(models, split):
    model, _, outside = models
    new = copy_sdata(split[1])
    names = list(new.tables[K.TABLE].var_names)
    dkan.tl.embed_genes(new, descriptions=_descriptions(names), genes=outside[:1], progress=False)  # results varm
    dkan.tl.predict(new, model, genes=outside[:1], progress=False)
    table = results(new)
    assert np.isfinite(table.layers[K.PRED][:, table.var_names.get_loc(outside[0])]).all()


def test_he_only_slide_table_includes_the_new_genes(models, split):
    from spatialdata import SpatialData

    model, _, outside = models
    image_key = next(iter(split[1].images))
    he = SpatialData(images={image_key: split[1].images[image_key]})
    tkey = dkan.tl.predict(
        he, model, um_per_px=2.0, genes=outside[:1], descriptions=_descriptions(outside[:1]), progress=False
    )
    table = he.tables[tkey]
    assert list(table.var_names) == [*model.genes, outside[0]]
    assert np.isfinite(table.layers[K.PRED]).all()


def test_mc_dropout_writes_a_standard_deviation_layer(models, split):
    model, _, _ = models
    new = copy_sdata(split[1])
    dkan.tl.predict(new, model, progress=False)
    det = results(new).layers[K.PRED].copy()
    state = torch.get_rng_state()
    dkan.tl.predict(new, model, n_samples=4, key_added="mc", progress=False)
    assert torch.equal(state, torch.get_rng_state())  # the user's random stream is left alone
    table = results(new)
    std = table.layers[f"mc{K.STD_SUFFIX}"]
    assert std.shape == table.shape and std.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(std), np.isnan(table.layers["mc"]))  # NaN exactly where pred is NaN
    panel = table.var_names.isin(model.genes)
    assert (std[:, panel] >= 0).all() and (std[:, panel] > 0).mean() > 0.9
    np.testing.assert_allclose(table.layers["mc"], det, rtol=1e-5, atol=1e-6)  # the prediction stays deterministic
    dkan.tl.predict(new, model, n_samples=4, key_added="mc2", progress=False)
    np.testing.assert_array_equal(table.layers[f"mc2{K.STD_SUFFIX}"], std)  # seeded draws: reproducible
    assert f"{K.PRED}{K.STD_SUFFIX}" not in table.layers  # one draw: no standard deviation
    with pytest.raises(ValueError, match="n_samples"):
        dkan.tl.predict(new, model, n_samples=0, key_added="x", progress=False)


def test_ensemble_mean_and_standard_deviation(models, split):
    a, b, _ = models
    new = copy_sdata(split[1])
    dkan.tl.predict(new, a, key_added="a", progress=False)
    dkan.tl.predict(new, b, key_added="b", progress=False)
    dkan.tl.predict(new, [a, b], progress=False)
    table = results(new)
    pa, pb = table.layers["a"], table.layers["b"]
    np.testing.assert_allclose(table.layers[K.PRED], (pa + pb) / 2, rtol=1e-5, atol=1e-6)
    # the default blends each network with its probes; the spread is the networks' own (probes left out)
    assert a.probes and b.probes
    na, nb = (DKANModel(m.module, m.config, m.genes, m.gene_embeddings, m.meta, m.history, m.trust) for m in (a, b))
    dkan.tl.predict(new, na, key_added="na", progress=False)
    dkan.tl.predict(new, nb, key_added="nb", progress=False)
    table = results(new)
    qa, qb = table.layers["na"], table.layers["nb"]
    assert not np.allclose(qa, pa, atol=1e-4)  # the blend moved the prediction
    np.testing.assert_allclose(table.layers[STD], np.abs(qa - qb) / np.sqrt(2), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="overwrite"):
        dkan.tl.predict(new, [a, b], key_added="a", progress=False)
    with pytest.raises(TypeError, match="DKANModel"):
        dkan.tl.predict(new, [a, 3], key_added="c", progress=False)


def test_ensemble_members_must_share_panel_and_inputs(models, split):
    a, _, _ = models
    other = dkan.tl.train(copy_sdata(split[0]), config="small", progress=False, **{**FAST, "n_genes": 20})
    with pytest.raises(ValueError, match="gene panel"):
        dkan.tl.predict(copy_sdata(split[1]), [a, other], progress=False)


def test_spatial_pred_shows_the_standard_deviation(models, split):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, _, _ = models
    new = copy_sdata(split[1])
    gene = model.genes[0]
    dkan.tl.predict(new, model, progress=False)
    with pytest.raises(KeyError, match="n_samples"):
        dkan.pl.spatial_pred(new, gene, show_std=True, return_fig=True)
    dkan.tl.predict(new, model, n_samples=3, key_added="mc", progress=False)
    fig = dkan.pl.spatial_pred(new, gene, pred_layer="mc", show_std=True, return_fig=True)
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    assert len(titles) == 3 and titles[-1].endswith("predicted SD"), titles
    plt.close(fig)
