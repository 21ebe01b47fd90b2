"""Multi-head self- and cross-attention with an optional key mask and learned relative-position bias.

Semantics follow the DKAN/TRIPLEX reference (bias-free q/k/v projections, scale ``head_dim ** -0.5``, no dropout on
the attention probabilities, output projection + dropout unless there is a single head). Departures: masked keys are
overwritten with ``torch.finfo(dtype).min`` of the score dtype (the reference uses the fp16 minimum in every dtype),
and dropout follows ``module.training`` like any torch module (the reference leaves it on in eval, its bug 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dkan.nn.layers.dropout import Dropout

__all__ = ["MultiHeadAttention", "RelativePositionBias", "attend", "attention_weights"]


class RelativePositionBias(nn.Module):
    """Learned per-head attention bias indexed by the offset class ``(|drow|, |dcol|)`` on a grid (LeViT style).

    Tokens are the cells of a ``grid[0] x grid[1]`` grid in row-major order; there are ``grid[0] * grid[1]``
    offset classes, each one scalar per head, zero-initialised.

    Parameters
    ----------
    heads
        Number of attention heads.
    grid
        ``(rows, cols)`` of the token grid.
    """

    def __init__(self, heads: int, grid: tuple[int, int]) -> None:
        super().__init__()
        rows, cols = (int(g) for g in grid)
        if rows < 1 or cols < 1:
            raise ValueError(f"Expected `grid` to hold two positive ints, found {grid!r}.")
        self.grid = (rows, cols)
        r = torch.arange(rows).repeat_interleave(cols)
        c = torch.arange(cols).repeat(rows)
        index = (r[:, None] - r[None]).abs() * cols + (c[:, None] - c[None]).abs()
        self.register_buffer("index", index, persistent=False)
        self.table = nn.Parameter(torch.zeros(heads, rows * cols))

    @property
    def n_tokens(self) -> int:
        """Number of grid cells (tokens)."""
        return self.grid[0] * self.grid[1]

    def forward(self) -> Tensor:
        """Bias of shape ``(heads, n_tokens, n_tokens)``."""
        return self.table[:, self.index]


def _check_key_mask(key_mask: Tensor, batch: int, n_keys: int) -> Tensor:
    if key_mask.shape != (batch, n_keys):
        raise ValueError(f"Expected `key_mask` of shape {(batch, n_keys)}, found {tuple(key_mask.shape)}.")
    return key_mask.bool()


def attention_weights(
    q: Tensor, k: Tensor, *, scale: float, bias: Tensor | None = None, key_mask: Tensor | None = None
) -> Tensor:
    """Softmax attention probabilities.

    Parameters
    ----------
    q, k
        ``(B, H, Nq, Dh)`` and ``(B, H, Nk, Dh)``.
    scale
        Factor on ``q @ k^T``.
    bias
        Additive bias broadcastable to ``(B, H, Nq, Nk)``.
    key_mask
        ``(B, Nk)``, ``True`` = valid key. Invalid keys are overwritten with the dtype minimum before the softmax,
        so they get zero weight whenever a row has one valid key (a fully masked row attends uniformly, as in the
        reference).

    Returns
    -------
    ``(B, H, Nq, Nk)`` weights summing to one over keys.
    """
    scores = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias
    if key_mask is not None:
        mask = _check_key_mask(key_mask, q.shape[0], k.shape[-2])
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1)


def attend(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, bias: Tensor | None = None, key_mask: Tensor | None = None
) -> Tensor:
    """Attention output ``softmax(q k^T * scale + bias) v`` with optional key mask.

    Without bias and mask this uses :func:`torch.nn.functional.scaled_dot_product_attention` (memory-efficient
    kernels for the long slide sequences); otherwise the explicit form of :func:`attention_weights`.
    """
    if bias is None and key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return attention_weights(q, k, scale=scale, bias=bias, key_mask=key_mask) @ v


class MultiHeadAttention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is ``None``, cross-attention otherwise.

    Parameters
    ----------
    dim
        Token width (queries and keys).
    heads
        Number of heads; must divide ``dim``.
    dropout
        Dropout after the output projection.
    grid
        When given, a :class:`RelativePositionBias` over this token grid is added to the scores (self-attention
        over exactly ``grid[0] * grid[1]`` tokens).
    """

    def __init__(self, dim: int, heads: int, *, dropout: float = 0.0, grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"Expected `heads` to divide dim={dim}, found heads={heads}.")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.rel_bias = RelativePositionBias(heads, grid) if grid is not None else None
        self.to_out = nn.Sequential(nn.Linear(dim, dim), Dropout(dropout)) if heads > 1 else nn.Identity()

    def _split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        """Attend from ``x`` (B, Nq, dim) to ``context`` (B, Nk, dim; default ``x``); returns (B, Nq, dim)."""
        ctx = x if context is None else context
        q = self._split(self.to_q(x))
        k, v = (self._split(t) for t in self.to_kv(ctx).chunk(2, dim=-1))
        bias = None
        if self.rel_bias is not None:
            n = self.rel_bias.n_tokens
            if q.shape[-2] != n or k.shape[-2] != n:
                raise ValueError(
                    f"Relative-position bias expects {n} query and key tokens (grid {self.rel_bias.grid}), "
                    f"found {q.shape[-2]} queries and {k.shape[-2]} keys."
                )
            bias = self.rel_bias().to(q.dtype)
        out = attend(q, k, v, scale=self.scale, bias=bias, key_mask=key_mask)
        b, _, nq, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, nq, -1))
