"""`dkan.tl.train`: fit DKAN on one or several SpatialData objects."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K
from dkan._data import prepare as prep
from dkan._results import results_table
from dkan._utils import get_table, iter_samples

if TYPE_CHECKING:
    import torch
    from spatialdata import SpatialData

    from dkan._config import DKANConfig
    from dkan.train.fitted import DKANModel

logger = logging.getLogger("dkan")


def train(
    sdata: SpatialData | Sequence[SpatialData],
    *,
    config: DKANConfig | str | Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    table_key: str | None = None,
    image_key: str | Mapping[str, str] | None = None,
    descriptions: Any = None,
    gene_info: str | os.PathLike | None = None,
    gene_symbols: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> DKANModel:
    """Train a DKAN model on paired H&E and spot expression.

    Any input step not yet run on the data (gene panel, normalisation, tiling, frozen features, gene
    embeddings) runs first with the configuration's settings, and says so in the log.

    Parameters
    ----------
    sdata
        One SpatialData or a list of them; every sample (spots element annotated by the table) is used.
    config
        A preset name (``"small"``, ``"her2st"``, ``"stnet"``, ``"cscc"``), a :class:`dkan.DKANConfig`, a
        mapping of overrides, or ``None`` for ``"small"``.
    device
        ``"cuda"``, ``"cpu"``, ... Default: CUDA when available. Launched with ``torchrun --nproc_per_node=N``,
        training runs under DDP on ``cuda:LOCAL_RANK`` (see :func:`init_distributed`).
    table_key
        Table annotating the spots; inferred when there is one.
    image_key
        Image to crop from (see :func:`dkan.tl.tile`); inferred per sample by default.
    descriptions
        Gene descriptions for :func:`dkan.tl.embed_genes` (``None``: the gene symbols, with a warning).
    gene_info
        NCBI ``gene_info`` file (e.g. ``Homo_sapiens.gene_info.gz``): genes without a description get their full
        name, and symbols missing from ``descriptions`` are looked up under their official symbol (see
        :func:`dkan.tl.describe_genes`).
    gene_symbols
        ``var`` column holding gene symbols, when ``var_names`` are other ids (e.g. Ensembl ids); the panel,
        the model's genes and the gene texts then use the symbols.
    checkpoint
        File for a resumable checkpoint written after every epoch.
    resume
        Continue from ``checkpoint`` when it exists.
    progress
        Show progress bars.
    **overrides
        Configuration fields to override (e.g. ``max_epochs=5``).

    Returns
    -------
    The trained model, with ``model.history`` (one record per epoch; the selected one has ``"selected": True``).
    Its weights are those of the epoch with the best smoothed validation score (``select_metric``, on the data
    ``val_split`` holds out), or of the last epoch when ``val_fraction=0``; ``model.meta["train"]["selection"]``
    says which epoch and why.

    Raises
    ------
    ValueError
        Non-finite targets or features (naming the table, sample, spot and gene), no usable validation data, or a
        ``checkpoint`` of other data or settings with ``resume=True``.
    dkan.train.loop.NonFiniteLossError
        A loss became non-finite during training (the checkpoint of the last good epoch is kept).
    """
    from dkan._config import DKANConfig
    from dkan.train.fitted import DKANModel

    if gene_symbols is not None:
        from contextlib import ExitStack

        from dkan._symbols import use_symbols

        with ExitStack() as stack:
            for sd in prep.as_list(sdata):
                stack.enter_context(use_symbols(get_table(sd, table_key)[1], gene_symbols))
            return train(
                sdata,
                config=config,
                device=device,
                table_key=table_key,
                image_key=image_key,
                descriptions=descriptions,
                gene_info=gene_info,
                checkpoint=checkpoint,
                resume=resume,
                progress=progress,
                **overrides,
            )
    cfg = DKANConfig.resolve(config, **overrides)
    dev = resolve_device(device if device is not None else init_distributed())
    sdatas, _, genes, emb, feats, emb_rec, samples, reader = training_inputs(
        sdata, cfg, dev, table_key=table_key, image_key=image_key, descriptions=descriptions, gene_info=gene_info,
        progress=progress,
    )  # fmt: skip
    module, result = fit_inputs(
        samples, emb, cfg, dev, reader=reader, progress=progress, checkpoint=checkpoint, resume=resume, genes=genes
    )
    module.eval()
    meta = model_meta(results_table(sdatas[0], table_key)[1], feats, emb_rec, cfg)
    meta["train"] = {
        "samples": [s.name for s in samples],
        "n_spots": int(sum(map(len, samples))),
        "best_epoch": result.best_epoch,
        "best_val_score": result.best_score,
        "selection": result.selection,
        "device": str(dev),
    }
    return DKANModel(module.cpu(), cfg, genes, emb, meta, result.history)


def training_inputs(
    sdata: SpatialData | Sequence[SpatialData],
    cfg: DKANConfig,
    dev: torch.device,
    *,
    table_key: str | None,
    image_key: Any,
    descriptions: Any,
    gene_info: Any,
    progress: bool,
) -> tuple[list[Any], list[Any], list[str], np.ndarray, dict[str, Any], dict[str, Any], list[Any], Any]:
    """Every missing input step, then the model inputs: shared by :func:`train` and :func:`cross_validate`.

    Returns ``(sdatas, count tables, panel genes, gene embeddings, feature record, embedding record, per-sample
    inputs, patch reader)``.
    """
    sdatas = prep.as_list(sdata)
    tables = [get_table(sd, table_key)[1] for sd in sdatas]
    _warn_ensembl(tables[0])
    genes, emb, feats, emb_rec = prep.prepare_training(
        sdatas, tables, cfg, table_key=table_key, image_key=image_key, descriptions=descriptions, device=dev,
        progress=progress, describe_kwargs={"gene_info": gene_info} if gene_info is not None else None,
    )  # fmt: skip
    samples, reader = build_inputs(sdatas, genes, cfg, table_key=table_key, with_target=True)
    return sdatas, tables, genes, emb, feats, emb_rec, samples, reader


def _warn_ensembl(adata: Any) -> None:
    """Warn when the genes are named by Ensembl ids: their texts (the ids) carry no meaning for the text encoder."""
    from dkan._symbols import looks_like_ensembl

    if looks_like_ensembl(list(adata.var_names[:1000])):
        logger.warning(
            "The table's genes are named by Ensembl ids (e.g. %s): the model's genes and their texts will be ids, "
            "which carry no meaning for the text encoder. Pass `gene_symbols=` naming a `var` column of symbols.",
            list(map(str, adata.var_names[:2])),
        )


def fit_inputs(
    samples: list[Any],
    emb: np.ndarray,
    cfg: DKANConfig,
    dev: torch.device,
    *,
    reader: Any = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    genes: list[str] | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Build a network and fit it on per-sample inputs; returns it (selected weights loaded, in eval mode).

    The validation data is held out of ``samples`` as ``cfg.val_split`` says; ``result.selection`` records
    which epoch was chosen, on which data and why. ``genes`` (names) make a resumed checkpoint check the panel.
    """
    import torch

    from dkan.train.data import make_validation_split
    from dkan.train.fitted import build_module
    from dkan.train.loop import fit

    split = make_validation_split(
        [s.name for s in samples],
        [s.grid.numpy() for s in samples],
        cfg.val_fraction,
        strategy=cfg.val_split,
        seed=cfg.seed,
    )
    train_rows, val_rows = split.train, split.val
    logger.info(
        "Training on %d samples, %d spots, %d genes, on %s; validation: %d spots, %s.",
        len(samples), sum(map(len, train_rows)), emb.shape[0], dev, sum(map(len, val_rows)), split.description,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    module = build_module(cfg, n_genes=emb.shape[0], gene_dim=emb.shape[1], feature_dim=samples[0].spot.shape[1])
    seen = [s.target[torch.as_tensor(r, dtype=torch.long)] for s, r in zip(samples, train_rows, strict=True)]
    module.init_from_data(genes=torch.as_tensor(emb), target_mean=torch.cat(seen).float().mean(0))  # training mean
    module.to(dev)
    result = fit(
        module,
        [s.to(dev) for s in samples],
        train_rows,
        val_rows,
        torch.as_tensor(emb, device=dev) if cfg.use_text else None,
        cfg,
        device=dev,
        read_patches=reader,
        progress=progress,
        checkpoint=checkpoint,
        resume=resume,
        identity={"genes": list(genes) if genes is not None else None, "validation": split.description},
    )
    result.selection["validation"] = split.description
    if result.best_state is not None:
        module.load_state_dict(result.best_state)
    return module.eval(), result


def init_distributed() -> str | None:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``); return this rank's device.

    Training then runs under PyTorch DDP: each rank takes a disjoint share of the per-sample batches and
    gradients are averaged across ranks (NCCL on CUDA, gloo on CPU).
    """
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        logger.info("Joined DDP process group (%s), rank %d.", backend, torch.distributed.get_rank())
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: the given one (checked by :func:`dkan._utils.resolve_device`), else CUDA or CPU."""
    from dkan._utils import resolve_device as _resolve

    return _resolve(device)


