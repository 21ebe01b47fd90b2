"""An H&E image file (JPEG, PNG, TIFF) read lazily through PIL: decoded once, on first access, sliced as (c, y, x)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def no_pixel_limit() -> Iterator[None]:
    """Lift PIL's decompression-bomb limit for the duration of the block, then restore it."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


@contextlib.contextmanager
def decoding(path: Path) -> Iterator[None]:
    """Report an image file PIL cannot identify or decode (corrupt, truncated, not an image) as a ValueError."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError (OSError), SyntaxError
        raise ValueError(
            f"`image` file {path} cannot be decoded as an image ({type(err).__name__}: {err}). Pass the section's "
            "H&E image as a readable JPEG, PNG or TIFF file (re-export or re-download a corrupt or truncated one)."
        ) from err


class LazyImage:
    """An RGB image file that is decoded once, on first access, and sliced as a (c, y, x) uint8 array."""

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, path: str | PathLike[str]) -> None:
        from PIL import Image

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"`image` file {self.path} does not exist.")
        with decoding(self.path), no_pixel_limit(), Image.open(self.path) as im:
            w, h = im.size
        self.shape = (3, h, w)
        self._data: np.ndarray | None = None
        self._lock = threading.Lock()

    def _load(self) -> np.ndarray:
        from PIL import Image

        with self._lock:
            if self._data is None:
                with decoding(self.path), no_pixel_limit(), Image.open(self.path) as im:
                    rgb = im if im.mode == "RGB" else im.convert("RGB")
                    arr = np.asarray(rgb)
                self._data = np.ascontiguousarray(np.moveaxis(arr, -1, 0))
        return self._data

    def __getitem__(self, key: Any) -> np.ndarray:
        return self._load()[key]

    def __getstate__(self) -> dict:  # drop the lock (and the cache) when pickled, e.g. into workers
        return {"path": self.path, "shape": self.shape}

    def __setstate__(self, state: dict) -> None:
        self.path, self.shape = state["path"], state["shape"]
        self._data, self._lock = None, threading.Lock()

    def __dask_tokenize__(self) -> tuple:
        return ("dkan-st-image", str(self.path.resolve()), self.path.stat().st_mtime_ns, self.shape)

    def to_dask(self, chunks: tuple[int, int, int]) -> Any:
        import dask.array as da

        return da.from_array(self, chunks=chunks, asarray=False, meta=np.empty((0, 0, 0), np.uint8))
