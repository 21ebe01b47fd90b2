"""Whole-slide images (``.svs``, ``.tif``/OME-TIFF, ``.ndpi``, ...) as SpatialData, read through tiffslide.

Reader choice (see ``docs/wsi.md``): `tiffslide <https://github.com/Bayer-Group/tiffslide>`_ is pure Python over
tifffile and zarr (already dkan dependencies), installs from PyPI everywhere, and exposes every pyramid level
as a zarr array, so each level becomes a dask array that decodes only the tiles a crop touches.

The physical pixel size is recorded as a transformation: the image's scale-0 pixels map to the coordinate
system ``f"{sample_id}_um"`` with a :class:`spatialdata.transformations.Scale` of µm per pixel.
:func:`image_um_per_px` reads it back; :func:`dkan.tl.make_spots`, :func:`dkan.tl.tile` and
:func:`dkan.tl.predict` use it when no ``um_per_px`` is given.
"""

from __future__ import annotations

import logging
import os
import threading
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")

#: Pixel sizes outside this range (µm/px) are taken as wrong metadata (e.g. a 72 dpi default resolution tag).
PLAUSIBLE_UM_PER_PX = (0.05, 20.0)
_MIN_LEVEL_SIDE = 512  #: synthetic pyramid levels are added down to about this size when the file has none


def read_wsi(
    path: str | PathLike[str],
    *,
    sample_id: str | None = None,
    um_per_px: float | None = None,
    chunk_size: int = 1024,
) -> SpatialData:
    """Open a whole-slide image as a SpatialData with a lazy multiscale image and its pixel size.

    Nothing is decoded here: every pyramid level of the file is a dask array over the file's tiles, so a
    crop decodes only the tiles it touches. A file without a pyramid gets lazily downsampled levels.

    Parameters
    ----------
    path
        Slide file readable by tiffslide: Aperio ``.svs``, generic tiled (pyramidal) TIFF and OME-TIFF,
        Hamamatsu ``.ndpi``, Leica ``.scn``, and other TIFF-based formats.
    sample_id
        Name of the slide; names the image ``f"{sample_id}_image"`` and the coordinate systems
        ``sample_id`` (pixels) and ``f"{sample_id}_um"`` (micrometres). Default: the file name without suffix.
    um_per_px
        µm per scale-0 pixel; overrides the file's metadata (needed when the file records none).
    chunk_size
        Side of the dask chunks in pixels (rounded to whole file tiles).

    Returns
    -------
    A SpatialData with one image element ``f"{sample_id}_image"`` (``c, y, x`` uint8 RGB, multiscale). A slide with
    16-bit samples is served as uint8, each value scaled by the dtype's range, ``round(v * 255 / 65535)``, and a
    warning says so; other sample types (float, 32-bit, signed) are refused.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The reader cannot open the file, its samples are neither 8- nor 16-bit unsigned integers, or the pixel
        size is missing or implausible and no ``um_per_px`` was given.
    """
    from spatialdata import SpatialData

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Slide file `{path}` does not exist.")
    sample_id = str(sample_id) if sample_id is not None else path.name.split(".")[0]
    slide = _open(path)
    try:
        mpp = slide_um_per_px(slide.properties, path=path, um_per_px=um_per_px)
        shapes = [(int(h), int(w)) for w, h in slide.level_dimensions]
        tiles = [_tile_shape(slide.properties, k) for k in range(len(shapes))]
        n_channels = int(slide.zarr_group["0"].shape[2]) if slide.zarr_group["0"].ndim == 3 else 1
        dtype = np.dtype(slide.zarr_group["0"].dtype)
    finally:
        slide.close()
    if n_channels not in (3, 4):
        raise ValueError(f"Slide `{path}` has {n_channels} channel(s); dkan needs an RGB (brightfield H&E) slide.")
    _check_dtype(dtype, path)
    levels = [_level_dask(path, k, shape, tiles[k], chunk_size) for k, shape in enumerate(shapes)]
    image = _image_element(levels, sample_id, mpp)
    logger.info(
        "read_wsi: %s, %d x %d px, %d levels, %.4g µm/px", path.name, shapes[0][1], shapes[0][0], len(levels), mpp
    )
    return SpatialData(images={f"{sample_id}{K.IMAGE_SUFFIX}": image})


