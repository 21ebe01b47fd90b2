"""Catalogue of bad inputs and faults in training: non-finite values, unusable validation data, model selection,
mismatched resumes (issue 12 items 4-6, issue 14 item 2).

Each case asserts the exception type and a phrase of its message, or the state kept (on disk or in the result).
The loop cases run :func:`dkan.train.loop.fit` on tiny synthetic tensors (CPU, a second or two each).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import results

from dkan._config import DKANConfig
from dkan.train.data import SampleInputs, make_validation_split
from dkan.train.fitted import build_module
from dkan.train.loop import NonFiniteLossError, fit

N_GENES, GENE_DIM, FEAT_DIM, SIDE = 6, 10, 12, 8

FAST = DKANConfig.resolve(
    "small",
    max_epochs=2,
    batch_size=32,
    lr=1e-2,
    amp=False,
    min_epochs=0,
    val_window=1,
    contrastive_genes=None,
)


def _samples(n: int = 2, *, seed: int = 0, n_genes: int = N_GENES, feat_dim: int = FEAT_DIM) -> list[SampleInputs]:
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij"), -1).reshape(-1, 2)
    out = []
    for i in range(n):
        spot = torch.randn(SIDE * SIDE, feat_dim, generator=g)
        target = spot[:, :n_genes] * 0.5 + 0.1 * torch.randn(SIDE * SIDE, n_genes, generator=g)
        out.append(
            SampleInputs(
                f"s{i}",
                spot,
                torch.randn(SIDE * SIDE, 25, feat_dim, generator=g),
                torch.ones(SIDE * SIDE, 25, dtype=torch.bool),
                grid,
                target,
            )
        )
    return out


def _fit(cfg=FAST, samples=None, *, val=None, genes_dim: int = GENE_DIM, **kwargs):
    samples = samples if samples is not None else _samples()
    n_genes = samples[0].target.shape[1]
    if val is None:
        split = make_validation_split(
            [s.name for s in samples], [s.grid.numpy() for s in samples], cfg.val_fraction, strategy="random", seed=0
        )
        train, val = split.train, split.val
    else:
        train = [np.setdiff1d(np.arange(len(s)), v) for s, v in zip(samples, val, strict=True)]
    torch.manual_seed(cfg.seed)
    module = build_module(cfg, n_genes=n_genes, gene_dim=genes_dim, feature_dim=samples[0].spot.shape[1])
    genes = torch.randn(n_genes, genes_dim, generator=torch.Generator().manual_seed(1))
    result = fit(module, samples, train, val, genes, cfg, device=torch.device("cpu"), progress=False, **kwargs)
    return module, result


# ---------------------------------------------------------------------- item 4: non-finite and absurd settings
@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        ({"lr": float("inf")}, "`lr` to be a finite number"),
        ({"lr": float("nan")}, "`lr` to be a finite number"),
        ({"lr": 1e3}, "`lr` to be in (0, 1]"),
        ({"weight_decay": float("inf")}, "`weight_decay` to be a finite number"),
        ({"weight_decay": 50.0}, "`weight_decay` to be in [0, 1]"),
        ({"temperature": float("nan")}, "`temperature` to be a finite number"),
        ({"fusion_mlp_ratio": float("inf")}, "`fusion_mlp_ratio` to be a finite number"),
        ({"grad_clip": float("inf")}, "`grad_clip` to be a finite number"),
        ({"gamma": float("nan")}, "`gamma` to be a finite number"),
        ({"distill": float("nan")}, "`distill` to be a finite number"),
        ({"target_mpp": float("inf")}, "`target_mpp` to be a finite number"),
        ({"val_fraction": float("nan")}, "`val_fraction` to be a finite number"),
        ({"select_metric": "auc"}, "`select_metric` to be one of"),
        ({"val_split": "folds"}, "`val_split` to be one of"),
        ({"val_window": 0}, "`val_window` to be >= 1"),
        ({"min_epochs": -1}, "`min_epochs` to be >= 0"),
    ],
)
def test_config_refuses_non_finite_or_absurd_values(overrides, phrase):
    with pytest.raises(ValueError) as info:
        DKANConfig.resolve("small", **overrides)
    assert phrase in str(info.value)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_normalize_refuses_non_finite_counts_naming_table_spot_and_gene(toy, value):
    import dkan
    from dkan import _keys as K

    adata = toy.tables[K.TABLE]
    x = np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X, dtype=np.float64)
    x[7, 3] = value
    adata.X = x
    spot, gene = adata.obs_names[7], adata.var_names[3]
    with pytest.raises(ValueError, match="non-finite count") as info:
        dkan.pp.normalize(toy, genes=list(adata.var_names))
    msg = str(info.value)
    assert repr(K.TABLE) in msg and repr(spot) in msg and repr(gene) in msg
    assert K.TARGET not in adata.layers and list(toy.tables) == [K.TABLE]  # nothing written


def test_normalize_ignores_non_finite_counts_outside_the_genes(toy):
    import dkan
    from dkan import _keys as K

    adata = toy.tables[K.TABLE]
    x = np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X, dtype=np.float64)
    x[0, -1] = np.nan
    adata.X = x
    dkan.pp.normalize(toy, genes=list(adata.var_names[:-1]))
    assert np.isfinite(results(toy).layers[K.TARGET]).all()


def test_build_inputs_refuses_a_non_finite_target(toy):
    import dkan
    from dkan import _keys as K
    from dkan._data.inputs import build_inputs

    adata = toy.tables[K.TABLE]
    genes = list(adata.var_names[:5])
    dkan.pp.normalize(toy, genes=genes)
    n = adata.n_obs
    adata = results(toy)  # targets and features live in the results table
    adata.obsm[K.SPOT_FEATURES] = np.zeros((n, 4), np.float32)
    adata.obsm[K.REGION_FEATURES] = np.zeros((n, 25, 4), np.float32)
    adata.obsm[K.REGION_MASK] = np.ones((n, 25), bool)
    adata.obsm[K.GRID] = np.zeros((n, 2), np.int64)
    adata.layers[K.TARGET][2, 1] = np.inf
    with pytest.raises(ValueError, match="non-finite") as info:
        build_inputs([toy], genes, FAST, table_key=None, with_target=True)
    assert repr(adata.obs_names[2]) in str(info.value) and repr(genes[1]) in str(info.value)
    adata.layers[K.TARGET][2, 1] = 0.0
    adata.obsm[K.SPOT_FEATURES][5, 0] = np.nan
    with pytest.raises(ValueError, match="dkan_spot_features"):
        build_inputs([toy], genes, FAST, table_key=None, with_target=True)


def test_non_finite_target_stops_training_at_epoch_0():
    samples = _samples()
    samples[0].target[3, 2] = float("inf")
    with pytest.raises(NonFiniteLossError, match="epoch 0") as info:
        _fit(samples=samples)
    assert "`sup`" in str(info.value) and "No checkpoint was requested" in str(info.value)
    assert isinstance(info.value, ValueError)  # catchable with the other input errors


def test_loss_turning_non_finite_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from dkan.nn.losses import DKANLoss

    ckpt = tmp_path / "run.pt"
    _fit(FAST.replace(max_epochs=1), checkpoint=ckpt)
    good = ckpt.read_bytes()
    real = DKANLoss.__call__

    def poisoned(self, out, target):  # a fault in the second run: every loss is NaN
        loss = real(self, out, target)
        return {**loss, "loss": loss["loss"] * float("nan"), "sup": loss["sup"] * float("nan")}

    monkeypatch.setattr(DKANLoss, "__call__", poisoned)
    with pytest.raises(NonFiniteLossError, match="epoch 1") as info:
        _fit(FAST.replace(max_epochs=3), checkpoint=ckpt, resume=True)
    assert "last good epoch is kept" in str(info.value) and "`sup`=nan" in str(info.value)
    assert ckpt.read_bytes() == good  # the NaN epoch was never written


# ---------------------------------------------------------------------- item 5: no usable validation data
def test_no_validation_keeps_the_last_epoch_and_says_so():
    _, result = _fit(FAST.replace(val_fraction=0.0, max_epochs=3, patience=0))
    assert len(result.history) == 3 and result.best_state is None
    assert result.best_epoch == 2 and result.history[-1]["selected"] is True
    assert "val_fraction=0" in result.selection["reason"]
    assert "val_pcc" not in result.history[0]


@pytest.mark.parametrize(
    ("val", "exc", "phrase"),
    [
        ([np.array([0, 1]), np.array([5])], ValueError, "Too few validation spots"),
        ([np.zeros(0, int), np.zeros(0, int)], ValueError, "left no validation spots"),
        ([np.arange(SIDE * SIDE), np.arange(SIDE * SIDE)], ValueError, "No training spots"),
    ],
)
def test_unusable_validation_is_refused_with_the_fix(val, exc, phrase):
    with pytest.raises(exc, match=phrase) as info:
        _fit(val=val)
    assert "val_fraction" in str(info.value)


def test_never_finite_validation_score_keeps_the_last_epoch(caplog):
    samples = _samples()
    samples[1].target[:] = 1.0  # constant validation targets: no Pearson r is defined
    val = [np.zeros(0, int), np.arange(SIDE * SIDE)]
    with caplog.at_level("WARNING", logger="dkan"):
        _, result = _fit(FAST.replace(max_epochs=3, patience=0), samples=samples, val=val)
    assert result.best_state is None and result.best_epoch == result.history[-1]["epoch"]
    assert "never finite" in result.selection["reason"] and "never finite" in caplog.text


def test_train_with_val_fraction_zero_records_the_choice(toy):
    import dkan

    model = dkan.tl.train(toy, progress=False, max_epochs=2, feature_encoder="dummy", val_fraction=0.0)
    sel = model.meta["train"]["selection"]
    assert sel["epoch"] == 1 and "last epoch" in sel["reason"] and sel["validation"].startswith("no validation")
    assert [r.get("selected", False) for r in model.history] == [False, True]


def test_train_refuses_a_split_with_too_few_validation_spots(toy):
    import dkan

    with pytest.raises(ValueError, match="Too few validation spots") as info:
        dkan.tl.train(toy, progress=False, max_epochs=1, feature_encoder="dummy", val_fraction=0.01, val_split="blocks")
    assert "val_fraction=0" in str(info.value)  # the fix is named


# ---------------------------------------------------------------------- issue 14 item 2: model selection
def test_reference_presets_keep_the_reference_selection_rule():
    from dkan._config import PRESETS

    for name in ("her2st", "stnet", "cscc"):
        cfg = PRESETS[name]
        assert (cfg.val_window, cfg.min_epochs, cfg.select_metric) == (1, 0, "pcc"), name
    assert (PRESETS["small"].val_window, PRESETS["small"].min_epochs) == (3, 20)


def test_sections_split_holds_out_whole_training_sections():
    grids = [np.argwhere(np.ones((SIDE, SIDE)))] * 4
    split = make_validation_split(["a", "b", "c", "d"], grids, 0.25, strategy="auto", seed=0)
    assert split.strategy == "sections"
    held = [i for i, v in enumerate(split.val) if len(v)]
    assert len(held) == 1 and len(split.train[held[0]]) == 0
    assert all(len(split.train[i]) == SIDE * SIDE for i in range(4) if i not in held)
    assert str(["a", "b", "c", "d"][held[0]]) in split.description


def test_sections_split_needs_two_samples():
    with pytest.raises(ValueError, match="val_split='blocks'"):
        make_validation_split(["a"], [np.zeros((9, 2), int)], 0.1, strategy="sections", seed=0)


@pytest.mark.parametrize("kind", ["square", "hex"])
def test_block_split_shares_no_counts_through_the_smoothing(kind):
    """No training target mixes a spot that a validation target mixes (3x3 / hex neighbour smoothing)."""
    from dkan.pp._grid import neighbour_average

    rc = np.argwhere(np.ones((30, 30)))
    if kind == "hex":  # Visium: doubled columns, one parity per row; the slide grid halves the column
        rc = rc[(rc[:, 0] + rc[:, 1]) % 2 == 0]
    grid = np.c_[rc[:, 0], rc[:, 1] // 2] if kind == "hex" else rc
    split = make_validation_split(["a", "b"], [grid, grid], 0.1, strategy="auto", seed=3)
    assert split.strategy == "blocks" and split.n_buffer > 0
    w = neighbour_average(rc, kind)
    shared = (w @ w.T).tocsr()
    for train, val in zip(split.train, split.val, strict=True):
        assert abs(len(val) - 0.1 * len(rc)) <= 0.1 * len(rc)
        assert shared[val][:, train].nnz == 0
        assert not set(train) & set(val)


def test_random_split_is_still_available():
    split = make_validation_split(["a"], [np.zeros((50, 2), int)], 0.2, strategy="random", seed=0)
    assert split.strategy == "random" and len(split.val[0]) == 10 and len(split.train[0]) == 40


def _history(scores: dict[str, list[float]]) -> list[dict]:
    n = len(next(iter(scores.values())))
    return [{"epoch": e, **{k: v[e] for k, v in scores.items()}} for e in range(n)]


def _select(cfg: DKANConfig, history: list[dict]):
    from dkan.train._selection import finish_selection, should_stop, smoothed_score, update_best
    from dkan.train.loop import FitResult

    module, result, bad, stopped = torch.nn.Linear(1, 1), FitResult(), 0, None
    for rec in history:
        rec["val_score"] = smoothed_score([*result.history, rec], cfg)
        result.history.append(rec)
        bad = update_best(module, result, rec, rec["epoch"], bad, cfg)
        if should_stop(bad, rec["epoch"], cfg):
            stopped = rec["epoch"]
            break
    finish_selection(result, cfg, has_val=True, stopped=stopped)
    return result


NOISY = [0.1, 0.5, 0.1, 0.2, 0.3, 0.35, 0.4, 0.38, 0.39, 0.37, 0.36, 0.35]  # a lucky spike at epoch 1


def test_smoothed_score_ignores_a_lucky_epoch():
    cfg = DKANConfig(val_window=3, min_epochs=0, patience=20, max_epochs=12)
    raw = DKANConfig(val_window=1, min_epochs=0, patience=20, max_epochs=12)
    assert _select(raw, _history({"val_pcc": NOISY})).best_epoch == 1
    smooth = _select(cfg, _history({"val_pcc": NOISY}))
    assert smooth.best_epoch == 8 and "mean over epochs 6-8" in smooth.selection["reason"]


def test_min_epochs_delays_early_stopping():
    scores = {"val_pcc": [0.5] + [0.1] * 11}
    early = _select(DKANConfig(val_window=1, min_epochs=0, patience=2, max_epochs=12), _history(scores))
    assert len(early.history) == 3 and "early stopping at epoch 2" in early.selection["stopped"]
    late = _select(DKANConfig(val_window=1, min_epochs=8, patience=2, max_epochs=12), _history(scores))
    assert len(late.history) == 8 and late.best_epoch == 0


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_fit_stops_after_exactly_patience_epochs_without_improvement(monkeypatch, patience):
    import dkan.train.loop as loop

    scores = iter([0.5] + [0.1] * 20)  # best at epoch 0, never better again
    monkeypatch.setattr(
        loop, "validation_metrics", lambda *a, **k: {"val_pcc": next(scores), "val_mse": 1.0, "val_r2": 0.0}
    )
    _, result = _fit(FAST.replace(max_epochs=10, patience=patience))
    assert len(result.history) == 1 + patience, "epochs run: the best one, then `patience` without improvement"
    assert f"early stopping at epoch {patience}" in result.selection["stopped"]


@pytest.mark.parametrize(("metric", "best"), [("pcc", 1), ("mse", 2), ("both", 0)])
def test_selection_metric_is_the_users_choice(metric, best):
    hist = _history({"val_pcc": [0.5, 0.6, 0.2], "val_mse": [0.2, 0.9, 0.1], "val_r2": [0.8, -0.5, 0.3]})
    result = _select(DKANConfig(val_window=1, min_epochs=0, select_metric=metric, max_epochs=3), hist)
    assert result.best_epoch == best and result.selection["metric"] == metric
    assert [bool(r.get("selected")) for r in result.history] == [i == best for i in range(3)]


def test_fit_records_metrics_and_selected_epoch():
    _, result = _fit(FAST.replace(max_epochs=3, val_window=2, select_metric="both"))
    rec = result.history[0]
    assert {"val_pcc", "val_mse", "val_r2", "val_score"} <= set(rec)
    assert result.best_epoch >= 1  # the first full window ends at epoch 1
    assert sum(bool(r.get("selected")) for r in result.history) == 1


def test_loss_sees_float32_targets_and_predictions_under_autocast(monkeypatch):
    """Under bf16 autocast the targets are not rounded to the prediction's dtype (CPU autocast stands in for CUDA)."""
    import contextlib

    from dkan.nn.losses import DKANLoss
    from dkan.train import loop

    seen = []
    real = DKANLoss.__call__

    def spy(self, out, target):
        seen.append((out["pred"].dtype, target.dtype))
        return real(self, out, target)

    def cpu_bf16(device, enabled):
        return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()

    monkeypatch.setattr(DKANLoss, "__call__", spy)
    monkeypatch.setattr(loop, "_autocast", cpu_bf16)
    _fit(FAST.replace(max_epochs=1, amp=True))
    assert seen and all(p == torch.float32 and t == torch.float32 for p, t in seen)


