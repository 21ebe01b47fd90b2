"""Genes outside a model's training panel: which of the requested genes are new, and their text embeddings.

DKAN queries a gene by the embedding of its text, so :func:`dkan.tl.predict` can predict a gene the model never saw
from its description, embedded with the model's own text encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K
from dkan._utils import uns_get

if TYPE_CHECKING:
    from anndata import AnnData

    from dkan.train.fitted import DKANModel

logger = logging.getLogger("dkan")


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
