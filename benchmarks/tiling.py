"""Benchmark: spot crops from a large lazy image, dkan.tl SpotCrops vs spatialdata's ImageTilesDataset.

Writes a synthetic 40,000 x 40,000 px uint8 RGB image (4.8 GB decoded, generated and written chunk by chunk,
never whole in memory) with 5,000 spot circles to a zarr store, then times each method in a fresh subprocess
(peak RSS = the subprocess's ``ru_maxrss``, imports included) and prints a markdown table.

    python benchmarks/tiling.py [--size 40000] [--spots 5000] [--workdir /tmp] [--keep]

``ImageTilesDataset`` has no region: it is timed cropping the 224 px patch and, as the same work as dkan's read,
the 1120 px window that holds the patch and the 5 x 5 region; both on a subset of spots spread over the image.
Every method first reads ``WARMUP`` crops untimed (one-time costs such as lazy imports).
dkan crops the 224 px patch plus the 5 x 5 region (1120 px) of every spot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CS = "bench"
CHUNK = 1024
WARMUP = 3  #: crops read before timing, by every method


def _pattern(block_id: tuple[int, int, int], block_info=None) -> np.ndarray:
    """A low-entropy (compressible) but position-dependent RGB texture for one chunk."""
    (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
    y = np.arange(y0, y1)[:, None]
    x = np.arange(x0, x1)[None, :]
    r = (x // 8 % 32) * 8 + np.zeros_like(y)
    g = (y // 8 % 32) * 8 + np.zeros_like(x)
    b = ((x + y) // 64 % 4) * 60
    return np.stack([r, g, b]).astype(np.uint8)


def write_data(path: Path, size: int, n_spots: int) -> None:
    import anndata as ad
    import dask.array as da
    import pandas as pd
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    chunks = ((3,), *(tuple([CHUNK] * (size // CHUNK) + ([size % CHUNK] if size % CHUNK else [])),) * 2)
    arr = da.map_blocks(lambda block_info=None: _pattern(None, block_info), dtype=np.uint8, chunks=chunks)
    image = Image2DModel.parse(arr, dims=("c", "y", "x"), transformations={CS: Identity()})
    side = int(np.ceil(np.sqrt(n_spots)))
    pitch = size / side
    g = (np.arange(side) + 0.5) * pitch
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)[:n_spots]
    shapes = ShapesModel.parse(xy, geometry=0, radius=np.full(n_spots, 50.0), transformations={CS: Identity()})
    obs = pd.DataFrame(
        {"region": pd.Categorical(["spots"] * n_spots), "spot_id": np.arange(n_spots), "sample": "bench"},
        index=[str(i) for i in range(n_spots)],
    )
    table = TableModel.parse(
        ad.AnnData(np.zeros((n_spots, 1), np.float32), obs=obs),
        region="spots",
        region_key="region",
        instance_key="spot_id",
    )
    SpatialData(images={"image": image}, shapes={"spots": shapes}, tables={"table": table}).write(path)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_method(method: str, path: str, n: int, batch: int) -> dict:
    """Run one method in this (fresh) process; return crops, seconds, peak RSS."""
    import spatialdata as sd

    sdata = sd.read_zarr(path)
    if method.startswith("imagetiles"):
        import copy

        from spatialdata.dataloader import ImageTilesDataset

        # ImageTilesDataset overwrites the radius of the shapes it gets: give it a copy
        sdata = sd.SpatialData(images={"image": sdata["image"]}, shapes={"spots": copy.deepcopy(sdata["spots"])})
        ds = ImageTilesDataset(
            sdata,
            regions_to_images={"spots": "image"},
            regions_to_coordinate_systems={"spots": CS},
            tile_dim_in_units=1120 if method == "imagetiles_region" else 224,
        )
        idx = np.linspace(0, len(ds) - 1, n + WARMUP).astype(int)
        for i in idx[:WARMUP]:  # first calls pay one-time costs (lazy imports, caches): not timed
            np.asarray(ds[int(i)].images["image"].data)
        idx = idx[WARMUP:]
        rss0 = _peak_rss_mb()
        t = time.perf_counter()
        for i in idx:
            tile = np.asarray(ds[int(i)].images["image"].data)
        assert tile.shape[0] == 3 and max(tile.shape[1:]) in (224, 1120), tile.shape  # edge tiles are clipped
        return {"crops": len(idx), "seconds": time.perf_counter() - t, "rss": _peak_rss_mb(), "rss0": rss0}

    import dkan
    from dkan._features.crops import BatchBySample, SpotCrops

    dkan.tl.tile(sdata)
    region = not method.startswith("dkan_patch")
    ds = SpotCrops(sdata, with_region=region, normalize=method.endswith("float"))
    ds.read_batch(np.arange(len(ds) - WARMUP, len(ds)))  # one-time costs, as for the baseline (far from timed spots)
    ds = SpotCrops(sdata, with_region=region, normalize=method.endswith("float"))  # fresh chunk cache
    rss0 = _peak_rss_mb()
    t = time.perf_counter()
    crops = 0
    if method.startswith("dkan_iter"):
        for out in ds.iter_batches(np.arange(n), batch, prefetch=True):
            crops += len(out["patch"])
            del out
    elif method == "dkan_item":  # one spot at a time, random order
        for i in np.random.default_rng(0).permutation(len(ds))[:n]:
            ds[int(i)]
            crops += 1
    else:
        if method.startswith("dkan_batch"):
            batches = [np.arange(i, min(i + batch, n)) for i in range(0, n, batch)]
        else:  # training access: per-sample shuffled batches
            batches = list(BatchBySample(ds, batch, seed=0))[: max(1, n // batch)]
        for b in batches:
            out = ds.read_batch(b)
            crops += len(out["patch"])
            del out
    return {"crops": crops, "seconds": time.perf_counter() - t, "rss": _peak_rss_mb(), "rss0": rss0}


METHODS = [
    # (method, label, what is cropped, spots timed (None: all), batch size)
    ("imagetiles", "spatialdata `ImageTilesDataset` (bounding_box_query), 224 px tile", "patch", 300, 1),
    ("imagetiles_region", "spatialdata `ImageTilesDataset`, 1120 px tile", "region window", 150, 1),
    ("dkan_batch", "dkan `SpotCrops.read_batch`, table order, uint8", "patch + 5x5 region", None, 16),
    ("dkan_iter", "dkan `SpotCrops.iter_batches(prefetch=True)`, uint8", "patch + 5x5 region", 1000, 16),
    ("dkan_batch_float", "dkan `SpotCrops.read_batch`, table order, float32", "patch + 5x5 region", 500, 8),
    ("dkan_item", "dkan `SpotCrops[i]`, random order, uint8", "patch + 5x5 region", 200, 1),
    ("dkan_patch_shuffled", "dkan `read_batch` + `BatchBySample` (training order), uint8", "patch", 2000, 64),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=40_000)
    ap.add_argument("--spots", type=int, default=5_000)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        print(json.dumps(run_method(args.run, args.path, args.n, args.batch)))
        return
    path = Path(args.workdir) / f"dkan_tiling_bench_{os.getpid()}.zarr"
    try:
        t = time.perf_counter()
        write_data(path, args.size, args.spots)
        print(
            f"wrote {args.size} x {args.size} px image + {args.spots} spots in {time.perf_counter() - t:.0f} s "
            f"({sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) / 2**20:.0f} MiB on disk)",
            file=sys.stderr,
        )
        rows = []
        for method, label, what, n, batch in METHODS:
            n = args.spots if n is None else min(n, args.spots)
            cmd = [sys.executable, __file__, "--run", method, "--path", str(path), "--n", str(n), "--batch", str(batch)]
            res = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            )
            rows.append((label, what, res))
            print(f"{label}: {res}", file=sys.stderr)
        base = rows[0][2]["crops"] / rows[0][2]["seconds"]
        same = rows[1][2]["crops"] / rows[1][2]["seconds"]
        print(
            f"\nMachine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; image {args.size} x {args.size} px "
            f"uint8 RGB zarr ({CHUNK} px chunks), {args.spots} spots on a regular grid.\n"
        )
        print(
            "| method | crop | spots timed | crops/s | ms/crop | vs ImageTilesDataset 224 px | "
            "vs ImageTilesDataset 1120 px (same window) | peak RSS MB (after setup) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for label, what, r in rows:
            rate = r["crops"] / r["seconds"]
            print(
                f"| {label} | {what} | {r['crops']} | {rate:.1f} | {1000 / rate:.1f} | {rate / base:.1f}x "
                f"| {rate / same:.1f}x | {r['rss']:.0f} ({r['rss0']:.0f}) |"
            )
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
