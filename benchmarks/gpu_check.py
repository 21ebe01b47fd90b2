"""One GPU check, prepared for the day a GPU is lent: features, training and AMP in one run, one JSON.

Three measurements, each a thin driver around the existing benchmarks (``features.py``, ``training.py``):

1. **features**: ``dkan.tl.extract_features`` end to end (lazy crops from a zarr image, spot + 5x5 region,
   EfficientNet-Lite0) against the encoder's bare forward pass on pre-loaded tensors, in spots/s; the target
   is end to end >= 80 % of bare.
2. **training**: one her2st-preset training epoch (her2st-sized synthetic inputs, trainable ResNet18 patch branch)
   with dkan's batch strategy (one section per batch, streamed NT-Xent) against the reference's (random batches
   over all sections, dense NT-Xent), time per epoch and peak memory, each in a fresh subprocess.
3. **amp**: the encoder forward and the her2st training epoch with and without mixed precision.

On one GPU the whole check takes a few minutes (``--budget-s``, default 540 s, skips what would not fit and
says so). ``--quick`` runs every path on the CPU on toy sizes in seconds (dummy encoder, small preset), so CI
keeps the script working; its numbers mean nothing.

Usage::

    python benchmarks/gpu_check.py                      # CUDA: writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --quick --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"


def settings(quick: bool, device: str) -> dict:
    """Sizes of every measurement: her2st-like on a GPU, toy-sized with ``--quick``."""
    if quick:
        return {
            "features": {"n_spots": 4, "batch_size": 4, "num_workers": 0, "encoder": "dummy", "patch_size": 32},
            "training": {"preset": "small", "batch": 32, "spots": (36, 40, 44), "genes": 64, "epochs": 1, "warmup": 1},
            "amp_forward": {"encoder": "dummy", "batch": 8, "size": 32, "repeats": 2},
            "threads": 1,
        }
    return {
        "features": {"n_spots": 4000, "batch_size": 64, "num_workers": min(8, os.cpu_count() or 1)},
        "training": {"preset": "her2st", "batch": 128, "spots": (170, 175, 180, 185, 190), "genes": 250, "epochs": 3},
        "amp_forward": {"encoder": "efficientnet_lite0", "batch": 64 * 26, "size": 224, "repeats": 10},
        "threads": 0,
    }


def machine(device: str) -> dict:
    import torch
    from _machine import cpu_model

    info = {
        "device": device,
        "cpu": cpu_model(platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_start": os.getloadavg(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


# ------------------------------------------------------------------------------------------------ measurements
def check_features(device: str, s: dict) -> dict:
    """End-to-end feature extraction against the bare forward (``features.bench``)."""
    import features

    ns = argparse.Namespace(
        device=device,
        n_spots=s["n_spots"],
        batch_size=s["batch_size"],
        num_workers=s["num_workers"],
        encoder=s.get("encoder", "efficientnet_lite0"),
        patch_size=s.get("patch_size", 224),
        pitch=136 if s.get("patch_size", 224) >= 224 else 40,
        in_memory=False,
    )
    r = features.bench(ns)
    return {
        "encoder": r["encoder"],
        "spots": r["spots"],
        "images_per_spot": r["images/spot"],
        "batch": r["batch"],
        "workers": r["workers"],
        "precision": r["amp"],
        "end_to_end_spots_per_s": r["e2e"],
        "crop_reading_spots_per_s": r["read"],
        "bare_forward_spots_per_s": r["bare"],
        "end_to_end_over_bare": r["e2e"] / r["bare"],
    }


def check_amp_forward(device: str, s: dict) -> dict:
    """Bare encoder forward in fp32 and under autocast (bf16 where supported, else fp16), images/s."""
    import torch

    from dkan._features.encoding import encode
    from dkan.nn.image_encoders import create_image_encoder

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    enc = create_image_encoder(s["encoder"]).to(dev).eval().requires_grad_(False)
    x = torch.randn(s["batch"], 3, s["size"], s["size"], device=dev)
    low = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
    out = {"encoder": enc.name, "images": s["batch"] * s["repeats"]}
    for name, amp in (("fp32", None), (str(low).replace("torch.", ""), low)):
        with torch.inference_mode():
            encode(enc, x[:2], amp=amp, chunk=256)
            _sync(dev)
            t = time.perf_counter()
            for _ in range(s["repeats"]):
                encode(enc, x, amp=amp, chunk=256)
            _sync(dev)
        out[f"{name}_images_per_s"] = s["batch"] * s["repeats"] / (time.perf_counter() - t)
    out["amp_speedup"] = out[f"{str(low).replace('torch.', '')}_images_per_s"] / out["fp32_images_per_s"]
    return out


def check_training(device: str, s: dict, *, threads: int, quick: bool, timeout: float) -> list[dict]:
    """Training epochs: dkan's strategy vs the reference's (AMP on), and dkan's with AMP off."""
    import training

    rows = []
    for strategy, amp in (("ours", True), ("reference", True), ("ours", False)):
        spec = {
            "device": device,
            "preset": s["preset"],
            "batch": s["batch"],
            "strategy": strategy,
            "spots": list(s["spots"]),
            "genes": s["genes"],
            "threads": threads,
            "epochs": s["epochs"],
            "warmup": s.get("warmup", 2),
            "max_steps": 0,
            # the reference contrasts all genes (and its dense loss needs the full gene set in the module output)
            "contrastive_genes": None if strategy == "reference" else "preset",
            "amp": amp,
        }
        # --quick: in this process (seconds); otherwise a fresh subprocess per cell, for a clean peak memory
        res = training.worker(spec) if quick else training.run_cell(spec, timeout=timeout)
        rows.append({"strategy": strategy, "amp": amp, **{k: spec[k] for k in ("preset", "batch", "genes")}, **res})
    return rows


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def summarize(training_rows: list[dict]) -> dict:
    """Ratios of the training cells: reference/ours time and memory, AMP off/on time."""
    import statistics

    by = {(r["strategy"], r["amp"]): r for r in training_rows if "times" in r}
    out = {}
    if ("ours", True) in by and ("reference", True) in by:
        ours, ref = by[("ours", True)], by[("reference", True)]
        out["reference_over_ours_time"] = statistics.median(ref["times"]) / statistics.median(ours["times"])
        out["ours_over_reference_peak_memory"] = ours["peak_gib"] / ref["peak_gib"]
    if ("ours", True) in by and ("ours", False) in by:
        on, off = by[("ours", True)], by[("ours", False)]
        out["fp32_over_amp_time"] = statistics.median(off["times"]) / statistics.median(on["times"])
        out["amp_over_fp32_peak_memory"] = on["peak_gib"] / off["peak_gib"]
    return out


