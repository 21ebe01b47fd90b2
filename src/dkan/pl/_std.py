"""The predicted standard deviation panel of :func:`dkan.pl.spatial_pred` (``show_std=True``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K
from dkan.pl._draw import color_scale, colorbar, draw_spots, gene_column, read_image

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from spatialdata import SpatialData

    from dkan._utils import Sample


def std_column(adata: AnnData, pred_layer: str, col: int, table_key: str) -> np.ndarray:
    """One gene's predicted standard deviation (``layers[pred_layer + "_std"]``)."""
    key = f"{pred_layer}{K.STD_SUFFIX}"
    if key not in adata.layers:
        raise KeyError(
            f"`show_std=True` needs `layers[{key!r}]` in table `{table_key}` (layers: {sorted(adata.layers)}). Predict "
            "with `dkan.tl.predict(sdata, model, n_samples=10)` (test-time dropout) or a list of models (an ensemble)."
        )
    return gene_column(adata, key, col)


def draw_std(
    sdata: SpatialData,
    sample: Sample,
    ax: Axes,
    xy: np.ndarray,
    r: np.ndarray,
    window: tuple[float, float, float, float],
    values: np.ndarray,
    *,
    gene: str,
    **kwargs: Any,
) -> None:
    """A panel of the predicted standard deviation, on its own colour scale (another quantity than expression)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("norm", "vmin", "vmax")}
    image = read_image(sdata, sample.image_key, window)
    if image is not None:
        ax.imshow(image[0], extent=image[1], interpolation="antialiased", zorder=0)
    norm = color_scale([values], None, 0.0, None)
    draw_spots(ax, xy, r, values, cmap="magma", norm=norm, **kwargs)
    colorbar(ax.figure, [ax], norm, "magma", label=f"{gene} predicted SD")
    ax.set_title(f"{sample.name}: {gene} predicted SD")
    ax.set_xlim(window[0], window[2])
    ax.set_ylim(window[3], window[1])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
