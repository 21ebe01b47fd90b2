"""The inputs of a training run: every missing input step, then the model tensors and the model's input record."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K
from dkan._data import prepare as prep
from dkan._data.inputs import build_inputs
from dkan._symbols import looks_like_ensembl
from dkan._utils import get_table, uns_get

if TYPE_CHECKING:
    import torch
    from spatialdata import SpatialData

    from dkan._config import DKANConfig

logger = logging.getLogger("dkan")


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
    if looks_like_ensembl(list(adata.var_names[:1000])):
        logger.warning(
            "The table's genes are named by Ensembl ids (e.g. %s): the model's genes and their texts will be ids, "
            "which carry no meaning for the text encoder. Pass `gene_symbols=` naming a `var` column of symbols.",
            list(map(str, adata.var_names[:2])),
        )


def model_meta(adata: Any, features: dict[str, Any], gene_rec: dict[str, Any], cfg: DKANConfig) -> dict[str, Any]:
    """Settings of every input step a prediction must reproduce."""
    from dkan.pp._normalize import FINGERPRINT

    norm = dict(uns_get(adata, K.UNS_NORMALIZE) or {})
    norm.pop("genes", None)
    return {
        "features": {k: features.get(k) for k in ("encoder", "weights_hash", "dim")},
        "tile": {"patch_size": cfg.patch_size, "region_grid": cfg.region_grid, "target_mpp": cfg.target_mpp},
        "normalize": {  # settings only: the training counts' fingerprint would tie the model to its data
            k: v for k, v in norm.items() if isinstance(v, str | int | float | bool | type(None)) and k != FINGERPRINT
        },
        "gene_embedding": {k: gene_rec.get(k) for k in ("encoder", "pooling", "dim", "weights_hash")},
    }
