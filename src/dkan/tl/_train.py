"""`dkan.tl.train`: fit DKAN on one or several SpatialData objects."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dkan import _keys as K
from dkan._data import prepare as prep
from dkan._data.training import model_meta, training_inputs
from dkan._docs import shared_docs
from dkan._results import results_table
from dkan._utils import get_table, resolve_device
from dkan.train.fitting import fit_inputs, init_distributed

if TYPE_CHECKING:
    import torch
    from spatialdata import SpatialData

    from dkan._config import DKANConfig
    from dkan.train.fitted import DKANModel

logger = logging.getLogger("dkan")


@shared_docs
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
    {sdatas}
    config
        A preset name (``"small"``, ``"her2st"``, ``"stnet"``, ``"cscc"``), a :class:`dkan.DKANConfig`, a
        mapping of overrides, or ``None`` for ``"small"``.
    device
        ``"cuda"``, ``"cpu"``, ... Default: CUDA when available. Launched with ``torchrun --nproc_per_node=N``,
        training runs under DDP on ``cuda:LOCAL_RANK`` (see :func:`dkan.train.fitting.init_distributed`).
    {table_key}
    {image_key}
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
    {progress}
    **overrides
        Configuration fields to override (e.g. ``max_epochs=5``).

    Returns
    -------
    The trained model, with ``model.history`` (one record per epoch; the selected one has ``"selected": True``).
    Its weights are those of the epoch with the best smoothed validation score (``select_metric``, on the data
    ``val_split`` holds out), or of the last epoch when ``val_fraction=0``; ``model.meta["train"]["selection"]``
    says which epoch and why. On those validation spots the model also records its trust signals (``model.trust``,
    ``model.meta["trust"]``: the calibration of its spread for ``predict(..., interval=)``, each gene's validation
    PCC, and a novelty reference of the training spots' features; see :mod:`dkan.tl._trust`), at the cost of 11
    forward passes over the validation spots. With ``probe_blend=True`` the model also stores the tuned
    ``ridge_ctx`` and ``knn`` probes fitted on all training spots (``model.probes``, ``model.meta["probe_blend"]``),
    and its trust signals are those of the blended prediction (probes fitted on the training rows only).

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
    from dkan.tl._trust import fit_trust

    fitted = _blend_probes(samples, cfg)  # the tuned probes on all training spots (trust uses the training rows only)
    meta[K.UNS_TRUST], trust = fit_trust(module, samples, emb, cfg, dev, reader=reader, blend=fitted is not None)
    probes: dict[str, Any] = {}
    if fitted is not None and meta[K.UNS_TRUST].get("calibration", {}).get("probe_blend", True):
        from dkan._evaluation.blend import probe_arrays

        probes, meta["probe_blend"] = probe_arrays(fitted)
        logger.info("Stored the ridge_ctx and knn probes for the DKAN+probes blend (`probe_blend=True`).")
    return DKANModel(module.cpu(), cfg, genes, emb, meta, result.history, trust, probes)


def _blend_probes(samples: list[Any], cfg: DKANConfig) -> Any:
    """The probes of the DKAN+probes blend fitted on all training samples; None when off or when they cannot fit."""
    if not cfg.probe_blend:
        return None
    from dkan._evaluation.blend import try_fit_blend_probes

    return try_fit_blend_probes(samples, list(range(len(samples))), seed=cfg.seed, purpose="the model")
