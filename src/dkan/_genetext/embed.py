"""Gene-semantic embeddings: encode one description per gene into ``table.varm``."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dkan import _keys as K
from dkan._docs import shared_docs
from dkan._utils import check_int, get_table, uns_get, uns_set

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from dkan.nn.text_encoders import TextEncoder

logger = logging.getLogger("dkan")

Descriptions = str | os.PathLike | Mapping[str, str] | pd.DataFrame | None


@shared_docs
def embed_genes(
    sdata: SpatialData | AnnData,
    *,
    descriptions: Descriptions = None,
    text_encoder: str | os.PathLike | TextEncoder = "minilm",
    pooling: str | None = None,
    table_key: str | None = None,
    key_added: str = K.GENE_EMBEDDING,
    overwrite: bool = False,
    batch_size: int = 64,
    device: str | None = None,
    describe_kwargs: Mapping[str, Any] | None = None,
    genes: Sequence[str] | None = None,
    progress: bool = True,
) -> None:
    """Embed a text description of every gene with a text encoder.

    Parameters
    ----------
    sdata
        SpatialData with the expression table, or the table (AnnData) itself.
    descriptions
        Text per gene: ``None`` (the symbol itself, with a warning), a mapping ``{symbol: text}``, a TSV/CSV path,
        ``"ncbi"`` (online, cached), or the DataFrame returned by :func:`dkan.tl.describe_genes`. Genes without
        a description use their symbol.
    text_encoder
        A registered name (``"minilm"``, ``"biobert"``), a model folder or Hugging Face id, or a built
        :class:`~dkan.nn.text_encoders.TextEncoder`.
    pooling
        ``"sep"``, ``"cls"`` or ``"mean"``; default: the encoder's own.
    table_key
        Table of ``sdata``; inferred when there is one.
    key_added
        ``varm`` key of the embeddings.
    overwrite
        Replace embeddings made by another encoder (or pooling) under ``key_added``; without it that is an error.
    batch_size
        Texts per forward pass.
    {device}
    describe_kwargs
        Options of :func:`dkan.tl.describe_genes` (``gene_info``, ``llm``, ``cache_dir``, ...) when
        ``descriptions`` is a mapping, a path or ``"ncbi"``.
    genes
        Genes to embed. Default: the gene panel (``var["dkan_panel"]``, in panel order) when one is selected,
        else every gene of the table.
    progress
        Show a progress bar over the batches of texts.

    Returns
    -------
    Nothing. On a SpatialData, writes ``varm[key_added]`` of the panel-sized results table ``f"{table_key}_dkan"``
    (:mod:`dkan._results`; its ``var`` grows by requested genes it lacks), so the count table is not widened and
    memory is ``panel x dim``. On an AnnData, writes its own ``varm[key_added]`` (``n_vars x dim`` float32; rows
    of genes not embedded are NaN). Either way with the provenance
    ``table.uns["dkan"]["gene_embedding"]``: ``encoder``, ``pooling``, ``dim``, ``weights_hash``, ``key_added``,
    ``source_counts`` and, per embedded gene (``var_names`` order, or ``genes`` recorded as ``genes``), ``text_sha1``
    and ``source``.
    """
    batch_size = check_int(batch_size, "batch_size")
    adata, genes = _target(sdata, table_key, genes)
    all_genes = [str(g) for g in adata.var_names]
    texts = gene_texts(genes, descriptions, describe_kwargs=describe_kwargs or {})
    enc_name = text_encoder.name if _is_encoder(text_encoder) else str(text_encoder)
    enc_pooling = text_encoder.pooling if _is_encoder(text_encoder) else pooling
    step = _uns_step(key_added)
    sha = [text_sha1(t) for t in texts["text"]]
    old = uns_get(adata, step)
    if old is not None and key_added in adata.varm and not overwrite:
        _check_same_encoder(old, enc_name, enc_pooling, key_added)
        same_genes = list(old.get("genes", all_genes)) == genes
        if same_genes and list(old.get("text_sha1", [])) == sha and adata.varm[key_added].shape[0] == len(all_genes):
            logger.info("Gene embeddings `%s` are up to date (same encoder and texts); nothing to do.", key_added)
            return
    encoder = text_encoder if _is_encoder(text_encoder) else _create(text_encoder, pooling, device, progress=progress)
    if old is not None and key_added in adata.varm and not overwrite:
        _check_same_encoder(old, encoder.name, encoder.pooling, key_added, weights_hash=encoder.weights_hash)
    logger.info("Embedding %d gene descriptions with %s (%s pooling).", len(genes), encoder.name, encoder.pooling)
    emb = encoder.encode(texts["text"].tolist(), batch_size=batch_size, progress=progress)
    subset = genes != all_genes
    if subset:
        full = np.full((len(all_genes), emb.shape[1]), np.nan, dtype=np.float32)
        full[adata.var_names.get_indexer(genes)] = emb
        emb = full
    adata.varm[key_added] = emb.astype(np.float32, copy=False)
    counts = texts["source"].value_counts()
    uns_set(
        adata,
        step,
        {
            "encoder": encoder.name,
            "pooling": encoder.pooling,
            "dim": int(encoder.dim),
            "weights_hash": encoder.weights_hash,
            "key_added": key_added,
            "source_counts": {str(k): int(v) for k, v in counts.items()},
            **({"genes": genes} if subset else {}),
            "text_sha1": sha,
            "source": texts["source"].astype(str).tolist(),
        },
    )


def gene_texts(genes: Sequence[str], descriptions: Descriptions, *, describe_kwargs: Mapping[str, Any]) -> pd.DataFrame:
    """Return ``describe_genes``-style texts (columns ``text``, ``source``) for ``genes`` from any description input."""
    from dkan._genetext.describe import describe_genes

    if descriptions is None:
        text = "its full name from `gene_info`" if describe_kwargs.get("gene_info") else "its symbol"
        logger.warning(
            "No gene descriptions given: each gene's text is %s, which carries little meaning. Pass "
            "`descriptions=` a {symbol: text} mapping, a TSV of summaries (e.g. NCBI RefSeq summaries), 'ncbi' "
            "(online, cached) or the output of `dkan.tl.describe_genes(...)`.",
            text,
        )
        return describe_genes(genes, source="symbol", **describe_kwargs)
    if isinstance(descriptions, pd.DataFrame):
        return _from_frame(genes, descriptions)
    if isinstance(descriptions, str | os.PathLike | Mapping):
        return describe_genes(genes, source=descriptions, **describe_kwargs)
    raise TypeError(
        "`descriptions` must be None, a mapping {symbol: text}, a path, 'ncbi' or a DataFrame from "
        f"`dkan.tl.describe_genes`; found {type(descriptions).__name__}."
    )


def _from_frame(genes: Sequence[str], frame: pd.DataFrame) -> pd.DataFrame:
    if "text" not in frame.columns:
        raise ValueError(
            f"`descriptions` DataFrame needs a 'text' column (as returned by `dkan.tl.describe_genes`); "
            f"found columns {list(frame.columns)}."
        )
    if frame.index.has_duplicates:
        dup = frame.index[frame.index.duplicated()].unique().tolist()[:10]
        raise ValueError(f"`descriptions` DataFrame has duplicated genes in its index: {dup}.")
    sub = frame.reindex(pd.Index(genes))
    missing = sub["text"].isna().to_numpy()
    text = sub["text"].where(~missing, pd.Series(genes, index=sub.index)).astype(str)
    source = sub["source"] if "source" in sub.columns else pd.Series("given", index=sub.index)
    source = source.where(~missing, "symbol").astype(str)
    if missing.any():
        logger.warning(
            "%d of %d genes are missing from `descriptions` and use their symbol as text: %s",
            int(missing.sum()),
            len(genes),
            ", ".join(np.asarray(genes)[missing][:10]),
        )
    return pd.DataFrame({"text": text.to_numpy(), "source": source.to_numpy()}, index=pd.Index(genes, name="gene"))


def _target(
    sdata: SpatialData | AnnData, table_key: str | None, genes: Sequence[str] | None
) -> tuple[AnnData, list[str]]:
    """The table whose ``varm`` gets the embeddings, and the genes to embed (default: the panel, else all genes).

    On a SpatialData that is the panel-sized results table (:mod:`dkan._results`), grown by any requested gene it
    lacks; on an AnnData, the AnnData itself (the genes must be its ``var_names``).
    """
    from dkan._results import ensure_genes, panel_of, results_table

    adata = _as_table(sdata, table_key)
    names = [str(g) for g in adata.var_names]
    if genes is None:
        genes = panel_of(adata) or names
    else:
        genes = [str(g) for g in genes]
        unknown = sorted(set(genes) - set(names))
        if unknown:
            raise KeyError(f"`genes` holds {len(unknown)} name(s) not in `var_names`, e.g. {unknown[:5]}.")
    if not hasattr(sdata, "tables"):
        return adata, genes
    rkey, _ = results_table(sdata, table_key, create=True)
    return ensure_genes(sdata, rkey, genes), genes


def _as_table(sdata: SpatialData | AnnData, table_key: str | None) -> AnnData:
    from anndata import AnnData

    if isinstance(sdata, AnnData):
        adata = sdata
    elif hasattr(sdata, "tables"):
        adata = get_table(sdata, table_key)[1]
    else:
        raise TypeError(f"`sdata` must be a SpatialData or an AnnData, found {type(sdata).__name__}.")
    if adata.n_vars == 0:
        raise ValueError("The table has no genes (`n_vars == 0`); there is nothing to embed.")
    if adata.var_names.has_duplicates:
        dup = adata.var_names[adata.var_names.duplicated()].unique().tolist()[:10]
        raise ValueError(f"The table has duplicated gene names {dup}; call `table.var_names_make_unique()` first.")
    return adata


def _is_encoder(obj: Any) -> bool:
    return hasattr(obj, "encode") and hasattr(obj, "pooling") and hasattr(obj, "weights_hash")


def _create(name: str | os.PathLike, pooling: str | None, device: str | None, *, progress: bool = True) -> TextEncoder:
    """Build a text encoder; without ``progress`` the ``transformers`` weight-loading bar is hidden too."""
    from dkan.nn.text_encoders import create_text_encoder

    if progress:
        return create_text_encoder(name, pooling=pooling, device=device)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - the text encoders need transformers
        return create_text_encoder(name, pooling=pooling, device=device)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return create_text_encoder(name, pooling=pooling, device=device)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _check_same_encoder(
    old: Mapping, name: str, pooling: str | None, key_added: str, *, weights_hash: str | None = None
) -> None:
    """Raise when ``varm[key_added]`` was made by another encoder, pooling or set of weights."""
    diffs = []
    if old.get("encoder") != name:
        diffs.append(f"encoder {old.get('encoder')!r} vs {name!r}")
    if pooling is not None and old.get("pooling") != pooling:
        diffs.append(f"pooling {old.get('pooling')!r} vs {pooling!r}")
    if weights_hash is not None and old.get("weights_hash") != weights_hash:
        diffs.append(f"weights {old.get('weights_hash')!r} vs {weights_hash!r}")
    if diffs:
        raise ValueError(
            f"`varm[{key_added!r}]` holds embeddings from another text encoder ({'; '.join(diffs)}). Pass "
            "`overwrite=True` to replace them, or `key_added=` to keep both."
        )


def _uns_step(key_added: str) -> str:
    """Provenance entry in ``uns['dkan']``: the standard one for the default key, a suffixed one otherwise."""
    return K.UNS_GENE_EMBEDDING if key_added == K.GENE_EMBEDDING else f"{K.UNS_GENE_EMBEDDING}_{key_added}"


def text_sha1(text: str) -> str:
    """The hash of a gene's text that ``uns["dkan"]["gene_embedding"]["text_sha1"]`` records."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()
