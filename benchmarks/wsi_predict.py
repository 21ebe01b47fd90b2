"""``dkan predict`` end to end on a synthetic whole-slide file: stage times, encoder passes, peak memory.

The benchmark writes its own slide with ``benchmarks/_wsi_fixture.py`` (a pyramidal, tiled, JPEG-compressed
TIFF with tissue-like blobs over about half of it, opened by tiffslide as a scanner file; nothing is committed),
trains a ``small``-preset model on toy slides with the preset's real encoder (EfficientNet-Lite0) unless
``--model`` gives one, then, each in a fresh process with ``--threads`` torch threads:

1. **whole slide, shared tiles**: :func:`dkan.tl.predict_slides` with ``shared_tiles=True`` (the code path of
   ``dkan predict SLIDE --out OUT.zarr --shared-tiles``): stage times (read, tissue + pseudo-spots, tiles +
   features, prediction, write), total, peak RSS, encoder passes against tissue tiles + spots;
2. **whole slide, spot by spot** (``--small`` only, or ``--full-spot-by-spot``): the same, ``shared_tiles=False``;
3. **a window of the same slide, both paths**: the pseudo-spots of the slide's pipeline inside a square window
   around the central spot (at least ``--subset-spots`` spots), tiled and encoded spot by spot and with shared
   tiles (the features stage of step 1, on the subset): the measured subset ratio, and the spot-by-spot cost
   per spot extrapolated to all spots of the slide (the other stages are those measured in step 1).

Usage::

    python benchmarks/wsi_predict.py --small            # 4,096 x 3,072 px at 0.25 µm/px: a few minutes on 2 cores
    python benchmarks/wsi_predict.py                    # 80,000 x 60,000 px at 0.25 µm/px (the issue's target size)
    python benchmarks/wsi_predict.py --workdir /tmp/w   # keep (and reuse) the slide and the model there
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


def _threads(spec: dict) -> None:
    import torch

    torch.set_num_threads(int(spec["threads"]))


def predict_worker(spec: dict) -> dict:
    """Run ``predict_slides`` on the whole slide; return its report row, encoder passes and peak RSS."""
    import spatialdata as sd

    import dkan
    from dkan import _keys as K

    _threads(spec)
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
    rec = table.uns[K.UNS][K.UNS_FEATURES]
    served = int(rec["region_tiles_served"]) if "region_tiles_served" in rec else int(table.obsm[K.REGION_MASK].sum())
    return {
        **row,
        "total_s": total,
        "n_spots": int(table.n_obs),
        "tissue_tiles": _tissue_tiles(table),
        "region_tiles_encoded": rec.get("region_tiles_encoded"),
        "spot_by_spot_passes": int(table.n_obs) + served,  # spot patches + valid region tiles: exact, not run
        "passes_per_spot": float(row["encoder_passes"] / table.n_obs),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_after_imports_gib": rss0,
    }


def subset_worker(spec: dict) -> dict:
    """Pseudo-spots of the slide inside a window; time tiles + features for one path on just those spots."""
    import numpy as np

    import dkan
    from dkan._utils import iter_samples, spot_pixels
    from dkan.io._store_read import read_slide
    from dkan.tl._slide import _features

    _threads(spec)
    model = dkan.DKANModel.load(spec["model"])
    sdata = read_slide(spec["slide"])
    _, tkey = dkan.tl.make_spots(sdata)
    (sample,) = iter_samples(sdata, table_key=tkey, need_image=True)
    xy, _ = spot_pixels(sdata, sample)
    centre = xy[np.argmin(np.abs(xy - np.median(xy, axis=0)).sum(axis=1))]
    cheb = np.abs(xy - centre).max(axis=1)
    n = min(int(spec["n_spots"]), len(xy))
    half = np.sort(cheb)[n - 1]
    keep = cheb <= half
    sdata.tables[tkey] = sdata.tables[tkey][keep].copy()
    t = time.perf_counter()
    passes = _features(sdata, model, device="cpu", shared_tiles=spec["shared_tiles"], progress=False)
    features_s = time.perf_counter() - t
    lo, hi = centre - half, centre + half
    return {
        "n_spots": int(keep.sum()),
        "window_px_level0": [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])],
        "features_s": features_s,
        "encoder_passes": passes,
        "seconds_per_spot": features_s / int(keep.sum()),
        "seconds_per_pass": features_s / passes,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _tissue_tiles(table) -> int:
    """Grid tiles (of the tiled level) that hold a spot centre: the 'tissue tiles' of the issue's target."""
    import numpy as np

    from dkan import _keys as K

    rec = next(iter(table.uns[K.UNS][K.UNS_TILE]["samples"].values()))
    xy = np.asarray(table.obsm[K.SPOT_PX])
    return len(np.unique(np.floor(xy / int(rec["patch_side"])).astype(int), axis=0))


