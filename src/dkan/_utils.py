"""Shared helpers: finding tables, samples, images and spot positions in a SpatialData."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("dkan")


@dataclass(frozen=True)
class Sample:
    """One sample (section) of a SpatialData: a spots element, its image and its rows in the table."""

    name: str  #: sample label (``obs["sample"]`` when present, else the region)
    spots_key: str  #: shapes element of the spots (= the table's region value)
    image_key: str | None  #: image element the spots are cropped from
    obs_idx: np.ndarray  #: integer positions of the sample's rows in the table
    table_key: str = K.TABLE  #: table holding the sample's rows


def choose_key(kind: str, param: str, key: str | None, available: list[str]) -> str:
    """Return ``key`` if valid, else the single available key; raise a helpful error otherwise."""
    if key is not None:
        if key not in available:
            raise KeyError(f"`{param}={key!r}` not found; available {kind}: {sorted(available)}.")
        return key
    if len(available) == 1:
        return available[0]
    if not available:
        raise KeyError(f"No {kind} found in the SpatialData; add one or pass `{param}=`.")
    raise KeyError(f"Several {kind} found: {sorted(available)}. Pass `{param}=` to choose one.")


def get_table(sdata: SpatialData, table_key: str | None = None) -> tuple[str, AnnData]:
    """Return ``(name, table)``, inferring the name when the SpatialData holds one table.

    dkan's results tables (:mod:`dkan._results`) of another table are skipped when inferring, so a SpatialData with
    one count table and its results table infers the count table.
    """
    if table_key is None:
        available = [k for k in sdata.tables.keys() if not is_derived(sdata, k)]
    else:
        available = list(sdata.tables.keys())
    key = choose_key("tables", "table_key", table_key, available)
    return key, sdata.tables[key]


def results_of(adata: AnnData) -> str | None:
    """The count table a results table belongs to (its own name for a table dkan created), or None."""
    value = adata.uns.get(K.UNS, {}).get(K.UNS_RESULTS_OF)
    return None if value is None else str(value)


def is_derived(sdata: SpatialData, key: str) -> bool:
    """Whether table ``key`` is the results table of *another* table of ``sdata`` (so not a count table)."""
    owner = results_of(sdata.tables[key])
    return owner is not None and owner != key and owner in sdata.tables


def table_attrs(adata: AnnData, *, table_key: str = "table") -> tuple[list[str], str, str]:
    """Return ``(regions, region_key, instance_key)`` of a table annotating shapes."""
    attrs = adata.uns.get("spatialdata_attrs")
    if not attrs or "region_key" not in attrs:
        raise ValueError(
            f"Table `{table_key}` has no `uns['spatialdata_attrs']`, so dkan cannot link it to spots. "
            "Parse it with `spatialdata.models.TableModel.parse(adata, region=..., region_key=..., instance_key=...)`."
        )
    region = attrs["region"]
    regions = [region] if isinstance(region, str) else list(region)
    return regions, attrs["region_key"], attrs["instance_key"]


def spots_to_image(sdata: SpatialData, spots_key: str, image_key: str) -> np.ndarray | None:
    """3x3 affine (x, y) from the spots' intrinsic coordinates to the image's scale-0 pixels, or None if unlinked.

    spatialdata refuses when several equally short paths exist (spatialdata-io's Visium layout links the hires
    image and the spots through both ``dataset_id`` and ``{dataset_id}_downscaled_hires``); then the
    transformations through each shared coordinate system are compared and used when they agree.
    """
    from spatialdata.transformations import get_transformation, get_transformation_between_coordinate_systems

    shapes, image = sdata.shapes[spots_key], sdata.images[image_key]
    axes = ("x", "y")
    try:
        t = get_transformation_between_coordinate_systems(sdata, shapes, image)
        return t.to_affine_matrix(input_axes=axes, output_axes=axes)
    except Exception:  # noqa: BLE001 - spatialdata raises several types when no single path exists
        pass
    ts, ti = get_transformation(shapes, get_all=True), get_transformation(image, get_all=True)
    mats = [
        np.linalg.inv(ti[cs].to_affine_matrix(input_axes=axes, output_axes=axes))
        @ ts[cs].to_affine_matrix(input_axes=axes, output_axes=axes)
        for cs in sorted(set(ts) & set(ti))
    ]
    if not mats:
        return None
    if any(not np.allclose(m, mats[0], rtol=1e-6, atol=1e-6) for m in mats[1:]):
        raise ValueError(
            f"Spots `{spots_key}` and image `{image_key}` share coordinate systems {sorted(set(ts) & set(ti))} "
            "that map them differently; remove the inconsistent transformation."
        )
    return mats[0]


def image_scale(sdata: SpatialData, spots_key: str, image_key: str) -> float | None:
    """Image pixels per spot-coordinate unit, or None when the two share no coordinate system."""
    a = spots_to_image(sdata, spots_key, image_key)
    return None if a is None else float(np.sqrt(abs(np.linalg.det(a[:2, :2]))))


def find_image(sdata: SpatialData, spots_key: str, image_key: str | None = None) -> str:
    """The image to crop the spots of ``spots_key`` from: given, or the highest-resolution one sharing a system."""
    if image_key is not None:
        if image_key not in sdata.images:
            raise KeyError(f"`image_key={image_key!r}` not found; available images: {sorted(sdata.images)}.")
        if image_scale(sdata, spots_key, image_key) is None:
            raise ValueError(
                f"Image `{image_key}` and spots `{spots_key}` share no coordinate system; "
                "set a transformation to a common system with `spatialdata.transformations.set_transformation`."
            )
        return image_key
    scales = {k: image_scale(sdata, spots_key, k) for k in sdata.images}
    scales = {k: s for k, s in scales.items() if s is not None}
    if not scales:
        raise KeyError(
            f"No image shares a coordinate system with spots `{spots_key}`; images: {sorted(sdata.images)}. "
            "Add the H&E image or pass `image_key=`."
        )
    return max(scales, key=lambda k: scales[k])


def iter_samples(
    sdata: SpatialData,
    *,
    table_key: str | None = None,
    image_key: str | Mapping[str, str] | None = None,
    spots_key: str | None = None,
    need_image: bool = True,
) -> list[Sample]:
    """List the samples of a SpatialData: one per shapes element annotated by the table.

    ``image_key`` is one image name (single sample) or a mapping ``{spots_key: image_key}``.
    """
    tkey, adata = get_table(sdata, table_key)
    regions, region_key, _ = table_attrs(adata, table_key=tkey)
    if spots_key is not None:
        if spots_key not in regions:
            raise KeyError(f"`spots_key={spots_key!r}` is not annotated by table `{tkey}`; choices: {regions}.")
        regions = [spots_key]
    if isinstance(image_key, str) and len(regions) > 1:
        raise ValueError(
            f"`image_key={image_key!r}` is one name but table `{tkey}` annotates {len(regions)} spot elements "
            f"{regions}; pass a mapping {{spots_key: image_key}} instead."
        )
    col = adata.obs[region_key].astype(str).to_numpy()
    out = []
    for region in regions:
        idx = np.flatnonzero(col == region)
        if len(idx) == 0:
            continue
        if region not in sdata.shapes:
            raise KeyError(f"Table `{tkey}` annotates `{region}`, which is not a shapes element of the SpatialData.")
        ikey = image_key.get(region) if isinstance(image_key, Mapping) else image_key
        img = find_image(sdata, region, ikey) if need_image else ikey
        name = str(adata.obs[K.SAMPLE].iloc[idx[0]]) if K.SAMPLE in adata.obs else region
        out.append(Sample(name=name, spots_key=region, image_key=img, obs_idx=idx, table_key=tkey))
    if not out:
        raise ValueError(f"Table `{tkey}` has no rows; dkan needs at least one spot.")
    return out


def spot_pixels(sdata: SpatialData, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Spot centres ``(x, y)`` and radii in scale-0 pixels of the sample's image, in table row order."""
    shapes = sdata.shapes[sample.spots_key]
    a = spots_to_image(sdata, sample.spots_key, sample.image_key)
    if a is None:
        raise ValueError(f"Spots `{sample.spots_key}` and image `{sample.image_key}` share no coordinate system.")
    centroids = shapes.geometry.centroid
    xy1 = np.c_[centroids.x.to_numpy(), centroids.y.to_numpy(), np.ones(len(shapes))]
    xy = (a @ xy1.T).T[:, :2]
    if "radius" in shapes:
        r = shapes["radius"].to_numpy(dtype=float) * np.sqrt(abs(np.linalg.det(a[:2, :2])))
    else:
        r = np.sqrt(shapes.geometry.area.to_numpy() / np.pi) * np.sqrt(abs(np.linalg.det(a[:2, :2])))
    return _align_to_table(sdata, sample, shapes.index, xy, r)


