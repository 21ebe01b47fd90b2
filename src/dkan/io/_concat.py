"""Merge single-sample SpatialData objects (as written by the readers) into one."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import pandas as pd

from dkan import _keys as K
from dkan._utils import get_table, table_attrs

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")


def _concat_samples(
    sdatas: Sequence[SpatialData],
    *,
    join: Literal["inner", "outer"] = "inner",
    table_key: str = K.TABLE,
) -> SpatialData:
    """Merge SpatialData objects holding one table each into one SpatialData with one table.

    The merge is :func:`spatialdata.concatenate` (``concatenate_tables=True``): elements are merged by name (names
    must not clash), tables are concatenated along spots with :func:`anndata.concat`. dkan then makes the region
    column categorical over all annotated shapes (in input order), the sample and patient columns categorical, and
    merges the ``uns["dkan"]["reader"]`` entries. ``join="inner"`` keeps the genes shared by all samples;
    ``"outer"`` keeps all genes and fills missing counts with zeros. Tables whose region / instance columns have
    other names get ``region`` / ``spot_id`` columns first.
    """
    import spatialdata as sd
    from spatialdata.models import TableModel

    if not sdatas:
        raise ValueError("`sdatas` is empty; pass at least one SpatialData.")
    _check_unique_names(sdatas)
    parts, regions, reader, n_genes = [], [], {}, []
    for one in sdatas:
        tkey, table = get_table(one)
        regs, region_key, instance_key = table_attrs(table, table_key=tkey)
        if (region_key, instance_key) != (K.REGION, K.INSTANCE):
            table = table.copy()
            table.obs[K.REGION] = pd.Categorical(table.obs[region_key].astype(str))
            table.obs[K.INSTANCE] = table.obs[instance_key].to_numpy()
            table.uns.pop("spatialdata_attrs")
            table = TableModel.parse(table, region=regs, region_key=K.REGION, instance_key=K.INSTANCE)
        regions += [r for r in regs if r not in regions]
        reader.update(table.uns.get(K.UNS, {}).get(K.UNS_READER, {}))
        n_genes.append(table.n_vars)
        elements = {kind: dict(getattr(one, kind)) for kind in ("images", "labels", "points", "shapes")}
        parts.append(sd.SpatialData(**elements, tables={table_key: table}))
    out = sd.concatenate(parts, concatenate_tables=True, join=join, fill_value=0, merge="same")
    merged = out.tables[table_key]
    if join == "inner" and merged.n_vars < max(n_genes):
        logger.info("concat: kept %d genes shared by all samples (of %s)", merged.n_vars, n_genes)
    merged.obs[K.REGION] = pd.Categorical(merged.obs[K.REGION].astype(str), categories=regions)
    for col in (K.SAMPLE, K.PATIENT):
        if col in merged.obs:
            merged.obs[col] = merged.obs[col].astype(str).astype("category")
    merged.uns.pop("spatialdata_attrs", None)
    merged.uns[K.UNS] = {K.UNS_READER: reader}
    out.tables[table_key] = TableModel.parse(merged, region=regions, region_key=K.REGION, instance_key=K.INSTANCE)
    return out


def _check_unique_names(sdatas: Sequence[SpatialData]) -> None:
    """Refuse element names that occur in several inputs (naming the element), before concatenating."""
    seen: dict[str, str] = {}
    for one in sdatas:
        for kind in ("images", "labels", "points", "shapes"):
            for name in getattr(one, kind):
                if name in seen:
                    raise ValueError(f"Element name {name!r} ({kind}) occurs in several inputs; rename one sample.")
                seen[name] = kind
