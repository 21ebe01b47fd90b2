"""``dkan.pl.training_history``: losses, adaptive loss weights and validation PCC per epoch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any

import numpy as np

from dkan.pl._utils import finish_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Panels: (title, y label, history keys with their legend labels).
_PANELS = (
    ("Losses", "loss", (("total", "total"), ("sup", "supervised"), ("con", "contrastive"))),
    ("Adaptive loss weights", "weight", (("w_sup", "w_sup"), ("w_con", "w_con"))),
    ("Validation", "PCC", (("val_pcc", "mean PCC"),)),
)


def training_history(
    model_or_history: Any,
    *,
    ax: Axes | Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    return_fig: bool = False,
    save: str | PathLike[str] | None = None,
) -> Figure | None:
    """Plot a training run per epoch: losses, adaptive loss weights and validation PCC.

    Panels without any recorded value are left out (e.g. the weights when the run used fixed weights), so
    the figure has up to three panels. The epoch training selected (``"selected"`` in its record; else the best
    validation PCC) is marked on every panel.

    Parameters
    ----------
    model_or_history
        A :class:`dkan.DKANModel` (its ``history``), a list of per-epoch dicts with keys among ``epoch``,
        ``total``, ``sup``, ``con``, ``w_sup``, ``w_con``, ``val_pcc``, or a DataFrame with those columns.
    ax
        Axes to draw on, one per panel that has data; a new figure when None.
    figsize, dpi
        Size and resolution of a new figure.
    return_fig
        Return the figure.
    save
        Path to save the figure to.

    Returns
    -------
    The figure when ``return_fig`` is True, else None.
    """
    records = _records(model_or_history)
    epochs = np.array([r.get("epoch", i) for i, r in enumerate(records)], dtype=float)
    series = {key: _series(records, key) for _, _, keys in _PANELS for key, _ in keys}
    panels = [p for p in _PANELS if any(np.isfinite(series[k]).any() for k, _ in p[2])]
    if not panels:
        raise ValueError(
            f"`model_or_history` records none of {[k for p in _PANELS for k, _ in p[2]]} per epoch; nothing to plot."
        )
    axes = _axes(ax, len(panels), figsize=figsize, dpi=dpi)
    chosen = [e for e, r in zip(epochs, records, strict=True) if r.get("selected")]  # the epoch training kept
    best = float(chosen[0]) if chosen else _best_epoch(epochs, series["val_pcc"])
    for a, (title, ylabel, keys) in zip(axes, panels, strict=True):
        for key, label in keys:
            y = series[key]
            if np.isfinite(y).any():
                a.plot(epochs, y, marker="o" if len(epochs) < 30 else None, ms=3, label=label)
        if best is not None:
            a.axvline(best, color="0.5", ls="--", lw=1, label="best epoch")
        a.set_title(title)
        a.set_xlabel("epoch")
        a.set_ylabel(ylabel)
        a.legend(fontsize="small")
    fig = axes[0].figure
    return finish_figure(fig, return_fig=return_fig, save=save)


def _records(obj: Any) -> list[Mapping[str, Any]]:
    """The per-epoch records of a model, a list of dicts or a DataFrame."""
    import pandas as pd

    history = getattr(obj, "history", obj)
    if isinstance(history, pd.DataFrame):
        history = history.to_dict("records")
    if not isinstance(history, Sequence) or isinstance(history, str | bytes):
        raise TypeError(
            "`model_or_history` must be a DKANModel, a list of per-epoch dicts or a DataFrame; "
            f"found {type(obj).__name__}."
        )
    if not history:
        raise ValueError("`model_or_history` has an empty training history; train the model first (`dkan.tl.train`).")
    if not all(isinstance(r, Mapping) for r in history):
        raise TypeError("Every entry of the training history must be a dict of per-epoch values.")
    return list(history)


def _series(records: list[Mapping[str, Any]], key: str) -> np.ndarray:
    vals = []
    for r in records:
        v = r.get(key)
        vals.append(np.nan if v is None else float(v))
    return np.asarray(vals, dtype=float)


def _best_epoch(epochs: np.ndarray, val: np.ndarray) -> float | None:
    if not np.isfinite(val).any():
        return None
    return float(epochs[int(np.nanargmax(val))])


def _axes(ax: Axes | Sequence[Axes] | None, n: int, *, figsize: Any, dpi: float | None) -> list[Axes]:
    import matplotlib.pyplot as plt

    if ax is None:
        _, grid = plt.subplots(1, n, figsize=figsize or (4.0 * n, 3.4), dpi=dpi, squeeze=False, layout="constrained")
        return list(grid[0])
    flat = list(np.ravel(np.asarray(ax, dtype=object)))
    if len(flat) != n:
        raise ValueError(f"`ax` must hold {n} axes, one per panel with data; found {len(flat)}. Pass `ax=None`.")
    return flat
