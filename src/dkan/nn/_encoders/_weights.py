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
    download: bool = False,
    hint: str = "",
) -> Path:
    """Find a weight file: ``path`` argument, then ``$env``, then the cache (downloading only if asked).

    A directory is searched for ``filename``; the cache holds it as ``cache_name`` (default ``filename``).
    Raises FileNotFoundError saying where to put the file.
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
        cached.parent.mkdir(parents=True, exist_ok=True)
        logger.info("Downloading %s weights from %s to %s", what, url, cached)
        torch.hub.download_url_to_file(url, str(cached), progress=True)
        return cached
    how = f", or pass `download=True` to fetch it from {url}" if url is not None else ""
    raise FileNotFoundError(
        f"{what} weights not found. Pass `checkpoint_path=` (file or folder holding `{filename}`), set the "
        f"environment variable {env}, or place it at {cached} (set ${CACHE_ENV} to move the cache folder){how}."
        f"{hint} Use `pretrained=False` for random weights."
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weight file (``.safetensors`` or a torch pickle) onto the CPU, memory-mapped when possible."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    try:
        return _torch_load(p, weights_only=True)
    except pickle.UnpicklingError:
        logger.warning("%s holds more than tensors; loading it with full unpickling (trust only known files).", p)
        return _torch_load(p, weights_only=False)


def _torch_load(p: Path, *, weights_only: bool) -> dict:
    try:
        return torch.load(p, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as err:  # the legacy (non-zip) format cannot be memory-mapped
        if "mmap" not in str(err).lower():
            raise
        return torch.load(p, map_location="cpu", weights_only=weights_only)


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
