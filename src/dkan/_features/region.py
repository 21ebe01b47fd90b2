"""Per-spot region features from either storage layout (spot by spot, or shared tiles)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    from spatialdata import SpatialData


def region_features(
    sdata: SpatialData,
    spots: Sequence[int] | np.ndarray | slice | None = None,
    *,
    table_key: str | None = None,
    key_added: str | None = None,
) -> np.ndarray:
    """Frozen region features ``(m, G*G, D)`` float32 of some spots, whichever way they are stored.

    Spot-by-spot features are ``obsm["dkan_region_features"]`` of the results table; shared-tile features
    (``extract_features(shared_tiles=True)``) are stored once per tile and gathered here for the spots asked for.
    Tiles outside the image are zeros, as in ``obsm["dkan_region_mask"]``.

    Parameters
    ----------
    sdata
        SpatialData with features from :func:`dkan.tl.extract_features`.
    spots
        Row positions (or a slice) of the spots in the results table; default all of them. On a whole slide with
        shared tiles, ask for a batch at a time: all spots at once is ``n x G*G x D`` floats.
    table_key
        Count table (or H&E-only spot table) whose results table holds the features; inferred when unambiguous.
    key_added
        The ``key_added`` given to :func:`dkan.tl.extract_features`, if any.

    Returns
    -------
    The region features of the spots, float32.
    """
    from dkan._features.extract import feature_keys
    from dkan._features.shared_tiles import gather
    from dkan._results import results_table

    name, res = results_table(sdata, table_key)
    keys = feature_keys(key_added)
    rows = slice(None) if spots is None else spots
    if keys["region"] in res.obsm:
        return np.asarray(res.obsm[keys["region"]][rows], dtype=np.float32)
    if keys["index"] in res.obsm and keys["tiles"] in res.uns:
        return gather(res.uns[keys["tiles"]], np.asarray(res.obsm[keys["index"]])[rows])
    raise KeyError(
        f"Table `{name}` holds no region features (`obsm[{keys['region']!r}]`, or `obsm[{keys['index']!r}]` with "
        f"`uns[{keys['tiles']!r}]`). Run `dkan.tl.extract_features(sdata, region=True)` first."
    )
