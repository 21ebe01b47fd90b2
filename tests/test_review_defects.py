"""Defects found in review (issue 20, part 1, item 3): each test fails without its fix."""

from __future__ import annotations

import numpy as np
import torch
from conftest import results

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
    from dkan.train.config import DKANConfig
    from dkan.train.loop import start_at_mean
    from dkan.train.model import build_module

    cfg = DKANConfig.resolve("small", gene_output="shared")
    module = build_module(cfg, n_genes=3, gene_dim=8, feature_dim=8)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    start_at_mean(module, [], [], None, torch.zeros(3), cfg, torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
