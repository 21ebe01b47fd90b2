"""``dkan.pl.metrics``: per-gene Pearson r per method (DKAN against baselines), as boxes or bars."""

from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dkan.pl._utils import finish_figure, get_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from dkan._evaluation.combine import CVSummary

_BAR_METRICS = ("mae", "mse", "pcc_all", "pcc_hpg", "pcc_heg", "pcc_hvg")


def _as_summary(result: Any) -> CVSummary:
    from dkan._evaluation.combine import CVSummary, combine_folds

    if isinstance(result, CVSummary):
        return result
    try:
        return combine_folds(result)
    except TypeError as err:
        raise TypeError(
            "`result` must be a CVSummary (from `combine_folds` / `cross_validate`), an EvalResult from "
            f"`dkan.tl.evaluate`, or a mapping of them; found {type(result).__name__}."
        ) from err


def _gene_means(cv: CVSummary) -> dict[str, np.ndarray]:
    """Per method: each gene's r averaged over folds (NaN folds skipped; all-NaN genes dropped)."""
    out = {}
    for method in cv.methods:
        sub = cv.per_gene[cv.per_gene["method"] == method]
        means = sub.groupby("gene", sort=False)["pearson"].mean().to_numpy(dtype=np.float64)
        out[method] = means[np.isfinite(means)]
    return out


def metrics(
    result: Any,
    *,
    kind: Literal["box", "bar"] = "box",
    metric: str = "pcc_all",
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    return_fig: bool = False,
    save: str | PathLike[str] | None = None,
) -> Figure | None:
    """Plot evaluation results per method: per-gene Pearson r as boxes, or a metric's mean ± std as bars.

    Parameters
    ----------
    result
        A ``CVSummary`` (from ``dkan.tl.cross_validate`` or ``combine_folds``), an ``EvalResult`` from
        :func:`dkan.tl.evaluate`, or anything ``combine_folds`` accepts (e.g. ``{method: {fold: result}}``).
    kind
        ``"box"``: one box per method of the per-gene r averaged over folds. ``"bar"``: one bar per method
        of ``metric`` (mean over folds) with the population std as error bar.
    metric
        Metric of the bars: one of ``mae``, ``mse``, ``pcc_all``, ``pcc_hpg``, ``pcc_heg``, ``pcc_hvg``.
    ax
        Axes to draw on; a new figure when None.
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
    if kind not in ("box", "bar"):
        raise ValueError(f"`kind` must be 'box' or 'bar'; found {kind!r}.")
    if kind == "bar" and metric not in _BAR_METRICS:
        raise ValueError(f"`metric` must be one of {list(_BAR_METRICS)}; found {metric!r}.")
    cv = _as_summary(result)
    ax = get_axes(ax, figsize=figsize, dpi=dpi)
    methods = cv.methods
    pos = np.arange(1, len(methods) + 1)
    n_folds = max(cv.protocol["n_folds"].values())
    if kind == "box":
        data = _gene_means(cv)
        boxes = ax.boxplot([data[m] for m in methods], positions=pos, widths=0.6, showmeans=True, patch_artist=True)
        for i, box in enumerate(boxes["boxes"]):
            box.set(facecolor=f"C{i % 10}", alpha=0.6)
        ax.set_ylabel("Pearson r per gene")
        ax.set_title(f"Per-gene PCC, mean over {n_folds} fold{'s' if n_folds > 1 else ''}")
        ax.axhline(0.0, color="0.7", lw=0.8, zorder=0)
    else:
        mean = cv.summary.loc[methods, f"{metric}_mean"].to_numpy()
        std = cv.summary.loc[methods, f"{metric}_std"].to_numpy()
        ax.bar(pos, mean, yerr=std, capsize=4, color="C0", width=0.6)
        ax.set_ylabel(f"{metric.upper().replace('_', '-')} (mean ± std over folds)")
        ax.set_title(f"{metric.upper().replace('_', '-')}, {n_folds} fold{'s' if n_folds > 1 else ''}")
    ax.set_xticks(pos)
    ax.set_xticklabels(methods)
    ax.set_xlabel("method")
    return finish_figure(ax.figure, return_fig=return_fig, save=save)
