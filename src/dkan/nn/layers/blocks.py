"""Transformer building blocks shared by every DKAN encoder.

One pre-norm block serves self- and cross-attention: the same LayerNorm normalises the queries and, when given, the
keys/values (shared gamma/beta, as in the reference). Stacks add a final LayerNorm only when asked (the reference's
slide, region and fusion encoders have one; the text and gene-cross encoders do not).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from dkan.nn.layers.attention import MultiHeadAttention
from dkan.nn.layers.dropout import Dropout
from dkan.nn.layers.positional import PEGH

__all__ = ["CrossEncoder", "ExpressionEncoder", "FeedForward", "SlideEncoder", "TransformerBlock", "TransformerEncoder"]


class FeedForward(nn.Sequential):
    """``Linear(dim, hidden) -> GELU -> Dropout -> Linear(hidden, dim) -> Dropout``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), Dropout(dropout), nn.Linear(hidden, dim), Dropout(dropout))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: ``x += Attn(LN x, LN context)``; ``x += FFN(LN x)``.

    Parameters
    ----------
    dim
        Token width.
    heads
        Attention heads.
    mlp_ratio
        FFN hidden width is ``int(dim * mlp_ratio)``.
    dropout
        Dropout of the attention output and of the FFN.
    grid
        Token grid for a learned relative-position bias (self-attention only).
    """

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0, *, grid: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, dropout=dropout, grid=grid)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        """Update ``x`` (B, N, dim), attending to itself or to ``context`` (B, M, dim) with ``key_mask`` (B, M)."""
        ctx = None if context is None else self.norm_attn(context)
        x = x + self.attn(self.norm_attn(x), ctx, key_mask)
        return x + self.ff(self.norm_ff(x))


class _Stack(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float = 0.0,
        *,
        grid: tuple[int, int] | None = None,
        final_norm: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"Expected `depth` >= 1, found {depth}.")
        self.layers = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, dropout, grid=grid) for _ in range(depth))
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()

    def _run(self, x: Tensor, context: Tensor | None, key_mask: Tensor | None) -> Tensor:
        for layer in self.layers:
            x = layer(x, context, key_mask)
        return self.norm(x)


class TransformerEncoder(_Stack):
    """Stack of self-attention :class:`TransformerBlock` layers, optionally followed by a LayerNorm.

    Parameters
    ----------
    dim, heads, mlp_ratio, dropout, grid
        See :class:`TransformerBlock`.
    depth
        Number of layers.
    final_norm
        Apply a LayerNorm to the output.
    """

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Encode ``x`` (B, N, dim); ``key_mask`` (B, N) marks valid tokens."""
        return self._run(x, None, key_mask)


class CrossEncoder(_Stack):
    """Stack of cross-attention :class:`TransformerBlock` layers: queries ``x`` attend to a fixed ``context``.

    Parameters are those of :class:`TransformerEncoder` (without ``grid``).
    """

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Update queries ``x`` (B, N, dim) from ``context`` (B, M, dim); ``key_mask`` (B, M) marks valid keys."""
        return self._run(x, context, key_mask)


class SlideEncoder(nn.Module):
    """Encoder over all spots of one sample: one layer, :class:`PEGH` on the spot grid, the remaining layers, LayerNorm.

    Parameters
    ----------
    dim, heads, mlp_ratio, dropout
        See :class:`TransformerBlock`.
    depth
        Total number of transformer layers (>= 1; the reference requires >= 2).
    kernel_size
        PEGH kernel side.
    duplicates
        PEGH handling of repeated positions.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float = 0.0,
        *,
        kernel_size: int = 3,
        duplicates: Literal["mean", "error"] = "mean",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"Expected `depth` >= 1, found {depth}.")
        self.first = TransformerBlock(dim, heads, mlp_ratio, dropout)
        self.pos = PEGH(dim, kernel_size, duplicates=duplicates)
        self.rest = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth - 1))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, grid: Tensor) -> Tensor:
        """Encode the tokens ``x`` (n, dim) of one sample at integer positions ``grid`` (n, 2); returns (n, dim)."""
        h = self.first(x[None])[0]
        h = self.pos(h, grid)[None]
        for layer in self.rest:
            h = layer(h)
        return self.norm(h)[0]


class ExpressionEncoder(nn.Module):
    """Expression profile to one token: ``p = Linear(y)``; ``LayerNorm(p + Dropout(Linear(GELU(p))))``.

    Parameters
    ----------
    n_genes
        Length of the expression vector.
    dim
        Output width.
    dropout
        Dropout on the second linear layer (0.3 in the reference).
    """

    def __init__(self, n_genes: int, dim: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.proj = nn.Linear(n_genes, dim)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(dim, dim), Dropout(dropout))
        self.norm = nn.LayerNorm(dim)

    def forward(self, y: Tensor) -> Tensor:
        """Encode expression ``y`` (B, n_genes) to (B, dim)."""
        p = self.proj(y)
        return self.norm(p + self.mlp(p))
