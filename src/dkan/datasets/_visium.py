"""Synthetic Space Ranger (10x Visium) output folders, with a full-resolution image, built from the toy slides.

No public Visium dataset with its full-resolution H&E image can be downloaded where dkan's tests run, so this
writes the files that ``spaceranger count`` produces (and the image it was given) for :func:`dkan.datasets.toy`
slides, which ``spatialdata_io.visium(..., fullres_image_file=...)`` reads like real data.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dkan import _keys as K
from dkan.datasets._toy import TOY_GENES, toy

if TYPE_CHECKING:
    from spatialdata import SpatialData

#: File name of the full-resolution image in each folder (pass it as ``fullres_image_file=``).
FULLRES_IMAGE = "fullres_image.tif"
#: Visium spot diameter in µm (the 55 µm capture areas; dkan infers µm/px from it when no pixel size is recorded).
_SPOT_UM = 55.0
#: Fiducial frame dots are about 1.6 spot diameters across (ratio of Space Ranger's two scale factors).
_FIDUCIAL_RATIO = 1.615
#: Human Ensembl gene ids of the toy genes (NCBI gene_info cross-references), in ``TOY_GENES`` order.
_ENSEMBL_IDS = (
    "ENSG00000115414 ENSG00000141736 ENSG00000186081 ENSG00000186847 ENSG00000128422 ENSG00000170421 "
    "ENSG00000111057 ENSG00000171345 ENSG00000119888 ENSG00000039068 ENSG00000026025 ENSG00000108821 "
    "ENSG00000164692 ENSG00000168542 ENSG00000113140 ENSG00000107796 ENSG00000133392 ENSG00000081237 "
    "ENSG00000019582 ENSG00000198851 ENSG00000153563 ENSG00000156738 ENSG00000211592 ENSG00000211896 "
    "ENSG00000132465 ENSG00000090382 ENSG00000129226 ENSG00000173372 ENSG00000261371 ENSG00000110799 "
    "ENSG00000148773 ENSG00000131747 ENSG00000091831 ENSG00000082175 ENSG00000107485 ENSG00000160182 "
    "ENSG00000110484 ENSG00000111341 ENSG00000011465 ENSG00000139329 ENSG00000133110 ENSG00000145423 "
    "ENSG00000106624 ENSG00000163453 ENSG00000143546 ENSG00000163220 ENSG00000204287 ENSG00000166710 "
    "ENSG00000034510 ENSG00000172551"
).split()


def synthetic_visium(
    path: str | PathLike[str],
    *,
    n_samples: int = 1,
    grid_size: int = 12,
    n_genes: int = 40,
    um_per_px: float = 2.0,
    hires_scalef: float = 0.5,
    lowres_scalef: float = 0.15,
    seed: int = 0,
) -> list[Path]:
    """Write synthetic Visium slides as Space Ranger output folders, each with a full-resolution TIFF.

    The slides are those of :func:`dkan.datasets.toy` (same ``seed``, ``grid_size`` and ``n_genes``, so the
    same tissue texture and counts), written in the layout of ``spaceranger count`` outputs. Visium's array
    coordinates put spots on a hexagonal grid where every ``array_row + array_col`` is even; each slide keeps
    the toy spots of that parity (a checkerboard of its square grid), so spots have Visium's six neighbours
    (``array_col`` +-2 on the same row, +-1 on the rows above and below), with rows half the in-row spacing
    apart instead of 0.87 of it. Genes are real human symbols with their Ensembl ids, as in a Space Ranger
    matrix.

    Each folder ``path / sample`` (samples ``"s0"``, ``"s1"``, ...) holds

    - ``filtered_feature_bc_matrix.h5``: counts in the 10x HDF5 format (Ensembl ``id`` and symbol ``name``
      of every feature; ``scanpy.read_10x_h5`` names genes by symbol and keeps ids in ``var["gene_ids"]``),
    - ``spatial/tissue_positions.csv`` (Space Ranger 2 layout, every spot under tissue),
      ``spatial/scalefactors_json.json``, ``spatial/tissue_hires_image.png``, ``spatial/tissue_lowres_image.png``,
    - ``fullres_image.tif``: the full-resolution RGB image Space Ranger was run on
      (in a real run, the file given to ``spaceranger count --image``; it is not part of the outputs).

    Read one with ``spatialdata_io.visium(folder, dataset_id=folder.name, fullres_image_file="fullres_image.tif")``.
    Spot pixel coordinates are those of the toy, so a crop of the full-resolution image at a spot is the toy's
    crop. The spot diameter is ``55 / um_per_px`` pixels, so the Visium rule (55 µm spots) gives ``um_per_px``.

    Parameters
    ----------
    path
        Folder to write the sample folders into (created when missing); a sample folder that already exists is
        an error, so nothing is overwritten.
    n_samples
        Number of slides; they share the toy's cell-type signatures, so a model trained on some predicts others.
    grid_size
        Side of the toy's square spot grid; each slide keeps the ``grid_size ** 2 // 2`` (or one more) spots
        with even ``array_row + array_col``.
    n_genes
        Number of genes (at most 50).
    um_per_px
        Pixel size of the full-resolution image (µm); sets the spot diameter in pixels.
    hires_scalef, lowres_scalef
        Scale of the hires and lowres PNGs relative to the full-resolution image (``scalefactors_json.json``).
    seed
        Seed of :func:`dkan.datasets.toy`.

    Returns
    -------
    The sample folders, in sample order.
    """
    path = Path(path)
    for name, value in (("hires_scalef", hires_scalef), ("lowres_scalef", lowres_scalef)):
        if not 0 < value <= 1:
            raise ValueError(f"`{name}` must be in (0, 1] (a downscaling of the full-resolution image), found {value}.")
    if um_per_px <= 0:
        raise ValueError(f"`um_per_px` must be positive, found {um_per_px}.")
    folders = [path / f"s{i}" for i in range(n_samples)]
    existing = [str(f) for f in folders if f.exists()]
    if existing:
        raise FileExistsError(f"{existing} already exist; remove them or pass another `path`.")
    sdata = toy(n_samples=n_samples, grid_size=grid_size, n_genes=n_genes, um_per_px=um_per_px, seed=seed)
    rng = np.random.default_rng(seed)
    for i, folder in enumerate(folders):
        _write_sample(sdata, f"s{i}", folder, um_per_px, (hires_scalef, lowres_scalef), rng)
    return folders


def _write_sample(
    sdata: SpatialData,
    sample: str,
    folder: Path,
    um_per_px: float,
    scalefs: tuple[float, float],
    rng: np.random.Generator,
) -> None:
    """Write one toy sample as a Space Ranger folder."""
    table = sdata.tables[K.TABLE]
    rows = table[table.obs[K.SAMPLE].astype(str) == sample]
    keep = ((rows.obs[K.ARRAY_ROW] + rows.obs[K.ARRAY_COL]) % 2 == 0).to_numpy()
    rows = rows[keep]
    barcodes = _barcodes(rng, rows.n_obs)
    (folder / "spatial").mkdir(parents=True)
    counts = rows.X.toarray() if hasattr(rows.X, "toarray") else np.asarray(rows.X)
    _write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, barcodes, list(rows.var_names), sample)
    _write_positions(folder / "spatial" / "tissue_positions.csv", rows, barcodes)
    image = np.asarray(sdata.images[f"{sample}{K.IMAGE_SUFFIX}"]["scale0"]["image"]).transpose(1, 2, 0)
    _write_images(folder, image, um_per_px, scalefs)


def _barcodes(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct Visium-like barcodes (16 nucleotides and the ``-1`` GEM-well suffix)."""
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(rng.choice(list("ACGT"), 16)) + "-1"] = None
    return list(out)


