"""Configuration, training loop and model save/load."""

from dkan._lazy import lazy_module

__getattr__, __dir__, __all__ = lazy_module(
    __name__,
    {
        "DKANConfig": "config",
        "PRESETS": "config",
        "DKANModel": "fitted",
    },
)
