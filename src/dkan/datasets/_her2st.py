"""The her2st repository layout (Andersson et al. 2021): HER2-positive breast cancer, legacy ST."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")

_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def her2st_sections(path: str | PathLike[str]) -> dict[str, Path | None]:
    """Sections of a her2st folder with a counts file, mapped to their image (None when absent)."""
    root = Path(path)
    cnt_dir = root / "ST-cnts"
    if not cnt_dir.is_dir():
        raise FileNotFoundError(
            f"`path` {root} is not a her2st folder: it has no `ST-cnts/`. Point it at a clone of "
            "github.com/almaan/her2st (with ST-cnts/, ST-spotfiles/ and ST-imgs/)."
        )
    out: dict[str, Path | None] = {}
    for f in sorted(cnt_dir.glob("*.tsv.gz")):
        section = f.name.removesuffix(".tsv.gz")
        img_dir = root / "ST-imgs" / section[0] / section
        imgs = sorted(p for p in img_dir.glob("*") if p.suffix.lower() in _IMAGE_EXT) if img_dir.is_dir() else []
        if len(imgs) > 1:
            raise ValueError(f"Several images for section {section} in {img_dir}: {[p.name for p in imgs]}; keep one.")
        out[section] = imgs[0] if imgs else None
    return out


def her2st(
    path: str | PathLike[str],
    sections: Sequence[str] | str | None = None,
    *,
    join: Literal["inner", "outer"] = "inner",
    scale_factors: Sequence[int] | None = (2, 2, 2, 2),
    chunks: tuple[int, int, int] = (3, 1024, 1024),
    progress: bool = True,
) -> SpatialData:
    """Read sections of the her2st repository layout into one SpatialData.

    The folder layout is the one of github.com/almaan/her2st: ``ST-cnts/{section}.tsv.gz``,
    ``ST-spotfiles/{section}_selection.tsv`` and ``ST-imgs/{letter}/{section}/<image>.jpg``. Each section
    becomes an image ``f"{section}_image"`` and spot circles ``f"{section}_spots"`` in the coordinate system
    ``section`` (see :func:`dkan.io.read_st`); one table ``"table"`` holds all spots with ``obs["sample"]``
    (the section) and ``obs["patient"]`` (its letter).

    dkan ships no data. The her2st data is public on Zenodo (record 3957257, linked from the README of
    github.com/almaan/her2st) as 7z archives encrypted with passwords that the repository's README publishes.
    Unpack the count matrices (``ST-cnts/``), the images (``ST-imgs/``) and the spot selection files
    (``ST-spotfiles/``) into one folder and pass it as ``path``. Only 36 sections have counts; a section is
    read when its image is there too.

    Parameters
    ----------
    path
        The her2st folder.
    sections
        Sections to read (e.g. ``["C2", "C3"]``); default: every section that has an image.
    join
        ``"inner"`` keeps the genes measured in all sections, ``"outer"`` all genes (missing counts are 0).
    scale_factors
        Image pyramid downsampling factors; ``None`` for single-scale images.
    chunks
        Dask chunks of the images, ``(c, y, x)``.
    progress
        Show a progress bar over the sections.

    Returns
    -------
    The sections as one SpatialData.
    """
    from dkan.io._concat import _concat_samples
    from dkan.io._st import read_st

    root = Path(path)
    found = her2st_sections(root)
    with_image = [s for s, img in found.items() if img is not None]
    if sections is None:
        if not with_image:
            raise ValueError(f"No section in {root} has an image under `ST-imgs/{{letter}}/{{section}}/`.")
        sections = with_image
    elif isinstance(sections, str):
        sections = [sections]
    bad = [s for s in sections if found.get(s) is None]
    if bad:
        raise ValueError(
            f"`sections` {bad} have no counts file or no image in {root}; sections with images: {with_image}."
        )
    sdatas = []
    for s in tqdm(sections, desc="her2st sections", disable=not progress or len(sections) < 2):
        spots = root / "ST-spotfiles" / f"{s}_selection.tsv"
        if not spots.is_file():
            raise FileNotFoundError(f"Section {s} has no spot file {spots}.")
        sdatas.append(
            read_st(
                root / "ST-cnts" / f"{s}.tsv.gz",
                spots,
                found[s],
                sample_id=s,
                patient=s[0],
                scale_factors=scale_factors,
                chunks=chunks,
            )
        )
    return _concat_samples(sdatas, join=join)