def _write_10x_h5(file: Path, counts: np.ndarray, barcodes: list[str], genes: list[str], library: str) -> None:
    """Counts (spots x genes) in Cell Ranger's HDF5 matrix format (version 2: a CSC matrix of genes x barcodes)."""
    import h5py
    from scipy import sparse

    ids = [_ENSEMBL_IDS[TOY_GENES.index(g)] for g in genes]
    csc = sparse.csc_matrix(counts.T.astype(np.int32))  # genes x barcodes: one column per barcode

    def ascii_array(values: list[str]) -> np.ndarray:
        return np.array(values, dtype=f"S{max(map(len, values))}")

    with h5py.File(file, "w") as f:
        f.attrs["filetype"] = np.array([b"matrix"])
        f.attrs["version"] = np.array([2], dtype=np.int32)
        f.attrs["library_ids"] = np.array([library.encode()])
        f.attrs["chemistry_description"] = np.array([b"Spatial 3' v1"])
        f.attrs["software_version"] = "spaceranger-2.0.0 (synthetic: dkan.datasets.synthetic_visium)"
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=ascii_array(barcodes))
        m.create_dataset("data", data=csc.data.astype(np.int32))
        m.create_dataset("indices", data=csc.indices.astype(np.int64))
        m.create_dataset("indptr", data=csc.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32))
        feat = m.create_group("features")
        feat.create_dataset("id", data=ascii_array(ids))
        feat.create_dataset("name", data=ascii_array(genes))
        feat.create_dataset("feature_type", data=ascii_array(["Gene Expression"] * len(genes)))
        feat.create_dataset("genome", data=ascii_array(["GRCh38"] * len(genes)))
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))


def _write_positions(file: Path, rows, barcodes: list[str]) -> None:
    """``tissue_positions.csv`` (Space Ranger 2): barcode, in_tissue, array row/col, full-resolution pixel row/col."""
    import pandas as pd

    xy = np.rint(rows.obsm["spatial"]).astype(np.int64)  # toy centres are whole pixels
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": 1,
            "array_row": rows.obs[K.ARRAY_ROW].to_numpy(),
            "array_col": rows.obs[K.ARRAY_COL].to_numpy(),
            "pxl_row_in_fullres": xy[:, 1],
            "pxl_col_in_fullres": xy[:, 0],
        }
    ).to_csv(file, index=False)


def _write_images(folder: Path, image: np.ndarray, um_per_px: float, scalefs: tuple[float, float]) -> None:
    """Full-resolution TIFF (tiled, with its pixel size), the hires/lowres PNGs and ``scalefactors_json.json``."""
    import tifffile
    from PIL import Image

    res = 1e4 / um_per_px  # pixels per centimetre
    tifffile.imwrite(
        folder / FULLRES_IMAGE,
        image,
        photometric="rgb",
        tile=(256, 256),
        resolution=(res, res),
        resolutionunit="CENTIMETER",
    )
    full = Image.fromarray(image)
    for name, scalef in zip(("hires", "lowres"), scalefs, strict=True):
        size = (max(1, round(image.shape[1] * scalef)), max(1, round(image.shape[0] * scalef)))
        full.resize(size, Image.Resampling.LANCZOS).save(folder / "spatial" / f"tissue_{name}_image.png")
    spot = _SPOT_UM / um_per_px
    scalefactors = {
        "spot_diameter_fullres": spot,
        "tissue_hires_scalef": scalefs[0],
        "fiducial_diameter_fullres": _FIDUCIAL_RATIO * spot,
        "tissue_lowres_scalef": scalefs[1],
    }
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors, indent=4))
