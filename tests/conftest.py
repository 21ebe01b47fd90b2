from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

DATA_DIR = Path(os.environ.get("DKAN_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@contextmanager
def benchmark_modules(*names: str) -> Iterator[tuple[ModuleType, ...]]:
    """The scripts ``names`` of ``benchmarks/``, imported with that folder on the path (they import each other)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield tuple(importlib.import_module(n) for n in names)
    finally:
        sys.path.remove(str(BENCH))


def data_path(*parts: str) -> Path:
    """Path under the shared real-data folder; skip the test when it is absent."""
    p = DATA_DIR.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not found at {p} (set DKAN_DATA_DIR to the shared data folder)")
    return p


@pytest.fixture(scope="session")
def toy_master():
    import dkan

    return dkan.datasets.toy(seed=0)


@pytest.fixture
def toy(toy_master):
    """A cheap deep copy of the session's toy SpatialData."""
    from dkan.datasets import copy_sdata

    return copy_sdata(toy_master)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def results(sdata, table_key=None):
    """The panel-sized results table where dkan writes targets, predictions, features and geometry."""
    from dkan._results import results_table

    return results_table(sdata, table_key)[1]
