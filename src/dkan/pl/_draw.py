"""Drawing helpers shared by the panels of :func:`dkan.pl.spatial_pred`: image background, spots, colour scales."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

#: Longest side, in screen pixels of the chosen pyramid level, that is enough for one panel's background.
_MAX_IMAGE_PX = 1000


def gene_column(adata: AnnData, layer: str, col: int) -> np.ndarray:
    """One gene's values of a layer (dense or sparse) as float64."""
    from scipy import sparse

    x = adata.layers[layer][:, col]
    if sparse.issparse(x):
        x = x.toarray()
    return np.asarray(x, dtype=np.float64).ravel()


def color_scale(values: list[np.ndarray], norm: Normalize | None, vmin: float | None, vmax: float | None) -> Normalize:
    """A colour scale spanning the finite ``values`` (the user's ``norm``/``vmin``/``vmax`` take precedence)."""
    from matplotlib.colors import Normalize

    if norm is not None:
        return norm
    vals = np.concatenate(values) if values else np.zeros(0)
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        vals = np.zeros(1)
    lo = float(vals.min()) if vmin is None else float(vmin)
    hi = float(vals.max()) if vmax is None else float(vmax)
    if hi <= lo:
        hi = lo + 1.0
    return Normalize(vmin=lo, vmax=hi)


def read_image(sdata: SpatialData, image_key: str | None, window: tuple[float, ...]) -> tuple[np.ndarray, tuple] | None:
    """The part of the image under ``window`` at about ``_MAX_IMAGE_PX`` pixels across, and its extent."""
    from dkan._features.levels import image_levels

    if image_key is None:
        return None
    levels = image_levels(sdata.images[image_key])
    h0, w0 = levels[0].sizes["y"], levels[0].sizes["x"]
    side = max(window[2] - window[0], window[3] - window[1])
    level = _pick_level(levels, side)
    sy, sx = h0 / level.sizes["y"], w0 / level.sizes["x"]
    step = max(1, int(side / sx // _MAX_IMAGE_PX))  # subsample a level finer than needed
    xa, xb = max(int(np.floor(window[0] / sx)), 0), min(int(np.ceil(window[2] / sx)), level.sizes["x"])
    ya, yb = max(int(np.floor(window[1] / sy)), 0), min(int(np.ceil(window[3] / sy)), level.sizes["y"])
    if xb <= xa or yb <= ya:
        return None
    crop = np.asarray(level.data[:, ya:yb:step, xa:xb:step])
    xb, yb = xa + crop.shape[2] * step, ya + crop.shape[1] * step
    return _to_rgb(crop), (xa * sx, xb * sx, yb * sy, ya * sy)


def _pick_level(levels: list[Any], side: float) -> Any:
    """The coarsest stored pyramid level with at least ``_MAX_IMAGE_PX`` pixels across ``side`` (scale-0 px).

    Levels computed lazily from a finer one (an in-memory pyramid: more dask graph layers than level 0) cost
    a full-resolution read each, so they are skipped; the finer level is then subsampled instead.
    """
    w0 = levels[0].sizes["x"]
    base = _graph_layers(levels[0])
    for cand in reversed(levels[1:]):
        if _graph_layers(cand) <= base and side * cand.sizes["x"] / w0 >= _MAX_IMAGE_PX:
            return cand
    return levels[0]


def _graph_layers(level: Any) -> int:
    graph = getattr(level.data, "dask", None)
    return len(graph.layers) if graph is not None and hasattr(graph, "layers") else 0


def _to_rgb(crop: np.ndarray) -> np.ndarray:
    """``(c, y, x)`` -> ``(y, x, 3)`` for imshow: uint8 as is, other types scaled to [0, 1]."""
    img = crop[:3] if crop.shape[0] >= 3 else np.repeat(crop[:1], 3, axis=0)
    img = np.moveaxis(img, 0, -1)
    if img.dtype == np.uint8:
        return img
    img = img.astype(np.float64)
    lo, hi = np.nanmin(img), np.nanmax(img)
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def draw_spots(
    ax: Axes, xy: np.ndarray, r: np.ndarray, values: np.ndarray, *, cmap: str, norm: Any, **kwargs: Any
) -> None:
    from matplotlib.collections import EllipseCollection

    coll = EllipseCollection(
        widths=2 * r,
        heights=2 * r,
        angles=np.zeros(len(r)),
        units="xy",
        offsets=xy,
        offset_transform=ax.transData,
        cmap=cmap,
        norm=norm,
        **kwargs,
    )
    coll.set_array(np.ma.masked_invalid(values))
    ax.add_collection(coll)


def colorbar(fig: Figure, axes: list[Axes], norm: Any, cmap: str, *, label: str) -> None:
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, label=label, shrink=0.8 if len(axes) <= 2 else 0.6)