#: The one conversion read_wsi makes: 16-bit samples scaled by the dtype's range, ``round(v * 255 / 65535)``.
UINT16_RULE = "uint16 -> uint8 by the dtype's range: round(v * 255 / 65535)"


def _check_dtype(dtype: np.dtype, path: Path) -> None:
    """Accept uint8 slides, and uint16 ones (served as uint8 by :data:`UINT16_RULE`, with a warning); refuse others."""
    if dtype == np.uint8:
        return
    if dtype == np.uint16:
        logger.warning(
            "read_wsi: slide `%s` stores 16-bit samples; dkan serves them as 8-bit, converted %s (a slide using only "
            "part of the 16-bit range looks darker; convert it to 8-bit yourself to choose another scaling).",
            path,
            UINT16_RULE,
        )
        return
    raise ValueError(
        f"Slide `{path}` stores {dtype} samples; dkan reads 8-bit RGB slides (and 16-bit ones, converted "
        f"{UINT16_RULE}). Convert it to 8-bit RGB with your scaling (e.g. with vips or tifffile), or read it "
        "yourself and parse a uint8 image with `spatialdata.models.Image2DModel`."
    )


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Samples as uint8: unchanged when they are, else 16-bit scaled by :data:`UINT16_RULE` (exact integer rounding)."""
    if values.dtype == np.uint8:
        return values
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)  # 65535 / 255 = 257 exactly


def _open(path: Path) -> Any:
    """Open ``path`` with tiffslide, turning the reader's many failure types into one clear error."""
    import tiffslide

    try:
        return tiffslide.TiffSlide(path)
    except Exception as err:
        raise ValueError(
            f"Cannot open `{path}` as a whole-slide image ({type(err).__name__}: {err}). dkan reads TIFF-based "
            "slides (.svs, .tif/.tiff, OME-TIFF, .ndpi, .scn) through tiffslide; convert other formats (e.g. .mrxs) "
            "to a pyramidal TIFF, e.g. with `vips tiffsave in.mrxs out.tif --tile --pyramid --compression jpeg`."
        ) from err


def slide_um_per_px(properties: Any, *, path: Path | str, um_per_px: float | None = None) -> float:
    """µm per scale-0 pixel: ``um_per_px`` when given, else the slide's metadata; checked for plausibility.

    Parameters
    ----------
    properties
        The reader's slide properties (``tiffslide.mpp-x``/``tiffslide.mpp-y``).
    path
        The slide, for error messages.
    um_per_px
        A pixel size given by the user, which wins over the metadata.

    Returns
    -------
    The pixel size in µm/px (mean of x and y when they differ slightly).
    """
    lo, hi = PLAUSIBLE_UM_PER_PX
    how = (
        "Pass the scanner's pixel size: `dkan.io.read_wsi(path, um_per_px=0.25)` in Python or "
        "`dkan predict SLIDE --um-per-px 0.25 ...` on the command line (0.25 µm/px at 40x, 0.5 at 20x)."
    )
    if um_per_px is not None:
        if not lo <= float(um_per_px) <= hi:
            raise ValueError(f"`um_per_px={um_per_px}` is outside the plausible range [{lo}, {hi}] µm/px. {how}")
        return float(um_per_px)
    mx, my = properties.get("tiffslide.mpp-x"), properties.get("tiffslide.mpp-y")
    if mx is None and my is None:
        mx = my = ome_um_per_px(path)
    values = [float(v) for v in (mx, my) if v is not None]
    if not values:
        raise ValueError(f"Slide `{path}` records no pixel size (µm/px) in its metadata. {how}")
    mpp = float(np.mean(values))
    if not lo <= mpp <= hi or (len(values) == 2 and abs(values[0] - values[1]) > 0.05 * mpp):
        raise ValueError(
            f"Slide `{path}` records an implausible pixel size (x {mx}, y {my} µm/px; plausible: square pixels "
            f"in [{lo}, {hi}]), probably a default resolution tag rather than the scanner's. {how}"
        )
    return mpp


