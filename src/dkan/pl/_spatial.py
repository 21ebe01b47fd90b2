"""``dkan.pl.spatial_pred``: observed and predicted expression of one gene on the H&E, side by side."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dkan import _keys as K
from dkan._docs import shared_docs
from dkan._utils import Sample, iter_samples, spot_pixels
from dkan.pl._draw import color_scale, colorbar, draw_spots, gene_column, read_image
from dkan.pl._utils import finish_figure

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

#: Margin around the spots' bounding box, in spot radii.
_MARGIN_RADII = 2.0


@dataclass
class _Row:
    """What one figure row shows: a sample's spots and their predicted (and maybe observed) values."""

    sample: Sample
    pred: np.ndarray
    observed: np.ndarray | None
    pcc: float | None


@shared_docs
def spatial_pred(
    sdata: SpatialData,
    gene: str,
    *,
    sample: str | Sequence[str] | None = None,
    pred_layer: str = K.PRED,
    target_layer: str = K.TARGET,
    table_key: str | None = None,
    image_key: str | Mapping[str, str] | None = None,
    cmap: str = "viridis",
    scale: Literal["shared", "panel"] = "shared",
    show_std: bool = False,
    show_novel: bool = False,
    ax: Axes | Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    return_fig: bool = False,
    save: str | PathLike[str] | None = None,
    **kwargs: Any,
) -> Figure | None:
    """Plot the observed and predicted expression of a gene over the H&E image, side by side.

    Each sample is one row: the H&E with its spots coloured by the observed values (``layers[target_layer]``)
    on the left and by the predictions (``layers[pred_layer]``) on the right, with the Pearson correlation
    across the sample's spots in the predicted panel's title. By default all panels share one colour scale and
    one colour bar; ``scale="panel"`` gives each panel its own. A sample without observed values (an H&E-only
    slide, or no ``target_layer``) shows the predictions only.

    Parameters
    ----------
    {sdata_pred}
    gene
        Gene symbol (a ``var_name`` of the table).
    sample
        Sample name (``obs["sample"]``, or the spots element name) or a list of them (one row each).
        Default: the first sample.
    pred_layer
        ``layers`` key of the predictions.
    target_layer
        ``layers`` key of the observed values; written by :func:`dkan.pp.normalize` and by
        :func:`dkan.tl.predict` on slides with counts, so both panels are on the same scale.
    table_key
        Table holding the predictions, or the count table whose results table (``f"{table_key}_dkan"``, see
        :mod:`dkan._results`) holds them. Default: the only table that has ``layers[pred_layer]``.
    image_key
        Image to draw under the spots (one name, or ``{spots_key: image_key}``); inferred per sample.
    cmap
        Colour map of the expression values.
    scale
        ``"shared"``: one colour scale over all panels (observed and predicted values compare directly);
        ``"panel"``: each panel spans its own values and has its own colour bar, so a prediction whose range is
        narrower than the observed one still shows its spatial pattern.
    show_std
        Add a panel per sample with the predicted standard deviation (``layers[pred_layer + "_std"]``, written by
        :func:`dkan.tl.predict` with ``n_samples > 1`` or an ensemble), on its own colour scale.
    show_novel
        Mark with red crosses the spots whose frozen features or patch colour lie far from the model's training
        spots (``obs["dkan_novel"]``, written by :func:`dkan.tl.predict`), and give their share in the title. The
        predicted panel's title always shows the gene's validation PCC when the results table has
        ``var["dkan_val_pcc"]``.
    ax
        Axes to draw on, one per panel in row-major order (2 per sample, or 1 per sample when no sample has
        observed values); a new figure when None.
    figsize, dpi
        Size and resolution of a new figure.
    return_fig
        Return the figure.
    save
        Path to save the figure to.
    **kwargs
        Passed to :class:`matplotlib.collections.EllipseCollection` drawing the spots (e.g. ``alpha``,
        ``edgecolors``, ``linewidths``). ``vmin``, ``vmax`` or ``norm`` replace the computed colour scale
        (of every panel with ``scale="panel"``).

    Returns
    -------
    The figure when ``return_fig`` is True, else None.

    Notes
    -----
    The panels are drawn with matplotlib alone (the spots as one
    :class:`~matplotlib.collections.EllipseCollection`, the image from the coarsest pyramid level that still has
    about 1000 pixels across the spots' window), so the optional extra ``dkan[plot]`` is not needed. Each spot gets
    the same colour as spatialdata-plot gives it with
    ``sdata.pl.render_shapes(spots_key, color=gene, table_name=..., table_layer=..., cmap=cmap, norm=norm)``;
    spatialdata-plot is not used here: rendering the panels through it made the figure 2-8 times slower on the
    toy slides (measured in the table of maintained libraries of the method page).
    """
    if scale not in ("shared", "panel"):
        raise ValueError(f"`scale={scale!r}` must be 'shared' (one colour scale) or 'panel' (one per panel).")
    tkey = _pred_table(sdata, pred_layer, table_key)
    adata = sdata.tables[tkey]
    col = _gene_index(adata, gene, tkey)
    samples = _pick_samples(iter_samples(sdata, table_key=tkey, image_key=image_key), sample)
    pred = gene_column(adata, pred_layer, col)
    observed = gene_column(adata, target_layer, col) if target_layer in adata.layers else None
    rows = [_make_row(s, pred, observed) for s in samples]
    from dkan.pl._std import std_column

    std = std_column(adata, pred_layer, col, tkey) if show_std else None
    if all(np.isnan(r.pred).all() for r in rows):
        raise ValueError(
            f"`layers[{pred_layer!r}]` of table `{tkey}` holds no prediction for `gene={gene!r}` in the chosen "
            "samples: the gene is outside the model's panel. Plot one of `model.genes`."
        )
    ncols = 2 if any(r.observed is not None for r in rows) else 1
    geometry = [spot_pixels(sdata, s) for s in samples]
    windows = [_window(xy, r) for xy, r in geometry]
    aspect = float(np.median([(w[3] - w[1]) / max(w[2] - w[0], 1e-9) for w in windows]))
    axes = _panel_axes(ax, len(rows), ncols + (std is not None), figsize=figsize, dpi=dpi, aspect=aspect)
    if std is not None:
        from dkan.pl._std import draw_std

        for row, row_axes, (xy, r), window in zip(rows, axes, geometry, windows, strict=True):
            draw_std(sdata, row.sample, row_axes.pop(), xy, r, window, std[row.sample.obs_idx], gene=gene, **kwargs)
    given = _pop_scale(kwargs)
    norm = color_scale([v for r in rows for v in (r.pred, r.observed) if v is not None], *given)
    for row, row_axes, (xy, r), window in zip(rows, axes, geometry, windows, strict=True):
        panel_norm = None if scale == "panel" else norm
        _draw_row(sdata, row, row_axes, xy, r, window, gene=gene, cmap=cmap, norm=panel_norm, given=given, **kwargs)
    from dkan.pl._trust import annotate

    annotate(adata, col, rows, axes, geometry, show_novel=show_novel)
    fig = axes[0][0].figure
    if scale == "shared":
        colorbar(
            fig,
            [a for r in axes for a in r],
            norm,
            cmap,
            label=f"{gene} ({'predicted' if ncols == 1 else 'observed and predicted'})",
        )
    return finish_figure(fig, return_fig=return_fig, save=save)


