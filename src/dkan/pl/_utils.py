"""Shared plumbing for ``dkan.pl`` functions: creating axes and finishing figures."""

from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def get_axes(ax: Axes | None = None, *, figsize: tuple[float, float] | None = None, dpi: float | None = None) -> Axes:
    """Return ``ax``, or the axes of a new figure of the given size and resolution."""
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=figsize, dpi=dpi)
    return ax


def finish_figure(fig: Figure, *, return_fig: bool = False, save: str | PathLike[str] | None = None) -> Figure | None:
    """End a plot function: save the figure when asked, then return it or None.

    Parameters
    ----------
    fig
        The figure drawn on.
    return_fig
        Return ``fig`` instead of None.
    save
        Path to write the figure to with ``fig.savefig`` (format from the suffix), or None.

    Returns
    -------
    ``fig`` when ``return_fig`` is True, else None.
    """
    if save is not None:
        fig.savefig(save, bbox_inches="tight")
    return fig if return_fig else None
