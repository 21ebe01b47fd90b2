"""benchmarks/gpu_check.py --quick: the GPU check runs end to end on the CPU and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_quick_writes_every_measurement(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["machine"]["device"] == "cpu"
    feats = report["features"]
    assert "error" not in feats, feats
    assert feats["end_to_end_spots_per_s"] > 0 and feats["bare_forward_spots_per_s"] > 0
    assert 0 < feats["end_to_end_over_bare"]
    amp = report["amp_forward"]
    assert "error" not in amp, amp
    assert amp["fp32_images_per_s"] > 0 and amp["amp_speedup"] > 0
    cells = {(r["strategy"], r["amp"]): r for r in report["training"]}
    assert set(cells) == {("ours", True), ("reference", True), ("ours", False)}
    assert all("error" not in r and r["times"][0] > 0 and r["peak_gib"] > 0 for r in cells.values()), cells
    summary = report["training_summary"]
    assert {"reference_over_ours_time", "ours_over_reference_peak_memory", "fp32_over_amp_time"} <= set(summary)
