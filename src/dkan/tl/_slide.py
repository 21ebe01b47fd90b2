"""One slide from file to prediction store: the stages of :func:`dkan.tl.predict_slides` for each slide.

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
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dkan import _keys as K
from dkan.io._store_read import is_store, read_slide, record_source
from dkan.tl._slide_errors import SlideError, slide_stage

if TYPE_CHECKING:
    import torch
    from spatialdata import SpatialData

    from dkan.train.fitted import DKANModel

logger = logging.getLogger("dkan")

#: The columns of the table :func:`dkan.tl.predict_slides` returns (one row per slide, see :func:`slide_row`).
REPORT_COLUMNS = (
    "slide", "out", "status", "n_spots", "read_s", "spots_s", "features_s", "predict_s", "write_s",
    "encoder_passes", "error",
)  # fmt: skip

#: Region tiles of whole-slide files by default: shared grid tiles half a tile apart (``shared_tiles=2``): 7.9x
#: fewer encoder passes than spot by spot on whole-slide pseudo-spots, and on the her2st benchmark within 0.001
#: PCC-ALL of spot by spot (docs: benchmarks, "Where the shared-tile loss comes from").
SLIDE_SHARED_TILES = 2


def default_shared_tiles(path: str | PathLike[str], shared_tiles: bool | int | None) -> bool | int:
    """``shared_tiles``, or when None: :data:`SLIDE_SHARED_TILES` for a slide file, spot by spot for a store."""
    if shared_tiles is not None:
        return shared_tiles
    return False if is_store(path) else SLIDE_SHARED_TILES


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
    from dkan._features.make_spots import make_spots
    from dkan.io._store_write import recover_store, write_new_store
    from dkan.tl._predict import predict

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
            make_spots(sdata, um_per_px=um_per_px)
    row["spots_s"], t = time.perf_counter() - t, time.perf_counter()
    with slide_stage(slide, "features"):
        shared = default_shared_tiles(slide, shared_tiles)
        row["encoder_passes"] = _features(sdata, model, device=device, shared_tiles=shared, progress=progress)
    row["features_s"], t = time.perf_counter() - t, time.perf_counter()
    with slide_stage(slide, "predict"):
        tkey = predict(sdata, model, device=device, batch_size=batch_size, um_per_px=um_per_px, progress=progress)
    row["n_spots"] = int(sdata.tables[tkey].n_obs)
    row["predict_s"], t = time.perf_counter() - t, time.perf_counter()
    with slide_stage(slide, "write"):
        record_source(sdata, slide, tkey, with_image=with_image)
        write_new_store(sdata, out, overwrite=overwrite)
    row["write_s"] = time.perf_counter() - t
    logger.info("%s: %d spots predicted, written to %s", slide.name, row["n_spots"], out)
    return row


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

    from dkan._data import prepare as prep
    from dkan._features.extract import extract_features
    from dkan._results import results_table
    from dkan._utils import get_table, uns_get

    tkey, _ = get_table(sdata, None)
    prep.ensure_tiles(sdata, model.config, table_key=tkey, image_key=None)
    extract_features(
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
