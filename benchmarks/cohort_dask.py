"""A cohort of slides on Dask distributed: 1 vs 2 worker processes of 1 thread each, and the local path.

The benchmark writes ``--n-slides`` synthetic whole-slide files with :func:`dkan.datasets.synthetic_wsi`
(pyramidal JPEG TIFFs, one seed each; nothing is committed), trains a ``small``-preset model on toy slides
(``--encoder``, default the preset's EfficientNet-Lite0, two short epochs) in a subprocess, saves it to a folder,
then predicts the whole cohort with :func:`dkan.tl.predict_slides` three ways, each into a fresh output folder:

1. **local**: no client, in a fresh subprocess with 1 torch / BLAS thread (the model loaded once, slides one
   after the other);
2. **dask, 1 worker**: ``LocalCluster(n_workers=1, threads_per_worker=1, processes=True)``;
3. **dask, 2 workers**: ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``.

The model is passed as its folder (each worker loads it once, inside the timed call, as the local run does).
Wall time is the ``predict_slides`` call only: the cluster is started, and its workers import dkan, torch and
spatialdata (as the local process does before its timer), before it; both are reported apart. Dask workers run with
``OMP_NUM_THREADS=1`` (distributed's default, and set here too).

**Per-slide peak memory per worker**: a daemon thread started on every worker with ``client.run`` samples the
worker process's RSS (``psutil``) every ``--sample-s`` seconds; the task stream (``distributed.get_task_stream``)
gives each slide's worker and compute interval, and a slide's peak is the largest sample of its worker inside
that interval. Spikes shorter than the sampling period can be missed; the worker's ``ru_maxrss`` (its true
high-water mark, read at the end) is reported beside it. The local run reports its process's ``ru_maxrss``.

The load average (``os.getloadavg``) is recorded before and after each run: on a shared machine the ratio is
that of the load at the time, not the idle ratio.

Usage::

    python benchmarks/cohort_dask.py                         # 8 slides of 8,192 x 6,144 px at 0.25 µm/px
    python benchmarks/cohort_dask.py --n-slides 1 --modes local   # size check: one slide, local only
    python benchmarks/cohort_dask.py --workdir /tmp/c        # keep (and reuse) the slides and the model there
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("local", "dask1", "dask2")


def local_worker(spec: dict) -> dict:
    """The no-client path in this process (1 torch thread): wall time, report rows, peak RSS."""
    import torch

    import dkan

    torch.set_num_threads(1)
    t = time.perf_counter()
    slides, out_dir = spec["slides"], spec["out_dir"]
    report = dkan.tl.predict_slides(slides, spec["model"], out_dir=out_dir, device="cpu", progress=False)
    wall = time.perf_counter() - t
    return {
        "wall_s": wall,
        "rows": report.to_dict(orient="records"),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _subprocess(flag: str, spec: dict, timeout: float, log: Path) -> dict:
    """Run a worker function in a fresh process with 1 torch / BLAS thread."""
    from _machine import run_worker

    return run_worker(__file__, flag, spec, timeout=timeout, log=log, threads=1)


# ------------------------------------------------------------------------------------- on the Dask workers
def start_sampler(period: float, dask_worker=None) -> int:
    """On a worker: sample this process's RSS every ``period`` s in a daemon thread (kept on the worker)."""
    import psutil

    proc = psutil.Process()
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            samples.append((time.time(), proc.memory_info().rss))
            stop.wait(period)

    threading.Thread(target=loop, daemon=True, name="rss-sampler").start()
    dask_worker._bench_rss = (samples, stop)
    return os.getpid()


def warm_up() -> float:
    """On a worker: import what a slide task imports (the local run imports it before its timer too)."""
    t = time.perf_counter()
    import spatialdata  # noqa: F401
    import torch  # noqa: F401

    import dkan.tl  # noqa: F401

    return time.perf_counter() - t