def _subprocess(flag: str, spec: dict, timeout: float, log: Path) -> dict:
    """Run a worker in a fresh process (``threads`` torch/BLAS threads), with the load average around it."""
    from _machine import run_worker

    load0 = os.getloadavg()
    out = run_worker(__file__, flag, spec, timeout=timeout, log=log, threads=spec.get("threads", 2))
    return {**out, "load_avg_before": load0, "load_avg_after": os.getloadavg()}


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "src"], capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help=f"a {SMALL[0]:,} x {SMALL[1]:,} px slide, not the full one")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--um-per-px", type=float, default=0.25)
    p.add_argument("--model", type=Path, default=None, help="saved model folder (default: train a small one)")
    p.add_argument("--encoder", default="efficientnet_lite0", help="feature encoder of the trained model")
    p.add_argument("--threads", type=int, default=2, help="torch / BLAS threads of the timed processes")
    p.add_argument("--subset-spots", type=int, default=600, help="at least this many spots in the compared window")
    p.add_argument("--full-spot-by-spot", action="store_true", help="also run the whole slide spot by spot")
    p.add_argument("--workdir", type=Path, default=None, help="keep the slide, model and stores here (reused)")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds for each timed subprocess")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/wsi_predict*.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--subset-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--train-worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    for flag, fn in ((args.worker, predict_worker), (args.subset_worker, subset_worker)):
        if flag is not None:
            print(json.dumps(fn(json.loads(flag)), default=str))
            return {}
    if args.train_worker is not None:
        spec = json.loads(args.train_worker)
        from _machine import train_model

        print(json.dumps({"train_s": train_model(Path(spec["out"]), encoder=spec["encoder"])}))
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    out = args.out or RESULTS / f"wsi_predict_{'small' if args.small else 'full'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(table_md(result))
    print(f"written to {out}", file=sys.stderr)
    return result


def run(args: argparse.Namespace, work: Path) -> dict:
    """Write (or reuse) the slide and the model in ``work``, then run the timed workers."""
    from _machine import cpu_model
    from _wsi_fixture import write_fixture

    width, height = SMALL if args.small else FULL
    width, height = args.width or width, args.height or height
    started = time.perf_counter()
    log = work / "workers.log"
    result: dict = {
        "commit": _commit(),
        "slide": {"width": width, "height": height, "um_per_px": args.um_per_px},
        "machine": {
            "cpu": cpu_model("unknown"),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "threads": args.threads,
            "load_avg_start": os.getloadavg(),
        },
    }
    slide, meta = work / f"slide_{width}x{height}.tif", work / f"slide_{width}x{height}.json"
    if not slide.exists():
        t = time.perf_counter()
        write_fixture(slide, width=width, height=height, um_per_px=args.um_per_px, tile=512)
        meta.write_text(json.dumps({"write_slide_s": time.perf_counter() - t, "load_avg": os.getloadavg()}))
    result["slide"].update(json.loads(meta.read_text()), file_mib=slide.stat().st_size / 2**20)
    model = args.model
    if model is None:
        model = work / "model"
        if not model.exists():
            result["train"] = _subprocess("--train-worker", {"out": str(model), "encoder": args.encoder}, 3600, log)
    base = {"slide": str(slide), "model": str(model), "threads": args.threads}
    paths = [("shared_tiles", True)] + ([("spot_by_spot", False)] if args.small or args.full_spot_by_spot else [])
    for mode, shared in paths:
        out_dir = work / f"out_{mode}"
        if out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)
        result[mode] = _subprocess(
            "--worker", {**base, "out_dir": str(out_dir), "shared_tiles": shared}, args.timeout, log
        )
    result["subset"] = {
        mode: _subprocess(
            "--subset-worker", {**base, "n_spots": args.subset_spots, "shared_tiles": shared}, args.timeout, log
        )
        for mode, shared in (("spot_by_spot", False), ("shared_tiles", True))
    }
    result["summary"] = summary(result)
    result["machine"]["load_avg_end"] = os.getloadavg()
    result["total_s"] = time.perf_counter() - started
    return result


