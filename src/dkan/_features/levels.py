"""Image pyramid levels: RGB checks, the µm per pixel of a sample, the level that fits a target resolution."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K
from dkan._utils import Sample, uns_get

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData
    from xarray import DataArray

logger = logging.getLogger("dkan")

VISIUM_SPOT_UM = 55.0  #: Visium spot diameter, used to infer µm/px when the reader recorded none


def image_levels(image: Any) -> list[DataArray]:
    """Pyramid levels of an image element (a plain ``DataArray`` is a one-level pyramid)."""
    from xarray import DataArray

    if isinstance(image, DataArray):
        return [image]
    return [next(iter(image[name].values())) for name in sorted(image.children, key=lambda s: int(s[5:]))]


def is_rgba(level: DataArray) -> bool:
    """Whether an image has 4 channels named r, g, b, a (e.g. a Visium hires PNG); dkan then ignores alpha."""
    names = [str(c).lower() for c in level.coords["c"].values] if "c" in level.coords else []
    return level.sizes.get("c") == 4 and names == ["r", "g", "b", "a"]


def rgb(level: DataArray) -> DataArray:
    """Return the RGB channels of an image level (drops the alpha channel of an RGBA image)."""
    return level.isel(c=slice(0, 3)) if is_rgba(level) else level


def check_rgb(level: DataArray, image_key: str) -> None:
    """Raise unless the image is ``(c, y, x)`` RGB (or RGBA, alpha ignored) ``uint8``."""
    if tuple(level.dims) != ("c", "y", "x"):
        raise ValueError(f"Image `{image_key}` has dims {tuple(level.dims)}; dkan needs a 2D image ('c', 'y', 'x').")
    if level.sizes["c"] != 3 and not is_rgba(level):
        raise ValueError(
            f"Image `{image_key}` has {level.sizes['c']} channels; dkan needs RGB (3 channels). "
            "Select the colour channels, e.g. `img.isel(c=[0, 1, 2])`, and parse it again with `Image2DModel`."
        )
    if level.dtype != np.uint8:
        raise TypeError(
            f"Image `{image_key}` has dtype {level.dtype}; dkan needs uint8 RGB. Rescale it to 0-255 and cast, "
            "e.g. `(img / img.max() * 255).astype('uint8')`, then parse it again with `Image2DModel`."
        )


def reader_um_per_px(adata: AnnData, sample: str) -> float | None:
    """µm per scale-0 pixel recorded by a dkan reader in ``uns["dkan"]["reader"][sample]``, or None."""
    meta = (uns_get(adata, K.UNS_READER) or {}).get(sample) or {}
    value = meta.get("um_per_px") if isinstance(meta, Mapping) else None
    return None if value is None else float(value)


def sample_um_per_px(sdata: SpatialData, sample: Sample, r_px: np.ndarray, *, required: bool) -> float | None:
    """µm per scale-0 pixel of a sample's image: reader metadata, the image's µm system, or the Visium spot rule."""
    from dkan.io._wsi import image_um_per_px

    value = reader_um_per_px(sdata.tables[sample.table_key], sample.name)
    if value is not None:
        return value
    if sample.image_key is not None and (value := image_um_per_px(sdata.images[sample.image_key])) is not None:
        return value
    if "radius" in sdata.shapes[sample.spots_key] and np.isfinite(r_px).any():
        value = VISIUM_SPOT_UM / (2.0 * float(np.nanmedian(r_px)))
        logger.info("Sample %s: assuming Visium spots (55 µm across): %.4g µm/px.", sample.name, value)
        return value
    if required:
        raise ValueError(
            f"Cannot tell the µm per pixel of sample `{sample.name}` (no reader metadata, spots are not circles). "
            f"Set `table.uns['{K.UNS}']['{K.UNS_READER}']['{sample.name}'] = {{'um_per_px': ...}}` "
            "or use `target_mpp=None` (native pixels)."
        )
    return None


def choose_level(levels: list[DataArray], mpp0: float | None, target_mpp: float | None) -> tuple[int, float]:
    """Pyramid level whose µm/px is closest to ``target_mpp`` at or below it, and the resample factor."""
    if target_mpp is None:
        return 0, 1.0
    if mpp0 is None:
        raise ValueError("`target_mpp` needs the image's µm per pixel.")
    width0 = levels[0].sizes["x"]
    mpps = [mpp0 * width0 / lv.sizes["x"] for lv in levels]
    ok = [k for k, m in enumerate(mpps) if m <= target_mpp * (1 + 1e-6)]
    k = max(ok, key=lambda i: mpps[i]) if ok else 0
    return k, float(target_mpp / mpps[k])
