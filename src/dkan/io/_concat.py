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

    Images and shapes are merged by name (names must not clash); tables are concatenated along spots, the
    region column becomes categorical over all annotated shapes, and ``uns["dkan"]["reader"]`` entries are
    merged. ``join="inner"`` keeps the genes shared by all samples; ``"outer"`` keeps all genes and fills
    missing counts with zeros.
    """
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    if not sdatas:
        raise ValueError("`sdatas` is empty; pass at least one SpatialData.")
    images, shapes, tables, reader = {}, {}, [], {}
    regions: list[str] = []
    for sd in sdatas:
        for kind, store in (("images", images), ("shapes", shapes)):
            for name, el in getattr(sd, kind).items():
                if name in store:
                    raise ValueError(f"Element name {name!r} ({kind}) occurs in several inputs; rename one sample.")
                store[name] = el
        tkey, table = get_table(sd)
        regs, region_key, instance_key = table_attrs(table, table_key=tkey)
        if (region_key, instance_key) != (K.REGION, K.INSTANCE):
            table = table.copy()
            table.obs[K.REGION] = table.obs[region_key].astype(str)
            table.obs[K.INSTANCE] = table.obs[instance_key].to_numpy()
        regions += [r for r in regs if r not in regions]
        reader.update(table.uns.get(K.UNS, {}).get(K.UNS_READER, {}))
        tables.append(table)
    n_genes = [t.n_vars for t in tables]
    merged = ad.concat(tables, join=join, fill_value=0, merge="same")
    if join == "inner" and merged.n_vars < max(n_genes):
        logger.info("concat: kept %d genes shared by all samples (of %s)", merged.n_vars, n_genes)
    if merged.obs_names.has_duplicates:
        merged.obs_names_make_unique()
    merged.obs[K.REGION] = pd.Categorical(merged.obs[K.REGION].astype(str), categories=regions)
    for col in (K.SAMPLE, K.PATIENT):
        if col in merged.obs:
            merged.obs[col] = merged.obs[col].astype(str).astype("category")
    merged.uns.pop("spatialdata_attrs", None)
    merged.uns[K.UNS] = {K.UNS_READER: reader}
    table = TableModel.parse(merged, region=regions, region_key=K.REGION, instance_key=K.INSTANCE)
    return SpatialData(images=images, shapes=shapes, tables={table_key: table})
