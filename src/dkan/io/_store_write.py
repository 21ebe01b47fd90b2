"""Writing SpatialData zarr stores so that a path is always either the old store or the new one.

Used by :func:`dkan.tl.predict_slides` and ``dkan predict``; the command line imports it, never the reverse.

- A new store is written to a hidden sibling ``.NAME.tmp-HOST-PID-XXXXXXXX`` and renamed into place.
- An existing store is replaced by swapping the two folders in one step (Linux ``renameat2`` with
  ``RENAME_EXCHANGE``), so ``NAME`` is the old store until the instant it is the new one. Where the file system
  cannot swap, the old store is first renamed aside to ``.NAME.old-HOST-PID-XXXXXXXX`` and the new one renamed in;
  a run killed between the two renames leaves ``NAME`` missing for a moment, and the next write to (or
  recovery of) ``NAME`` puts the old store back.
- ``--in-place`` updates keep a complete backup of the new table next to the store
  (``.STORE.TABLE.dkan-backup.zarr``, renamed into place only once written); a killed update is finished from it
  by the next in-place run.

Leftovers are judged by the writer's host and process id in their names: those of a process that is gone (on
this host) are removed or restored by :func:`recover_store`; those of a live process or of another host are
left alone (a shared folder written from several machines). Names without a host and pid (written by dkan
before this rule) count as stale.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import socket
import sys
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")

_LEFTOVER = re.compile(r"^\.(?P<name>.+?)\.(?P<kind>tmp|old)-(?:(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-)?[0-9a-f]{8}$")
_BACKUP = ".dkan-backup.zarr"
_PENDING = ".dkan-pending"  #: marker of a new element being written in place (``.STORE.NAME.dkan-pending``)


def _host() -> str:
    """The name of this machine, reduced to characters that are safe in a file name (no ``-``)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def temp_sibling(path: Path, kind: str) -> Path:
    """A fresh hidden sibling name ``.NAME.KIND-HOST-PID-XXXXXXXX`` of ``path``."""
    return path.with_name(f".{path.name}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _stale(host: str | None, pid: str | None) -> bool:
    """Whether a leftover's writer is gone: no recorded writer, or a dead process on this host."""
    from dkan._utils import pid_alive

    if host is None or pid is None:
        return True
    if host != _host():
        return False
    return int(pid) != os.getpid() and not pid_alive(int(pid))


def _leftovers(path: Path) -> list[tuple[str, Path]]:
    """``(kind, path)`` of the stale temporary and set-aside siblings of ``path``, newest first."""
    if not path.parent.is_dir():
        return []
    found = []
    for entry in path.parent.iterdir():
        m = _LEFTOVER.match(entry.name)
        if m and m["name"] == path.name and _stale(m["host"], m["pid"]):
            found.append((m["kind"], entry))
    return sorted(found, key=lambda item: item[1].lstat().st_mtime, reverse=True)


def recover_store(path: str | os.PathLike[str]) -> None:
    """Undo what a killed write to ``path`` left: restore a store that was set aside, remove temporary copies.

    When ``path`` is missing and a write killed between its two renames set the old store aside, the old store
    is renamed back (the newest one, when there are several). Every other stale ``.NAME.tmp-*`` and
    ``.NAME.old-*`` sibling is removed. Leftovers of live writers and of other hosts are kept.

    Parameters
    ----------
    path
        The store path.
    """
    path = Path(path)
    leftovers = _leftovers(path)
    if not os.path.lexists(path):
        old = next((entry for kind, entry in leftovers if kind == "old"), None)
        if old is not None:
            _move(old, path)
            logger.warning("Restored %s from %s, set aside by an interrupted write.", path, old.name)
            leftovers = [item for item in leftovers if item[1] != old]
    for _, entry in leftovers:
        logger.info("Removing %s, left by an interrupted write.", entry)
        shutil.rmtree(entry, ignore_errors=True)


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


def write_new_store(sdata: SpatialData, out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``sdata`` to ``out`` so that ``out`` is at every instant absent, the old store or the new one.

    Leftovers of killed writes to ``out`` are recovered first (:func:`recover_store`).

    Parameters
    ----------
    sdata
        The SpatialData to write.
    out
        Target zarr store path.
    overwrite
        Replace an existing store at ``out`` (only a zarr store; swapped in once the new one is complete).

    Returns
    -------
    The path written.
    """
    out = Path(out)
    recover_store(out)
    check_replaceable_store(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out, "tmp")
    try:
        _write_quietly(sdata, tmp)
        if not out.exists():
            _move(tmp, out)
        elif _exchange(tmp, out):
            pass  # `tmp` now holds the old store
        else:
            old = temp_sibling(out, "old")
            _move(out, old)
            _move(tmp, out)
            tmp = old
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (one step; a separate function so that kill tests can stop between steps)."""
    os.replace(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False  # C library without renameat2 (glibc < 2.28, musl)
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False  # file system or kernel without the exchange
    raise OSError(code, os.strerror(code), str(a), None, str(b))


# ----------------------------------------------------------------------------------------- in-place updates
def backup_path(store: Path, table_key: str) -> Path:
    """The complete backup of an in-place table update: ``.STORE.TABLE.dkan-backup.zarr`` next to the store."""
    return store.with_name(f".{store.name}.{table_key}{_BACKUP}")


def write_backup(table: AnnData, table_key: str, backup: Path) -> None:
    """Write ``table`` as a one-table SpatialData store ``backup``, which exists only once complete."""
    import spatialdata as sd

    recover_store(backup)
    tmp = temp_sibling(backup, "tmp")
    try:
        with warnings.catch_warnings():  # the table annotates elements that stay in the store
            warnings.filterwarnings("ignore", "The table is annotating", UserWarning)
            sd.SpatialData(tables={table_key: table}).write(tmp)
        shutil.rmtree(backup, ignore_errors=True)
        _move(tmp, backup)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def restore_backups(store: str | os.PathLike[str]) -> list[str]:
    """Finish the in-place table updates of ``store`` that a killed run left, from their complete backups.

    The table element in the store may be the old one, missing or half-written; it is replaced by the backup's
    table (the update the killed run was writing), then the backup is removed.

    Parameters
    ----------
    store
        A SpatialData zarr store.

    Returns
    -------
    The table keys restored.
    """
    import spatialdata as sd

    store = Path(store)
    drop_unfinished_elements(store)
    done = []
    for key, backup in pending_backups(store).items():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The table is annotating", UserWarning)
            copy = sd.read_zarr(backup)
        copy.path = store.resolve()
        if f"tables/{key}" in copy.elements_paths_on_disk():
            copy.delete_element_from_disk(key)
        copy.write_element(key)
        shutil.rmtree(backup, ignore_errors=True)
        logger.warning("Finished an interrupted in-place update of table `%s` in %s from %s.", key, store, backup)
        done.append(key)
    return done


def pending_backups(store: Path) -> dict[str, Path]:
    """``{table key: backup}`` of in-place updates of ``store`` that a killed run did not finish."""
    store = Path(store)
    prefix, found = f".{store.name}.", {}
    if store.parent.is_dir():
        for entry in store.parent.iterdir():
            name = entry.name
            if name.startswith(prefix) and name.endswith(_BACKUP) and entry.is_dir():
                found[name[len(prefix) : -len(_BACKUP)]] = entry
            elif name.startswith(prefix) and _BACKUP + ".tmp-" in name:
                recover_store(entry.with_name(name.split(".tmp-")[0]))  # a backup killed while written
    return found


def update_in_place(sdata: SpatialData, table_key: str, *, added: Sequence[str] = ()) -> None:
    """Rewrite table ``table_key`` of a backed SpatialData on disk and write the new elements ``added``.

    The updated table is first saved as a one-table store next to the store (``.STORE.TABLE.dkan-backup.zarr``,
    renamed into place once complete) so an interruption between deleting and rewriting the element loses
    nothing; the backup is removed when the element is written. A killed or failed update leaves the backup,
    and the next in-place run finishes the update from it before reading the store.

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
    kinds = {name: kind for kind, name, _ in sdata.gen_elements()}
    for name in added:
        if name not in on_disk:
            _write_new_element(sdata, store, name, kinds[name])
    if table_key not in on_disk:
        sdata.write_element(table_key)
        return
    backup = backup_path(store, table_key)
    write_backup(sdata.tables[table_key], table_key, backup)
    try:
        sdata.delete_element_from_disk(table_key)
        sdata.write_element(table_key)
    except BaseException:
        logger.error(
            "Rewriting table `%s` in %s failed; the updated table is kept in %s. The next `dkan predict "
            "--in-place` on the store restores it (dkan.io._store_write.restore_backups).",
            table_key, store, backup,
        )  # fmt: skip
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _pending_path(store: Path, name: str) -> Path:
    return store.with_name(f".{store.name}.{name}{_PENDING}")


def _write_new_element(sdata: SpatialData, store: Path, name: str, kind: str) -> None:
    """Write a new element in place, marked as pending until complete (see :func:`drop_unfinished_elements`)."""
    marker = _pending_path(store, name)
    marker.write_text(f"{kind}/{name}\n")
    try:
        sdata.write_element(name)
    except BaseException:
        shutil.rmtree(store / kind / name, ignore_errors=True)
        marker.unlink(missing_ok=True)
        raise
    marker.unlink(missing_ok=True)


def drop_unfinished_elements(store: str | os.PathLike[str]) -> list[str]:
    """Delete the new elements a killed in-place run left half-written in ``store`` (their pending markers say which).

    The run that follows writes them again. Returns the element paths removed.
    """
    store = Path(store)
    prefix, removed = f".{store.name}.", []
    if not store.parent.is_dir():
        return removed
    for marker in store.parent.iterdir():
        if not (marker.name.startswith(prefix) and marker.name.endswith(_PENDING) and marker.is_file()):
            continue
        rel = marker.read_text().strip()
        target = (store / rel).resolve()
        if rel and target.is_relative_to(store.resolve()) and target != store.resolve():
            shutil.rmtree(target, ignore_errors=True)
            removed.append(rel)
            logger.warning("Removed `%s` from %s: a killed in-place run left it half-written.", rel, store)
        marker.unlink(missing_ok=True)
    if removed:
        import zarr

        with warnings.catch_warnings():  # zarr's notices on v3 consolidated metadata and parquet files
            warnings.filterwarnings("ignore", category=UserWarning, module="zarr")
            zarr.consolidate_metadata(str(store))  # the store's metadata listed the removed elements
    return removed


def _write_quietly(sdata: SpatialData, path: Path) -> None:
    """``sdata.write(path)`` without zarr's notice that autosharding becomes its default (one per array written).

    The notice is about zarr's future defaults, not about this store, and floods a cohort run's stderr.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autoshard.*", category=UserWarning)
        sdata.write(path, update_sdata_path=False)
