"""Readers for spatial transcriptomics layouts."""

from dkan._lazy import lazy_module

__getattr__, __dir__, __all__ = lazy_module(
    __name__,
    {
        "read_st": "_st",
        "read_hest": "_hest",
        "read_wsi": "_wsi",
        "image_um_per_px": "_wsi",
        "add_slide_image": "_wsi",
    },
)
