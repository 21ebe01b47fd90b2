"""Model tensors from SpatialData: per-sample targets, spot and region features, masks and grid positions.

The one place where tables become tensors: :func:`dkan.tl.train`, :func:`dkan.tl.predict` and
:func:`dkan.tl.cross_validate` all build their inputs here. Everything is read from the results table
(:mod:`dkan._results`); non-finite inputs are refused with the spot (and gene) that holds one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K
from dkan._results import results_table
from dkan._utils import get_table, iter_samples

if TYPE_CHECKING:
    import torch
    from spatialdata import SpatialData

    from dkan._config import DKANConfig


def build_inputs(
    sdatas: list[SpatialData],
    genes: list[str],
    cfg: DKANConfig,
    *,
    table_key: str | None,
    with_target: bool,
) -> tuple[list[Any], Any]:
    """Per-sample tensors for the model, and the patch reader when the patch trunk is trainable."""
    import torch

    from dkan.train.data import SampleInputs

    samples, crop_sets = [], []
    for sd in sdatas:
        _, adata = results_table(sd, table_key)  # targets, features and geometry (dkan._results)
        gidx = adata.var_names.get_indexer(genes) if with_target else None
        if with_target and (gidx < 0).any():
            lost = [g for g, i in zip(genes, gidx, strict=True) if i < 0]
            raise KeyError(f"`layers[{K.TARGET!r}]` has no column for {len(lost)} panel gene(s), e.g. {lost[:5]}.")
        for s in iter_samples(sd, table_key=table_key, need_image=False):
            rows = s.obs_idx
            target = None
            if with_target:
                y = np.asarray(adata.layers[K.TARGET][rows][:, gidx], dtype=np.float32)
                _require_finite(y, f"layers[{K.TARGET!r}]", adata, rows, s.name, genes)
                target = torch.as_tensor(y)
            spot = _take_rows(adata.obsm[K.SPOT_FEATURES], rows, np.float32)
            _require_finite(spot, f"obsm[{K.SPOT_FEATURES!r}]", adata, rows, s.name)
            region, index = region_inputs(adata, rows, s.name)
            colour = _take_rows(adata.obsm[K.SPOT_COLOUR], rows, np.float32) if K.SPOT_COLOUR in adata.obsm else None
            samples.append(
                SampleInputs(
                    name=s.name,
                    spot=torch.as_tensor(spot),
                    region=torch.as_tensor(region),
                    mask=torch.as_tensor(np.asarray(adata.obsm[K.REGION_MASK][rows], dtype=bool)),
                    grid=torch.as_tensor(np.asarray(adata.obsm[K.GRID][rows], dtype=np.int64)),
                    target=target,
                    region_index=None if index is None else torch.as_tensor(index),
                    colour=colour,
                )
            )
            crop_sets.append((sd, s))
    reader = _patch_reader(crop_sets, cfg, table_key=table_key) if cfg.patch_trainable else None
    return samples, reader


def region_inputs(adata: Any, rows: np.ndarray, sample: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Region features of ``rows``: ``((n, G*G, D), None)`` spot by spot, ``((m, D), (n, G*G))`` for shared tiles.

    Shared tiles (``uns["dkan_region_tiles"]`` + ``obsm["dkan_region_index"]``, see
    :func:`dkan.tl.extract_features`) stay one row per tile: the sample gets a view of the tiles its spots use and
    an int64 index into it (-1 kept), gathered per batch; no ``(n, G*G, D)`` array is made.
    """
    if K.REGION_FEATURES in adata.obsm or K.REGION_INDEX not in adata.obsm:
        region = _take_rows(adata.obsm[K.REGION_FEATURES], rows, np.float32)  # (n, G*G, D): no copy if whole
        _require_finite(region, f"obsm[{K.REGION_FEATURES!r}]", adata, rows, sample)
        return region, None
    if K.REGION_TILES not in adata.uns:
        raise KeyError(
            f"`obsm[{K.REGION_INDEX!r}]` indexes shared-tile region features, but `uns[{K.REGION_TILES!r}]` is "
            "missing; rerun `dkan.tl.extract_features(..., shared_tiles=True, force=True)`."
        )
    tiles = np.asarray(adata.uns[K.REGION_TILES], dtype=np.float32)
    index = np.asarray(adata.obsm[K.REGION_INDEX][rows], dtype=np.int64)
    used = index[index >= 0]
    lo, hi = (int(used.min()), int(used.max()) + 1) if used.size else (0, 0)
    if hi > len(tiles) or index.ndim != 2:
        raise ValueError(
            f"`obsm[{K.REGION_INDEX!r}]` of sample {sample!r} points at tile {hi - 1}, but "
            f"`uns[{K.REGION_TILES!r}]` holds {len(tiles)}; rerun `dkan.tl.extract_features(..., force=True)`."
        )
    part = tiles[lo:hi]  # a view: the tiles this sample's spots use (contiguous when extract_features wrote them)
    if not all(np.isfinite(part[i : i + 4096]).all() for i in range(0, len(part), 4096)):
        raise ValueError(
            f"`uns[{K.REGION_TILES!r}]` used by sample {sample!r} holds non-finite values; training on them gives "
            "a NaN model. Recompute them with `dkan.tl.extract_features(..., shared_tiles=True, force=True)`."
        )
    return part, np.where(index >= 0, index - lo, -1)


