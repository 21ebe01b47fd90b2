"""Example and real datasets as SpatialData."""

from dkan._lazy import lazy_module

__getattr__, __dir__, __all__ = lazy_module(
    __name__,
    {
        "toy": "_toy",
        "copy_sdata": "_toy",
        "toy_gene_descriptions": "_toy_genes",
        "her2st": "_her2st",
        "synthetic_wsi": "_wsi",
        "synthetic_visium": "_visium",
        "synthetic_hest": "_hest",
    },
)
