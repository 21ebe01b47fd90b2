"""``dkan predict`` end to end on a synthetic whole-slide file: stage times, encoder passes, peak memory.

The benchmark writes its own slide with :func:`dkan.datasets.synthetic_wsi` (a pyramidal, tiled,
JPEG-compressed TIFF with tissue-like blobs over about half of it, read by tiffslide as a scanner file would
be; nothing is committed), trains a ``small``-preset model on toy slides with the preset's real encoder
(EfficientNet-Lite0) unless ``--model`` gives one, then runs :func:`dkan.tl.predict_slides` (the code path
of ``dkan predict SLIDE --out OUT.zarr``) in a fresh subprocess and reports:

- stage times (write the slide, read, tissue + pseudo-spots, tiles + features, prediction, write the store);
- encoder passes (spot patches plus region tiles) against the number of spots and of tissue tiles;
- the peak RSS of the prediction process;

for the spot-by-spot features and the shared-tile features (``shared_tiles=True``), each in its own process, in
the same run, and their ratio.

Usage::

    python benchmarks/wsi_predict.py --small            # 4,096 x 3,072 px at 0.25 µm/px: a few minutes on 2 cores
    python benchmarks/wsi_predict.py                    # 80,000 x 60,000 px at 0.25 µm/px (the issue's target size)
    python benchmarks/wsi_predict.py --model model/     # reuse a saved model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
FULL = (80_000, 60_000)
SMALL = (4_096, 3_072)


def train_model(out: Path, *, encoder: str) -> float:
    """A ``small``-preset model on toy slides (two short epochs); returns seconds."""
    import dkan

    t = time.perf_counter()
    sdata = dkan.datasets.toy(n_samples=2, grid_size=6, seed=0)
    model = dkan.tl.train(sdata, config="small", max_epochs=2, feature_encoder=encoder, device="cpu", progress=False)
    model.save(out)
    return time.perf_counter() - t


def predict_worker(spec: dict) -> dict:
    """Run ``predict_slides`` on one slide; return its report row, encoder passes and peak RSS."""
    import spatialdata as sd

    import dkan

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t = time.perf_counter()
    report = dkan.tl.predict_slides(
        [spec["slide"]], spec["model"], out_dir=spec["out_dir"], device="cpu", shared_tiles=spec["shared_tiles"]
    )
    total = time.perf_counter() - t
    row = report.iloc[0].to_dict()
    if row["status"] != "written":
        raise RuntimeError(f"prediction failed: {row['error']}")
    table = next(iter(sd.read_zarr(row["out"]).tables.values()))
    return {
        **row,
        "total_s": total,
        "n_spots": int(table.n_obs),
        "tissue_tiles": _tissue_tiles(table),
        "passes_per_spot": float(row["encoder_passes"] / table.n_obs),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_after_imports_gib": rss0,
    }


def _tissue_tiles(table) -> int:
    """Grid tiles (of the tiled level) that hold a spot centre: the 'tissue tiles' of the issue's target."""
    import numpy as np

    from dkan import _keys as K

    rec = next(iter(table.uns[K.UNS][K.UNS_TILE]["samples"].values()))
    xy = np.asarray(table.obsm[K.SPOT_PX])
    return len(np.unique(np.floor(xy / int(rec["patch_side"])).astype(int), axis=0))


def _subprocess(flag: str, spec: dict, timeout: float) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, flag, json.dumps(spec)], capture_output=True, text=True, timeout=timeout
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{flag} failed (rc {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--small", action="store_true", help=f"a {SMALL[0]:,} x {SMALL[1]:,} px slide instead of the full one"
    )
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--um-per-px", type=float, default=0.25)
    p.add_argument("--model", type=Path, default=None, help="saved model folder (default: train a small one)")
    p.add_argument("--encoder", default="efficientnet_lite0", help="feature encoder of the trained model")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds for the prediction subprocess")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/wsi_predict*.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--train-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(predict_worker(json.loads(args.worker)), default=str))
        return {}
    if args.train_worker is not None:
        spec = json.loads(args.train_worker)
        print(json.dumps({"train_s": train_model(Path(spec["out"]), encoder=spec["encoder"])}))
        return {}

    import dkan

    width, height = SMALL if args.small else FULL
    width, height = args.width or width, args.height or height
    started, load0 = time.perf_counter(), os.getloadavg()
    result: dict = {
        "slide": {"width": width, "height": height, "um_per_px": args.um_per_px},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_avg_start": load0},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        slide = dkan.datasets.synthetic_wsi(
            tmp / "slide.tif", width=width, height=height, um_per_px=args.um_per_px, tile=512
        )
        result["write_slide_s"] = time.perf_counter() - t
        result["slide"]["file_mib"] = slide.stat().st_size / 2**20
        model = args.model
        if model is None:
            model = tmp / "model"
            result["train"] = _subprocess("--train-worker", {"out": str(model), "encoder": args.encoder}, 3600)
        for mode, shared in (("spot_by_spot", False), ("shared_tiles", True)):
            spec = {"slide": str(slide), "model": str(model), "out_dir": str(tmp / mode), "shared_tiles": shared}
            result[mode] = _subprocess("--worker", spec, args.timeout)
    a, b = result["spot_by_spot"], result["shared_tiles"]
    result["shared_over_spot_by_spot"] = {
        "total_speedup": a["total_s"] / b["total_s"],
        "features_speedup": a["features_s"] / b["features_s"],
        "encoder_passes_ratio": a["encoder_passes"] / b["encoder_passes"],
    }
    result["machine"]["load_avg_end"] = os.getloadavg()
    result["total_s"] = time.perf_counter() - started
    out = args.out or RESULTS / f"wsi_predict{'_small' if args.small else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    lines = [
        "| path | slide (px) | spots | tissue tiles | encoder passes (per spot) | read s | tissue + spots s "
        "| tiles + features s | predict s | write s | total s | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("spot_by_spot", "shared_tiles"):
        r = result[mode]
        lines.append(
            f"| {mode} | {width:,} x {height:,} | {r['n_spots']} | {r['tissue_tiles']} | {r['encoder_passes']} "
            f"({r['passes_per_spot']:.1f}) | {r['read_s']:.1f} | {r['spots_s']:.1f} | {r['features_s']:.1f} "
            f"| {r['predict_s']:.1f} | {r['write_s']:.1f} | {r['total_s']:.1f} | {r['peak_rss_gib']:.2f} |"
        )
    print("\n".join(lines))
    print(json.dumps(result["shared_over_spot_by_spot"]))
    print(f"written to {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
