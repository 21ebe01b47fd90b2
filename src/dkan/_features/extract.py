"""Frozen image features of every spot's patch and of its region tiles."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K
from dkan._docs import shared_docs
from dkan._features.encoding import Preprocess, crop_loader, encode
from dkan._trust import optical_density
from dkan._utils import get_table, resolve_device, uns_get, uns_set

if TYPE_CHECKING:
    import torch
    from spatialdata import SpatialData

    from dkan.nn.image_encoders import ImageEncoder

logger = logging.getLogger("dkan")


def feature_keys(key_added: str | None = None) -> dict[str, str]:
    """Storage keys of the features.

    ``spot``, ``colour`` (each spot patch's mean optical density per channel), ``region`` (spot by spot), ``mask``
    and ``index`` (shared tiles) are ``obsm`` keys, ``tiles`` (shared tiles) an ``uns`` key, and ``uns`` the step of
    ``uns["dkan"]`` holding the provenance.
    """
    if key_added is None:
        return {
            "spot": K.SPOT_FEATURES,
            "colour": K.SPOT_COLOUR,
            "region": K.REGION_FEATURES,
            "mask": K.REGION_MASK,
            "tiles": K.REGION_TILES,
            "index": K.REGION_INDEX,
            "uns": K.UNS_FEATURES,
        }
    return {
        "spot": key_added,
        "colour": f"{key_added}_colour",
        "region": f"{key_added}_region",
        "mask": f"{key_added}_region_mask",
        "tiles": f"{key_added}_region_tiles",
        "index": f"{key_added}_region_index",
        "uns": key_added,
    }


@shared_docs
def extract_features(
    sdata: SpatialData,
    encoder: str | Callable | ImageEncoder = "efficientnet_lite0",
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    table_key: str | None = None,
    tile_key: str | None = None,
    key_added: str | None = None,
    region: bool = True,
    overwrite: bool = False,
    force: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    shared_tiles: bool | int | None = None,
    progress: bool = True,
) -> None:
    """Encode every spot's patch (and its region tiles) with a frozen image encoder.

    Crops come lazily from the images through the tile geometry (:func:`dkan.tl.tile`, run with defaults when
    missing). For encoders with a fixed input size (``encoder.fixed_size``), crops whose side differs from
    ``input_size`` are resized to it (bilinear,
    antialiased) before normalisation with the encoder's ``mean`` / ``std``. Region tiles whose mask is 0 (they
    leave the image) are not encoded; their features are zeros. On CUDA the encoder runs under autocast
    (bfloat16 where supported, else float16) with pinned, non-blocking transfers; features are stored float32.

    Parameters
    ----------
    sdata
        SpatialData with spots, their table and images.
    encoder
        Encoder name (see :func:`dkan.nn.list_image_encoders`), timm name, callable or
        :class:`~dkan.nn.image_encoders.ImageEncoder`.
    batch_size
        Spots per batch; one encoder call sees up to ``batch_size * 26`` images with ``region=True``.
    {device}
    num_workers
        DataLoader worker processes reading crops (0: in the main process).
    {table_key}
    tile_key
        ``key_added`` of the :func:`dkan.tl.tile` run to use (default: the default geometry).
    key_added
        Default: ``obsm["dkan_spot_features"]``, ``obsm["dkan_spot_colour"]``, ``obsm["dkan_region_features"]``,
        ``obsm["dkan_region_mask"]`` and ``uns["dkan"]["features"]`` (shared tiles: ``uns["dkan_region_tiles"]`` and
        ``obsm["dkan_region_index"]`` instead of ``obsm["dkan_region_features"]``). Given: ``obsm[key_added]``,
        ``obsm[f"{key_added}_colour"]``, ``obsm[f"{key_added}_region"]`` (or ``uns[f"{key_added}_region_tiles"]`` and
        ``obsm[f"{key_added}_region_index"]``), ``obsm[f"{key_added}_region_mask"]`` and ``uns["dkan"][key_added]``.
    region
        Also encode the ``G x G`` region tiles of every spot.
    overwrite
        Allow replacing features of a different encoder stored under the same key.
    force
        Recompute even when features with the same settings exist.
    checkpoint_path
        Weight file of the encoder (see :func:`dkan.nn.create_image_encoder`).
    shared_tiles
        Compute region features once per tile of a slide-aligned grid and share them between spots (each region
        tile is replaced by the nearest grid tile; the spot patch stays exact): encoder passes grow with the
        tissue, not with 26 x spots. A departure from the reference, off by default here (whole-slide
        prediction turns it on with ``2``; see ``dkan._features.shared_tiles``). Stored once per tile, not per spot:
        ``uns["dkan_region_tiles"]`` float32 ``(n_tiles, D)`` plus ``obsm["dkan_region_index"]`` int32
        ``(n, G*G)``, the row of each spot's region tile in it (-1 where the mask is 0); training and prediction
        gather them a batch of spots at a time (:func:`dkan.tl.region_features` does it for given
        rows). An int ``n >= 1`` places the grid tiles every ``1/n`` of a tile (overlapping for ``n > 1``;
        ``True`` is ``1``), each region tile then at most ``1/(2n)`` of a tile from its exact position in x and y,
        for about ``n**2`` times the grid tiles (recorded as ``subdivide``). ``None`` (default) keeps stored
        features of either kind and computes new ones spot by spot.
    {progress}

    Returns
    -------
    None; writes ``obsm`` arrays (float32 ``(n, D)``, the patch colours float32 ``(n, 3)`` (mean optical density
    ``-log10((I + 1) / 256)`` of the patch per R, G, B channel, used by the colour novelty of
    :func:`dkan.tl.predict`) and ``(n, G*G, D)``, the bool mask; with shared tiles the
    ``(n_tiles, D)`` ``uns`` array and the ``(n, G*G)`` index instead of the per-spot region array) and the
    provenance (encoder name, weights hash, dimension, geometry, dtype, ``region_storage`` ``"spots"`` or
    ``"tiles"``, ``keys``) to the panel-sized results table ``f"{table_key}_dkan"`` (:mod:`dkan._results`), never
    to the count table.
    """
    from dkan._features.crops import SpotCrops
    from dkan._features.tile import tile_keys
    from dkan.nn.image_encoders import create_image_encoder

    if int(batch_size) < 1:
        raise ValueError(f"`batch_size` must be positive; got {batch_size}.")
    from dkan._results import results_table

    tkey, _ = get_table(sdata, table_key)
    _, adata = results_table(sdata, tkey, create=True)  # features, geometry and provenance live there
    keys = feature_keys(key_added)
    enc = create_image_encoder(encoder, checkpoint_path=checkpoint_path)
    old = uns_get(adata, keys["uns"])
    subdivide = _subdivide(shared_tiles) if region else 0
    shared = subdivide > 0
    crops = SpotCrops(sdata, table_key=tkey, tile_key=tile_key, with_region=region and not shared, normalize=False)
    geometry = uns_get(adata, tile_keys(tile_key)["uns"] if tile_key is not None else K.UNS_TILE)
    settings = {
        "encoder": enc.name,
        "weights_hash": enc.weights_hash,
        "tile_key": tile_key or K.UNS_TILE,
        "tile": _plain(geometry),
    }
    same_kind = shared_tiles is None or _stored_subdivide(old) == subdivide
    if old is not None and not force and same_kind and _up_to_date(adata, old, settings, keys, region):
        logger.info("Features `%s` are up to date (%s); pass `force=True` to recompute.", keys["spot"], enc.name)
        if keys["colour"] not in adata.obsm:
            logger.info(
                "They were computed by an earlier dkan, without the spot colours `obsm[%r]` that the colour novelty "
                "of `dkan.tl.predict` needs; pass `force=True` to add them.", keys["colour"],
            )  # fmt: skip
        return
    if old is not None and not overwrite and _identity(old) != _identity(settings):
        raise ValueError(
            f"`key_added={key_added!r}` already holds features of encoder {old.get('encoder')!r} "
            f"(weights {str(old.get('weights_hash'))[:12]}), not {enc.name!r} (weights {enc.weights_hash[:12]}). "
            "Pass `overwrite=True` to replace them, or another `key_added=` to keep both."
        )
    spot, colour, reg, mask, info = _encode_all(
        enc, crops, adata.n_obs, batch_size, device, num_workers, region and not shared, progress
    )
    if shared:
        from dkan._features.shared_tiles import shared_region_features

        tiles, index, mask, run = shared_region_features(
            sdata, adata, enc, table_key=tkey, tile_key=tile_key, patch_size=crops.patch_size, device=device,
            batch_size=batch_size, subdivide=subdivide, progress=progress,
        )  # fmt: skip
        info = {**info, **run}
    adata.obsm[keys["spot"]] = spot
    adata.obsm[keys["colour"]] = colour
    _store_region(adata, keys, key_added, reg, mask, tiles if shared else None, index if shared else None)
    record = {
        **settings,
        "dim": int(enc.num_features),
        "input_size": int(enc.input_size),
        "mean": list(enc.mean),
        "std": list(enc.std),
        "patch_size": int(crops.patch_size),
        "resized": bool(enc.fixed_size) and int(crops.patch_size) != int(enc.input_size),
        "region": bool(region),
        "shared_tiles": shared,
        "region_storage": ("tiles" if shared else "spots") if region else None,
        "dtype": "float32",
        "keys": {k: keys[k] for k in _stored(region, shared)},
        **info,
    }
    uns_set(adata, keys["uns"], record)


def _subdivide(shared_tiles: bool | int | None) -> int:
    """Grid subdivision asked for by ``shared_tiles``: 0 spot by spot (None/False), 1 for True, else the int."""
    if shared_tiles is None or shared_tiles is False:
        return 0
    if shared_tiles is True:
        return 1
    if isinstance(shared_tiles, int | np.integer) and shared_tiles >= 1:
        return int(shared_tiles)
    raise ValueError(
        f"`shared_tiles` must be None, a bool or a positive int (grid tiles every 1/n of a tile); got {shared_tiles!r}."
    )


def _stored_subdivide(old: dict | None) -> int:
    """Grid subdivision of stored features (0: spot by spot; shared tiles from before the option: 1)."""
    if not old or not old.get("shared_tiles"):
        return 0
    return int(old.get("subdivide", 1))


def _stored(region: bool, shared: bool) -> tuple[str, ...]:
    """Names (of :func:`feature_keys`) of what a run stores."""
    if not region:
        return ("spot",)
    return ("spot", "mask", "tiles", "index") if shared else ("spot", "region", "mask")


def _store_region(
    adata: Any,
    keys: dict[str, str],
    key_added: str | None,
    reg: np.ndarray | None,
    mask: np.ndarray | None,
    tiles: np.ndarray | None,
    index: np.ndarray | None,
) -> None:
    """Write region features in one layout and drop those of the other (or all, without region features).

    Spot by spot: ``obsm[region]`` ``(n, G*G, D)``. Shared tiles: ``uns[tiles]`` ``(n_tiles, D)`` and
    ``obsm[index]`` ``(n, G*G)`` int32. The default mask key is also written by :func:`dkan.tl.tile`, so it is
    kept when no region features are stored.
    """
    stale = [keys["region"], keys["index"]]
    if reg is None and tiles is None and key_added is not None:
        stale.append(keys["mask"])
    for k in stale:
        adata.obsm.pop(k, None)
    adata.uns.pop(keys["tiles"], None)
    if reg is not None:
        adata.obsm[keys["region"]] = reg
    if tiles is not None:
        adata.uns[keys["tiles"]] = np.asarray(tiles, dtype=np.float32)
        adata.obsm[keys["index"]] = np.asarray(index, dtype=np.int32)
    if mask is not None:
        adata.obsm[keys["mask"]] = mask


def has_region(adata: Any, keys: dict[str, str]) -> bool:
    """Whether ``adata`` holds region features in either layout (spot by spot, or shared tiles + index)."""
    return keys["region"] in adata.obsm or (keys["index"] in adata.obsm and keys["tiles"] in adata.uns)


def _plain(obj: Any) -> Any:
    """Nested dicts / lists / numpy scalars as plain Python (as they read back from zarr / h5ad)."""
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _identity(rec: dict) -> tuple:
    return rec.get("encoder"), rec.get("weights_hash")


def _up_to_date(adata: Any, old: dict, settings: dict, keys: dict, region: bool) -> bool:
    """Whether stored features were made with the same encoder and geometry and cover what is asked."""
    same = _identity(old) == _identity(settings) and _plain(old.get("tile")) == settings["tile"]
    same = same and old.get("tile_key") == settings["tile_key"]
    present = keys["spot"] in adata.obsm and (not region or (old.get("region") and has_region(adata, keys)))
    return bool(same and present)


def _encode_all(
    enc: ImageEncoder,
    crops: Any,
    n_obs: int,
    batch_size: int,
    device: str | torch.device | None,
    num_workers: int,
    region: bool,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, dict]:
    """Run the encoder over every spot of ``crops``; returns spot, patch colour, region and mask arrays, run info."""
    import torch
    from tqdm.auto import tqdm

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    was_training = enc.training
    enc = enc.eval().to(dev)  # no requires_grad_ change: inference_mode already records no graph
    enc = enc.to(memory_format=torch.channels_last)  # also on CPU: 1.7-1.9x faster for EfficientNet-Lite0 (oneDNN)
    g2, d = crops.region_grid**2, enc.num_features
    spot = np.full((n_obs, d), np.nan, dtype=np.float32)
    colour = np.full((n_obs, 3), np.nan, dtype=np.float32)
    reg = np.zeros((n_obs, g2, d), dtype=np.float32) if region else None
    mask = np.zeros((n_obs, g2), dtype=bool) if region else None
    loader = crop_loader(crops, batch_size=batch_size, num_workers=num_workers, pin_memory=cuda)
    prep = Preprocess(enc, dev)
    n_tiles = 0
    with (
        torch.inference_mode(),
        tqdm(total=len(crops), desc=f"features ({enc.name})", unit="spot", disable=not progress) as bar,
    ):
        for batch in loader:
            rows = batch["index"].numpy()
            colour[rows] = optical_density(batch["patch"].numpy())  # uint8 (normalize=False), before the device
            images = [batch["patch"].to(dev, non_blocking=cuda)]
            if region:  # transfer uint8 tiles, drop the masked ones on the device
                m = batch["region_mask"]
                images.append(batch["region"].to(dev, non_blocking=cuda)[m.to(dev, non_blocking=cuda)])
                mask[rows] = m.numpy()
            x = torch.cat(images)
            feats = encode(enc, prep(x), amp=amp, chunk=4 * batch_size).float().cpu().numpy()
            spot[rows] = feats[: len(rows)]
            if region:
                r = np.zeros((len(rows), g2, d), dtype=np.float32)
                r[m.numpy()] = feats[len(rows) :]
                reg[rows] = r
                n_tiles += int(m.sum())
            bar.update(len(rows))
    enc.train(was_training)
    info = {"device": dev.type, "amp": None if amp is None else str(amp).replace("torch.", "")}
    logger.info("Encoded %d spots and %d region tiles with %s on %s.", len(crops), n_tiles, enc.name, dev)
    return spot, colour, reg, mask, info