_OME_UNITS = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def ome_um_per_px(path: Path | str) -> float | None:
    """``PhysicalSizeX`` of an OME-TIFF's first image in µm (OME-XML; tiffslide reads only resolution tags)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            xml = tf.ome_metadata if tf.is_ome else None
        if not xml:
            return None
        image = tifffile.xml2dict(xml)["OME"]["Image"]
        pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
        size, unit = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit", "µm")
        return None if size is None or unit not in _OME_UNITS else float(size) * _OME_UNITS[unit]
    except (tifffile.TiffFileError, OSError, KeyError, TypeError, ValueError):
        return None


def _tile_shape(properties: Any, level: int) -> tuple[int, int]:
    th = properties.get(f"tiffslide.level[{level}].tile-height")
    tw = properties.get(f"tiffslide.level[{level}].tile-width")
    return (int(th or 256), int(tw or 256))


def _level_dask(path: Path, level: int, shape: tuple[int, int], tile: tuple[int, int], chunk_size: int) -> Any:
    """One pyramid level as a lazy ``(3, y, x)`` uint8 dask array, chunks aligned to the file's tiles."""
    import dask.array as da

    src = _SlideLevel(path, level, shape)
    chunks = tuple(max(1, round(chunk_size / t)) * t for t in tile)
    arr = da.from_array(src, chunks=(*chunks, -1), asarray=False, meta=np.empty((0, 0, 0), np.uint8))
    return arr.transpose(2, 0, 1)


class _SlideLevel:
    """One level of a slide as a sliceable ``(y, x, 3)`` uint8 array; the file is opened once per process."""

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, path: Path, level: int, shape: tuple[int, int]) -> None:
        self.path, self.level, self.shape = Path(path), int(level), (*shape, 3)
        self._state: tuple[int, Any, Any] | None = None  # (pid, slide, zarr array)
        self._lock = threading.Lock()

    def _array(self) -> Any:
        with self._lock:
            if self._state is None or self._state[0] != os.getpid():  # a forked worker opens its own handle
                import tiffslide

                slide = tiffslide.TiffSlide(self.path)
                self._state = (os.getpid(), slide, slide.zarr_group[str(self.level)])
            return self._state[2]

    def __getitem__(self, key: Any) -> np.ndarray:
        out = to_uint8(np.asarray(self._array()[key[:2]]))
        if out.ndim == 2:  # grey slide: replicate into RGB
            out = np.repeat(out[..., None], 3, axis=-1)
        return np.ascontiguousarray(out[..., :3][(slice(None), slice(None), key[2])])

    def __getstate__(self) -> dict:  # drop the file handle and the lock when pickled, e.g. into workers
        return {"path": self.path, "level": self.level, "shape": self.shape}

    def __setstate__(self, state: dict) -> None:
        self.path, self.level, self.shape = state["path"], state["level"], state["shape"]
        self._state, self._lock = None, threading.Lock()

    def __dask_tokenize__(self) -> tuple:
        return ("dkan-wsi-level", str(self.path.resolve()), self.path.stat().st_mtime_ns, self.level, self.shape)


