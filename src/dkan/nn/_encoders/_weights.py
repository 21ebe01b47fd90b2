"""Weight files: locating, reading, hashing and strict loading."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("dkan")

CACHE_ENV = "DKAN_CACHE_DIR"
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def cache_dir() -> Path:
    """The folder dkan downloads weights into: ``$DKAN_CACHE_DIR`` or ``~/.cache/dkan``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "dkan")).expanduser()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file (memoised per path, size and modification time)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys, dtypes, shapes and bytes of a state dict."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolve_checkpoint(
    path: str | os.PathLike | None,
    *,
    what: str,
    env: str,
    filename: str,
    cache_name: str | None = None,
    url: str | None = None,
    sha256: str | None = None,
    download: bool = False,
    hint: str = "",
) -> Path:
    """Find a weight file: ``path`` argument, then ``$env``, then the cache (downloading only if asked).

    A directory is searched for ``filename``; the cache holds it as ``cache_name`` (default ``filename``).
    A download is accepted only when its SHA-256 equals ``sha256``. Raises FileNotFoundError saying where to put
    the file.
    """
    source = "checkpoint_path" if path is not None else env
    if path is None:
        path = os.environ.get(env) or None
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / filename
        if p.is_file():
            return p
        raise FileNotFoundError(
            f"{what} weights not found at {p} (from `{source}`). Put `{filename}` there, or pass "
            f"`checkpoint_path=` pointing at it.{hint}"
        )
    cached = cache_dir() / (cache_name or filename)
    if cached.is_file():
        return cached
    if url is not None and download:
        return download_verified(url, cached, sha256=sha256, what=what)
    how = f", or pass `download=True` to fetch it from {url}" if url is not None else ""
    raise FileNotFoundError(
        f"{what} weights not found. Pass `checkpoint_path=` (file or folder holding `{filename}`), set the "
        f"environment variable {env}, or place it at {cached} (set ${CACHE_ENV} to move the cache folder){how}."
        f"{hint} Use `pretrained=False` for random weights."
    )


def download_verified(url: str, dest: Path, *, sha256: str | None, what: str) -> Path:
    """Download ``url`` to ``dest`` through a temporary file, keeping it only if its SHA-256 is ``sha256``.

    Raises
    ------
    ValueError
        No expected digest was given, or the download's digest differs (the file is deleted).
    """
    if not sha256 or len(sha256) != 64:
        raise ValueError(
            f"Refusing to download {what} weights from {url} without a known SHA-256 to check them against: pass "
            "`sha256=` (64 hex digits, e.g. from `sha256sum` of a copy you trust), or download the file yourself "
            "and pass `checkpoint_path=`."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    logger.info("Downloading %s weights from %s to %s", what, url, dest)
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=True)
        got = file_sha256(tmp)
        if got != sha256.lower():
            raise ValueError(
                f"The {what} weights downloaded from {url} have SHA-256 {got}, expected {sha256.lower()}; the file "
                "was deleted. The release may have changed or the download was tampered with."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


_CONVERT_HINT = (
    "dkan never unpickles weight files (a pickle can run arbitrary code). If you trust this file, convert it once "
    "to safetensors with `dkan.nn.convert_checkpoint(src, dst, trust_pickle=True)` and pass the new file."
)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weight file (``.safetensors``, or a torch file holding only tensors) onto the CPU.

    Torch files are read with ``weights_only=True`` (memory-mapped when possible); one that holds anything but
    tensors and plain containers is refused, never unpickled.

    Raises
    ------
    ValueError
        The file cannot be read as weights; the message says how to convert a trusted checkpoint.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError) as err:
            raise ValueError(f"Cannot read safetensors weights from {p}: {err}") from None
    try:
        return _torch_load(p)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"Cannot read {p} as a plain tensor file ({first}). {_CONVERT_HINT}") from None


def _torch_load(p: Path) -> dict:
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:  # the legacy (non-zip) format cannot be memory-mapped
        if "mmap" not in str(err).lower():
            raise
        return torch.load(p, map_location="cpu", weights_only=True)


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, *, trust_pickle: bool = False, key: str | None = None
) -> Path:
    """Convert a pickled torch checkpoint you trust into a ``.safetensors`` file that dkan can load safely.

    Unpickling runs whatever code the file names, so this is the one place dkan does it, and only when asked.

    Parameters
    ----------
    src
        The torch checkpoint (``.pth``, ``.ckpt``, ``.bin``).
    dst
        The ``.safetensors`` file to write.
    trust_pickle
        Must be True: you confirm that ``src`` comes from a source you trust.
    key
        Entry holding the state dict (default: ``"state_dict"`` when present, else the top level).

    Returns
    -------
    The file written.
    """
    from safetensors.torch import save_file

    if trust_pickle is not True:
        raise ValueError(
            "`trust_pickle=True` is required: converting unpickles the checkpoint, which can run arbitrary code."
        )
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"`dst={str(dst)!r}` must end in `.safetensors`.")
    obj = torch.load(Path(src), map_location="cpu", weights_only=False)
    sd = obj[key] if key is not None else (obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj)
    if not isinstance(sd, Mapping):
        raise TypeError(f"{src} holds a {type(sd).__name__}, not a state dict; pass `key=` to choose an entry.")
    tensors = {k: v.detach().contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{src} holds no tensors under {key or 'the top level'}.")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.part")
    save_file(tensors, str(tmp))
    os.replace(tmp, dst)
    return dst


def _fmt(keys: list[str], n: int = 12) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Raise ValueError listing missing, unexpected and mis-shaped keys of ``state_dict`` for ``model``."""
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_fmt(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_fmt(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (file vs model): {_fmt(shapes)}")
        raise ValueError(
            f"Weights from {source} do not match the architecture; nothing was loaded. " + "; ".join(parts) + "."
        )


def build_with_weights(
    factory: Callable[[], nn.Module], state_dict: Mapping[str, torch.Tensor], *, source: str
) -> nn.Module:
    """Build ``factory()`` and load ``state_dict`` strictly, skipping the random init where possible.

    BatchNorm ``num_batches_tracked`` counters absent from the file are filled with zeros (they do not affect
    inference); every other missing or unexpected key is an error.
    """
    with torch.device("meta"):
        model = factory()
    sd = dict(state_dict)
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros((), dtype=v.dtype)
    check_keys(model, sd, source=source)
    model.load_state_dict(sd, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # non-persistent buffers
        model = factory()
        model.load_state_dict(sd, strict=True)
    return model
