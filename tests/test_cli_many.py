"""``dkan predict A B C --out-dir DIR`` (issue 24 item 1): a cohort of slides from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import dkan
from dkan.cli import main

FAST = ["--device", "cpu", "--no-progress", "-q"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Two good synthetic slides and one cut short (its header reads, its JPEG tiles do not decode)."""
    folder = tmp_path_factory.mktemp("slides")
    opts = {"width": 1000, "height": 800, "um_per_px": 0.5, "tile": 128, "n_blobs": 3}
    a = dkan.datasets.synthetic_wsi(folder / "a.tif", seed=0, **opts)
    full = dkan.datasets.synthetic_wsi(folder / "full.tif", seed=1, **opts)
    bad = folder / "broken.tif"
    data = full.read_bytes()
    bad.write_bytes(data[: int(len(data) * 0.6)])
    full.unlink()
    c = dkan.datasets.synthetic_wsi(folder / "c.tif", seed=2, **opts)
    return [a, bad, c]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sdata = dkan.datasets.toy(n_samples=2, grid_size=6, seed=0)
    model = dkan.tl.train(sdata, config="small", progress=False, max_epochs=1, feature_encoder="dummy", device="cpu")
    return model.save(tmp_path_factory.mktemp("model") / "model")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(dkan.__file__).parents[1]), *sys.path])}


def _stores(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_many_slides_one_store_each_a_bad_one_reported_and_rerun_skips(slides, model_dir, tmp_path):
    """In a process of its own, so that stderr is exactly what a user sees (no zarr noise at exit)."""
    out_dir = tmp_path / "preds"
    cmd = [sys.executable, "-m", "dkan", "predict", *map(str, slides), "--model", str(model_dir)]
    cmd += ["--out-dir", str(out_dir), *FAST]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert _stores(out_dir) == ["a.zarr", "c.zarr"]
    named = [line for line in proc.stderr.splitlines() if "broken.tif" in line]  # zarr/novelty warnings aside
    assert len(named) == 1 and named[0].startswith("dkan: error: "), proc.stderr
    assert sum(line.startswith("dkan: error") for line in proc.stderr.splitlines()) == 1
    assert "Traceback" not in proc.stderr
    table = proc.stdout.strip().splitlines()
    assert table[0].split() == ["slide", "status", "error"]
    assert [row.split()[1] for row in table[1:]] == ["written", "failed", "written"]
    assert "broken.tif" in table[2]

    good = [slides[0], slides[2]]  # rerun: both finished slides are skipped, nothing fails
    stamp = {p: (out_dir / p).stat().st_mtime_ns for p in _stores(out_dir)}
    argv = ["predict", *map(str, good), "--model", str(model_dir), "--out-dir", str(out_dir), *FAST]
    assert main(argv) == 0
    assert {p: (out_dir / p).stat().st_mtime_ns for p in _stores(out_dir)} == stamp


def test_rerun_report_lists_skipped_slides(slides, model_dir, tmp_path, capsys):
    out_dir = tmp_path / "preds"
    argv = ["predict", str(slides[0]), "--model", str(model_dir), "--out-dir", str(out_dir), *FAST]
    assert main(argv) == 0
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].split()[:2] == [str(slides[0]), "skipped"]
    assert _stores(out_dir) == ["a.zarr"]


def test_errors_raise_stops_with_one_line(slides, model_dir, tmp_path, capsys):
    out_dir = tmp_path / "preds"
    argv = ["predict", str(slides[1]), str(slides[0]), "--model", str(model_dir), "--out-dir", str(out_dir)]
    assert main([*argv, "--errors", "raise", *FAST]) == 1
    err = capsys.readouterr().err
    assert "dkan: error:" in err and "broken.tif" in err
    assert not out_dir.exists() or _stores(out_dir) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--out", "x.zarr"], "need --out-dir"),
        (["--in-place"], "need --out-dir"),
        (["--out-dir", "d", "--out", "x.zarr"], "not allowed with argument"),
        (["--out-dir", "d", "--in-place"], "not allowed with argument"),
        (["--out-dir", "d", "--table-key", "t"], "--table-key cannot be used with --out-dir"),
        (["--out-dir", "d", "--errors", "ignore"], "invalid choice"),
    ],
)
def test_misuse_is_an_argparse_error(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "a.tif", "b.tif", "--model", "m", *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_scheduler_needs_out_dir(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "a.tif", "--model", "m", "--out", "x.zarr", "--scheduler", "tcp://127.0.0.1:1"])
    assert exc.value.code == 2
    assert "--scheduler needs --out-dir" in capsys.readouterr().err


def test_scheduler_address_is_parsed(tmp_path):
    from dkan.cli import build_parser

    args = build_parser().parse_args(
        ["predict", "a.tif", "b.tif", "--model", "m", "--out-dir", "d", "--scheduler", "tcp://10.0.0.1:8786"]
    )
    assert args.scheduler == "tcp://10.0.0.1:8786" and args.out_dir == Path("d") and len(args.store) == 2
