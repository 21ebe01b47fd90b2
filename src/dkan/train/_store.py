"""On-disk layout of a saved model: a manifest (``dkan.json``) that commits a set of checksummed files.

A model folder holds ``dkan.json`` and the tensor files it names. Writing is crash-safe without ever removing
the folder:

- a new folder is assembled in a temporary sibling (``.NAME.dkan-tmp-PID-XXXX``) and renamed into place;
- an existing model folder is updated in place: the new tensor files get fresh names, then ``dkan.json`` is
  replaced atomically (the commit point), then the files the old manifest named are removed. A crash before
  the commit leaves the old model, after it the new one; unreferenced files of an interrupted save are
  removed by the next save.

Only a folder that is recognisably a dkan model (a readable ``dkan.json`` naming a dkan format) is ever
written into; anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dkan._utils import pid_alive

MANIFEST = "dkan.json"
_TMP_DIR = re.compile(r"^\.(?P<name>.+)\.dkan-tmp-(?P<pid>\d+)-[0-9a-f]{8}$")
_WRITER_TMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")  # safetensors (Rust tempfile crate): .tmp + 6 characters
_OURS = re.compile(r"^(model|genes)(\.[0-9a-f]{8})?\.safetensors$|^dkan\.json\.tmp-\d+-[0-9a-f]{8}$")


def content_sha256(payload: Mapping[str, Any]) -> str:
    """SHA-256 of a JSON payload in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse ``path/dkan.json``; ValueError naming the file when it is not a JSON object with a format."""
    file = path / MANIFEST
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{file} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): the model was "
            "truncated or edited. Save it again from the trained model."
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text: the model file is corrupted.") from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise ValueError(f"{file} is not a dkan model manifest (no `format` field).")
    return meta


def is_model_dir(path: Path) -> bool:
    """True when ``path`` is a folder whose ``dkan.json`` is a dkan manifest (readable or not quite)."""
    if not (path / MANIFEST).is_file():
        return False
    try:
        read_manifest(path)
    except ValueError:
        return False
    return True


def check_target(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Check that a model may be saved at ``path``; return it as a Path.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    ValueError
        ``overwrite`` is True but ``path`` is a file or a folder that is not a dkan model (nothing is removed).
    """
    path = Path(path)
    if not path.exists():
        return path
    if not overwrite:
        raise FileExistsError(f"`path={str(path)!r}` exists; pass `overwrite=True` to replace the model there.")
    if not path.is_dir():
        raise ValueError(f"`path={str(path)!r}` is a file, not a dkan model folder; choose another path.")
    if not is_model_dir(path):
        raise ValueError(
            f"`path={str(path)!r}` exists and is not a dkan model folder (no readable {MANIFEST}); dkan only "
            "overwrites its own models. Choose another path or remove the folder yourself."
        )
    return path


def new_temp_dir(path: Path) -> Path:
    """Create an empty temporary sibling folder of ``path`` (mode from the umask, like any new folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = path.with_name(f".{path.name}.dkan-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    return tmp


def token() -> str:
    """A short random suffix for tensor file names."""
    return uuid.uuid4().hex[:8]


def current_umask() -> int:
    """The process umask (read without changing it where the OS allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: the classic round trip
    os.umask(mask)
    return mask


def follow_umask(file: Path) -> None:
    """Give ``file`` the mode a plain ``open()`` would (some writers, safetensors among them, create 0600)."""
    os.chmod(file, 0o666 & ~current_umask())


def write_manifest(folder: Path, meta: Mapping[str, Any]) -> None:
    """Write ``folder/dkan.json`` atomically (temporary file, fsync, rename)."""
    tmp = folder / f"{MANIFEST}.tmp-{os.getpid()}-{token()}"
    try:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST)
    finally:
        tmp.unlink(missing_ok=True)


def commit_new(tmp: Path, path: Path) -> None:
    """Move a complete temporary folder to a ``path`` that does not exist."""
    try:
        os.rename(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(
            f"`path={str(path)!r}` appeared while the model was being saved; nothing was written."
        ) from err


def remove_unreferenced(path: Path, keep: set[str]) -> None:
    """Remove dkan's own files in a model folder that the manifest does not name (the user's files stay)."""
    for entry in path.iterdir():
        if entry.name != MANIFEST and entry.name not in keep and _OURS.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)


def clean_stale(path: Path) -> None:
    """Remove temporary folders of saves to ``path`` whose process is gone (a killed save)."""
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        m = _TMP_DIR.match(entry.name)
        if (
            m
            and m["name"] == path.name
            and entry.is_dir()
            and (int(m["pid"]) == os.getpid() or not pid_alive(int(m["pid"])))
        ):
            shutil.rmtree(entry, ignore_errors=True)


def clean_writer_temps(path: Path) -> None:
    """Remove the hidden temporary files a killed safetensors write left in a model folder (``.tmpXXXXXX``).

    safetensors writes each tensor file to a hidden sibling named like this and renames it into place; a save
    killed by SIGKILL leaves it behind. Only called by a save to ``path`` (a load never removes anything: a
    save running at the same time may own the file).
    """
    if not path.is_dir():
        return
    for entry in path.iterdir():
        if _WRITER_TMP.match(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