def model_meta(adata: Any, features: dict[str, Any], gene_rec: dict[str, Any], cfg: DKANConfig) -> dict[str, Any]:
    """Settings of every input step a prediction must reproduce."""
    from dkan._utils import uns_get

    norm = dict(uns_get(adata, K.UNS_NORMALIZE) or {})
    norm.pop("genes", None)
    return {
        "features": {k: features.get(k) for k in ("encoder", "weights_hash", "dim")},
        "tile": {"patch_size": cfg.patch_size, "region_grid": cfg.region_grid, "target_mpp": cfg.target_mpp},
        "normalize": {k: v for k, v in norm.items() if isinstance(v, str | int | float | bool | type(None))},
        "gene_embedding": {k: gene_rec.get(k) for k in ("encoder", "pooling", "dim", "weights_hash")},
    }


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
            samples.append(
                SampleInputs(
                    name=s.name,
                    spot=torch.as_tensor(spot),
                    region=torch.as_tensor(region),
                    mask=torch.as_tensor(np.asarray(adata.obsm[K.REGION_MASK][rows], dtype=bool)),
                    grid=torch.as_tensor(np.asarray(adata.obsm[K.GRID][rows], dtype=np.int64)),
                    target=target,
                    region_index=None if index is None else torch.as_tensor(index),
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
