"""Plots of predictions, metrics and training history."""

from dkan._lazy import lazy_module

__getattr__, __dir__, __all__ = lazy_module(
    __name__,
    {
        "spatial_pred": "_spatial",
        "metrics": "_metrics",
        "training_history": "_history",
    },
)
