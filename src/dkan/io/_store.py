"""SpatialData zarr stores: read a store or a slide file, write a new store atomically, update a table in place.

Writing is never half-done where it can be avoided: :func:`write_new_store` writes the whole store to a temporary
sibling path and renames it into place; :func:`update_in_place` first writes a backup copy of the updated table next
to the store, then replaces the table element (``delete_element_from_disk`` + ``write_element``, spatialdata's
pattern) and finally removes the backup.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Sequence
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


def write_new_store(sdata: SpatialData, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``sdata`` to ``out`` via a temporary sibling path, so ``out`` is either complete or untouched.

    Parameters
    ----------
    sdata
        The SpatialData to write.
    out
        Target zarr store path.
    overwrite
        Replace an existing store at ``out`` (removed only after the new one is in place).

    Returns
    -------
    The path written.
    """
    out = Path(out)
    check_replaceable_store(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        sdata.write(tmp, update_sdata_path=False)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def check_replaceable_store(out: Path, *, overwrite: bool) -> None:
    """Refuse to replace anything at ``out`` but a zarr store (a folder with zarr metadata at its root)."""
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"`{out}` exists; pass overwrite to replace it.")
    if not out.is_dir() or not any((out / name).is_file() for name in ("zarr.json", ".zgroup")):
        raise ValueError(
            f"`{out}` exists and is not a zarr store; dkan only replaces stores. Choose another output path."
        )


def update_in_place(sdata: SpatialData, table_key: str, *, added: Sequence[str] = ()) -> None:
    """Rewrite table ``table_key`` of a backed SpatialData on disk and write the new elements ``added``.

    The updated table is first saved as a standalone AnnData zarr next to the store (``.STORE.TABLE.dkan-backup.zarr``)
    so an interruption between deleting and rewriting the element loses nothing; the backup is removed when the
    element is written. A failed write leaves the backup and says how to restore it.

    Parameters
    ----------
    sdata
        A SpatialData read from a zarr store (``sdata.path`` set).
    table_key
        The table to replace on disk with its in-memory version.
    added
        Names of elements that are new in memory and not yet on disk.
    """
    if sdata.path is None:
        raise ValueError("The SpatialData is not backed by a zarr store; write it with `sdata.write(path)` instead.")
    store = Path(sdata.path)
    # public API: paths are "<element type>/<element name>"
    on_disk = {p.rsplit("/", 1)[-1] for p in sdata.elements_paths_on_disk()}
    for name in added:
        if name not in on_disk:
            sdata.write_element(name)
    if table_key not in on_disk:
        sdata.write_element(table_key)
        return
    backup = store.with_name(f".{store.name}.{table_key}.dkan-backup.zarr")
    shutil.rmtree(backup, ignore_errors=True)
    sdata.tables[table_key].write_zarr(backup)
    try:
        sdata.delete_element_from_disk(table_key)
        sdata.write_element(table_key)
    except BaseException:
        logger.error(
            "Rewriting table `%s` in %s failed; the updated table is kept in %s. Restore it with "
            "`sdata.tables[%r] = anndata.read_zarr(backup)` and `sdata.write_element(%r, overwrite=True)`.",
            table_key, store, backup, table_key, table_key,
        )  # fmt: skip
        raise
    shutil.rmtree(backup, ignore_errors=True)
