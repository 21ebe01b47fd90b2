"""Deterministic synthetic slides whose texture encodes expression (for tests, tutorials and demos)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dkan import _keys as K

if TYPE_CHECKING:
    from spatialdata import SpatialData

#: Gene symbols used by the toy data (real names, so gene-text tutorials read naturally).
TOY_GENES = (
    "FN1 ERBB2 KRT5 KRT14 KRT17 KRT8 KRT18 KRT19 EPCAM CDH1 VIM COL1A1 COL1A2 COL3A1 SPARC ACTA2 MYH11 "
    "PTPRC CD74 CD3E CD8A MS4A1 IGKC IGHG1 JCHAIN LYZ CD68 C1QA PECAM1 VWF MKI67 TOP2A ESR1 PGR GATA3 "
    "TFF1 SCGB2A2 MGP DCN LUM POSTN SFRP2 AEBP1 IGFBP7 S100A8 S100A9 HLA-DRA B2M TMSB10 MUCL1"
).split()

# colour (RGB, 0-255) and blob radius (px) of each cell type: tumour, stroma, immune, vessel/other
_TYPE_COLOURS = np.array([[110, 40, 140], [235, 140, 180], [40, 30, 110], [200, 80, 80], [150, 110, 190]])
_TYPE_RADII = np.array([8, 6, 4, 6, 8])


def toy(
    *,
    n_samples: int = 3,
    grid_size: int = 12,
    n_genes: int = 40,
    n_types: int = 4,
    spot_pitch_px: int = 48,
    um_per_px: float = 2.0,
    library_size: float = 200.0,
    seed: int = 0,
) -> SpatialData:
    """Make synthetic paired H&E-like slides and spot counts that an image model can learn.

    Each slide holds a few "cell types" drawn as coloured, textured blobs whose proportions vary smoothly
    across the slide. Each spot's counts are Poisson draws from the cell-type mix under the spot (times a
    fixed signature matrix) plus a smaller contribution of the mix in its neighbourhood, so the patch image
    predicts expression and the region context helps.

    Parameters
    ----------
    n_samples
        Number of slides (samples ``"s0"``, ``"s1"``, ...); patients alternate ``"P0"``, ``"P1"``.
    grid_size
        Spots per side of the square spot grid (``grid_size ** 2`` spots per slide).
    n_genes
        Number of genes (at most ``len(TOY_GENES)``).
    n_types
        Number of cell types (at most 5).
    spot_pitch_px
        Distance between neighbouring spot centres in pixels.
    um_per_px
        Physical pixel size recorded for the slides.
    library_size
        Mean counts per spot.
    seed
        Random seed; the same seed gives identical data.

    Returns
    -------
    A SpatialData with, per sample ``s``, an image ``f"{s}_image"`` (multiscale, uint8 RGB), spot circles
    ``f"{s}_spots"`` and one table ``"table"`` with raw counts in ``X``.
    """
    if not 1 <= n_genes <= len(TOY_GENES):
        raise ValueError(f"`n_genes` must be in [1, {len(TOY_GENES)}], found {n_genes}.")
    if not 2 <= n_types <= len(_TYPE_COLOURS):
        raise ValueError(f"`n_types` must be in [2, {len(_TYPE_COLOURS)}], found {n_types}.")
    if n_samples < 1 or grid_size < 2:
        raise ValueError(f"Need `n_samples >= 1` and `grid_size >= 2`, found {n_samples} and {grid_size}.")
    rng = np.random.default_rng(seed)
    sig_local = rng.gamma(0.6, 1.0, size=(n_types, n_genes))
    sig_local[:, : min(n_genes, 3 * n_types)] *= 0.2  # weaken some genes, make a few type markers
    for t in range(n_types):
        sig_local[t, t::n_types][:3] += 4.0
    sig_context = rng.gamma(0.6, 1.0, size=(n_types, n_genes))
    slides = [
        _make_slide(rng, grid_size, n_types, spot_pitch_px, sig_local, sig_context, library_size)
        for _ in range(n_samples)
    ]
    return _to_spatialdata(slides, TOY_GENES[:n_genes], spot_pitch_px, um_per_px)


def _smooth_fields(rng: np.random.Generator, n_types: int, size: int) -> np.ndarray:
    """Smooth cell-type proportion fields, shape (n_types, size, size), summing to 1 per pixel."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    logits = np.zeros((n_types, size, size))
    for t in range(n_types):
        for _ in range(3):
            cy, cx = rng.uniform(-0.1, 1.1, 2)
            w = rng.uniform(0.15, 0.35)
            logits[t] += rng.uniform(1.0, 3.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * w**2))
    e = np.exp(2.0 * logits)
    return e / e.sum(0, keepdims=True)


