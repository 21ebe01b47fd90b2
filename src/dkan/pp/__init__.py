"""Preprocessing: gene panel selection and normalisation."""

from dkan._lazy import lazy_module

__getattr__, __dir__, __all__ = lazy_module(
    __name__,
    {
        "select_genes": "_select",
        "normalize": "_normalize",
        "aggregate_bins": "_bins",
    },
)
