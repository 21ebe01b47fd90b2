"""Trust signals on :func:`dkan.pl.spatial_pred`: the gene's validation PCC in the title, novel spots marked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes


def annotate(
    adata: AnnData, col: int, rows: list[Any], axes: list[list[Axes]], geometry: list[Any], *, show_novel: bool
) -> None:
    """Add the validation PCC of gene column ``col`` to each predicted panel's title; mark novel spots there.

    ``rows``/``axes``/``geometry`` are the figure rows (the predicted panel is the last of each row's axes).
    """
    pcc = float(adata.var[K.VAL_PCC].iloc[col]) if K.VAL_PCC in adata.var else np.nan
    if show_novel and K.NOVEL not in adata.obs:
        raise KeyError(
            f"`show_novel=True` needs `obs[{K.NOVEL!r}]`, written by `dkan.tl.predict` with a model trained by this "
            "dkan version; predict again, or drop `show_novel`."
        )
    novel = adata.obs[K.NOVEL].to_numpy(dtype=bool) if show_novel else None
    for row, row_axes, (xy, _) in zip(rows, axes, geometry, strict=True):
        ax = row_axes[-1]
        if np.isfinite(pcc):
            ax.set_title(f"{ax.get_title()}\nvalidation PCC = {pcc:.2f}")
        if novel is not None:
            flag = novel[row.sample.obs_idx]
            ax.scatter(*xy[flag].T, marker="x", s=12, c="red", linewidths=0.8, label="novel (unlike training)")
            ax.set_title(f"{ax.get_title()}\nnovel spots: {flag.mean():.0%}")
