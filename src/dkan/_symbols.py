"""Gene names: Ensembl-id detection and a ``var`` column of symbols used in place of ``var_names``."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData

#: Ensembl gene ids (human ENSG..., mouse ENSMUSG..., other species ENS<code>G...), optionally versioned
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def looks_like_ensembl(names: Sequence[str], *, fraction: float = 0.5) -> bool:
    """Whether at least ``fraction`` of ``names`` are Ensembl gene ids (``ENSG00000141510``, ``ENSMUSG...``)."""
    names = [str(n) for n in names]
    if not names:
        return False
    return sum(bool(_ENSEMBL.match(n)) for n in names) >= fraction * len(names)


def symbol_columns(adata: AnnData, genes: Sequence[str]) -> list[tuple[str, int]]:
    """``var`` columns holding some of ``genes``, with how many, best first."""
    wanted = {str(g) for g in genes}
    found = []
    for col in adata.var.columns:
        values = adata.var[col]
        if values.dtype.kind in "biufc":
            continue
        n = len(wanted & {str(v) for v in values.dropna().unique()})
        if n:
            found.append((str(col), n))
    return sorted(found, key=lambda t: -t[1])


def missing_genes_hint(adata: AnnData, genes: Sequence[str]) -> str:
    """Advice for a table that holds none of ``genes`` in ``var_names``: Ensembl ids, or a symbol column to use."""
    cols = symbol_columns(adata, genes)
    if cols:
        col, n = cols[0]
        return f"`var[{col!r}]` holds {n} of them: pass `gene_symbols={col!r}` to match genes by that column."
    if looks_like_ensembl(list(adata.var_names[:1000])):
        return (
            f"The table's `var_names` look like Ensembl gene ids (e.g. {list(map(str, adata.var_names[:2]))}) while "
            "the genes are symbols. Pass `gene_symbols=` naming a `var` column of symbols (spatialdata-io and scanpy "
            "readers keep one, e.g. 'gene_symbols'), or add one by mapping the ids to symbols (NCBI gene_info, "
            "Ensembl BioMart) and pass its name."
        )
    return ""


@contextmanager
def use_symbols(adata: AnnData, gene_symbols: str | None) -> Iterator[AnnData]:
    """Use ``var[gene_symbols]`` as ``var_names`` inside the block; the original names come back afterwards.

    Missing symbols keep their original name, duplicated ones are made unique (``anndata``'s ``-1`` suffixes).
    Everything dkan writes meanwhile is aligned by position (``var`` columns, ``layers``, ``varm``), so it stays
    with the right genes when the names are restored.
    """
    if gene_symbols is None:
        yield adata
        return
    if not isinstance(gene_symbols, str):
        raise TypeError(f"`gene_symbols` must be the name of a `var` column; found {type(gene_symbols).__name__}.")
    if gene_symbols not in adata.var.columns:
        raise KeyError(
            f"`gene_symbols={gene_symbols!r}` is not a column of `var`; columns: {list(map(str, adata.var.columns))}."
        )
    import pandas as pd
    from anndata.utils import make_index_unique

    original = adata.var_names.copy()
    values = adata.var[gene_symbols]
    names = np.where(values.isna().to_numpy(), original.to_numpy(dtype=object), values.astype(str).to_numpy())
    adata.var_names = make_index_unique(pd.Index(names, dtype=object))
    try:
        yield adata
    finally:
        adata.var_names = original
