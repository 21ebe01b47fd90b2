"""Spot crops (patch and ``G x G`` region) read lazily from SpatialData images, as a torch Dataset.

Windows come from the tile geometry written by :func:`dkan.tl.tile`. Reads go through a per-image chunk cache
(:class:`dkan._features.windows.ChunkReader`): a batch of windows is mapped to the image chunks it touches, the
missing chunks are fetched in one ``dask.compute`` call (decoded in parallel, each once), and windows are
assembled from them with zero padding at the image edge. A region is one window: at native resolution its
chunk pieces are copied straight into the ``G*G`` tile layout (one copy per pixel); when resampling, the window
is read, resized and cut into tiles by a reshape.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dkan import _keys as K
from dkan._features.levels import image_levels, rgb
from dkan._features.pixels import augment, augment_tiles, cut_tiles, resize
from dkan._features.tile import tile, tile_keys, window_origins
from dkan._features.windows import ChunkReader, _BufferPool, read_window, strip_cache_bytes
from dkan._utils import get_table, table_attrs, uns_get

__all__ = ["BatchBySample", "ChunkReader", "SpotCrops", "augment", "read_window"]

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class _Source:
    """One sample of the dataset: its image level, windows and table rows."""

    name: str
    sdata_index: int
    table_key: str
    obs_idx: np.ndarray  #: table rows of the spots, in dataset order
    reader: ChunkReader
    spot_px: np.ndarray  #: (n, 2) x, y at the level
    mask: np.ndarray  #: (n, G*G) bool
    patch_side: int
    region_side: int


def _sources(sdata: SpatialData, k: int, table_key: str | None, tile_key: str | None, cache_bytes: int | None) -> list:
    """Crop sources of every tiled sample of one SpatialData (runs :func:`tile` with defaults if needed)."""
    from dkan._results import results_table

    tkey, _ = get_table(sdata, table_key)
    _, adata = results_table(sdata, tkey, create=True)
    step = tile_keys(None)["uns"] if tile_key is None else tile_key
    geo = uns_get(adata, step)
    if geo is None:
        if tile_key is not None:
            raise KeyError(
                f"`tile_key={tile_key!r}` not found in `uns['{K.UNS}']` of table `{tkey}`; run dkan.tl.tile."
            )
        logger.info("No tile geometry in table `%s`; running dkan.tl.tile with default settings.", tkey)
        tile(sdata, table_key=tkey)
        _, adata = results_table(sdata, tkey)
        geo = uns_get(adata, step)
    _, region_key, _ = table_attrs(adata, table_key=tkey)
    region = adata.obs[region_key].astype(str).to_numpy()
    keys = geo["keys"]
    out = []
    for name, rec in geo["samples"].items():
        idx = np.flatnonzero(region == rec["spots_key"])
        level = rgb(image_levels(sdata.images[rec["image_key"]])[rec["level"]])
        out.append(
            _Source(
                name=str(name),
                sdata_index=k,
                table_key=tkey,
                obs_idx=idx,
                reader=ChunkReader(level, cache_bytes=cache_bytes or strip_cache_bytes(level, rec["region_side"])),
                spot_px=np.asarray(adata.obsm[keys["spot_px"]])[idx],
                mask=np.asarray(adata.obsm[keys["region_mask"]], dtype=bool)[idx],
                patch_side=int(rec["patch_side"]),
                region_side=int(rec["region_side"]),
            )
        )
    return out, geo


class SpotCrops(Dataset):
    """Spot patches (and optionally ``G x G`` regions) of one or several SpatialData, read lazily.

    Parameters
    ----------
    sdata
        One SpatialData or a list; every tiled sample of every element is part of the dataset. Samples without
        tile geometry are tiled with :func:`dkan.tl.tile` defaults.
    table_key
        Table holding the spots and tile geometry (inferred when there is one).
    tile_key
        ``uns["dkan"]`` step of the geometry (the ``key_added`` of :func:`dkan.tl.tile`; default ``"tile"``).
    with_region
        Also return the region tiles (one window read per spot, cut by a reshape).
    augment
        Training augmentation: random horizontal flip, vertical flip and 90° rotation (each p=0.5, as in the
        reference), the same for patch, region and region mask.
    normalize
        Return float32 ``(x / 255 - mean) / std``; ``False`` returns uint8 (normalise later, e.g. on the GPU).
    mean, std
        Per-channel normalisation statistics (default ImageNet).
    seed
        Seed of the augmentation generator in the main process; DataLoader workers use their worker seed.
    cache_bytes
        Budget of the per-image chunk cache. ``None``: enough for the chunk rows that one row of region windows
        spans (so each chunk is decoded once in table order), between 256 MiB and 1 GiB.

    Attributes
    ----------
    samples
        Per sample, the dataset indices of its spots (for per-sample batches, see :class:`BatchBySample`).
    sample_names
        Sample names, in the order of ``samples``; ``item["sample"]`` indexes them.
    """

    def __init__(
        self,
        sdata: SpatialData | Sequence[SpatialData],
        *,
        table_key: str | None = None,
        tile_key: str | None = None,
        with_region: bool = False,
        augment: bool = False,
        normalize: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
        cache_bytes: int | None = None,
    ) -> None:
        sdatas = list(sdata) if isinstance(sdata, list | tuple) else [sdata]
        if not sdatas:
            raise ValueError("`sdata` is an empty list; pass at least one SpatialData.")
        self._sources: list[_Source] = []
        params = None
        for k, sd in enumerate(sdatas):
            srcs, geo = _sources(sd, k, table_key, tile_key, cache_bytes)
            p = (int(geo["patch_size"]), int(geo["region_grid"]))
            if params is not None and p != params:
                raise ValueError(
                    f"SpatialData {k} was tiled with (patch_size, region_grid) = {p}, others with {params}."
                )
            params = p
            self._sources.extend(srcs)
        self.patch_size, self.region_grid = params
        self.with_region, self.augment, self.normalize, self.seed = with_region, augment, normalize, int(seed)
        sizes = [len(s.obs_idx) for s in self._sources]
        if sum(sizes) == 0:
            raise ValueError("The tiled samples have no spots.")
        offsets = np.r_[0, np.cumsum(sizes)]
        self._src_of = np.repeat(np.arange(len(sizes)), sizes)
        self._local = np.concatenate([np.arange(n) for n in sizes])
        self.samples = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(sizes))]
        self.sample_names = [s.name for s in self._sources]
        std_t = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t
        self._gen: torch.Generator | None = None
        self._gen_seed: int | None = None
        self._pool = _BufferPool()

    def __len__(self) -> int:
        return len(self._src_of)

    def table_rows(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(sample id, table row)`` of dataset indices."""
        idx = np.asarray(indices, dtype=np.int64)
        src = self._src_of[idx]
        rows = np.array([self._sources[s].obs_idx[loc] for s, loc in zip(src, self._local[idx], strict=True)])
        return src, rows.astype(np.int64)

    def source_rows(self) -> list[np.ndarray]:
        """Per sample (in the order of ``samples``), the table rows of its spots."""
        return [src.obs_idx for src in self._sources]

    def _draw(self, n: int) -> np.ndarray:
        """``(n, 3)`` augmentation draws ``(hflip, vflip, rot)`` from the per-process generator."""
        info = torch.utils.data.get_worker_info()
        seed = self.seed if info is None else int(info.seed)
        if self._gen is None or self._gen_seed != seed:
            self._gen, self._gen_seed = torch.Generator().manual_seed(seed), seed
        return (torch.rand((n, 3), generator=self._gen) < 0.5).numpy().astype(np.int64)

    def read_batch(self, indices: Sequence[int] | np.ndarray, *, transforms: np.ndarray | None = None) -> dict:
        """Read a batch of spots at once (windows grouped per image, chunks fetched in one ``dask.compute``).

        Parameters
        ----------
        indices
            Dataset indices.
        transforms
            Optional ``(n, 3)`` integer array ``(hflip, vflip, rot90 count)`` overriding the random augmentation.

        Returns
        -------
        Dict of batched tensors: ``patch`` (B, 3, P, P), ``region`` (B, G*G, 3, P, P) when ``with_region``,
        ``region_mask`` (B, G*G) bool, ``index`` (B,) table rows and ``sample`` (B,) sample ids.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n, p, g = len(idx), self.patch_size, self.region_grid
        if transforms is None:
            transforms = self._draw(n) if self.augment else np.zeros((n, 3), dtype=np.int64)
        patch = self._pool.get((n, 3, p, p), np.uint8)
        region = self._pool.get((n, g * g, 3, p, p), np.uint8) if self.with_region else None
        mask = np.empty((n, g * g), bool)
        src_ids, rows = self.table_rows(idx)
        for s in np.unique(src_ids):
            pos = np.flatnonzero(src_ids == s)
            self._read_source(self._sources[s], self._local[idx[pos]], pos, transforms, patch, region, mask)
        out = {
            "patch": self._finish(patch),
            "region_mask": torch.from_numpy(mask),
            "index": torch.from_numpy(rows),
            "sample": torch.from_numpy(src_ids.astype(np.int64)),
        }
        if region is not None:
            out["region"] = self._finish(region)
        return out

    def iter_batches(
        self, indices: Sequence[int] | np.ndarray | None = None, batch_size: int = 32, *, prefetch: bool = False
    ) -> Iterator[dict]:
        """Yield :meth:`read_batch` results over ``indices`` (default: all, in table order).

        Table order is the fastest order: neighbouring spots share image chunks. With ``prefetch``, a background
        thread decodes the chunks of the next batch while this one is assembled; that helps only when spare
        CPU cores exist (on 2 busy cores it measured no faster).
        """
        from concurrent.futures import ThreadPoolExecutor

        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        with ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(self._prefetch, batches[0]) if prefetch and batches else None
            for k, b in enumerate(batches):
                if ahead is not None:
                    ahead.result()
                    ahead = pool.submit(self._prefetch, batches[k + 1]) if k + 1 < len(batches) else None
                yield self.read_batch(b)

    def _prefetch(self, indices: np.ndarray) -> None:
        src_ids = self._src_of[indices]
        for s in np.unique(src_ids):
            src = self._sources[s]
            xy = src.spot_px[self._local[indices[src_ids == s]]]
            side = src.region_side if self.with_region else src.patch_side
            src.reader.prefetch([(int(y0), int(x0), side, side) for x0, y0 in window_origins(xy, side)])

    def _read_source(self, src: _Source, loc: np.ndarray, pos: np.ndarray, tf: np.ndarray, patch, region, mask) -> None:
        """Fill the batch rows ``pos`` with the crops of spots ``loc`` of one source."""
        p, g = self.patch_size, self.region_grid
        xy = src.spot_px[loc]
        for b, lc in zip(pos, loc, strict=True):
            mask[b] = augment(src.mask[lc].reshape(g, g), *tf[b]).reshape(-1)
        if src.patch_side == p and (region is None or src.region_side == g * p):
            # native resolution: assemble chunk pieces straight into the output tiles (one copy per pixel)
            centre = region is not None and g % 2 == 1  # the patch is then the centre tile
            windows = [] if centre else [(int(y0), int(x0), p, p) for x0, y0 in window_origins(xy, p)]
            outs = [] if centre else [patch[b] for b in pos]
            if region is not None:
                for b, (x0, y0) in zip(pos, window_origins(xy, g * p), strict=True):
                    windows += [(int(y0) + i * p, int(x0) + j * p, p, p) for i in range(g) for j in range(g)]
                    outs += list(region[b])
            src.reader.read(windows, outs)
            for b in pos:
                if centre:
                    patch[b] = region[b, g * g // 2]
                if tf[b].any():
                    patch[b] = augment(patch[b], *tf[b]).copy()
                    if region is not None:
                        tiles = region[b].reshape(g, g, 3, p, p)
                        tiles[...] = augment_tiles(tiles, *tf[b]).copy()
            return
        side = src.region_side if region is not None else src.patch_side
        windows = [(int(y0), int(x0), side, side) for x0, y0 in window_origins(xy, side)]
        off = side // 2 - src.patch_side // 2
        for b, buf in zip(pos, src.reader.read(windows), strict=True):
            h, v, r = (int(t) for t in tf[b])
            pw = buf[:, off : off + src.patch_side, off : off + src.patch_side]
            patch[b] = resize(augment(pw, h, v, r), p)
            if region is not None:
                cut_tiles(resize(augment(buf, h, v, r), g * p), region[b], g)

    def _finish(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        if not self.normalize:
            return t
        out = torch.from_numpy(self._pool.get(arr.shape, np.float32))
        return torch.mul(t, self._scale, out=out).add_(self._shift)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pool": _BufferPool()}

    def __getitem__(self, i: int) -> dict:
        batch = self.read_batch([int(i)])
        return {k: (v[0] if k not in ("index", "sample") else int(v[0])) for k, v in batch.items()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        batch = self.read_batch(indices)
        return [
            {k: (v[b] if k not in ("index", "sample") else int(v[b])) for k, v in batch.items()}
            for b in range(len(indices))
        ]


class BatchBySample(Sampler):
    """Batches of dataset indices where every batch comes from one sample (shuffled, seeded).

    Parameters
    ----------
    samples
        A :class:`SpotCrops` or its ``samples`` (per-sample arrays of dataset indices).
    batch_size
        Maximum batch size.
    shuffle
        Shuffle spots within samples and the order of batches; reshuffled every epoch.
    drop_last
        Drop each sample's last incomplete batch.
    seed
        Base seed; epoch ``e`` uses ``(seed, e)``. The epoch advances on every iteration, or set it with
        :meth:`set_epoch`.
    """

    def __init__(
        self,
        samples: SpotCrops | Sequence[np.ndarray],
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        groups = samples.samples if isinstance(samples, SpotCrops) else samples
        self.groups = [np.asarray(s, dtype=np.int64) for s in groups]
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be positive; got {batch_size}.")
        self.batch_size, self.shuffle, self.drop_last, self.seed = int(batch_size), shuffle, drop_last, int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (the shuffle of the next iteration)."""
        self.epoch = int(epoch)

    def _batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        out = []
        for group in self.groups:
            order = rng.permutation(group) if self.shuffle else group
            stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
            out.extend(order[i : min(i + self.batch_size, stop)] for i in range(0, stop, self.batch_size))
        if self.shuffle:
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        self.epoch += 1
        for b in batches:
            yield b.tolist()

    def __len__(self) -> int:
        if self.drop_last:
            return sum(len(g) // self.batch_size for g in self.groups)
        return sum(-(-len(g) // self.batch_size) for g in self.groups)
