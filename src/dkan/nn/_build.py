"""Construction helpers of the DKAN network: width projections, encoder settings, required batch keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from dkan._config import DKANConfig


def proj(n_in: int, n_out: int) -> nn.Module:
    """Linear map when widths differ, identity otherwise (the reference's convention)."""
    return nn.Linear(n_in, n_out) if n_in != n_out else nn.Identity()


def spec(cfg: DKANConfig, prefix: str) -> dict[str, Any]:
    """Width, depth, heads, MLP ratio and dropout of the encoder whose configuration fields start with ``prefix``."""
    return {
        "dim": cfg.d,
        "depth": getattr(cfg, f"{prefix}_depth"),
        "heads": getattr(cfg, f"{prefix}_heads"),
        "mlp_ratio": getattr(cfg, f"{prefix}_mlp_ratio"),
        "dropout": getattr(cfg, f"{prefix}_dropout"),
    }


def require(batch: Mapping[str, Tensor], key: str, why: str) -> Tensor:
    """``batch[key]``, or a KeyError saying why it is needed and which keys the batch has."""
    if key not in batch:
        raise KeyError(f"Batch key {key!r} is required {why}; found keys {sorted(batch)}.")
    return batch[key]