def _take_rows(values: Any, rows: np.ndarray, dtype: Any) -> np.ndarray:
    """``values[rows]`` as ``dtype``; ``values`` itself (no copy) when ``rows`` is every row in order."""
    values = np.asarray(values)
    if len(rows) == len(values) and np.array_equal(rows, np.arange(len(values))):
        return np.asarray(values, dtype=dtype)
    return np.asarray(values[rows], dtype=dtype)


def _require_finite(
    values: np.ndarray, where: str, adata: Any, rows: np.ndarray, sample: str, genes: list[str] | None = None
) -> None:
    """Refuse ``inf``/``NaN`` model inputs, naming the first spot (and gene) that holds one."""
    if all(np.isfinite(values[i : i + 1024]).all() for i in range(0, len(values), 1024)):  # no full-size mask
        return
    bad = ~np.isfinite(values)
    first = np.argwhere(bad)[0]
    spot = adata.obs_names[rows[first[0]]]
    gene = f", gene {genes[first[1]]!r}" if genes is not None else ""
    raise ValueError(
        f"`{where}` of sample {sample!r} holds {int(bad.sum())} non-finite value(s) ({values[tuple(first)]} at spot "
        f"{spot!r}{gene}); training on them gives a NaN model. Recompute it (e.g. `dkan.pp.normalize` on finite raw "
        "counts, `dkan.tl.extract_features`) or drop those spots."
    )


def _patch_reader(crop_sets: list[tuple[Any, Any]], cfg: DKANConfig, *, table_key: str | None) -> Any:
    """``read(sample, rows, augment) -> (B, 3, P, P)`` patch crops normalised for the patch encoder.

    ``rows`` index the spots of sample ``sample`` (in the order of :class:`SampleInputs`); crops come lazily from
    the image through :class:`~dkan._features.crops.SpotCrops`, augmented (flips, 90 degree rotations) with a generator
    seeded from ``cfg.seed`` when ``augment``.
    """
    import torch

    from dkan._features.crops import SpotCrops
    from dkan.nn.image_encoders import create_image_encoder

    enc = create_image_encoder(cfg.patch_encoder, pretrained=False)  # only its normalisation is needed here
    datasets: dict[int, tuple[SpotCrops, np.ndarray]] = {}
    for sd, _ in crop_sets:
        if id(sd) in datasets:
            continue
        crops = SpotCrops(sd, table_key=table_key, mean=enc.mean, std=enc.std)
        n_obs = get_table(sd, table_key)[1].n_obs
        position = np.full(n_obs, -1, dtype=np.int64)  # table row -> dataset index
        for src_rows, ds_idx in zip(crops.source_rows(), crops.samples, strict=True):
            position[src_rows] = ds_idx
        datasets[id(sd)] = (crops, position)
    gen = torch.Generator().manual_seed(int(cfg.seed))

    def read(s: int, rows: np.ndarray, augment: bool) -> torch.Tensor:
        sd, sample = crop_sets[s]
        crops, position = datasets[id(sd)]
        idx = position[sample.obs_idx[np.asarray(rows)]]
        if (idx < 0).any():
            raise ValueError(f"Sample `{sample.name}` has spots without tile geometry; run dkan.tl.tile again.")
        tf = (torch.rand((len(idx), 3), generator=gen) < 0.5).numpy().astype(np.int64) if augment else None
        return crops.read_batch(idx, transforms=tf)["patch"].clone()

    return read
