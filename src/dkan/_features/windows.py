"""Windows of lazy ``(c, y, x)`` images: zero-padded reads and a chunk-cached batch reader (no torch)."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np


def read_window(array: Any, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Read ``array[:, y0:y0+h, x0:x0+w]`` as uint8 ``(c, h, w)``, zero-padded where it leaves the image.

    ``array`` is a ``(c, y, x)`` numpy, dask or xarray array; only the part inside the image is read.
    """
    data = array.data if hasattr(array, "dims") else array
    c, height, width = data.shape
    out = np.zeros((c, h, w), dtype=np.uint8)
    ya, yb, xa, xb = max(y0, 0), min(y0 + h, height), max(x0, 0), min(x0 + w, width)
    if ya < yb and xa < xb:
        out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = np.asarray(data[:, ya:yb, xa:xb])
    return out


def strip_cache_bytes(array: Any, window: int, *, floor: int = 256 * 2**20, cap: int = 2**30) -> int:
    """Chunk-cache budget that keeps the chunk rows one ``window``-high row of spots spans, plus one row.

    Spots read in table (row-major) order revisit every chunk row for each spot row that crosses it; when the
    rows a window spans fit in the cache, each chunk is decoded once. Clamped to ``[floor, cap]`` bytes, so a
    huge image never gets a cache near its size.
    """
    data = array.data if hasattr(array, "dims") else array
    chunks = getattr(data, "chunks", None)
    if chunks is None:
        return floor
    c, _, w = data.shape
    chunk_h = int(max(chunks[1]))
    rows = -(-int(window) // chunk_h) + 2
    return int(min(max(rows * chunk_h * w * c * data.dtype.itemsize, floor), cap))


class ChunkReader:
    """Read many windows of one ``(c, y, x)`` image, fetching each image chunk once (LRU cache by bytes)."""

    def __init__(self, array: Any, *, cache_bytes: int = 256 * 2**20) -> None:
        self.data = array.data if hasattr(array, "dims") else array
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        chunks = getattr(self.data, "chunks", None)
        if chunks is not None and len(chunks[0]) > 1:  # channels split over chunks: one block holds all
            self.data = self.data.rechunk({0: -1})
            chunks = self.data.chunks
        self._blocks: Any = None  # the array's blocks as dask Delayed objects, made on first fetch
        c, h, w = self.data.shape
        ych, xch = (chunks[1], chunks[2]) if chunks is not None else ((h,), (w,))
        self._yb = np.r_[0, np.cumsum(ych)].astype(np.int64)
        self._xb = np.r_[0, np.cumsum(xch)].astype(np.int64)
        self._ybl, self._xbl = self._yb.tolist(), self._xb.tolist()
        self._chunk_bytes = c * np.diff(self._yb)[:, None] * np.diff(self._xb)[None, :]
        self._direct = chunks is None or int(self._chunk_bytes.max()) > self.cache_bytes // 4

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_used", "_lock", "_blocks")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _cache=OrderedDict(), _used=0, _lock=threading.Lock(), _blocks=None)

    def _spans(self, windows: np.ndarray) -> np.ndarray:
        """Per window ``(by0, by1, bx0, bx1)``: the half-open ranges of chunk rows / columns it overlaps."""
        y0, x0, h, w = windows.T
        ya, yb = np.clip(y0, 0, self._yb[-1]), np.clip(y0 + h, 0, self._yb[-1])
        xa, xb = np.clip(x0, 0, self._xb[-1]), np.clip(x0 + w, 0, self._xb[-1])
        spans = np.stack(
            [
                np.searchsorted(self._yb, ya, "right") - 1,
                np.searchsorted(self._yb, yb, "left"),
                np.searchsorted(self._xb, xa, "right") - 1,
                np.searchsorted(self._xb, xb, "left"),
            ],
            axis=1,
        )
        spans[(ya >= yb) | (xa >= xb)] = 0  # window entirely outside: no chunk
        return spans

    def _fetch(self, ids: list[tuple[int, int]], *, touch: bool = True) -> None:
        """Fetch the missing chunks in one ``dask.compute`` call and put them in the cache (thread-safe).

        Chunks are computed as the array's own blocks (``to_delayed``): no slicing graph per chunk and no
        defensive copy of each result (dask's array finalisation copies single-chunk results); about 15 % faster
        on the tiling benchmark.
        """
        with self._lock:
            missing = [b for b in ids if b not in self._cache]
        if missing:
            import dask

            with self._lock:
                if self._blocks is None:
                    self._blocks = self.data.to_delayed()
                blocks = [self._blocks[0, i, j] for i, j in missing]
            arrays = dask.compute(*blocks)
            with self._lock:
                for key, arr in zip(missing, arrays, strict=True):
                    if key not in self._cache:
                        self._cache[key] = np.asarray(arr)
                        self._used += self._cache[key].nbytes
        if touch:
            with self._lock:
                for b in ids:
                    self._cache.move_to_end(b)

    def prefetch(self, windows: Sequence[tuple[int, int, int, int]]) -> None:
        """Decode the chunks of ``windows`` into the cache (up to half its budget); safe from another thread."""
        wins = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
        ids = list(dict.fromkeys(b for span in self._spans(wins).tolist() for b in self._ids(span)))
        budget, keep = self.cache_bytes // 2, []
        for b in ids:
            budget -= int(self._chunk_bytes[b])
            if budget < 0:
                break
            keep.append(b)
        if not self._direct:
            self._fetch(keep, touch=False)

    @staticmethod
    def _ids(span: list[int]) -> list[tuple[int, int]]:
        return [(i, j) for i in range(span[0], span[1]) for j in range(span[2], span[3])]

    def _nbytes(self, ids: list[tuple[int, int]]) -> int:
        return sum(int(self._chunk_bytes[b]) for b in ids)

    def _flush(self, windows: Sequence, spans: list, group: list[int], ids: list, res: list) -> None:
        """Fetch a group's chunks, assemble its windows, then trim the cache."""
        self._fetch(ids)
        for m in group:
            self._assemble(windows[m], spans[m], res[m])
        self._evict()

    def _evict(self) -> None:
        with self._lock:
            while self._used > self.cache_bytes and self._cache:
                self._used -= self._cache.popitem(last=False)[1].nbytes

    def _assemble(self, win: tuple[int, int, int, int], span: tuple[int, int, int, int], out: np.ndarray) -> None:
        """Copy one window from cached chunks into ``out`` (zeros outside the image)."""
        y0, x0, h, w = win
        if y0 < 0 or x0 < 0 or y0 + h > self._ybl[-1] or x0 + w > self._xbl[-1]:
            out[...] = 0
        for i in range(span[0], span[1]):
            cy, cy1 = self._ybl[i], self._ybl[i + 1]
            ya, yb = max(y0, cy), min(y0 + h, cy1)
            for j in range(span[2], span[3]):
                cx, cx1 = self._xbl[j], self._xbl[j + 1]
                xa, xb = max(x0, cx), min(x0 + w, cx1)
                out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = self._cache[(i, j)][
                    :, ya - cy : yb - cy, xa - cx : xb - cx
                ]

    def read(self, windows: Sequence[tuple[int, int, int, int]], out: Sequence[np.ndarray] | None = None) -> list:
        """Read windows ``(y0, x0, h, w)`` into uint8 ``(c, h, w)`` arrays (``out`` buffers when given)."""
        c = self.data.shape[0]
        res = list(out) if out is not None else [np.empty((c, h, w), np.uint8) for _, _, h, w in windows]
        if self._direct:
            for win, buf in zip(windows, res, strict=True):
                buf[...] = read_window(self.data, *win)
            return res
        wins = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
        spans = self._spans(wins).tolist()
        group: list[int] = []
        ids: dict[tuple[int, int], None] = {}
        size = 0
        for k in np.lexsort((wins[:, 1], wins[:, 0])).tolist():  # row-major: neighbours share chunks
            new = [b for b in self._ids(spans[k]) if b not in ids]
            if group and size + self._nbytes(new) > self.cache_bytes:
                self._flush(windows, spans, group, list(ids), res)
                group, ids, size, new = [], {}, 0, self._ids(spans[k])
            group.append(k)
            ids.update(dict.fromkeys(new))
            size += self._nbytes(new)
        self._flush(windows, spans, group, list(ids), res)
        return res


class _Lease:
    """Owns one pooled buffer while the array handed out for it, or anything made from that array, is alive.

    The array is built from this object's ``__array_interface__``, so numpy views and ``torch.from_numpy``
    tensors of it all keep the lease referenced; its garbage collection hands the buffer back to the pool.
    """

    __slots__ = ("__weakref__", "buffer")

    def __init__(self, buffer: np.ndarray) -> None:
        self.buffer = buffer

    @property
    def __array_interface__(self) -> dict[str, Any]:
        return self.buffer.__array_interface__


class _BufferPool:
    """Output arrays reused once nothing derived from them is left (fresh large arrays cost page faults).

    Ownership is explicit: :meth:`get` hands out an array owned by a :class:`_Lease`; when the lease is collected
    (every array, view and tensor made from it is gone), a finaliser puts the buffer back on the free list, which
    keeps at most ``size`` buffers. Nothing depends on reference-count values.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._free: list[np.ndarray] = []
        self._lock = threading.RLock()  # re-entrant: a collection inside `get` may run `_release`

    def __getstate__(self) -> dict[str, Any]:
        return {"size": self.size}  # a copy (another process) starts with an empty pool

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["size"])

    def get(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """Return a writable array of ``shape`` and ``dtype`` (uninitialised), reusing a free buffer if one fits."""
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        buffer = None
        with self._lock:
            for i, free in enumerate(self._free):
                if free.shape == shape and free.dtype == dtype:
                    buffer = self._free.pop(i)
                    break
        if buffer is None:
            buffer = np.empty(shape, dtype)
        lease = _Lease(buffer)
        weakref.finalize(lease, self._release, buffer)
        return np.asarray(lease)

    def _release(self, buffer: np.ndarray) -> None:
        with self._lock:
            self._free.append(buffer)
            if len(self._free) > self.size:
                self._free.pop(0)