# ---------------------------------------------------------------------- item 6: resume on other data or settings
@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "run.pt"
    _fit(FAST.replace(max_epochs=1), checkpoint=path)
    return path


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"cfg": {"d": 32}}, "config `d`: 128"),
        ({"cfg": {"slide_depth": 3}}, "config `slide_depth`"),
        ({"cfg": {"lr": 1e-3}}, "config `lr`"),
        ({"n_genes": 5}, "n_genes: 6 in the checkpoint, 5 now"),
        ({"feat_dim": 14}, "feature_dim: 12 in the checkpoint, 14 now"),
        ({"n_samples": 3}, "samples: 2 in the checkpoint, 3 now"),
        ({"gene_dim": 8}, "gene_dim"),
        ({"identity": {"genes": ["A", "B", "C", "X", "E", "F"]}}, "first difference at position 3: 'D' vs 'X'"),
    ],
)
def test_resume_on_other_data_or_settings_is_refused(tmp_path, change, phrase):
    path = tmp_path / "run.pt"
    _fit(FAST.replace(max_epochs=1), checkpoint=path, identity={"genes": list("ABCDEF")})
    before = path.read_bytes()
    cfg = FAST.replace(max_epochs=2, **change.get("cfg", {}))
    samples = _samples(
        change.get("n_samples", 2), n_genes=change.get("n_genes", N_GENES), feat_dim=change.get("feat_dim", FEAT_DIM)
    )
    ident = change.get("identity", {"genes": list("ABCDEF")})
    with pytest.raises(ValueError, match="other data or settings") as info:
        _fit(cfg, samples, genes_dim=change.get("gene_dim", GENE_DIM), checkpoint=path, resume=True, identity=ident)
    assert phrase in str(info.value) and "resume=False" in str(info.value)
    assert path.read_bytes() == before  # the checkpoint is left as it was


