"""Helpers shared by the benchmark scripts: the CPU model name, a worker process, a quick toy model."""

from __future__ import annotations

import time
from pathlib import Path


def cpu_model(default: str) -> str:
    """The ``model name`` of ``/proc/cpuinfo``, or ``default`` where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default


def run_worker(script: str, flag: str, spec: dict, *, timeout: float, log: Path, threads: int | str = 1) -> dict:
    """Run ``script flag spec-json`` in a fresh process with ``threads`` torch/BLAS threads; its last JSON line.

    The child's stderr is appended to ``log`` (its last 2,000 characters are raised on failure).
    """
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "a") as err:
        err.write(f"\n=== {flag} {json.dumps(spec)}\n")
        err.flush()
        proc = subprocess.run(
            [sys.executable, script, flag, json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=timeout,
            env=env,
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{flag} failed (rc {proc.returncode}): {log.read_text()[-2000:]}")
    return json.loads(lines[-1])


def train_model(out: Path, *, encoder: str) -> float:
    """A ``small``-preset model on toy slides (two short epochs), saved to ``out``; returns seconds."""
    import dkan

    t = time.perf_counter()
    sdata = dkan.datasets.toy(n_samples=2, grid_size=6, seed=0)
    model = dkan.tl.train(sdata, config="small", max_epochs=2, feature_encoder=encoder, device="cpu", progress=False)
    model.save(out)
    return time.perf_counter() - t