# ----------------------------------------------------------------------------------------- data
def _pred_table(sdata: SpatialData, pred_layer: str, table_key: str | None) -> str:
    """The table holding ``layers[pred_layer]``: given, or the only one that has it."""
    if table_key is not None:
        if table_key not in sdata.tables:
            raise KeyError(f"`table_key={table_key!r}` not found; available tables: {sorted(sdata.tables)}.")
        from dkan._results import find_results

        found = find_results(sdata, table_key)  # a count table's predictions live in its results table
        if found is not None and pred_layer not in sdata.tables[table_key].layers:
            table_key = found[0]
        if pred_layer not in sdata.tables[table_key].layers:
            raise KeyError(_missing_pred(pred_layer, table_key, sdata.tables[table_key]))
        return table_key
    with_pred = [k for k, t in sdata.tables.items() if pred_layer in t.layers]
    if len(with_pred) == 1:
        return with_pred[0]
    if len(with_pred) > 1:
        raise KeyError(f"Several tables have `layers[{pred_layer!r}]`: {sorted(with_pred)}. Pass `table_key=`.")
    if len(sdata.tables) == 1:
        name, table = next(iter(sdata.tables.items()))
        raise KeyError(_missing_pred(pred_layer, name, table))
    raise KeyError(
        f"No table of the SpatialData has `layers[{pred_layer!r}]` (tables: {sorted(sdata.tables)}). "
        "Run `dkan.tl.predict(sdata, model)` first, or pass `pred_layer=` / `table_key=`."
    )


def _missing_pred(pred_layer: str, table_key: str, adata: AnnData) -> str:
    return (
        f"`pred_layer={pred_layer!r}` not found in table `{table_key}` (layers: {sorted(adata.layers)}). "
        "Run `dkan.tl.predict(sdata, model)` first, or pass the `key_added` you predicted with."
    )


def _gene_index(adata: AnnData, gene: str, table_key: str) -> int:
    if not isinstance(gene, str):
        raise TypeError(f"`gene` must be one gene symbol (str); found {type(gene).__name__}.")
    names = adata.var_names
    if gene in names:
        return int(names.get_loc(gene))
    close = difflib.get_close_matches(gene, list(map(str, names)), n=3)
    hint = f"Did you mean {close}? " if close else ""
    raise KeyError(f"`gene={gene!r}` is not in table `{table_key}`. {hint}Genes include {list(names[:8])}.")


