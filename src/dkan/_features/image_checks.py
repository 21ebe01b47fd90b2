"""Checks of the image a sample's spots are cropped from: which one was picked, blank pixels, upsampling."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from spatialdata import SpatialData
    from xarray import DataArray

    from dkan._utils import Sample

logger = logging.getLogger("dkan")

#: Largest upsampling of the crops (target µm/px over the chosen level's µm/px) accepted without a warning
MAX_UPSAMPLE = 1.5
#: Pixel standard deviation (0-255 scale) under which the image around the spots counts as blank
BLANK_STD = 2.0
#: Spots sampled for the blank check, and the half-side (px) of the window read around each
_N_PROBE, _HALF = 32, 8


def other_images(sdata: SpatialData, sample: Sample) -> list[str]:
    """The other images that share a coordinate system with the sample's spots, highest resolution first."""
    from dkan._utils import image_scale

    scales = {k: image_scale(sdata, sample.spots_key, k) for k in sdata.images if k != sample.image_key}
    return sorted((k for k, s in scales.items() if s is not None), key=lambda k: -scales[k])


def log_choice(sdata: SpatialData, sample: Sample, image_key: str | Mapping[str, str] | None) -> None:
    """Say which image was picked when several could serve and the user did not name one."""
    given = isinstance(image_key, str) or (isinstance(image_key, Mapping) and sample.spots_key in image_key)
    others = [] if given else other_images(sdata, sample)
    if others:
        logger.info(
            "Sample %s: cropping spots from image `%s`, the highest-resolution of %d images in the spots' coordinate "
            "system (others: %s); pass `image_key=` to choose another.",
            sample.name,
            sample.image_key,
            len(others) + 1,
            others,
        )


def check_upsampling(sdata: SpatialData, sample: Sample, *, level_mpp: float | None, target_mpp: float | None) -> None:
    """Warn when the crops are upsampled more than :data:`MAX_UPSAMPLE` to reach ``target_mpp``."""
    if level_mpp is None or target_mpp is None or level_mpp <= target_mpp * MAX_UPSAMPLE:
        return
    others = other_images(sdata, sample)
    logger.warning(
        "Sample %s: image `%s` has %.3g µm/px, coarser than the %.3g µm/px the crops are made at, so every crop is "
        "upsampled %.1fx and carries no detail at that scale. Load the full-resolution image (Visium: "
        "`spatialdata_io.visium(path, fullres_image_file=...)`, then `image_key=` it)%s, or train and predict at "
        "the image's resolution (`target_mpp=%.3g`).",
        sample.name,
        sample.image_key,
        level_mpp,
        target_mpp,
        level_mpp / target_mpp,
        f"; other images here: {others}" if others else "",
        level_mpp,
    )


def check_not_blank(sdata: SpatialData, sample: Sample, level: DataArray, spot_px: np.ndarray) -> None:
    """Warn when the image around the spots is blank or near-constant (e.g. an all-black RGBA image).

    Reads a small window around up to :data:`_N_PROBE` spots of the chosen pyramid level, never the whole image.
    """
    from dkan._features.levels import rgb

    pick = np.unique(np.linspace(0, len(spot_px) - 1, min(_N_PROBE, len(spot_px))).astype(int))
    h, w = level.sizes["y"], level.sizes["x"]
    data = rgb(level).data
    windows = []
    for x, y in np.floor(spot_px[pick]).astype(np.int64):
        y0, y1, x0, x1 = max(y - _HALF, 0), min(y + _HALF, h), max(x - _HALF, 0), min(x + _HALF, w)
        if y1 > y0 and x1 > x0:
            windows.append(np.asarray(data[:, y0:y1, x0:x1]).reshape(data.shape[0], -1))
    if not windows:
        return
    pixels = np.concatenate(windows, axis=1).astype(np.float64)
    if pixels.std() >= BLANK_STD:
        return
    others = other_images(sdata, sample)
    fix = f"pass `image_key=` one of the other images here: {others}" if others else "load the H&E image it should be"
    logger.warning(
        "Sample %s: image `%s` is blank around the spots (pixel values %d-%d, std %.2f over %d spots); its crops "
        "carry no tissue and the model cannot learn or predict from them. Check the image (plot it) and %s.",
        sample.name,
        sample.image_key,
        int(pixels.min()),
        int(pixels.max()),
        float(pixels.std()),
        len(windows),
        fix,
    )


def check_image(
    sdata: SpatialData,
    sample: Sample,
    level: DataArray,
    spot_px: np.ndarray,
    *,
    image_key: Any,
    level_mpp: float | None,
    target_mpp: float | None,
) -> None:
    """All checks of the image picked for ``sample`` (log the choice, blank pixels, upsampling)."""
    log_choice(sdata, sample, image_key)
    check_not_blank(sdata, sample, level, spot_px)
    check_upsampling(sdata, sample, level_mpp=level_mpp, target_mpp=target_mpp)
