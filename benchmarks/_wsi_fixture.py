"""A fast writer of the benchmark's scanner-sized synthetic slide (pyramidal, tiled, JPEG-compressed TIFF).

:func:`dkan.datasets.synthetic_wsi` renders and JPEG-encodes every tile of every level (estimated at about
30 minutes for 80,000 x 60,000 px on 2 cores, from its small-slide time). Here the same kind of slide is
written from a few tiles encoded once:

- ``n_variants`` textured tissue tiles (eosin with nuclei-like dots and noise) and one glass tile are rendered
  and JPEG-encoded once, exactly as tifffile would encode them (YCbCr, 2x2 subsampling);
- tissue is the same union of ellipses as in :func:`dkan.datasets.synthetic_wsi`; per level, it is sampled
  on a grid every ``tile / 16`` px: a tile with every sample inside is a pre-encoded tissue tile (a variant
  picked at random), one with none inside is the glass tile (a sliver thinner than the sample spacing is
  dropped), and only the tiles on the tissue border are composed and encoded;
- tifffile writes the encoded tiles from a generator of bytes (no image is ever held whole), level 0 with its
  lower levels (downsampled by 2 each, rendered the same way) as SubIFDs, the pixel size in the resolution tags.

The texture repeats every few tiles: the file decodes, and the pipeline crops, tiles and encodes it, exactly
like a varied one; it is not meant to look like real tissue.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dkan.datasets._wsi import _BACKGROUND, _STAIN, _blobs, _tissue


def write_fixture(
    path: Path,
    *,
    width: int,
    height: int,
    um_per_px: float,
    tile: int = 512,
    n_blobs: int = 6,
    n_variants: int = 8,
    quality: int = 85,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the slide to ``path`` (must not exist); returns ``path``."""
    import tifffile
    from tqdm.auto import tqdm

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"`path={path}` exists; remove it or choose another path.")
    if tile % 16:
        raise ValueError(f"`tile` must be a multiple of 16; got {tile}.")
    n_levels = 1 + max(0, int(np.ceil(np.log2(max(width, height) / 1024))))
    rng = np.random.default_rng(seed)
    blobs = _blobs(rng, width, height, n_blobs)
    encode = _encoder(quality)
    tissue = [_texture(rng, tile) for _ in range(n_variants)]
    glass = np.broadcast_to(_BACKGROUND.astype(np.uint8), (tile, tile, 3))
    tiles = {"tissue": [encode(t) for t in tissue], "glass": encode(glass)}
    sizes = [(-(-width // 2**k), -(-height // 2**k)) for k in range(n_levels)]
    total = sum(-(-w // tile) * -(-h // tile) for w, h in sizes)
    res = 1e4 / um_per_px  # pixels per centimetre
    with (
        tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tw,
        tqdm(total=total, desc="write slide", unit="tile", disable=not progress) as bar,
    ):
        for k, (w, h) in enumerate(sizes):
            tw.write(
                _level_tiles(blobs, w, h, 2**k, tile, tissue, glass, tiles, encode, rng, bar),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="jpeg",
                subsampling=(2, 2),
                photometric="rgb",
                subifds=n_levels - 1 if k == 0 else None,
                subfiletype=0 if k == 0 else 1,
                resolution=(res / 2**k, res / 2**k),
                resolutionunit="CENTIMETER",
            )
    return path


def _encoder(quality: int):
    """JPEG-encode an RGB tile as tifffile does for ``compression="jpeg"`` (YCbCr, 2x2 subsampling)."""
    import imagecodecs

    def encode(img: np.ndarray) -> bytes:
        return imagecodecs.jpeg8_encode(
            np.ascontiguousarray(img), level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
        )

    return encode


def _texture(rng: np.random.Generator, tile: int) -> np.ndarray:
    """One tissue tile: eosin with nuclei-like dark dots and noise."""
    oy, ox = rng.integers(0, 10_000, 2)
    ys, xs = (oy + np.arange(tile))[:, None], (ox + np.arange(tile))[None, :]
    nuclei = (np.sin(xs / 23.0) * np.sin(ys / 19.0) + rng.normal(0, 0.35, (tile, tile))) > 0.8
    img = np.where(nuclei[..., None], _STAIN[1], _STAIN[0]) + rng.normal(0, 6, (tile, tile, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _level_tiles(
    blobs: np.ndarray,
    w: int,
    h: int,
    f: int,
    tile: int,
    tissue: list[np.ndarray],
    glass: np.ndarray,
    tiles: dict,
    encode,
    rng: np.random.Generator,
    bar,
) -> Iterator[bytes]:
    """Encoded tiles of one level (row-major); tissue sampled every ``tile // 16`` px of the level."""
    step, per = tile // 16, 16
    ny, nx = -(-h // tile), -(-w // tile)
    gy = np.arange(ny * per + 1)[:, None] * step * f  # sample positions in full-resolution pixels
    gx = np.arange(nx * per + 1)[None, :] * step * f
    inside = np.vstack(
        [_tissue(blobs, gx.astype(float), gy[i : i + 256].astype(float)) for i in range(0, len(gy), 256)]
    )
    variant = rng.integers(0, len(tissue), (ny, nx))
    for ty in range(ny):
        for tx in range(nx):
            block = inside[ty * per : ty * per + per + 1, tx * per : tx * per + per + 1]
            if block.all():
                yield tiles["tissue"][variant[ty, tx]]
            elif not block.any():
                yield tiles["glass"]
            else:  # on the tissue border: the exact mask
                ys = ((ty * tile + np.arange(tile)) * f)[:, None].astype(float)
                xs = ((tx * tile + np.arange(tile)) * f)[None, :].astype(float)
                mask = _tissue(blobs, xs, ys)[..., None]
                yield encode(np.where(mask, tissue[variant[ty, tx]], glass))
            bar.update(1)