def _make_slide(rng, grid_size, n_types, pitch, sig_local, sig_context, library_size) -> dict:
    margin = 2 * pitch
    size = grid_size * pitch + 2 * margin
    fields = _smooth_fields(rng, n_types, size)
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = (242, 228, 236)  # pale background
    img += rng.normal(0, 6, size=img.shape)
    n_blobs = int(size * size / 100)
    pos = rng.uniform(0, size, size=(n_blobs, 2))
    cum = np.cumsum(fields[:, pos[:, 1].astype(int), pos[:, 0].astype(int)], axis=0)
    types = (rng.uniform(size=n_blobs)[None] > cum).sum(0).clip(0, n_types - 1)
    yy, xx = np.mgrid[-9:10, -9:10]
    for (x, y), t in zip(pos, types, strict=True):
        r = _TYPE_RADII[t]
        disc = (xx**2 + yy**2) <= r * r
        if t % 2 == 1:  # ring texture for odd types
            disc &= (xx**2 + yy**2) >= (r - 2.5) ** 2
        ys, xs = yy[disc] + int(y), xx[disc] + int(x)
        ok = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
        img[ys[ok], xs[ok]] = _TYPE_COLOURS[t] + rng.normal(0, 10, 3)
    rows, cols = np.mgrid[0:grid_size, 0:grid_size]
    rows, cols = rows.ravel(), cols.ravel()
    cx = margin + (cols + 0.5) * pitch
    cy = margin + (rows + 0.5) * pitch
    local = _mix_near(pos, types, n_types, cx, cy, 0.5 * pitch)
    context = _mix_near(pos, types, n_types, cx, cy, 2.5 * pitch)
    rate = local @ sig_local + 0.5 * context @ sig_context
    rate = library_size * rate / rate.sum(1, keepdims=True).mean()
    counts = rng.poisson(rate).astype(np.int32)
    image = np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return {"image": image, "x": cx, "y": cy, "row": rows, "col": cols, "counts": counts, "radius": 0.25 * pitch}


def _mix_near(pos: np.ndarray, types: np.ndarray, n_types: int, cx, cy, radius: float) -> np.ndarray:
    """Cell-type fractions of blobs within ``radius`` of each spot centre."""
    d2 = (pos[None, :, 0] - cx[:, None]) ** 2 + (pos[None, :, 1] - cy[:, None]) ** 2
    near = d2 <= radius**2
    onehot = np.eye(n_types)[types]
    mix = near.astype(float) @ onehot
    return mix / np.maximum(mix.sum(1, keepdims=True), 1.0)


def _to_spatialdata(slides: list[dict], genes, pitch: int, um_per_px: float) -> SpatialData:
    import anndata as ad
    import pandas as pd
    from scipy import sparse
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    images, shapes, obs, counts, xy = {}, {}, [], [], []
    reader = {}
    for i, sl in enumerate(slides):
        s = f"s{i}"
        tf = {s: Identity()}
        images[f"{s}{K.IMAGE_SUFFIX}"] = Image2DModel.parse(
            sl["image"], dims=("c", "y", "x"), scale_factors=[2], chunks=(3, 512, 512), transformations=tf
        )
        n = len(sl["x"])
        ids = np.arange(n)
        shapes[f"{s}{K.SPOTS_SUFFIX}"] = ShapesModel.parse(
            np.c_[sl["x"], sl["y"]], geometry=0, radius=np.full(n, sl["radius"]), index=ids, transformations=tf
        )
        obs.append(
            pd.DataFrame(
                {
                    K.REGION: f"{s}{K.SPOTS_SUFFIX}",
                    K.INSTANCE: ids,
                    K.SAMPLE: s,
                    K.PATIENT: f"P{i % 2}",
                    K.ARRAY_ROW: sl["row"],
                    K.ARRAY_COL: sl["col"],
                },
                index=[f"{s}_{j}" for j in ids],
            )
        )
        counts.append(sl["counts"])
        xy.append(np.c_[sl["x"], sl["y"]])
        reader[s] = {"um_per_px": um_per_px, "spot_pitch_px": float(pitch), "layout": "toy"}
    obs_df = pd.concat(obs)
    for col in (K.REGION, K.SAMPLE, K.PATIENT):
        obs_df[col] = obs_df[col].astype("category")
    adata = ad.AnnData(X=sparse.csr_matrix(np.vstack(counts)), obs=obs_df, var=pd.DataFrame(index=list(genes)))
    adata.obsm["spatial"] = np.vstack(xy)
    adata.uns[K.UNS] = {K.UNS_READER: reader}
    table = TableModel.parse(adata, region=list(shapes), region_key=K.REGION, instance_key=K.INSTANCE)
    return SpatialData(images=images, shapes=shapes, tables={K.TABLE: table})


def copy_sdata(sdata: SpatialData) -> SpatialData:
    """Deep copy of a SpatialData (cheap for toy data; used to hand each test its own copy)."""
    from spatialdata import deepcopy

    return deepcopy(sdata)
