"""Pure torch modules: encoder registries, DKAN network, losses."""

from dkan._lazy import lazy_module

__getattr__, __dir__, __all__ = lazy_module(
    __name__,
    {
        "create_image_encoder": "image_encoders",
        "list_image_encoders": "image_encoders",
        "register_image_encoder": "image_encoders",
        "create_text_encoder": "text_encoders",
        "list_text_encoders": "text_encoders",
        "register_text_encoder": "text_encoders",
        "DKAN": "network",
        "convert_checkpoint": "_encoders._weights",
    },
)