def _pick_samples(samples: list[Sample], sample: str | Sequence[str] | None) -> list[Sample]:
    if sample is None:
        return samples[:1]
    wanted = [sample] if isinstance(sample, str) else list(sample)
    if not wanted:
        raise ValueError("`sample` is an empty list; pass a sample name, a list of them, or None.")
    by_name = {s.name: s for s in samples} | {s.spots_key: s for s in samples}
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise KeyError(f"`sample={missing}` not found; samples: {[s.name for s in samples]}.")
    return [by_name[w] for w in wanted]


def _make_row(sample: Sample, pred: np.ndarray, observed: np.ndarray | None) -> _Row:
    from dkan._metrics import pearson_per_gene

    p = pred[sample.obs_idx]
    o = None if observed is None else observed[sample.obs_idx]
    if o is None or not np.isfinite(o).any():
        return _Row(sample, p, None, None)
    ok = np.isfinite(p) & np.isfinite(o)
    r, _ = pearson_per_gene(p[ok, None], o[ok, None])
    return _Row(sample, p, o, float(r[0]))


def _pop_scale(kwargs: dict[str, Any]) -> tuple[Normalize | None, float | None, float | None]:
    """The user's ``norm``, ``vmin`` and ``vmax`` (removed from ``kwargs``)."""
    return kwargs.pop("norm", None), kwargs.pop("vmin", None), kwargs.pop("vmax", None)


# ----------------------------------------------------------------------------------------- drawing
def _panel_axes(
    ax: Axes | Sequence[Axes] | None, nrows: int, ncols: int, *, figsize: Any, dpi: float | None, aspect: float
) -> list[list[Axes]]:
    """Axes as rows of ``ncols`` panels: a new figure, or the user's axes checked for number."""
    import matplotlib.pyplot as plt

    if ax is None:
        panel_h = 4.0 * float(np.clip(aspect, 0.5, 2.0))
        size = figsize if figsize is not None else (4.0 * ncols + 1.2, (panel_h + 0.6) * nrows)
        _, grid = plt.subplots(nrows, ncols, figsize=size, dpi=dpi, squeeze=False, layout="constrained")
        return [list(r) for r in grid]
    flat = list(np.ravel(np.asarray(ax, dtype=object)))
    if len(flat) != nrows * ncols:
        raise ValueError(
            f"`ax` must hold {nrows * ncols} axes ({nrows} sample(s) x {ncols} panel(s)); found {len(flat)}. "
            "Pass `ax=None` for a new figure."
        )
    return [flat[i * ncols : (i + 1) * ncols] for i in range(nrows)]


def _draw_row(
    sdata: SpatialData,
    row: _Row,
    axes: list[Axes],
    xy: np.ndarray,
    r: np.ndarray,
    window: tuple[float, float, float, float],
    *,
    gene: str,
    cmap: str,
    norm: Any,
    given: tuple[Any, Any, Any] = (None, None, None),
    **kwargs: Any,
) -> None:
    """One sample's panels: the image, the spots coloured by value, titles and limits.

    With ``norm=None`` each panel gets a colour scale of its own values (``given``: the user's norm, vmin, vmax)
    and its own colour bar.
    """
    name = row.sample.name
    panels: list[tuple[np.ndarray | None, str]] = [(row.pred, f"{name}: {gene} predicted")]
    if len(axes) == 2:
        panels.insert(0, (row.observed, f"{name}: {gene} observed"))
        if row.pcc is not None:
            panels[1] = (row.pred, f"{panels[1][1]}\nPCC = {row.pcc:.3f}")
    image = read_image(sdata, row.sample.image_key, window)
    for a, (values, title) in zip(axes, panels, strict=True):
        if image is not None:
            a.imshow(image[0], extent=image[1], interpolation="antialiased", zorder=0)
        if values is None:
            a.text(0.5, 0.5, "not measured", ha="center", va="center", transform=a.transAxes)
        else:
            own = norm if norm is not None else color_scale([values], *given)
            draw_spots(a, xy, r, values, cmap=cmap, norm=own, **kwargs)
            if norm is None:
                colorbar(a.figure, [a], own, cmap, label=gene)
        a.set_title(title)
        a.set_xlim(window[0], window[2])
        a.set_ylim(window[3], window[1])
        a.set_aspect("equal")
        a.set_xticks([])
        a.set_yticks([])


def _window(xy: np.ndarray, r: np.ndarray) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` in scale-0 pixels around all spots."""
    pad = _MARGIN_RADII * float(np.nanmax(r)) if len(r) else 0.0
    return (
        float(np.nanmin(xy[:, 0]) - pad),
        float(np.nanmin(xy[:, 1]) - pad),
        float(np.nanmax(xy[:, 0]) + pad),
        float(np.nanmax(xy[:, 1]) + pad),
    )
