"""DKAN+probes (``DKANConfig(probe_blend=True)``): mean of the network and the tuned ridge_ctx and knn probes."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

import dkan
from dkan import _keys as K
from dkan._evaluation.blend import ARRAY_NAMES, fit_blend_probes, predict_probes, probe_arrays
from dkan._evaluation.probes import baseline_fold, context_input
from dkan.datasets import copy_sdata
from dkan.train.data import SampleInputs
from dkan.train.fitted import DKANModel

FAST = {"max_epochs": 2, "feature_encoder": "dummy", "n_genes": 30}


def _inputs(n_samples: int = 3, n_side: int = 10, d: int = 8, g: int = 5) -> list[SampleInputs]:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2 * d, g))
    grid = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij"), -1).reshape(-1, 2)
    out = []
    for i in range(n_samples):
        n = n_side * n_side
        spot, region = rng.normal(size=(n, d)), rng.normal(size=(n, 25, d))
        mask = rng.random((n, 25)) > 0.2
        ctx = (region * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        y = np.tanh(np.concatenate([spot, ctx], 1) @ w) + 0.2 * rng.normal(size=(n, g))
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))
        out.append(SampleInputs(f"s{i}", t(spot), t(region), torch.as_tensor(mask), torch.as_tensor(grid), t(y)))
    return out


def test_stored_probes_are_the_cv_baselines_and_the_affine_fold_is_exact():
    samples = _inputs(4)
    train = [0, 1, 2]
    fitted = fit_blend_probes(samples, train, seed=0)
    arrays, settings = probe_arrays(fitted)
    assert set(arrays) == set(ARRAY_NAMES)
    x = context_input(samples[3])
    ridge, knn = predict_probes(arrays, settings, x)
    for name, got in (("ridge_ctx", ridge), ("knn", knn)):
        base, params = baseline_fold(name, samples, train, [3], seed=0)
        np.testing.assert_allclose(got, base[0], rtol=1e-5, atol=1e-5)  # ridge: folded affine map, float64
        assert settings[name] == params


def test_cv_blend_row_is_the_mean_of_network_and_probe_baselines(toy_master):
    res = dkan.tl.cross_validate(
        copy_sdata(toy_master), groupby="sample", config="small", baselines=("ridge_ctx", "knn"), progress=False,
        probe_blend=True, **FAST,
    )  # fmt: skip
    p = res.predictions
    assert set(p) == {"DKAN", "DKAN_network", "ridge_ctx", "knn"}
    expected = (p["DKAN_network"].astype(np.float64) + p["ridge_ctx"] + p["knn"]) / 3
    np.testing.assert_allclose(p["DKAN"], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(p["DKAN"], p["DKAN_network"])
    assert "DKAN_network" in res.table().index


@pytest.fixture(scope="module")
def split():
    from dkan.demo import split_toy

    return split_toy()


@pytest.fixture(scope="module")
def blended(split):
    model = dkan.tl.train(copy_sdata(split[0]), config="small", progress=False, probe_blend=True, **FAST)
    network = DKANModel(model.module, model.config, model.genes, model.gene_embeddings, model.meta, [], model.trust)
    outside = [g for g in split[0].tables[K.TABLE].var_names if g not in model.genes]
    return model, network, outside


def _predict(sdata, model, **kw):
    tkey = dkan.tl.predict(sdata, model, progress=False, **kw)
    return sdata.tables[tkey]


def test_blended_prediction_is_mean_of_network_and_stored_probes(blended, split):
    model, network, _ = blended
    assert set(model.probes) == set(ARRAY_NAMES) and model.meta["probe_blend"]["knn"]["k"] > 0
    assert model.meta[K.UNS_TRUST]["calibration"]["probe_blend"] is True  # trust calibrated on the blend
    assert np.isfinite(model.trust["val_pcc"]).any()
    got = _predict(copy_sdata(split[1]), model)
    net = _predict(copy_sdata(split[1]), network)
    assert got.uns[K.UNS][K.UNS_PREDICT]["probe_blend"] is True
    assert net.uns[K.UNS][K.UNS_PREDICT]["probe_blend"] is False
    from dkan._data.inputs import build_inputs

    held = copy_sdata(split[1])
    dkan.tl.predict(held, network, progress=False)  # prepares the inputs (features, tiles)
    (inp,), _ = build_inputs([held], model.genes, model.config, table_key=K.TABLE, with_target=False)
    ridge, knn = predict_probes(model.probes, model.meta["probe_blend"], context_input(inp))
    cols = got.var_names.get_indexer(model.genes)
    expected = (net.layers[K.PRED][:, cols].astype(np.float64) + ridge + knn) / 3
    np.testing.assert_allclose(got.layers[K.PRED][:, cols], expected, rtol=1e-5, atol=1e-5)
    # intervals come from the blend's calibration
    lo = _predict(copy_sdata(split[1]), model, interval=0.9)
    assert np.isfinite(lo.layers[f"{K.PRED}{K.LOWER_SUFFIX}"][:, cols]).all()


def test_save_load_keeps_probes_and_predictions(blended, split, tmp_path):
    model, _, _ = blended
    model.save(tmp_path / "m")
    loaded = DKANModel.load(tmp_path / "m")
    assert set(loaded.probes) == set(model.probes)
    for k, v in model.probes.items():
        np.testing.assert_array_equal(loaded.probes[k], v)
    assert loaded.meta["probe_blend"] == model.meta["probe_blend"]
    a = _predict(copy_sdata(split[1]), model).layers[K.PRED]
    b = _predict(copy_sdata(split[1]), loaded).layers[K.PRED]
    np.testing.assert_array_equal(a, b)


def test_model_without_the_option_has_no_probe_tensors(split, tmp_path):
    model = dkan.tl.train(copy_sdata(split[0]), config="small", progress=False, max_epochs=1, probe_blend=False, **{
        k: v for k, v in FAST.items() if k != "max_epochs"
    })  # fmt: skip
    assert model.probes == {} and "probe_blend" not in model.meta
    model.save(tmp_path / "plain")
    loaded = DKANModel.load(tmp_path / "plain")
    assert loaded.probes == {}
    genes_file = next((tmp_path / "plain").glob("genes.*.safetensors"))
    with safe_open(str(genes_file), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("probe.")]
    assert _predict(copy_sdata(split[1]), loaded).uns[K.UNS][K.UNS_PREDICT]["probe_blend"] is False


def test_genes_outside_the_panel_stay_network_only(blended, split):
    model, network, outside = blended
    texts = {g: f"{g} is a gene expressed in breast tissue stroma." for g in outside[:2]}
    got = _predict(copy_sdata(split[1]), model, genes=outside[:2], descriptions=texts)
    net = _predict(copy_sdata(split[1]), network, genes=outside[:2], descriptions=texts)
    cols = got.var_names.get_indexer(outside[:2])
    np.testing.assert_array_equal(got.layers[K.PRED][:, cols], net.layers[K.PRED][:, cols])
    panel = got.var_names.get_indexer(model.genes)
    assert not np.allclose(got.layers[K.PRED][:, panel], net.layers[K.PRED][:, panel])


def test_ensemble_mixing_blended_and_plain_models_is_refused(blended, split):
    model, network, _ = blended
    with pytest.raises(ValueError, match="probe_blend"):
        dkan.tl.predict(copy_sdata(split[1]), [model, network], progress=False)


def test_trust_calibrates_on_probes_fitted_on_training_rows_only(split, monkeypatch):
    import dkan._evaluation.blend as B
    from dkan.train.data import make_validation_split

    calls = []
    original = B.fit_blend_probes

    def spy(samples, train, *, seed, cache=None, rows=None):
        calls.append((list(train), rows, [s.name for s in samples], [s.grid.numpy() for s in samples]))
        return original(samples, train, seed=seed, cache=cache, rows=rows)

    monkeypatch.setattr(B, "fit_blend_probes", spy)
    model = dkan.tl.train(copy_sdata(split[0]), config="small", progress=False, probe_blend=True, **FAST)
    assert len(calls) == 2  # the stored probes (all spots), then trust's (training rows of the validation split)
    (_, stored_rows, _, _), (_, rows, names, grids) = calls
    cfg = model.config
    val = make_validation_split(names, grids, cfg.val_fraction, strategy=cfg.val_split, seed=cfg.seed)
    assert stored_rows is None
    for got, train_rows, val_rows in zip(rows, val.train, val.val, strict=True):
        np.testing.assert_array_equal(got, train_rows)
        assert not set(np.asarray(got).tolist()) & set(np.asarray(val_rows).tolist())
    assert sum(len(v) for v in val.val) > 0


def test_the_default_falls_back_to_the_network_when_the_probes_cannot_be_fitted(caplog):
    """A 16-spot slide leaves the probes' inner split without training spots: one warning, a network-only model."""
    tiny = dkan.datasets.toy(seed=0, n_samples=1, grid_size=4, n_genes=10)
    assert dkan.DKANConfig().probe_blend  # the default blends
    with caplog.at_level("WARNING", logger="dkan"):
        model = dkan.tl.train(tiny, progress=False, max_epochs=1, feature_encoder="dummy", val_fraction=0.0)
    assert "cannot be fitted" in caplog.text and "network alone" in caplog.text
    assert model.probes == {} and "probe_blend" not in model.meta
    out = copy_sdata(tiny)
    assert _predict(out, model).uns[K.UNS][K.UNS_PREDICT]["probe_blend"] is False
