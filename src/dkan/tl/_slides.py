"""From slide files to prediction stores: one slide (``dkan predict SLIDE``) or a cohort in one call.

Each slide goes through the stages *read* (:func:`dkan.io.read_wsi` for a slide file, spatialdata for a zarr
store), *spots* (tissue detection on a low pyramid level and pseudo-spots, :func:`dkan.tl.make_spots`, when the
slide has no table), *predict* (tiles, frozen features and the model, :func:`dkan.tl.predict`) and *write* (a
new zarr store written to a temporary sibling and renamed into place). A store at the output path therefore
means a finished slide: a rerun skips it, and a crash loses at most the slide in progress.

Which errors are a slide's own failure: see :mod:`dkan.tl._slide_errors`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dkan import _keys as K
from dkan.tl._slide_errors import SlideError, slide_stage

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from spatialdata import SpatialData

    from dkan.train.model import DKANModel

logger = logging.getLogger("dkan")

#: The columns of the table :func:`predict_slides` returns.
REPORT_COLUMNS = (
    "slide", "out", "status", "n_spots", "read_s", "spots_s", "features_s", "predict_s", "write_s",
    "encoder_passes", "error",
)  # fmt: skip


def is_store(path: str | PathLike[str]) -> bool:
    """Whether ``path`` is a zarr store (a folder) rather than a slide file."""
    return Path(path).is_dir()


#: Region tiles of whole-slide files by default: shared grid tiles half a tile apart (``shared_tiles=2``): 7.9x
#: fewer encoder passes than spot by spot on whole-slide pseudo-spots, and on the her2st benchmark within 0.001
#: PCC-ALL of spot by spot (docs: benchmarks, "Where the shared-tile loss comes from").
SLIDE_SHARED_TILES = 2


def default_shared_tiles(path: str | PathLike[str], shared_tiles: bool | int | None) -> bool | int:
    """``shared_tiles``, or when None: :data:`SLIDE_SHARED_TILES` for a slide file, spot by spot for a store."""
    if shared_tiles is not None:
        return shared_tiles
    return False if is_store(path) else SLIDE_SHARED_TILES


def read_slide(path: str | PathLike[str], *, um_per_px: float | None = None) -> SpatialData:
    """Read a SpatialData zarr store, or open a whole-slide file with :func:`dkan.io.read_wsi`.

    Parameters
    ----------
    path
        A zarr store (folder) or a slide file (``.svs``, ``.tif``, ``.ndpi``, ...).
    um_per_px
        Pixel size for a slide file whose metadata lacks it (ignored for a store; give it to
        :func:`dkan.tl.predict` instead).

    Returns
    -------
    The SpatialData (images lazy in both cases).
    """
    import spatialdata as sd

    from dkan.io import read_wsi

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Slide `{path}` does not exist.")
    if is_store(path):
        try:
            return sd.read_zarr(path)
        except Exception as err:
            raise ValueError(
                f"Cannot read `{path}` as a SpatialData zarr store ({type(err).__name__}: {err})."
            ) from err
    return read_wsi(path, um_per_px=um_per_px)


def output_path(slide: str | PathLike[str], out_dir: str | PathLike[str]) -> Path:
    """The store a slide's predictions go to: ``out_dir / f"{name}.zarr"`` (name = file name without suffixes)."""
    name = Path(slide).name.split(".")[0]
    return Path(out_dir) / f"{name}.zarr"


def record_source(sdata: SpatialData, slide: Path, table_key: str, *, with_image: bool | None = None) -> None:
    """Before writing a prediction store: record a slide file as its source and, by default, leave its image out.

    Parameters
    ----------
    sdata
        The predicted SpatialData.
    slide
        Its input: a slide file or a zarr store.
    table_key
        The table holding the predictions (gets ``uns["dkan"]["source"]`` for a slide file).
    with_image
        Keep the image elements; default: only when the input is a zarr store.
    """
    from dkan._utils import uns_set

    if not is_store(slide):
        uns_set(
            sdata.tables[table_key], K.UNS_SOURCE, {"slide": str(Path(slide).resolve()), "images": list(sdata.images)}
        )
    if not (with_image if with_image is not None else is_store(slide)):
        for key in list(sdata.images):
            del sdata[key]


