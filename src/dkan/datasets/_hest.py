"""A small synthetic folder in the HEST-1k layout (``st/``, ``wsis/``, ``metadata/``), for tests and tutorials."""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path

import numpy as np

from dkan import _keys as K

#: Centre-to-centre spot distance and spot diameter (µm) written to the metadata: Visium's.
_PITCH_UM, _DIAMETER_UM = 100.0, 55.0


def synthetic_hest(
    path: str | PathLike[str],
    *,
    n_samples: int = 2,
    grid_size: int = 8,
    n_genes: int = 20,
    seed: int = 0,
) -> Path:
    """Write toy slides (:func:`dkan.datasets.toy`) as a HEST-1k folder that :func:`dkan.io.read_hest` reads.

    Per sample ``SYNTH{i}``: ``st/SYNTH{i}.h5ad`` (raw counts, ``obs`` ``array_row``, ``array_col``,
    ``in_tissue``, ``pxl_col_in_fullres``, ``pxl_row_in_fullres``, spot centres in slide pixels in
    ``obsm["spatial"]``), ``wsis/SYNTH{i}.tif`` (a tiled pyramidal TIFF) and ``metadata/SYNTH{i}.json``
    (``pixel_size_um_estimated``, ``spot_diameter`` 55 and ``inter_spot_dist`` 100 µm, ``st_technology``
    ``"Visium"``, ``patient``, ``species``, ``organ``, the slide size). The image texture predicts the counts, as
    in the toy data, so a model can learn from the folder.

    Parameters
    ----------
    path
        Folder to create; an existing non-empty folder is an error.
    n_samples
        Number of samples; patients alternate ``"P0"``, ``"P1"``.
    grid_size
        Spots per side of each sample's square spot grid.
    n_genes
        Number of genes (toy gene symbols).
    seed
        Random seed.

    Returns
    -------
    The folder written.
    """
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    from dkan.datasets._toy import toy

    root = Path(path)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"`path={root}` exists and is not empty; choose a new folder.")
    sdata = toy(n_samples=n_samples, grid_size=grid_size, n_genes=n_genes, seed=seed)
    table = sdata.tables[K.TABLE]
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_samples):
        s, sid = f"s{i}", f"SYNTH{i}"
        rows = table[(table.obs[K.SAMPLE] == s).to_numpy()]
        image = sdata.images[f"{s}{K.IMAGE_SUFFIX}"]["scale0"]["image"].values  # (3, y, x) uint8
        pitch_px = float(table.uns[K.UNS][K.UNS_READER][s]["spot_pitch_px"])
        um_per_px = _PITCH_UM / pitch_px
        xy = np.asarray(rows.obsm["spatial"], dtype=np.float64)
        obs = pd.DataFrame(
            {
                "in_tissue": 1,
                K.ARRAY_ROW: rows.obs[K.ARRAY_ROW].to_numpy(),
                K.ARRAY_COL: rows.obs[K.ARRAY_COL].to_numpy(),
                "pxl_col_in_fullres": xy[:, 0],
                "pxl_row_in_fullres": xy[:, 1],
            },
            index=[f"{r}x{c}" for r, c in zip(rows.obs[K.ARRAY_ROW], rows.obs[K.ARRAY_COL], strict=True)],
        )
        st = ad.AnnData(X=sparse.csr_matrix(rows.X), obs=obs, var=pd.DataFrame(index=rows.var_names.copy()))
        st.obsm["spatial"] = xy
        st.write_h5ad(root / "st" / f"{sid}.h5ad")
        _write_pyramid(root / "wsis" / f"{sid}.tif", image, um_per_px)
        meta = {
            "id": sid,
            "dataset_title": "dkan synthetic HEST-layout sample",
            "st_technology": "Visium",
            "species": "Homo sapiens",
            "organ": "Breast",
            "patient": f"P{i % 2}",
            "pixel_size_um_estimated": um_per_px,
            "pixel_size_um_embedded": None,
            "spot_diameter": _DIAMETER_UM,
            "inter_spot_dist": _PITCH_UM,
            "spots_under_tissue": int(rows.n_obs),
            "fullres_px_width": int(image.shape[2]),
            "fullres_px_height": int(image.shape[1]),
        }
        (root / "metadata" / f"{sid}.json").write_text(json.dumps(meta, indent=1))
    return root


def _write_pyramid(path: Path, chw: np.ndarray, um_per_px: float, tile: int = 256) -> None:
    """A tiled TIFF with 2x-downsampled sub-resolutions down to about one tile (as HEST's pyramidal TIFFs)."""
    import tifffile

    levels = [np.ascontiguousarray(chw.transpose(1, 2, 0))]
    while max(levels[-1].shape[:2]) > tile:
        prev = levels[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        small = prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
        levels.append(np.rint(small).astype(np.uint8))
    res = 1e4 / um_per_px  # pixels per centimetre
    with tifffile.TiffWriter(path) as tw:
        for k, level in enumerate(levels):
            tw.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                subifds=len(levels) - 1 if k == 0 else None,
                subfiletype=0 if k == 0 else 1,
                resolution=(res / 2**k, res / 2**k),
                resolutionunit="CENTIMETER",
            )
