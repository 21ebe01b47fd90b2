"""A slide that fails alone: which errors are the slide's, and the error that names it.

Which errors are a slide's own failure (reported per slide by ``errors="skip"``, raised as :class:`SlideError`
naming the slide by ``errors="raise"``): any error raised while a slide is processed that is an ``OSError``,
``EOFError``, ``KeyError``, ``ValueError`` or ``TypeError``, or that comes from a library reading or decoding
image files (``imagecodecs``, ``tifffile``, ``tiffslide``, ``openslide``, ``PIL``, ``zarr``, ``numcodecs``,
``zlib``, ...), wherever it surfaces (decoding is lazy: a truncated JPEG tile fails only when features are
computed). Any other error (a ``RuntimeError`` of torch, an ``AttributeError``, an invalid model) is a fault of
the program or the environment rather than of the slide and stops the batch with its own traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from typing import Any

#: Top-level modules whose exceptions mean that a slide's file could not be read or decoded.
READER_MODULES = frozenset(
    {"imagecodecs", "tifffile", "tiffslide", "openslide", "PIL", "zarr", "numcodecs", "zlib", "ome_types", "xml"}
)
#: Exception types that are a slide's failure wherever they come from (bad or unreadable input).
SLIDE_ERRORS = (OSError, EOFError, KeyError, ValueError, TypeError)


class SlideError(ValueError):
    """One slide could not be read, decoded or predicted; the original error is its ``__cause__``.

    Attributes
    ----------
    slide
        The slide's path.
    stage
        Where it failed (``read``, ``spots``, ``features``, ``predict``, ``write``).
    """

    def __init__(self, slide: str | PathLike[str], stage: str, err: BaseException | str) -> None:
        self.slide, self.stage = str(slide), stage
        if isinstance(err, str):  # rebuilt from its message (pickled between processes)
            super().__init__(err)
            return
        text = " ".join(str(err.args[0] if isinstance(err, KeyError) and err.args else err).split())
        super().__init__(f"Slide `{slide}` failed ({stage}): {type(err).__name__}: {text or '(no message)'}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (SlideError, (self.slide, self.stage, str(self)))


def is_slide_error(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) means that the slide, not the program, is at fault."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, SLIDE_ERRORS):
            return True
        if any(cls.__module__.split(".")[0] in READER_MODULES for cls in type(cur).__mro__):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


@contextmanager
def slide_stage(slide: str | PathLike[str], stage: str, *, user_errors_as_is: bool = False) -> Iterator[None]:
    """Turn the slide errors (:func:`is_slide_error`) raised inside the block into a :class:`SlideError`.

    Parameters
    ----------
    slide
        The slide being processed.
    stage
        Its stage, for the message.
    user_errors_as_is
        Leave the plain user errors (:data:`SLIDE_ERRORS`) as they are and convert only decoder errors (the
        command line, whose messages already name their parameter).
    """
    try:
        yield
    except SlideError:
        raise
    except Exception as err:
        if not is_slide_error(err) or (user_errors_as_is and isinstance(err, SLIDE_ERRORS)):
            raise
        raise SlideError(slide, stage, err) from err
