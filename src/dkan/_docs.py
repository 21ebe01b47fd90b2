"""Shared docstring text for parameters that many public functions take (``sdata``, ``table_key``, ``device``...).

A docstring line holding only ``{key}`` (a key of :data:`PARAMS`) becomes that parameter's numpydoc entry
when the function is decorated with :func:`shared_docs`: write ``{table_key}`` where the entry
``table_key`` and its description would go in the *Parameters* section.

Only whole-line placeholders are replaced, so other braces in a docstring (``{gene: text}``) stay. An unknown
key is a KeyError at import, so a typo cannot ship.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

#: ``key -> (parameter name, description)``; the key is what a docstring writes between braces.
PARAMS: dict[str, tuple[str, str]] = {
    "sdatas": (
        "sdata",
        "One SpatialData or a list of them; every sample (spots element annotated by the table) is used.",
    ),
    "sdata_spots": ("sdata", "SpatialData with spots (shapes), their table and an RGB uint8 image per sample."),
    "sdata_pred": ("sdata", "SpatialData with predictions from :func:`dkan.tl.predict`."),
    "table_key": ("table_key", "Table annotating the spots; inferred when there is one."),
    "table_key_any": ("table_key", "Table of a SpatialData; inferred when it holds one table."),
    "image_key": (
        "image_key",
        "Image to crop from: one name, or a mapping ``{spots_key: image_key}``; inferred per sample by default "
        "(see :func:`dkan.tl.tile`).",
    ),
    "device": (
        "device",
        "Torch device (``'cpu'``, ``'cuda'``, ``'cuda:1'``...); default CUDA when available, else CPU.",
    ),
    "progress": ("progress", "Show progress bars."),
}

_PLACEHOLDER = re.compile(r"^(?P<indent>[ \t]*)\{(?P<key>\w+)\}[ \t]*$", flags=re.M)


def fill(doc: str | None) -> str | None:
    """``doc`` with every whole-line ``{key}`` of :data:`PARAMS` replaced by that parameter's numpydoc entry."""
    if doc is None:
        return None

    def entry(match: re.Match[str]) -> str:
        key = match.group("key")
        if key not in PARAMS:
            raise KeyError(f"Docstring placeholder {{{key}}} is not a key of dkan._docs.PARAMS: {sorted(PARAMS)}.")
        indent = match.group("indent")
        name, text = PARAMS[key]
        body = textwrap.fill(text, width=116, initial_indent=indent + "    ", subsequent_indent=indent + "    ")
        return f"{indent}{name}\n{body}"

    return _PLACEHOLDER.sub(entry, doc)


def shared_docs(func: F) -> F:
    """Decorator: fill the ``{key}`` placeholders of ``func.__doc__`` (see :func:`fill`)."""
    func.__doc__ = fill(func.__doc__)
    return func
