from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from dkan.pl._history import training_history


def _history(n: int = 6, *, weights: bool = True) -> list[dict[str, float]]:
    out = []
    for e in range(n):
        rec = {"epoch": e, "total": 3.0 / (e + 1), "sup": 1.0 / (e + 1), "con": 2.0 / (e + 1), "val_pcc": 0.1 * e}
        if weights:
            rec |= {"w_sup": 0.5 + 0.05 * e, "w_con": 0.5 - 0.05 * e}
        out.append(rec)
    out[-1]["val_pcc"] = 0.0  # best epoch is n - 2
    return out


class _FakeModel:
    def __init__(self, history):
        self.history = history


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _lines(ax) -> dict[str, np.ndarray]:
    return {
        ln.get_label(): np.asarray(ln.get_ydata(), float) for ln in ax.get_lines() if ln.get_label() != "best epoch"
    }


def test_three_panels_with_every_series(tmp_path):
    hist = _history()
    fig = training_history(_FakeModel(hist), return_fig=True, save=tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    losses, weights, val = fig.axes
    assert len(fig.axes) == 3
    got = _lines(losses)
    assert set(got) == {"total", "supervised", "contrastive"}
    np.testing.assert_allclose(got["total"], [r["total"] for r in hist])
    np.testing.assert_allclose(got["contrastive"], [r["con"] for r in hist])
    np.testing.assert_allclose(_lines(weights)["w_con"], [r["w_con"] for r in hist])
    np.testing.assert_allclose(_lines(val)["mean PCC"], [r["val_pcc"] for r in hist])
    np.testing.assert_array_equal(losses.get_lines()[0].get_xdata(), np.arange(6))
    for ax in fig.axes:
        (best,) = [ln for ln in ax.get_lines() if ln.get_label() == "best epoch"]
        assert best.get_xdata()[0] == 4


def test_fixed_weights_gives_two_panels_and_dataframe_input():
    fig = training_history(pd.DataFrame(_history(weights=False)), return_fig=True)
    assert [a.get_title() for a in fig.axes] == ["Losses", "Validation"]


def test_user_axes_and_errors():
    _, axes = plt.subplots(1, 3)
    assert training_history(_history(), ax=axes) is None
    assert all(a.get_lines() for a in axes)
    with pytest.raises(ValueError, match="3 axes"):
        training_history(_history(), ax=axes[:2])
    with pytest.raises(ValueError, match="empty training history"):
        training_history(_FakeModel([]))
    with pytest.raises(TypeError, match="model_or_history"):
        training_history(42)
    with pytest.raises(ValueError, match="nothing to plot"):
        training_history([{"epoch": 0}])
