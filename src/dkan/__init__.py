"""dkan: predict spatial gene expression from H&E histology with DKAN, on SpatialData."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dkan._version import __version__

_SUBMODULES = ("datasets", "io", "pp", "tl", "pl", "nn", "train")
_LAZY_ATTRS = {"DKANModel": "dkan.train", "DKANConfig": "dkan.train"}

__all__ = ["DKANConfig", "DKANModel", "__version__", "datasets", "io", "nn", "pl", "pp", "tl", "train"]

if TYPE_CHECKING:  # pragma: no cover
    from dkan import datasets, io, nn, pl, pp, tl, train
    from dkan.train import DKANConfig, DKANModel


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"dkan.{name}")
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
    raise AttributeError(f"module 'dkan' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
