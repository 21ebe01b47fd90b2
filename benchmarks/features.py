"""Throughput of frozen feature extraction (spot patch + 5x5 region) against the encoder's bare forward.

A synthetic slide (textured uint8 RGB, a square spot grid at a 136 px pitch as in legacy ST at full resolution,
far enough from the border that all 25 region tiles are valid: the most work per spot) is written to zarr and
read back, so crops come lazily from a dask image exactly as in ``dkan.tl.extract_features``. Three numbers,
all in spots per second:

- end to end: ``extract_features(..., region=True)`` (crop reading, uint8 transfer, resize/normalise, encoder);
- crop reading: the same DataLoader without the encoder (can the loader keep the device fed?);
- bare forward: the encoder on pre-loaded, normalised tensors on the device, the same images per spot
  (1 patch + valid region tiles), the same chunking and autocast.

Usage::

    python benchmarks/features.py                          # CPU: 16 spots
    python benchmarks/features.py --device cuda --n-spots 4000 --batch-size 64 --num-workers 8
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def texture(size: int, seed: int = 0, base: int = 2048) -> np.ndarray:
    """A cheap H&E-coloured texture ``(3, size, size)`` uint8: smooth colour fields plus pixel noise, tiled."""
    from scipy.ndimage import zoom

    rng = np.random.default_rng(seed)
    b = min(base, size)
    low = rng.random((3, b // 64 + 2, b // 64 + 2), dtype=np.float32)
    field = zoom(low, (1, 64, 64), order=1)[:, :b, :b]
    pink = np.array([200, 120, 170], np.float32)[:, None, None]
    tile = pink + 90 * (field - 0.5) + rng.normal(0, 18, (3, b, b)).astype(np.float32)
    tile = tile.clip(0, 255).astype(np.uint8)
    reps = math.ceil(size / b)
    return np.tile(tile, (1, reps, reps))[:, :size, :size]


def make_sdata(n_spots: int, *, pitch: int = 136, margin: int = 560, chunk: int = 1024, seed: int = 0):
    """A one-sample SpatialData: textured image, ``n_spots`` circles on a square grid (``margin`` px from the image
    border), a table annotating them."""
    import anndata as ad
    import dask.array as da
    import pandas as pd
    import scipy.sparse as sp
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    from dkan import _keys as K

    side = math.ceil(math.sqrt(n_spots))
    size = (side - 1) * pitch + 2 * margin + 1
    cs = "bench"
    image = Image2DModel.parse(
        da.from_array(texture(size, seed), chunks=(3, chunk, chunk)),
        dims=("c", "y", "x"),
        scale_factors=[2, 2],
        transformations={cs: Identity()},
    )
    ij = np.stack(np.unravel_index(np.arange(n_spots), (side, side)), axis=1)
    xy = ij[:, ::-1] * pitch + margin + 0.5
    ids = np.arange(n_spots)
    shapes = ShapesModel.parse(
        xy, geometry=0, radius=np.full(n_spots, pitch / 4), index=pd.Index(ids), transformations={cs: Identity()}
    )
    spots_key = f"{cs}{K.SPOTS_SUFFIX}"
    obs = pd.DataFrame(
        {
            K.REGION: pd.Categorical([spots_key] * n_spots),
            K.INSTANCE: ids,
            K.SAMPLE: cs,
            K.ARRAY_ROW: ij[:, 0],
            K.ARRAY_COL: ij[:, 1],
        },
        index=[f"s{i}" for i in ids],
    )
    table = TableModel.parse(
        ad.AnnData(X=sp.csr_matrix((n_spots, 4), dtype=np.float32), obs=obs),
        region=spots_key,
        region_key=K.REGION,
        instance_key=K.INSTANCE,
    )
    return SpatialData(images={f"{cs}{K.IMAGE_SUFFIX}": image}, shapes={spots_key: shapes}, tables={K.TABLE: table})


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(args: argparse.Namespace) -> dict:
    import spatialdata
    import torch

    import dkan
    from dkan import _keys as K
    from dkan._features.crops import SpotCrops
    from dkan._features.encoding import crop_loader, encode
    from dkan._results import results_table
    from dkan.nn.image_encoders import create_image_encoder

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    n_spots = args.n_spots or (4000 if cuda else 16)
    with tempfile.TemporaryDirectory() as tmp:
        sdata = make_sdata(n_spots, pitch=args.pitch, margin=int(2.5 * args.patch_size))
        if not args.in_memory:
            path = Path(tmp) / "bench.zarr"
            sdata.write(path)
            sdata = spatialdata.read_zarr(path)
        dkan.tl.tile(sdata, patch_size=args.patch_size)
        enc = create_image_encoder(args.encoder).to(device)

        # warm-up (cudnn autotune, lazy init) on a few spots
        dkan.tl.extract_features(sdata, enc, batch_size=args.batch_size, device=device, region=False, key_added="warm")

        crops = SpotCrops(sdata, with_region=True, normalize=False)
        t = time.perf_counter()
        for _ in crop_loader(crops, batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=cuda):
            pass
        t_read = time.perf_counter() - t

        _sync(device)
        t = time.perf_counter()
        dkan.tl.extract_features(
            sdata, enc, batch_size=args.batch_size, device=device, num_workers=args.num_workers, force=True
        )
        _sync(device)
        t_e2e = time.perf_counter() - t
        n_images = n_spots + int(np.asarray(results_table(sdata, K.TABLE)[1].obsm[K.REGION_MASK]).sum())

    amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    step = args.batch_size * 26
    x = torch.randn(step, 3, enc.input_size, enc.input_size, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    enc = enc.eval().requires_grad_(False)
    n_steps = max(1, math.ceil(n_images / step))
    with torch.inference_mode():
        encode(enc, x[: args.batch_size], amp=amp, chunk=4 * args.batch_size)
        _sync(device)
        t = time.perf_counter()
        for _ in range(n_steps):
            encode(enc, x, amp=amp, chunk=4 * args.batch_size)
        _sync(device)
        t_bare = time.perf_counter() - t
    per_spot = n_images / n_spots
    bare = n_steps * step / t_bare / per_spot
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    return {
        "device": name,
        "threads": torch.get_num_threads(),
        "encoder": enc.name,
        "spots": n_spots,
        "images/spot": per_spot,
        "batch": args.batch_size,
        "workers": args.num_workers,
        "amp": str(amp).replace("torch.", "") if amp else "fp32",
        "e2e": n_spots / t_e2e,
        "read": n_spots / t_read,
        "bare": bare,
        "t_e2e": t_e2e,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--n-spots", type=int, default=None, help="spots (default 16 on CPU, 4000 on CUDA)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--patch-size", type=int, default=224)
    p.add_argument("--pitch", type=int, default=136, help="spot pitch in px (legacy ST at ~0.73 um/px)")
    p.add_argument("--in-memory", action="store_true", help="skip the zarr round trip (numpy-backed dask image)")
    r = bench(p.parse_args())
    print(
        f"\n| device | encoder | spots | images/spot | batch | workers | precision | end-to-end spots/s "
        f"| crop reading spots/s | bare forward spots/s | end-to-end / bare |\n"
        f"|---|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {r['device']} ({r['threads']} threads) | {r['encoder']} | {r['spots']} | {r['images/spot']:.1f} "
        f"| {r['batch']} | {r['workers']} | {r['amp']} | {r['e2e']:.2f} | {r['read']:.1f} | {r['bare']:.2f} "
        f"| {r['e2e'] / r['bare']:.0%} |"
    )


if __name__ == "__main__":
    main()