def summary(result: dict) -> dict:
    """Targets: measured where both paths ran on the whole slide, else extrapolated from the window (said so)."""
    full, sub = result["shared_tiles"], result["subset"]
    a, b = sub["spot_by_spot"], sub["shared_tiles"]
    other = full["total_s"] - full["features_s"]  # everything but tiles + features, measured on the whole slide
    sbs_features = a["seconds_per_spot"] * full["n_spots"]  # extrapolated per spot
    out = {
        "whole_slide_total_s": full["total_s"],
        "peak_rss_gib": full["peak_rss_gib"],
        "n_spots": full["n_spots"],
        "encoder_passes": full["encoder_passes"],
        "tissue_tiles_plus_spots": full["tissue_tiles"] + full["n_spots"],
        "passes_over_tissue_tiles_plus_spots": full["encoder_passes"] / (full["tissue_tiles"] + full["n_spots"]),
        "subset_features_speedup": a["features_s"] / b["features_s"],
        "subset_passes_ratio": a["encoder_passes"] / b["encoder_passes"],
        "spot_by_spot_passes_whole_slide_exact": full["spot_by_spot_passes"],
        "spot_by_spot_features_s_extrapolated": sbs_features,
        "spot_by_spot_total_s_extrapolated": other + sbs_features,
        "speedup_extrapolated": (other + sbs_features) / full["total_s"],
        "features_speedup_extrapolated": sbs_features / full["features_s"],
    }
    if "spot_by_spot" in result:
        whole = result["spot_by_spot"]
        out["speedup_measured_whole_slide"] = whole["total_s"] / full["total_s"]
        out["features_speedup_measured_whole_slide"] = whole["features_s"] / full["features_s"]
    out["targets"] = {
        "under_10_min": full["total_s"] < 600,
        "peak_rss_under_4_gb": full["peak_rss_gib"] * 2**30 < 4e9,
        "passes_within_1.5x": out["passes_over_tissue_tiles_plus_spots"] <= 1.5,
        "at_least_5x_faster": out.get("speedup_measured_whole_slide", out["speedup_extrapolated"]) >= 5,
    }
    return out


def table_md(result: dict) -> str:
    """Markdown rows of the whole-slide runs and of the window comparison."""
    s = result["slide"]
    lines = [
        "| path | slide (px) | spots | tissue tiles | encoder passes (per spot) | read s | tissue + spots s "
        "| tiles + features s | predict s | write s | total s | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("shared_tiles", "spot_by_spot"):
        if mode in result:
            r = result[mode]
            lines.append(
                f"| {mode} | {s['width']:,} x {s['height']:,} | {r['n_spots']:,} | {r['tissue_tiles']:,} "
                f"| {r['encoder_passes']:,} ({r['passes_per_spot']:.1f}) | {r['read_s']:.1f} | {r['spots_s']:.1f} "
                f"| {r['features_s']:.1f} | {r['predict_s']:.1f} | {r['write_s']:.1f} | {r['total_s']:.1f} "
                f"| {r['peak_rss_gib']:.2f} |"
            )
    lines += [
        "",
        "| window path | spots | encoder passes | tiles + features s | s / spot | peak RSS GiB |",
        "|---|---|---|---|---|---|",
    ]
    for mode, r in result["subset"].items():
        lines.append(
            f"| {mode} | {r['n_spots']:,} | {r['encoder_passes']:,} | {r['features_s']:.1f} "
            f"| {r['seconds_per_spot']:.4f} | {r['peak_rss_gib']:.2f} |"
        )
    lines += ["", "```", json.dumps(result["summary"], indent=1, default=str), "```"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