# ------------------------------------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="CPU, toy sizes, seconds: checks the script works")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/gpu_check.json)")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip measurements that would start after this")
    args = p.parse_args(argv)

    import torch

    device = args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    s = settings(args.quick, device)
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    started = time.perf_counter()
    report: dict = {"quick": args.quick, "machine": machine(device), "seconds": {}}
    steps = {
        "features": lambda: check_features(device, s["features"]),
        "amp_forward": lambda: check_amp_forward(device, s["amp_forward"]),
        "training": lambda: check_training(
            device,
            s["training"],
            threads=s["threads"],
            quick=args.quick,
            timeout=max(60.0, args.budget_s - (time.perf_counter() - started)) / 3,
        ),
    }
    for name, run in steps.items():
        if time.perf_counter() - started > args.budget_s:
            report[name] = {"error": f"skipped: the {args.budget_s:.0f} s budget was spent"}
            continue
        t = time.perf_counter()
        try:
            report[name] = run()
        except Exception as err:  # noqa: BLE001 - one failed measurement must not lose the others
            report[name] = {"error": f"{type(err).__name__}: {err}"}
        report["seconds"][name] = time.perf_counter() - t
        print(f"gpu_check: {name} done in {report['seconds'][name]:.1f} s", file=sys.stderr)
    if isinstance(report.get("training"), list):
        report["training_summary"] = summarize(report["training"])
    report["seconds"]["total"] = time.perf_counter() - started
    report["machine"]["load_avg_end"] = os.getloadavg()
    out = args.out or RESULTS / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"gpu_check: written to {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
