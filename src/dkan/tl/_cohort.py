"""A cohort of slides on a Dask distributed cluster: one task per slide, the model loaded once per worker.

:func:`dkan.tl.predict_slides` with ``client=`` comes here. Each task runs :func:`dkan.tl._slide.slide_row` on
a worker: recover what a killed run left at the slide's output, skip a finished store, else predict and write the
store atomically. A slide that fails comes back as a ``failed`` row; an error that is not the slide's (see
:func:`dkan.tl._slide_errors.is_slide_error`) fails its task and is raised here. A task whose worker died (killed,
out of memory) is retried by Dask on another worker; when Dask gives up (``KilledWorker``) the slide is reported
as failed.
"""

from __future__ import annotations

import logging
import threading
import uuid
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dkan.train.fitted import DKANModel

logger = logging.getLogger("dkan")

#: Models loaded in this (worker) process: ``{(folder, manifest mtime and size): model}``.
_MODELS: dict[tuple[str, int, int], DKANModel] = {}
_LOCK = threading.Lock()


def worker_model(model: DKANModel | str) -> DKANModel:
    """The model for a task: a model object as it is, a folder loaded once per process (cached)."""
    from dkan.train._store import MANIFEST
    from dkan.train.fitted import DKANModel

    if isinstance(model, DKANModel):
        return model
    path = Path(model).resolve()
    stat = (path / MANIFEST).stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)  # a model saved again is loaded again
    with _LOCK:
        if key not in _MODELS:
            _MODELS.clear()
            _MODELS[key] = DKANModel.load(path)
        return _MODELS[key]


def models_loaded() -> int:
    """How many models this process has cached (read on the workers with ``client.run`` by the tests)."""
    return len(_MODELS)


def slide_task(slide: str, out: str, model: DKANModel | str, opts: dict[str, Any]) -> dict[str, Any]:
    """One slide on a worker: its report row (a failure is a row; the exception object stays on the worker).

    The slide's own dask work (lazy image reads) runs in this task's thread with dask's synchronous scheduler:
    inside a task, dask's default scheduler is the worker's client, which would send every read to the cluster
    as tasks and let this task leave its worker thread while it waits, so a 1-thread worker would run several
    slides at once (more memory than one slide per thread, and slower).
    """
    import dask

    from dkan.tl._slide import slide_row

    with dask.config.set(scheduler="synchronous"):
        row = slide_row(Path(slide), Path(out), worker_model(model), opts, progress=False)
    row.pop("exception", None)
    return row


def predict_on_client(
    client: Any,
    pairs: list[tuple[Path, Path]],
    model: DKANModel | str | PathLike[str],
    opts: dict[str, Any],
    *,
    errors: str,
    progress: bool,
) -> list[dict[str, Any]]:
    """Submit one task per slide to ``client`` and collect the report rows in the order of ``pairs``.

    Parameters
    ----------
    client
        A ``dask.distributed.Client``.
    pairs
        ``(slide, output store)`` per slide.
    model
        A model object (sent to every worker once) or its folder (loaded once per worker).
    opts
        Keyword arguments of :func:`dkan.tl._slide.predict_slide`.
    errors
        ``"raise"`` or ``"skip"`` (see :func:`dkan.tl.predict_slides`).
    progress
        Show a progress bar of finished slides.

    Returns
    -------
    The report rows.
    """
    from distributed import as_completed
    from tqdm.auto import tqdm

    from dkan.tl._slide_errors import SlideError
    from dkan.train.fitted import DKANModel

    if isinstance(model, DKANModel):
        ref: Any = client.scatter(model, broadcast=True)
    elif isinstance(model, str | PathLike):
        ref = str(Path(model).resolve())
        if not Path(ref).is_dir():
            raise FileNotFoundError(f"`model={model}` is not a model folder; pass a folder saved with DKANModel.save.")
    else:
        raise TypeError(f"`model` must be a DKANModel or the folder it was saved to; got {type(model).__name__}.")
    run = uuid.uuid4().hex[:8]  # task keys unique per call: a key still held by the scheduler returns old results
    futures = {
        client.submit(slide_task, str(path), str(out), ref, opts, key=f"dkan-slide-{path.name}-{run}-{i}"): i
        for i, (path, out) in enumerate(pairs)
    }
    rows: list[dict[str, Any] | None] = [None] * len(pairs)
    bar = tqdm(total=len(pairs), desc="dkan slides", unit="slide", disable=not progress)
    try:
        for future in as_completed(futures):
            i = futures[future]
            rows[i] = _row(future, pairs[i])
            bar.update()
            if errors == "raise" and rows[i]["status"] == "failed":
                path, _ = pairs[i]
                raise SlideError(path, "task", rows[i]["error"])
    finally:
        bar.close()
        client.cancel([f for f in futures if not f.done()])
    return [row for row in rows if row is not None]


def _row(future: Any, pair: tuple[Path, Path]) -> dict[str, Any]:
    """A finished task's row; a worker that died with the slide (``KilledWorker``) makes a failed row."""
    from distributed import KilledWorker

    path, out = pair
    try:
        row = future.result()
    except KilledWorker as err:
        logger.error("%s: its worker died (%s); reported as failed", path.name, err)
        return {"slide": str(path), "out": str(out), "status": "failed", "error": f"worker died: {err}"}
    return row