def test_resume_with_more_epochs_continues(checkpoint):
    _, result = _fit(FAST.replace(max_epochs=3, patience=50), checkpoint=checkpoint, resume=True)
    assert [r["epoch"] for r in result.history] == [0, 1, 2]


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04garbage"])
def test_resume_from_a_corrupt_checkpoint_is_refused(tmp_path, content):
    path = tmp_path / "run.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="cannot be read"):
        _fit(checkpoint=path, resume=True)
    assert path.read_bytes() == content


def test_resume_from_a_foreign_torch_file_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    torch.save({"module": {}, "epoch": 3}, path)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        _fit(checkpoint=path, resume=True)


def test_history_plot_marks_the_selected_epoch():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dkan.pl._history import training_history

    hist = [{"epoch": e, "total": 1.0, "val_pcc": [0.1, 0.9, 0.2, 0.3][e]} for e in range(4)]
    hist[3]["selected"] = True  # chosen on a smoothed score or another metric, not the raw best PCC (epoch 1)
    fig = training_history(hist, return_fig=True)
    marks = [ln.get_xdata()[0] for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == "best epoch"]
    plt.close(fig)
    assert marks and set(marks) == {3}


def test_block_split_that_leaves_no_training_spots_is_refused():
    grid = np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"), -1).reshape(-1, 2)
    with pytest.raises(ValueError, match="leaves no training spots"):
        make_validation_split(["a", "b"], [grid, grid], 0.25, strategy="blocks", seed=1)