def predict_slide(
    slide: str | PathLike[str],
    model: DKANModel,
    *,
    out: str | PathLike[str],
    um_per_px: float | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    batch_size: int = 256,
    with_image: bool | None = None,
    shared_tiles: bool | int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict the model's panel on one slide and write a new store; ``out`` is complete or absent.

    Parameters
    ----------
    slide
        Slide file or SpatialData zarr store.
    model
        A trained :class:`dkan.DKANModel`.
    out
        Path of the new zarr store.
    um_per_px
        Pixel size for a slide without one in its metadata (µm/px of the full-resolution image).
    overwrite
        Replace an existing store at ``out`` (only once the new one is complete).
    device
        Torch device (default CUDA when available).
    batch_size
        Spots per forward pass.
    with_image
        Copy the image into the new store. Default: yes for a zarr store, no for a slide file (a decoded
        whole slide is tens of GB; the store records the slide's path, see :func:`dkan.io.add_slide_image`).
    shared_tiles
        Region features from shared grid tiles (``extract_features(shared_tiles=...)``; an int ``n`` puts them
        ``1/n`` of a tile apart, each region tile then within ``1/(2n)`` tile of its exact place): encoder passes grow
        with the tissue area instead of 26 per spot. ``None`` (default): ``2`` for a slide file (8x fewer encoder
        passes on whole-slide pseudo-spots; on the her2st benchmark within 0.001 PCC-ALL of spot by spot, docs:
        benchmarks), spot by spot for a zarr store; ``False`` or ``0``: spot by spot.
    progress
        Show progress bars for features and prediction.

    Returns
    -------
    One row of the report of :func:`predict_slides` (stage times in seconds).
    """
    import dkan
    from dkan.io._store_write import recover_store, write_new_store

    slide, out = Path(slide), Path(out)
    recover_store(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"`out={out}` exists; pass `overwrite=True` to replace it or choose another path.")
    if out.resolve() == slide.resolve() or slide.resolve() in out.resolve().parents:
        raise ValueError(f"`out={out}` would be written into the input `{slide}`; choose another path.")
    row: dict[str, Any] = {"slide": str(slide), "out": str(out), "status": "written", "error": ""}
    t = time.perf_counter()
    with slide_stage(slide, "read"):
        sdata = read_slide(slide, um_per_px=um_per_px)
    row["read_s"], t = time.perf_counter() - t, time.perf_counter()
    if not len(sdata.tables):
        logger.info("%s: detecting tissue and laying pseudo-spots", slide.name)
        with slide_stage(slide, "spots"):
            dkan.tl.make_spots(sdata, um_per_px=um_per_px)
    row["spots_s"], t = time.perf_counter() - t, time.perf_counter()
    with slide_stage(slide, "features"):
        shared = default_shared_tiles(slide, shared_tiles)
        row["encoder_passes"] = _features(sdata, model, device=device, shared_tiles=shared, progress=progress)
    row["features_s"], t = time.perf_counter() - t, time.perf_counter()
    with slide_stage(slide, "predict"):
        tkey = dkan.tl.predict(
            sdata, model, device=device, batch_size=batch_size, um_per_px=um_per_px, progress=progress
        )
    row["n_spots"] = int(sdata.tables[tkey].n_obs)
    row["predict_s"], t = time.perf_counter() - t, time.perf_counter()
    with slide_stage(slide, "write"):
        record_source(sdata, slide, tkey, with_image=with_image)
        write_new_store(sdata, out, overwrite=overwrite)
    row["write_s"] = time.perf_counter() - t
    logger.info("%s: %d spots predicted, written to %s", slide.name, row["n_spots"], out)
    return row


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
        Region features from shared grid tiles (see :func:`predict_slide`).
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

    from dkan.train.model import DKANModel

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


def slide_row(path: Path, out: Path, model: DKANModel, opts: dict[str, Any], *, progress: bool) -> dict[str, Any]:
    """Skip a finished slide, else predict it; a :class:`SlideError` becomes a ``failed`` row (``exception`` key).

    Parameters
    ----------
    path, out
        The slide and its output store.
    model
        The model.
    opts
        Keyword arguments of :func:`predict_slide` (``overwrite`` among them).
    progress
        Show progress bars.

    Returns
    -------
    One row of the report.
    """
    from dkan.io._store_write import recover_store

    recover_store(out)  # a store a killed run set aside is back before deciding to skip
    if out.exists() and not opts["overwrite"]:
        logger.info("%s: %s exists, skipped (pass overwrite=True to recompute)", path.name, out)
        return {"slide": str(path), "out": str(out), "status": "skipped", "error": ""}
    try:
        return predict_slide(path, model, out=out, progress=progress, **opts)
    except SlideError as err:
        logger.error("%s: failed, skipped: %s", path.name, err)
        return {"slide": str(path), "out": str(out), "status": "failed", "error": str(err), "exception": err}


def _features(sdata: SpatialData, model: DKANModel, *, device: Any, shared_tiles: bool | int, progress: bool) -> int:
    """Tiles and frozen features of the slide's only table with the model's settings; returns the encoder passes."""
    import numpy as np

    import dkan
    from dkan._results import results_table
    from dkan._utils import get_table, uns_get
    from dkan.tl import _prepare as prep

    tkey, _ = get_table(sdata, None)
    prep.ensure_tiles(sdata, model.config, table_key=tkey, image_key=None)
    dkan.tl.extract_features(
        sdata,
        model.meta["features"]["encoder"],
        table_key=tkey,
        device=device,
        shared_tiles=shared_tiles if shared_tiles else None,
        progress=progress,
    )
    _, adata = results_table(sdata, tkey)
    info = uns_get(adata, K.UNS_FEATURES) or {}
    tiles = info.get("region_tiles_encoded")
    if tiles is None:
        tiles = int(np.asarray(adata.obsm[K.REGION_MASK]).sum()) if K.REGION_MASK in adata.obsm else 0
    return int(adata.n_obs + tiles)
