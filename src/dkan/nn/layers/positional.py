"""PEGH: positional encoding of spot tokens by a depthwise convolution over their integer grid positions.

The reference (TRIPLEX's APEG) scatters tokens into a dense zero grid through a sparse COO tensor, convolves and reads
the occupied cells back in lexicographic order, so it silently relies on the spots being sorted by ``(row, col)``,
sums duplicate positions and drops all-zero rows. This implementation computes the same convolution with explicit
index gathers over the occupied cells only: the output follows the input order, any grid works (square legacy ST,
Visium hex ``(array_row, array_col)`` where every other cell is simply empty, caller-defined grids of pseudo-spots),
memory is ``O(n_spots * dim)`` instead of ``O(grid area * dim)``, and duplicate positions are averaged (or rejected).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["PEGH", "grid_cells"]


def grid_cells(grid: Tensor) -> tuple[Tensor, Tensor, int]:
    """Map integer positions to occupied cells.

    Parameters
    ----------
    grid
        ``(n, 2)`` integer ``(row, col)`` positions (any offset, negative allowed).

    Returns
    -------
    ``(cells, inverse, width)``: the sorted unique linear cell ids ``row * width + col`` after shifting the minimum
    to zero, the cell of each input row, and the grid width used for the linear ids.
    """
    if grid.ndim != 2 or grid.shape[1] != 2:
        raise ValueError(f"Expected `grid` of shape (n, 2), found {tuple(grid.shape)}.")
    if grid.is_floating_point() or grid.is_complex():
        raise TypeError(f"Expected `grid` to hold integer positions, found dtype {grid.dtype}.")
    pos = grid.long() - grid.long().amin(dim=0)
    width = int(pos[:, 1].max()) + 1 if len(pos) else 1
    cells, inverse = torch.unique(pos[:, 0] * width + pos[:, 1], sorted=True, return_inverse=True)
    return cells, inverse, width


class PEGH(nn.Module):
    """Depthwise-convolution positional encoding on a sparse spot grid.

    ``out_i = x_i + (conv * X)[cell_i]`` where ``X`` is the dense grid holding each occupied cell's (mean) token and
    zeros elsewhere, and ``conv`` is a depthwise ``kernel_size`` x ``kernel_size`` convolution with bias and zero
    padding. For unique positions this equals the reference's ``conv(X) + X`` read at the occupied cells.

    Parameters
    ----------
    dim
        Token width (one filter per channel).
    kernel_size
        Odd kernel side.
    duplicates
        What to do when two tokens share a position: ``"mean"`` averages them into the cell (each keeps its own
        residual), ``"error"`` raises.
    """

    def __init__(self, dim: int, kernel_size: int = 3, *, duplicates: Literal["mean", "error"] = "mean") -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"Expected `kernel_size` to be an odd int >= 1, found {kernel_size}.")
        if duplicates not in ("mean", "error"):
            raise ValueError(f"Expected `duplicates` to be 'mean' or 'error', found {duplicates!r}.")
        self.kernel_size = kernel_size
        self.duplicates = duplicates
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def _cell_tokens(self, x: Tensor, inverse: Tensor, n_cells: int) -> Tensor:
        if n_cells == len(x):  # a bijection: a plain gather (deterministic on every device)
            return x[torch.argsort(inverse)]
        if self.duplicates == "error":
            raise ValueError(
                f"`grid` holds {len(x) - n_cells} duplicate position(s); pass unique positions or use "
                "PEGH(..., duplicates='mean')."
            )
        summed = x.new_zeros(n_cells, x.shape[1]).index_put((inverse,), x, accumulate=True)
        counts = torch.bincount(inverse, minlength=n_cells).to(x.dtype)
        return summed / counts[:, None]

    def forward(self, x: Tensor, grid: Tensor) -> Tensor:
        """Encode ``x`` (n, dim) at integer positions ``grid`` (n, 2) ``(row, col)``; returns (n, dim)."""
        if x.ndim != 2 or len(x) != len(grid):
            raise ValueError(f"Expected `x` of shape (n, dim) with n={len(grid)} rows, found {tuple(x.shape)}.")
        if len(x) == 0:
            return x
        cells, inverse, width = grid_cells(grid.to(x.device))
        cell_x = self._cell_tokens(x, inverse, len(cells))
        rows, cols = cells // width, cells % width
        n_rows = int(rows.max()) + 1 if len(cells) else 1
        pad = self.kernel_size // 2
        weight = self.conv.weight[:, 0]  # (dim, k, k)
        acc = x.new_zeros(cell_x.shape) + self.conv.bias
        for ky in range(self.kernel_size):
            for kx in range(self.kernel_size):
                r, c = rows + (ky - pad), cols + (kx - pad)
                inside = (r >= 0) & (r < n_rows) & (c >= 0) & (c < width)
                target = r * width + c
                pos = torch.searchsorted(cells, target).clamp_(max=len(cells) - 1)
                found = inside & (cells[pos] == target)
                neighbour = cell_x[pos] * found[:, None].to(x.dtype)
                acc = acc + neighbour * weight[:, ky, kx]
        return x + acc[inverse]
