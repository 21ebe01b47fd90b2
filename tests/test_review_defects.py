"""Defects found in review (issue 20, part 1, item 3): each test fails without its fix."""

from __future__ import annotations

import numpy as np
import torch
from conftest import benchmark_modules, results

import dkan
from dkan import _keys as K
from dkan.datasets import copy_sdata

FAST = {"feature_encoder": "dummy", "n_genes": 20}


def test_first_prediction_is_the_training_mean(toy):
    """The untrained network (a 1e-9 learning rate for one epoch) predicts each gene's training mean on average."""
    model = dkan.tl.train(toy, config="small", progress=False, max_epochs=1, lr=1e-9, val_fraction=0.0, **FAST)
    new = copy_sdata(toy)
    dkan.tl.predict(new, model, progress=False)
    table = results(new)[:, model.genes]
    pred, target = np.asarray(table.layers[K.PRED]), np.asarray(table.layers[K.TARGET])
    np.testing.assert_allclose(pred.mean(0), target.mean(0), atol=2e-3)
    assert pred.std(0).max() > 0  # the head is not zeroed: spots still differ, and gradients reach every layer


def test_start_at_mean_is_a_no_op_for_the_shared_output():
    from dkan._config import DKANConfig
    from dkan.train.fitted import build_module
    from dkan.train.loop import start_at_mean

    cfg = DKANConfig.resolve("small", gene_output="shared")
    module = build_module(cfg, n_genes=3, gene_dim=8, feature_dim=8)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    start_at_mean(module, [], [], None, torch.zeros(3), cfg, torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_output_heads_run_in_float32_under_bf16_autocast():
    """Under autocast (bf16 on CUDA in validation and prediction; here CPU bf16) the outputs are float32."""
    from test_nn_model import make_batch, make_model

    model = make_model().eval()
    batch = make_batch()
    with torch.no_grad():
        ref = model(batch)["pred"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch)
    assert out["z_img"].dtype == torch.bfloat16  # autocast is really on for the rest of the network
    for key in ("pred", "pred_fusion", "pred_patch", "pred_region", "pred_slide"):
        assert out[key].dtype == torch.float32, key
    torch.testing.assert_close(out["pred"], ref, atol=0.1, rtol=0.05)


class _OnDevice(torch.nn.Module):
    """A module whose parameters claim to live on ``device`` (no accelerator is needed to inspect it)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self._device = torch.device(device)

    def parameters(self, recurse: bool = True):
        yield type("P", (), {"device": self._device})()


def test_mc_dropout_forks_the_generator_of_the_models_device(monkeypatch):
    import contextlib

    from dkan.nn.inference import draws, rng_devices

    assert rng_devices([torch.nn.Linear(2, 2)]) == ([], "cuda")  # CPU: only the CPU generator
    assert rng_devices([_OnDevice("cuda:1"), _OnDevice("cuda:1")]) == ([1], "cuda")
    calls = []

    @contextlib.contextmanager
    def fork(devices=None, enabled=True, device_type="cuda", **kwargs):
        calls.append((list(devices), device_type))
        yield

    monkeypatch.setattr(torch.random, "fork_rng", fork)
    _, std = draws(lambda m, mc: np.random.default_rng().normal(size=(3, 2)), [_OnDevice("cuda:1")], 3, 0)
    assert calls == [([1], "cuda")] and std is not None


def _texts(genes, word):
    return {g: f"{g} is a {word} gene of breast tissue." for g in genes}


def test_train_with_new_descriptions_embeds_them_again(toy, toy_master, caplog):
    """Stored embeddings of the same encoder are reused only for the texts they were made from."""
    genes = list(toy.tables[K.TABLE].var_names)
    first = dkan.tl.train(
        toy, config="small", progress=False, max_epochs=1, descriptions=_texts(genes, "stromal"), **FAST
    )
    again = dkan.tl.train(
        toy, config="small", progress=False, max_epochs=1, descriptions=_texts(genes, "stromal"), **FAST
    )
    np.testing.assert_array_equal(first.gene_embeddings, again.gene_embeddings)  # same texts: reused
    with caplog.at_level("WARNING", logger="dkan"):
        new = dkan.tl.train(
            toy, config="small", progress=False, max_epochs=1, descriptions=_texts(genes, "immune"), **FAST
        )
    assert "other texts" in caplog.text
    assert not np.allclose(first.gene_embeddings, new.gene_embeddings)
    fresh = copy_sdata(toy_master)  # nothing stored yet
    ref = dkan.tl.train(
        fresh, config="small", progress=False, max_epochs=1, descriptions=_texts(genes, "immune"), **FAST
    )
    np.testing.assert_allclose(new.gene_embeddings, ref.gene_embeddings, rtol=1e-5, atol=1e-6)
    # no texts given: whatever is stored (the user's own `embed_genes`) is used
    kept = dkan.tl.train(toy, config="small", progress=False, max_epochs=1, **FAST)
    np.testing.assert_array_equal(kept.gene_embeddings, new.gene_embeddings)


def test_ensemble_members_use_their_own_gene_embeddings(toy):
    import copy

    from dkan.train.fitted import DKANModel

    a = dkan.tl.train(toy, config="small", progress=False, max_epochs=1, **FAST)
    other = a.gene_embeddings[::-1].copy()  # the same panel embedded from other texts
    b = DKANModel(copy.deepcopy(a.module), a.config, a.genes, other, a.meta, a.history, a.trust, a.probes)
    new = copy_sdata(toy)
    dkan.tl.predict(new, a, key_added="a", progress=False)
    dkan.tl.predict(new, b, key_added="b", progress=False)
    dkan.tl.predict(new, [a, b], progress=False)
    table = results(new)[:, a.genes]
    pa, pb = np.asarray(table.layers["a"]), np.asarray(table.layers["b"])
    assert not np.allclose(pa, pb, atol=1e-3)
    np.testing.assert_allclose(table.layers[K.PRED], (pa + pb) / 2, rtol=1e-5, atol=1e-5)


def _her2st_report():
    with benchmark_modules("_her2st_report") as (module,):
        return module


def test_her2st_report_states_the_validation_split_that_training_used():
    from dkan._config import DKANConfig

    rep = _her2st_report()
    names = ["C2", "C3", "C4", "C5", "C6"]
    grids = [np.stack(np.meshgrid(np.arange(12), np.arange(12)), -1).reshape(-1, 2) for _ in names]
    folds = [[n] for n in names]
    cfg = DKANConfig.resolve("small")  # val_split="auto": whole training sections with 4 training sections
    splits = rep.validation_splits(cfg, names, grids, folds)
    assert list(splits) == names
    for test, text in splits.items():
        assert text.startswith("held-out training sections") and test not in text
    sentence = rep.validation_protocol(cfg, splits)
    assert "random" not in sentence and "val_split='auto'" in sentence and "test C2: held-out" in sentence
    rnd = cfg.replace(val_split="random")
    assert "a random 10% of the spots" in rep.validation_protocol(rnd, rep.validation_splits(rnd, names, grids, folds))


def test_shuffled_texts_give_the_shuffled_embeddings_over_stored_ones(toy):
    """The parallel `shuffled_text` benchmark path: stored embeddings, then the same panel with permuted texts."""
    import pandas as pd

    from dkan._data import prepare as prep
    from dkan.tl._cv import shuffle_gene_text

    genes = list(toy.tables[K.TABLE].var_names[:12])
    desc = pd.DataFrame({"text": [f"{g} marks cell type number {i}." for i, g in enumerate(genes)]}, index=genes)
    kw = {"table_key": None, "text_encoder": "minilm", "progress": False}
    emb, _ = prep.gene_embeddings(toy, genes, descriptions=desc, **kw)
    shuffled = desc.copy()
    shuffled["text"] = shuffle_gene_text(desc["text"].to_numpy())
    got, _ = prep.gene_embeddings(toy, genes, descriptions=shuffled, **kw)
    order = [list(desc["text"]).index(t) for t in shuffled["text"]]
    assert order != list(range(len(genes)))
    np.testing.assert_allclose(got, emb[order], rtol=1e-4, atol=1e-5)
