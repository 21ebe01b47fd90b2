"""From slide files to prediction stores for a cohort: :func:`dkan.tl.predict_slides` (serially or on Dask).

Each slide goes through the stages of :mod:`dkan.tl._slide`; a store at the output path means a finished slide, so
a rerun skips it. With a Dask ``client``, one slide per task (:mod:`dkan.tl._cohort`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dkan.tl._slide import REPORT_COLUMNS, slide_row

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from dkan.train.fitted import DKANModel

logger = logging.getLogger("dkan")


def output_path(slide: str | PathLike[str], out_dir: str | PathLike[str]) -> Path:
    """The store a slide's predictions go to: ``out_dir / f"{name}.zarr"`` (name = file name without suffixes)."""
    name = Path(slide).name.split(".")[0]
    return Path(out_dir) / f"{name}.zarr"


def predict_slides(
    slides: str | PathLike[str] | Sequence[str | PathLike[str]],
    model: DKANModel | str | PathLike[str],
    *,
    out_dir: str | PathLike[str],
    um_per_px: float | None = None,
    overwrite: bool = False,
    errors: str = "raise",
    device: str | torch.device | None = None,
    batch_size: int = 256,
    with_image: bool | None = None,
    shared_tiles: bool | int | None = None,
    progress: bool = True,
    client: Any = None,
) -> pd.DataFrame:
    """Predict a cohort of slides, writing each slide's store as soon as it is finished.

    Every slide becomes ``out_dir / f"{name}.zarr"``, written atomically (temporary sibling, then renamed), so
    an interrupted run loses at most the slide in progress and a rerun skips the slides already written.

    Parameters
    ----------
    slides
        Slide files (``.svs``, ``.tif``, ``.ndpi``, ...) and/or SpatialData zarr stores.
    model
        A trained :class:`dkan.DKANModel`, or the folder it was saved to.
    out_dir
        Folder for the output stores (created if needed).
    um_per_px
        Pixel size for slides whose metadata lacks it (the same for all of them).
    overwrite
        Recompute slides whose output store exists (default: skip them).
    errors
        ``"raise"``: stop at the first slide that fails with a :class:`SlideError` naming it (the original error
        chained); ``"skip"``: log the error, report it and go on. A slide fails on any error that is about its
        file or its content, at any stage (see the module notes); other errors stop the batch.
    device
        Torch device (default CUDA when available).
    batch_size
        Spots per forward pass.
    with_image
        Copy each slide's image into its store (default: only for zarr store inputs; see :func:`predict_slide`).
    shared_tiles
        Region features from shared grid tiles (see :func:`dkan.tl._slide.predict_slide`; default ``2`` for slide
        files, spot by spot for zarr stores).
    progress
        Show progress bars (slides, features, prediction).
    client
        A ``dask.distributed.Client``: one task per slide on its workers (any Dask cluster whose workers see
        the slides, ``out_dir`` and the model folder, e.g. a ``LocalCluster`` or a dask-jobqueue cluster). Each
        worker loads the model once (from its folder, or from one broadcast copy of a model object) and writes
        its slides' stores with the same atomic rule; ``errors="raise"`` raises at the first failure seen
        (slides already running still finish). Default: one slide after the other in this process.

    Returns
    -------
    One row per slide: ``slide``, ``out``, ``status`` (``written``, ``skipped`` or ``failed``), ``n_spots``,
    stage times ``read_s``, ``spots_s``, ``features_s`` (tiles and frozen features), ``predict_s``,
    ``write_s``, ``encoder_passes`` and ``error``.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from dkan.train.fitted import DKANModel

    if errors not in ("raise", "skip"):
        raise ValueError(f"`errors` must be 'raise' or 'skip'; got {errors!r}.")
    paths = [Path(slides)] if isinstance(slides, str | PathLike) else [Path(s) for s in slides]
    if not paths:
        raise ValueError("`slides` is empty; pass one or more slide files or zarr stores.")
    outs = [output_path(p, out_dir) for p in paths]
    dupes = sorted({o.name for o in outs if outs.count(o) > 1})
    if dupes:
        raise ValueError(f"Several slides would write the same output {dupes}; rename them or use separate calls.")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"`slides` not found: {missing}.")
    opts = {
        "um_per_px": um_per_px, "overwrite": overwrite, "device": device, "batch_size": batch_size,
        "with_image": with_image, "shared_tiles": shared_tiles,
    }  # fmt: skip
    pairs = list(zip(paths, outs, strict=True))
    if client is not None:
        from dkan.tl._cohort import predict_on_client

        rows = predict_on_client(client, pairs, model, opts, errors=errors, progress=progress)
        return pd.DataFrame(rows, columns=list(REPORT_COLUMNS))
    if not isinstance(model, DKANModel):
        model = DKANModel.load(model)
    rows = []
    bar = tqdm(pairs, desc="dkan slides", unit="slide", disable=not progress)
    for path, out in bar:
        bar.set_postfix_str(path.name)
        row = slide_row(path, out, model, opts, progress=progress)
        if row["status"] == "failed" and errors == "raise":
            raise row.pop("exception")
        row.pop("exception", None)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(REPORT_COLUMNS))
