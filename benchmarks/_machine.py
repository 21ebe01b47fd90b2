"""The CPU model name, shared by the benchmark reports."""

from __future__ import annotations

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