def _align_to_table(
    sdata: SpatialData, sample: Sample, index: Any, xy: np.ndarray, r: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Reorder per-shape arrays to the order of the sample's table rows (through the instance key)."""
    import pandas as pd

    adata = sdata.tables[sample.table_key]
    _, _, instance_key = table_attrs(adata, table_key=sample.table_key)
    inst = adata.obs[instance_key].to_numpy()[sample.obs_idx]
    pos = pd.Index(index).get_indexer(inst)
    if (pos < 0).any():
        missing = inst[pos < 0][:5]
        raise KeyError(
            f"Table rows of `{sample.spots_key}` name instances {list(missing)} that are not in the shapes index."
        )
    return xy[pos], r[pos]


def uns_get(adata: AnnData, step: str) -> dict | None:
    """Run parameters of ``step`` from ``adata.uns["dkan"]``, or None."""
    return adata.uns.get(K.UNS, {}).get(step)


def uns_set(adata: AnnData, step: str, params: dict) -> None:
    """Record run parameters of ``step`` in ``adata.uns["dkan"]``."""
    adata.uns.setdefault(K.UNS, {})[step] = params


def check_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as an int; a non-integer is a TypeError, one below ``minimum`` a ValueError."""
    import numbers

    what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be {what}; found {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"`{name}={value}` must be {what}.")
    return int(value)


def grid_coords(obs: Any, *, table_key: str | None) -> np.ndarray:
    """Spot-grid positions ``obs[["array_row", "array_col"]]`` as an ``(n, 2)`` int64 array (rounded).

    A missing (NaN), infinite or non-numeric position is a ValueError naming the column and the first spots: cast
    to integers it would become -9.2e18 and put the spot far off the grid.
    """
    import pandas as pd

    table = "of the table" if table_key is None else f"of table `{table_key}`"
    out = []
    for col in (K.ARRAY_ROW, K.ARRAY_COL):
        values = pd.to_numeric(obs[col], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        bad = ~np.isfinite(values)
        if bad.any():
            spots = [str(s) for s in obs.index[bad][:5]]
            found = [str(v) for v in obs[col].to_numpy()[bad][:3]]
            raise ValueError(
                f"`obs[{col!r}]` {table} has {int(bad.sum())} missing, infinite or non-numeric grid "
                f"position(s) (e.g. {found}) at spot(s) {spots}; dkan needs every spot's integer grid position. "
                "Fill them in (Visium: from the tissue positions file) or drop those spots."
            )
        out.append(np.rint(values).astype(np.int64))
    return np.stack(out, axis=1)


def check_unique_genes(adata: AnnData, *, table_key: str = K.TABLE) -> None:
    """Refuse a table whose ``var_names`` repeat a gene (genes are matched by name)."""
    names = adata.var_names
    if names.has_duplicates:
        dup = [str(g) for g in names[names.duplicated()].unique()]
        raise ValueError(
            f"Table `{table_key}` has {len(dup)} duplicated gene name(s) in `var_names`, e.g. {dup[:5]}; dkan matches "
            "genes by name. Make them unique with `table.var_names_make_unique()` (or sum the duplicated columns)."
        )


def resolve_device(device: str | int | torch.device | None, *, param: str = "device") -> torch.device:
    """The torch device to run on: ``device`` checked, or CUDA when available, else CPU.

    Parameters
    ----------
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, a CUDA index, a :class:`torch.device`, or ``None``.
    param
        Parameter name used in error messages.

    Returns
    -------
    The device; a name torch does not know, or an accelerator this machine lacks, is a ValueError.
    """
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool) or not isinstance(device, str | int | torch.device):
        raise TypeError(f"`{param}` must be a device name such as 'cpu' or 'cuda'; found {type(device).__name__}.")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"`{param}={device!r}` is not a torch device; use 'cpu', 'cuda', 'cuda:N' (N = GPU index) or 'mps'."
        ) from err
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"`{param}={device!r}` but CUDA is not available here; use `{param}='cpu'`.")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"`{param}={device!r}` but this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1}).")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`{param}={device!r}` but MPS is not available here; use `{param}='cpu'`.")
    return dev


def error_line(err: BaseException) -> str:
    """The message of ``err`` on one line (a KeyError's message without the quotes ``str`` adds)."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    text = " ".join(str(msg).split())
    return text or type(err).__name__


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` runs on this machine."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
