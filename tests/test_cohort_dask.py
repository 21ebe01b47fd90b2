"""A cohort of slides on a Dask distributed cluster (issue 24 part 1): ``predict_slides(..., client=...)``."""

from __future__ import annotations

import pytest

import dkan
from dkan import _keys as K

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three small synthetic slides and a corrupt one."""
    folder = tmp_path_factory.mktemp("cohort")
    opts = {"width": 800, "height": 600, "um_per_px": 0.5, "tile": 128, "n_blobs": 2}
    slides = [dkan.datasets.synthetic_wsi(folder / f"s{i}.tif", seed=i, **opts) for i in range(3)]
    data = slides[0].read_bytes()
    bad = folder / "s3_cut.tif"
    bad.write_bytes(data[: int(len(data) * 0.6)])  # header reads, JPEG tiles do not decode
    return [*slides[:2], bad, slides[2]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sdata = dkan.datasets.toy(n_samples=2, grid_size=6, seed=0)
    model = dkan.tl.train(sdata, config="small", progress=False, max_epochs=1, feature_encoder="dummy", device="cpu")
    return model.save(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as c,
    ):
        yield c


def test_cohort_on_a_local_cluster(cohort, model_dir, client, tmp_path):
    from dkan.tl._cohort import models_loaded

    out_dir = tmp_path / "preds"
    report = dkan.tl.predict_slides(cohort, model_dir, out_dir=out_dir, errors="skip", device="cpu", client=client)
    assert list(report["status"]) == ["written", "written", "failed", "written"]
    assert "s3_cut.tif" in report["error"].iloc[2] and "Jpeg" in report["error"].iloc[2]
    assert sorted(p.name for p in out_dir.iterdir()) == ["s0.zarr", "s1.zarr", "s2.zarr"]  # nothing half-written
    assert (report["n_spots"].dropna() > 0).all()
    loaded = client.run(models_loaded)
    assert len(loaded) == 2 and all(n <= 1 for n in loaded.values()) and sum(loaded.values()) >= 1  # once per worker
    again = dkan.tl.predict_slides(cohort, model_dir, out_dir=out_dir, errors="skip", device="cpu", client=client)
    assert list(again["status"]) == ["skipped", "skipped", "failed", "skipped"]
    with pytest.raises(dkan.tl.SlideError, match=r"s3_cut\.tif"):
        dkan.tl.predict_slides(cohort[2:3], model_dir, out_dir=out_dir, device="cpu", client=client)


def test_cohort_with_a_model_object_matches_the_local_run(cohort, model_dir, client, tmp_path):
    import numpy as np
    import spatialdata as sd

    model = dkan.DKANModel.load(model_dir)
    remote = dkan.tl.predict_slides(cohort[:1], model, out_dir=tmp_path / "r", device="cpu", client=client)
    local = dkan.tl.predict_slides(cohort[:1], model, out_dir=tmp_path / "l", device="cpu", progress=False)
    assert list(remote["status"]) == list(local["status"]) == ["written"]
    (a,) = sd.read_zarr(tmp_path / "r" / "s0.zarr").tables.values()
    (b,) = sd.read_zarr(tmp_path / "l" / "s0.zarr").tables.values()
    np.testing.assert_allclose(a.layers[K.PRED], b.layers[K.PRED], rtol=1e-5, atol=1e-6)


_KILL_ON_RENAME = """
import os, signal
from dkan.io import _store_write as sw

def _move(src, dst, _real=sw._move):
    try:  # the first worker to rename a finished store into place dies there (once per test)
        os.close(os.open(MARKER, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return _real(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)

sw._move = _move
"""


def test_worker_killed_mid_cohort_leaves_no_half_store(cohort, model_dir, client, tmp_path):
    """A worker SIGKILLed before renaming its store: Dask reruns the slide elsewhere, the leftover is removed."""
    marker = tmp_path / "killed"
    client.run(exec, _KILL_ON_RENAME, {"MARKER": str(marker)})
    out_dir = tmp_path / "preds"
    good = [cohort[0], cohort[1], cohort[3]]
    report = dkan.tl.predict_slides(good, model_dir, out_dir=out_dir, errors="skip", device="cpu", client=client)
    assert marker.exists()  # a worker was killed
    assert list(report["status"]) == ["written"] * 3
    assert sorted(p.name for p in out_dir.iterdir()) == ["s0.zarr", "s1.zarr", "s2.zarr"]  # no hidden leftover


def test_slide_dask_work_stays_in_its_task(cohort, model_dir, client, tmp_path):
    """A slide's own dask reads run inside its task: no extra tasks on the cluster, no slide seceding from its
    worker thread (inside a task, dask's default scheduler is the worker's client: every image read became
    cluster tasks, and a 1-thread worker ran several slides at once)."""
    from distributed import get_task_stream

    with get_task_stream(client) as ts:
        report = dkan.tl.predict_slides(cohort[:2], model_dir, out_dir=tmp_path / "p", device="cpu", client=client)
    assert list(report["status"]) == ["written", "written"]
    keys = [str(t["key"]) for t in ts.data]
    assert len(keys) == 2 and all(k.startswith("dkan-slide-") for k in keys), keys[:5]
