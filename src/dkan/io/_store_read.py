"""Reading SpatialData for dkan: a zarr store or a whole-slide file, and the source record of a prediction store.

Writing stores (atomically, with recovery of killed writes) is :mod:`dkan.io._store_write`.
"""

from __future__ import annotations

import logging
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

from dkan import _keys as K
from dkan._utils import error_line, uns_set

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")


def is_store(path: str | PathLike[str]) -> bool:
    """Whether ``path`` is a zarr store (a folder) rather than a slide file."""
    return Path(path).is_dir()


def read_store(store: Path) -> SpatialData:
    """Read a SpatialData zarr store; a missing or unreadable one is an error that names it."""
    import spatialdata as sd

    if not store.exists():
        raise FileNotFoundError(f"Store `{store}` does not exist.")
    logger.info("Reading %s", store)
    try:
        return sd.read_zarr(store)
    except Exception as err:  # zarr, anndata and spatialdata raise many types for a folder that is no store
        raise ValueError(
            f"Store `{store}` cannot be read as a SpatialData zarr store ({type(err).__name__}: {error_line(err)}). "
            "Pass a store written by `SpatialData.write`."
        ) from err


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

    from dkan.io._wsi import read_wsi

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
    if not is_store(slide):
        uns_set(
            sdata.tables[table_key], K.UNS_SOURCE, {"slide": str(Path(slide).resolve()), "images": list(sdata.images)}
        )
    if not (with_image if with_image is not None else is_store(slide)):
        for key in list(sdata.images):
            del sdata[key]
