"""Helpers of :func:`dkan.tl.predict`: ensembles, test-time dropout and genes outside the training panel."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K
from dkan._utils import uns_get

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from dkan.train.fitted import DKANModel

logger = logging.getLogger("dkan")

#: Fields of ``model.meta`` that must agree between the members of an ensemble.
_SAME_META = ("features", "tile", "normalize", "gene_embedding")


def as_models(model: DKANModel | Sequence[DKANModel]) -> list[DKANModel]:
    """One model or an ensemble (a non-empty list of models with the same panel and input settings)."""
    from dkan.train.fitted import DKANModel

    models = [model] if isinstance(model, DKANModel) else list(model) if isinstance(model, Sequence) else None
    if not models or not all(isinstance(m, DKANModel) for m in models):
        raise TypeError(
            f"Expected `model` to be a DKANModel or a non-empty list of them, found {type(model).__name__}."
        )
    first = models[0]
    for i, m in enumerate(models[1:], start=1):
        if m.genes != first.genes:
            raise ValueError(f"`model[{i}]` predicts other genes than `model[0]`; an ensemble needs one gene panel.")
        diff = [k for k in _SAME_META if m.meta.get(k) != first.meta.get(k)]
        if diff or m.config.use_text != first.config.use_text:
            raise ValueError(
                f"`model[{i}]` was trained on other inputs than `model[0]` (differs in {diff or ['use_text']}); "
                "an ensemble needs models trained with the same features, tiles, normalisation and gene texts."
            )
    return models


def new_genes(model: DKANModel, genes: Sequence[str] | None) -> list[str]:
    """The requested genes that are not in the model's panel (in order, without duplicates)."""
    if genes is None:
        return []
    if isinstance(genes, str) or not all(isinstance(g, str) for g in genes):
        raise TypeError(f"Expected `genes` to be a list of gene symbols, found {genes!r}.")
    panel = set(model.genes)
    out = list(dict.fromkeys(g for g in genes if g not in panel))
    if out and not model.config.use_text:
        raise ValueError(
            f"`genes` names {len(out)} gene(s) outside the panel (e.g. {out[:3]}), but this model was trained with "
            "`use_text=False` (a learned gene table), so it can only predict its own panel."
        )
    return out


def new_gene_embeddings(adata: AnnData | None, model: DKANModel, genes: list[str], descriptions: Any) -> np.ndarray:
    """Embeddings ``(k, Dt)`` of genes outside the panel, made with the model's text encoder.

    From ``descriptions`` when given (every gene needs one), else from ``adata.varm`` (the results table, None when
    there is none yet) when it holds embeddings of the model's text encoder for them; otherwise a ``KeyError`` that
    says how to provide them.
    """
    rec = dict(model.meta.get("gene_embedding") or {})
    dim = model.gene_embeddings.shape[1]
    if descriptions is not None:
        emb = _embed(genes, descriptions, rec)
    else:
        emb = _from_varm(adata, genes, rec)
    if emb.shape != (len(genes), dim):
        raise ValueError(
            f"The embeddings of the new genes have shape {emb.shape}, the model's have width {dim}; embed them with "
            f"the model's text encoder {rec.get('encoder')!r}."
        )
    return emb


def _embed(genes: list[str], descriptions: Any, rec: dict[str, Any]) -> np.ndarray:
    from dkan._genetext.embed import gene_texts
    from dkan.nn.text_encoders import create_text_encoder

    texts = gene_texts(genes, descriptions, describe_kwargs={})
    missing = [g for g, s in zip(genes, texts["source"], strict=True) if s == "symbol"]
    if missing:
        raise KeyError(
            f"`descriptions` has no text for {len(missing)} gene(s) outside the model's panel: {missing[:10]}. "
            "A new gene is queried by the embedding of its description; add them to `descriptions`."
        )
    encoder = create_text_encoder(rec.get("encoder"), pooling=rec.get("pooling"))
    want = rec.get("weights_hash")
    if want is not None and encoder.weights_hash != want:
        raise ValueError(
            f"The text encoder {rec.get('encoder')!r} found here has other weights ({encoder.weights_hash}) than the "
            f"one the model was trained with ({want}); install the same weights to query new genes."
        )
    logger.info("Embedding %d gene(s) outside the panel with %s.", len(genes), encoder.name)
    return np.asarray(encoder.encode(texts["text"].tolist(), progress=False), dtype=np.float32)


def _from_varm(adata: AnnData | None, genes: list[str], rec: dict[str, Any]) -> np.ndarray:
    have = (uns_get(adata, K.UNS_GENE_EMBEDDING) or {}) if adata is not None else {}
    same = adata is not None and K.GENE_EMBEDDING in adata.varm and have.get("encoder") == rec.get("encoder")
    emb = np.full((len(genes), 0), np.nan, dtype=np.float32)
    if same:
        idx = adata.var_names.get_indexer(genes)
        emb = np.full((len(genes), adata.varm[K.GENE_EMBEDDING].shape[1]), np.nan, dtype=np.float32)
        emb[idx >= 0] = np.asarray(adata.varm[K.GENE_EMBEDDING])[idx[idx >= 0]]
    missing = [g for g, row in zip(genes, emb, strict=True) if row.size == 0 or not np.isfinite(row).all()]
    if missing:
        raise KeyError(
            f"No {rec.get('encoder')!r} embedding for {len(missing)} gene(s) outside the model's panel: "
            f"{missing[:10]}. Pass `descriptions={{gene: text}}` for them (embedded with the model's text encoder)."
        )
    return emb


def draws(
    run: Callable[[Any, bool], np.ndarray], modules: list[Any], n_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean prediction and per-entry standard deviation over an ensemble and/or test-time dropout.

    ``run(module, mc_dropout)`` returns one prediction array. The mean is the average of the modules'
    deterministic predictions; the standard deviation (``ddof=1``) is over every draw: each module's
    deterministic prediction when there is no dropout sampling (``n_samples == 1``), else its ``n_samples``
    dropout draws (seeded with ``seed + i``, the global torch generator is left as it was). ``None`` when there
    is a single draw.
    """
    import torch

    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"Expected `n_samples` to be an int >= 1, found {n_samples!r}.")
    means = [run(m, False) for m in modules]
    if n_samples == 1:
        samples = means
    else:
        samples = []
        with torch.random.fork_rng(devices=[]):
            for j, m in enumerate(modules):
                for i in range(n_samples):
                    torch.manual_seed(seed + j * n_samples + i)
                    samples.append(run(m, True))
    mean = np.mean(means, axis=0).astype(np.float32)
    if len(samples) < 2:
        return mean, None
    return mean, np.std(samples, axis=0, ddof=1).astype(np.float32)


def has_dropout(module: torch.nn.Module) -> bool:
    """Whether a network has a dropout layer with a non-zero rate (test-time dropout can vary)."""
    from torch import nn

    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())