def _image_element(levels: list[Any], sample_id: str, mpp: float) -> Any:
    """A spatialdata multiscale image (DataTree) from the levels, with pixel and micrometre systems."""
    from spatialdata.models import Image2DModel

    if len(levels) == 1:  # no pyramid in the file: add lazily downsampled levels for overviews
        return Image2DModel.parse(
            levels[0],
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            scale_factors=overview_factors(levels[0].shape[1:]),
            transformations=transformations_for(sample_id, mpp),
        )
    return pyramid_tree(levels, transformations_for(sample_id, mpp))


def overview_factors(shape: tuple[int, ...]) -> list[int] | None:
    """Factors 2, 2, ... that halve an image until its longer side is about ``_MIN_LEVEL_SIDE`` px."""
    factors: list[int] = []
    while max(shape) // 2 ** (len(factors) + 1) >= _MIN_LEVEL_SIDE:
        factors.append(2)
    return factors or None


def pyramid_tree(levels: list[Any], transformations: dict[str, Any]) -> Any:
    """A validated spatialdata multiscale image from ``(3, y, x)`` dask levels (largest first).

    ``transformations`` apply to scale 0; spatialdata derives each level's scale from the shape ratios.
    """
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import set_transformation

    tree = xr.DataTree.from_dict(
        {
            f"scale{k}": xr.Dataset({"image": xr.DataArray(lv, dims=("c", "y", "x"), coords={"c": ["r", "g", "b"]})})
            for k, lv in enumerate(levels)
        }
    )
    set_transformation(tree, transformations, set_all=True)
    Image2DModel().validate(tree)
    return tree


def transformations_for(sample_id: str, um_per_px: float) -> dict[str, Any]:
    """Transformations of a slide's scale-0 pixels: identity to ``sample_id``, µm scale to ``f"{sample_id}_um"``."""
    from spatialdata.transformations import Identity, Scale

    return {sample_id: Identity(), f"{sample_id}{K.MICRONS_SUFFIX}": Scale([um_per_px, um_per_px], axes=("y", "x"))}


def image_um_per_px(image: Any) -> float | None:
    """µm per scale-0 pixel recorded on an image element, or None.

    The pixel size is the scale of the image's transformation to a coordinate system named ``"um"`` or
    ending in ``"_um"`` (as written by :func:`read_wsi`). Implausible values count as none.

    Parameters
    ----------
    image
        A spatialdata image element (``DataArray`` or multiscale ``DataTree``).

    Returns
    -------
    µm/px, or None when no micrometre coordinate system is recorded.
    """
    from spatialdata.transformations import get_transformation

    lo, hi = PLAUSIBLE_UM_PER_PX
    for cs, t in sorted(get_transformation(image, get_all=True).items()):
        if cs != K.MICRONS_SUFFIX.lstrip("_") and not cs.endswith(K.MICRONS_SUFFIX):
            continue
        a = t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        value = float(np.sqrt(abs(np.linalg.det(a[:2, :2]))))
        if lo <= value <= hi:
            return value
        logger.warning("Image pixel size %.4g µm/px (coordinate system `%s`) is implausible; ignored.", value, cs)
    return None


def add_slide_image(sdata: SpatialData, *, um_per_px: float | None = None) -> list[str]:
    """Add back the image of the slide a prediction store was made from (the store records the slide's path).

    Parameters
    ----------
    sdata
        A store written by :func:`dkan.tl.predict_slides` / ``dkan predict SLIDE`` from a slide file.
    um_per_px
        Pixel size, when the slide needed one at prediction time.

    Returns
    -------
    The names of the images added (lazy, as read by :func:`read_wsi`), e.g. for ``dkan.pl.spatial_pred``.
    """
    from dkan._utils import uns_get

    sources = [src for t in sdata.tables.values() if (src := uns_get(t, K.UNS_SOURCE))]
    if not sources:
        raise ValueError(
            "No table records a source slide (`uns['dkan']['source']`); it was not made from a slide file."
        )
    slide = sources[0]["slide"]
    images = read_wsi(slide, um_per_px=um_per_px).images
    for key, image in images.items():
        sdata.images[key] = image
    return list(images)
