"""Reusable pure-torch layers of the DKAN network."""

from dkan.nn.layers.attention import MultiHeadAttention, RelativePositionBias, attend, attention_weights
from dkan.nn.layers.blocks import (
    CrossEncoder,
    ExpressionEncoder,
    FeedForward,
    SlideEncoder,
    TransformerBlock,
    TransformerEncoder,
)
from dkan.nn.layers.dropout import Dropout
from dkan.nn.layers.positional import PEGH, grid_cells

__all__ = [
    "PEGH",
    "CrossEncoder",
    "Dropout",
    "ExpressionEncoder",
    "FeedForward",
    "MultiHeadAttention",
    "RelativePositionBias",
    "SlideEncoder",
    "TransformerBlock",
    "TransformerEncoder",
    "attend",
    "attention_weights",
    "grid_cells",
]