def stop_sampler(dask_worker=None) -> dict:
    """On a worker: stop the sampler; return its samples and the process's ``ru_maxrss`` (bytes)."""
    samples, stop = dask_worker._bench_rss
    stop.set()
    return {"samples": list(samples), "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_dask(n_workers: int, slides: list[str], model: str, out_dir: Path, *, period: float) -> dict:
    """``predict_slides`` on a fresh ``LocalCluster`` of ``n_workers`` processes of 1 thread each."""
    from distributed import Client, LocalCluster, get_task_stream

    import dkan

    t = time.perf_counter()
    with (
        LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        startup = time.perf_counter() - t
        pids = client.run(start_sampler, period)
        t = time.perf_counter()
        client.run(warm_up)
        imports = time.perf_counter() - t
        with get_task_stream(client) as ts:
            t = time.perf_counter()
            report = dkan.tl.predict_slides(slides, model, out_dir=out_dir, device="cpu", progress=False, client=client)
            wall = time.perf_counter() - t
        mem = client.run(stop_sampler)
        stream = ts.data
    return {
        "wall_s": wall,
        "cluster_start_s": startup,
        "worker_imports_s": imports,
        "rows": report.to_dict(orient="records"),
        "workers": {addr: {"pid": pids[addr], "ru_maxrss_gib": m["ru_maxrss"] / 2**30} for addr, m in mem.items()},
        "per_slide": per_slide_peaks(stream, mem),
    }


def per_slide_peaks(stream: list[dict], mem: dict) -> list[dict]:
    """Each slide's worker, compute interval and peak sampled RSS of that worker inside the interval."""
    out = []
    for task in stream:
        key = str(task["key"])
        if not key.startswith("dkan-slide-"):
            continue
        comp = [s for s in task["startstops"] if s["action"] == "compute"]
        if not comp:
            continue
        start, stop = comp[0]["start"], comp[-1]["stop"]
        samples = mem.get(task["worker"], {}).get("samples", [])
        inside = [rss for ts, rss in samples if start <= ts <= stop]
        out.append({
            "slide": key[len("dkan-slide-") :].rsplit("-", 2)[0],
            "worker": task["worker"],
            "start": start,
            "compute_s": stop - start,
            "peak_rss_gib": max(inside) / 2**30 if inside else None,
            "n_samples": len(inside),
        })  # fmt: skip
    t0 = min((r["start"] for r in out), default=0.0)
    for r in sorted(out, key=lambda r: r["start"]):
        r["start"] -= t0
    return sorted(out, key=lambda r: r["start"])


# ------------------------------------------------------------------------------------------------- driver
def _commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "src"], capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return str(os.getloadavg())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-slides", type=int, default=8)
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--height", type=int, default=6144)
    p.add_argument("--um-per-px", type=float, default=0.25)
    p.add_argument("--encoder", default="efficientnet_lite0", help="feature encoder of the trained model")
    p.add_argument("--model", type=Path, default=None, help="saved model folder (default: train a small one)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    p.add_argument("--sample-s", type=float, default=0.05, help="RSS sampling period on the workers (s)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the slides, model and stores here (reused)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds for each subprocess")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/cohort_dask.json)")
    p.add_argument("--local-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--train-worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.local_worker is not None:
        print(json.dumps(local_worker(json.loads(args.local_worker)), default=str))
        return {}
    if args.train_worker is not None:
        spec = json.loads(args.train_worker)
        from _machine import train_model

        print(json.dumps({"train_s": train_model(Path(spec["out"]), encoder=spec["encoder"])}))
        return {}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"`--modes` has {bad}; choose among {MODES}.")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work, modes)
    out = args.out or RESULTS / "cohort_dask.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(table_md(result))
    print(f"written to {out}", file=sys.stderr)
    return result


