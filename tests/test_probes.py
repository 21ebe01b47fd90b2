"""Tuned probes (ridge, ridge_ctx, kNN): parameter chosen on training samples only, and they find real signal."""

import numpy as np
import pytest
import torch

from dkan._evaluation import probes
from dkan._evaluation.probes import baseline_fold
from dkan.tl._cv import BASELINES
from dkan.train.data import SampleInputs

N_SIDE, D, G, T = 12, 16, 6, 25


def _sample(name: str, rng: np.random.Generator, w: np.ndarray, *, marker: float | None = None) -> SampleInputs:
    """A grid of spots whose targets depend on the spot features and on the mean of the region tiles."""
    n = N_SIDE * N_SIDE
    grid = np.stack(np.meshgrid(np.arange(N_SIDE), np.arange(N_SIDE), indexing="ij"), -1).reshape(-1, 2)
    spot = rng.normal(size=(n, D))
    region = rng.normal(size=(n, T, D))
    mask = (rng.random((n, T)) > 0.2).astype(np.float32)
    ctx = (region * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
    target = np.tanh(spot @ w[:D] + 3 * ctx @ w[D:]) + 0.3 * rng.normal(size=(n, G))
    if marker is not None:  # identifies the rows of this sample wherever they end up
        spot[:, 0] = marker
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))
    return SampleInputs(name, t(spot), t(region), t(mask), torch.as_tensor(grid), t(target))


def _samples(n: int, seed: int = 0) -> list[SampleInputs]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(2 * D, G)) / np.sqrt(D)
    return [_sample(f"s{i}", rng, w) for i in range(n)]


def _replace_test(samples: list[SampleInputs], i: int) -> list[SampleInputs]:
    rng = np.random.default_rng(123)
    other = _sample("other", rng, rng.normal(size=(2 * D, G)) * 5)
    return [other if j == i else s for j, s in enumerate(samples)]


@pytest.mark.parametrize("n_train", [3, 2])
@pytest.mark.parametrize("name", ["ridge", "ridge_ctx", "knn"])
def test_tuned_parameter_never_depends_on_the_test_section(name, n_train):
    samples = _samples(n_train + 1)
    train, test = list(range(n_train)), [n_train]
    _, params = baseline_fold(name, samples, train, test, seed=0)
    _, params_other = baseline_fold(name, _replace_test(samples, n_train), train, test, seed=0)
    key = "k" if name == "knn" else "alpha"
    assert params[key] == params_other[key]
    assert params["inner_pcc"] == params_other["inner_pcc"]  # the whole inner search, not only its winner
    expected = "leave one of the 3 training samples out" if n_train == 3 else "spatial blocks"
    assert expected in params["inner_split"]


@pytest.mark.parametrize("n_train", [3, 2])
def test_inner_split_uses_only_training_sections(monkeypatch, n_train):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2 * D, G)) / np.sqrt(D)
    samples = [_sample(f"s{i}", rng, w, marker=float(i)) for i in range(n_train)]
    samples.append(_sample("test", rng, w, marker=99.0))
    seen: list[np.ndarray] = []
    original = probes._scores

    def spy(kind, x_tr, y_tr, x_va, y_va, **kw):
        seen.extend([x_tr[:, 0], x_va[:, 0]])
        assert len(x_va) and len(x_tr)
        return original(kind, x_tr, y_tr, x_va, y_va, **kw)

    monkeypatch.setattr(probes, "_scores", spy)
    baseline_fold("ridge", samples, list(range(n_train)), [n_train], seed=0)
    markers = set(np.unique(np.concatenate(seen)).tolist())
    assert markers == set(map(float, range(n_train)))  # every training sample, never the test one
    if n_train == 3:  # leave-one-out: each inner validation set is exactly one training sample
        assert [set(np.unique(v).tolist()) for v in seen[1::2]] == [{0.0}, {1.0}, {2.0}]


@pytest.mark.parametrize("name", ["ridge", "ridge_ctx", "knn"])
def test_probes_beat_the_training_mean_where_there_is_signal(name):
    samples = _samples(4)
    train, test = [0, 1, 2], [3]
    pred = baseline_fold(name, samples, train, test, seed=0)[0][0]
    mean = baseline_fold("mean", samples, train, test, seed=0)[0][0]
    y = samples[3].target.numpy()
    assert ((pred - y) ** 2).mean() < 0.9 * ((mean - y) ** 2).mean()
    r = [np.corrcoef(pred[:, g], y[:, g])[0, 1] for g in range(G)]
    assert np.mean(r) > 0.3


def test_context_probe_uses_the_region_tiles():
    """The targets depend on the region mean: the context ridge must beat the spot-only ridge."""
    samples = _samples(4)
    y = samples[3].target.numpy()
    mse = {
        n: ((baseline_fold(n, samples, [0, 1, 2], [3], seed=0)[0][0] - y) ** 2).mean() for n in ("ridge", "ridge_ctx")
    }
    assert mse["ridge_ctx"] < mse["ridge"]


def test_baselines_list_and_hest_row_kept():
    assert BASELINES == ("mean", "ridge_hest", "ridge", "ridge_ctx", "knn")
    _, params = baseline_fold("ridge_hest", _samples(3), [0, 1], [2], seed=0)
    assert "HEST" in params["protocol"]


def test_fit_probe_rejects_bad_input():
    with pytest.raises(ValueError, match="Unknown probe"):
        probes.fit_probe("lasso", [np.zeros((3, 2))], [np.zeros((3, 1))], [np.zeros((3, 2))])
    with pytest.raises(ValueError, match="one entry per training sample"):
        probes.fit_probe("ridge", [np.zeros((3, 2))], [], [np.zeros((3, 2))])
