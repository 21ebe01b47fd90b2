"""Lazy attribute loading for subpackages, so that ``import dkan`` stays light."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_module(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """Return ``(__getattr__, __dir__, __all__)`` for a package whose ``names`` live in private modules.

    A module path starting with ``dkan.`` is absolute (a name the package re-exports from a lower layer); any
    other is relative to ``package``.
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            module = names[name] if names[name].startswith("dkan.") else f"{package}.{names[name]}"
            return getattr(importlib.import_module(module), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__, sorted(names)