def run(args: argparse.Namespace, work: Path, modes: list[str]) -> dict:
    """Write (or reuse) the slides and the model in ``work``, then run each mode once."""
    from _machine import cpu_model

    import dkan

    started = time.perf_counter()
    log = work / "workers.log"
    result: dict = {
        "commit": _commit(),
        "slides": {"n": args.n_slides, "width": args.width, "height": args.height, "um_per_px": args.um_per_px},
        "machine": {
            "cpu": cpu_model("unknown"),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "uptime_start": _uptime(),
        },
    }
    t = time.perf_counter()
    slides = []
    for i in range(args.n_slides):
        path = work / f"slide{i}_{args.width}x{args.height}.tif"
        if not path.exists():
            dkan.datasets.synthetic_wsi(path, width=args.width, height=args.height, um_per_px=args.um_per_px, seed=i)
        slides.append(str(path))
    mib = sum(Path(s).stat().st_size for s in slides) / 2**20
    result["slides"].update(write_s=time.perf_counter() - t, file_mib=mib)
    model = args.model
    if model is None:
        model = work / "model"
        if not model.exists():
            result["train"] = _subprocess("--train-worker", {"out": str(model), "encoder": args.encoder}, 3600, log)
    result["encoder"] = args.encoder if args.model is None else "given model"
    for mode in modes:
        out_dir = work / f"out_{mode}"
        shutil.rmtree(out_dir, ignore_errors=True)
        load0, up0 = os.getloadavg(), _uptime()
        if mode == "local":
            spec = {"slides": slides, "model": str(model), "out_dir": str(out_dir)}
            r = _subprocess("--local-worker", spec, args.timeout, log)
        else:
            r = run_dask(int(mode[-1]), slides, str(model), out_dir, period=args.sample_s)
        r.update(load_avg_before=load0, load_avg_after=os.getloadavg(), uptime_before=up0, uptime_after=_uptime())
        failed = [row for row in r["rows"] if row["status"] != "written"]
        if failed:
            raise RuntimeError(f"{mode}: slides not written: {failed}")
        result[mode] = r
    if "dask1" in result and "dask2" in result:
        result["ratio_1_over_2_workers"] = result["dask1"]["wall_s"] / result["dask2"]["wall_s"]
    if "local" in result and "dask1" in result:
        result["ratio_dask1_over_local"] = result["dask1"]["wall_s"] / result["local"]["wall_s"]
    result["machine"]["uptime_end"] = _uptime()
    result["total_s"] = time.perf_counter() - started
    return result


def table_md(result: dict) -> str:
    """Markdown: wall time per mode, the ratio, and per-slide / per-worker peak RSS."""
    s = result["slides"]
    lines = [
        f"commit {result['commit']}; {s['n']} slides of {s['width']:,} x {s['height']:,} px at {s['um_per_px']} "
        f"µm/px; encoder {result['encoder']}; {result['machine']['cpu']} ({result['machine']['cpu_count']} cores)",
        f"uptime at start: {result['machine']['uptime_start']}",
        f"uptime at end:   {result['machine']['uptime_end']}",
        "",
        "| run | workers x threads | wall s | s / slide | spots / slide | cluster start + imports s "
        "| load avg before | load avg after | peak RSS GiB per process (ru_maxrss) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        if mode not in result:
            continue
        r = result[mode]
        n = len(r["rows"])
        spots = sum(row["n_spots"] for row in r["rows"]) / n
        shape = "1 process x 1 (no client)" if mode == "local" else f"{mode[-1]} x 1"
        if mode == "local":
            peaks = f"{r['peak_rss_gib']:.2f}"
        else:
            peaks = ", ".join(f"{w['ru_maxrss_gib']:.2f}" for w in r["workers"].values())
        start = f"{r['cluster_start_s']:.1f} + {r['worker_imports_s']:.1f}" if "cluster_start_s" in r else ""
        la0 = "/".join(f"{x:.2f}" for x in r["load_avg_before"])
        la1 = "/".join(f"{x:.2f}" for x in r["load_avg_after"])
        lines.append(
            f"| {mode} | {shape} | {r['wall_s']:.1f} | {r['wall_s'] / n:.1f} | {spots:.0f} | {start} | {la0} "
            f"| {la1} | {peaks} |"
        )
    lines.append("")
    for key in ("ratio_1_over_2_workers", "ratio_dask1_over_local"):
        if key in result:
            lines.append(f"{key}: {result[key]:.2f}")
    for mode in ("dask1", "dask2"):
        if mode not in result:
            continue
        names = {addr: f"w{i}" for i, addr in enumerate(result[mode]["workers"])}
        lines += ["", f"{mode}: per slide", "", "| slide | worker | start s | compute s | peak RSS GiB (sampled) |"]
        lines.append("|---|---|---|---|---|")
        for r in result[mode]["per_slide"]:
            peak = f"{r['peak_rss_gib']:.2f}" if r["peak_rss_gib"] is not None else "n/a"
            lines.append(
                f"| {r['slide']} | {names.get(r['worker'], r['worker'])} | {r['start']:.1f} | {r['compute_s']:.1f} "
                f"| {peak} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
