"""Spot grids: square (legacy ST) or hex (Visium) detection and grid-neighbour averaging."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from scipy import sparse

#: grid-neighbour offsets (d_row, d_col): legacy ST square grid (8 neighbours) and Visium hex grid (6)
_OFFSETS = {
    "square": [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)],
    "hex": [(0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1)],
}


def detect_grid(rc: np.ndarray) -> Literal["square", "hex"]:
    """Grid type of integer ``(row, col)`` spot coordinates.

    Visium's hex grid uses doubled columns, so every spot has ``row + col`` of one parity and no two spots of a
    row are one column apart; anything else is treated as the square legacy ST grid.
    """
    rc = np.asarray(rc, dtype=np.int64)
    if len(rc) < 2:
        return "square"
    parity = np.unique((rc[:, 0] + rc[:, 1]) % 2)
    if len(parity) == 1 and not _has_pair(rc, (0, 1)):
        return "hex"
    return "square"


def _codes(rc: np.ndarray) -> np.ndarray:
    return rc[:, 0] * (1 << 32) + rc[:, 1]


def _has_pair(rc: np.ndarray, offset: tuple[int, int]) -> bool:
    return bool(np.isin(_codes(rc + np.asarray(offset)), _codes(rc)).any())


def neighbour_average(rc: np.ndarray, grid: Literal["square", "hex"]) -> sparse.csr_matrix:
    """Row-stochastic matrix averaging each spot with the existing spots among its immediate grid neighbours."""
    rc = np.asarray(rc, dtype=np.int64)
    index = pd.Index(_codes(rc))
    if index.has_duplicates:
        dup = rc[index.duplicated()][:3].tolist()
        raise ValueError(f"Several spots share array coordinates (row, col), e.g. {dup}; smoothing needs unique ones.")
    n = len(rc)
    rows, cols = [np.arange(n)], [np.arange(n)]
    for off in _OFFSETS[grid]:
        j = index.get_indexer(_codes(rc + np.asarray(off)))
        ok = j >= 0
        rows.append(np.flatnonzero(ok))
        cols.append(j[ok])
    r, c = np.concatenate(rows), np.concatenate(cols)
    w = sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=(n, n))
    return sparse.diags(1.0 / np.asarray(w.sum(axis=1)).ravel()) @ w
