"""Packaging: declared dependencies match what src/ imports, one version source, public API page, extras."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

import dkan

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: import name -> distribution name where they differ
_DIST = {"PIL": "pillow", "sklearn": "scikit-learn", "skimage": "scikit-image", "yaml": "pyyaml"}
#: imports inside a try/except ImportError that raise a message naming the extra
_OPTIONAL = {"squidpy": "svg", "openai": "llm", "distributed": "dask"}


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def _third_party_imports() -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    found = set()
    for path in (ROOT / "src" / "dkan").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found |= {n.split(".")[0] for n in names}
    return {n for n in found if n not in stdlib and n not in ("dkan", "__future__")}


def test_core_dependencies_cover_every_runtime_import():
    core = _requirement_names(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    for name in sorted(_third_party_imports()):
        dist = _DIST.get(name, name).lower().replace("_", "-")
        if name in _OPTIONAL:
            assert dist in _requirement_names(extras[_OPTIONAL[name]]), name
            assert dist not in core, f"{dist} is optional (extra {_OPTIONAL[name]!r}) but listed as a core dependency"
        else:
            assert dist in core, f"src/ imports {name!r}; declare {dist!r} in [project] dependencies"


def test_core_dependencies_have_floors_and_no_unused_entries():
    deps = PYPROJECT["project"]["dependencies"]
    assert all(">=" in d for d in deps), [d for d in deps if ">=" not in d]
    used = {_DIST.get(n, n).lower().replace("_", "-") for n in _third_party_imports()} | {"zarr"}
    assert _requirement_names(deps) <= used, _requirement_names(deps) - used


def test_version_has_one_source():
    assert "version" not in PYPROJECT["project"]
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["hatch"]["version"]["path"] == "src/dkan/_version.py"
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*", dkan.__version__)


def test_license_and_typing_marker_ship():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert PYPROJECT["project"]["license"] == "MIT"
    assert (ROOT / "src" / "dkan" / "py.typed").exists()


def test_api_page_documents_public_names_only():
    page = (ROOT / "docs" / "api.md").read_text()
    names = re.findall(r"^\s+(dkan\.[\w.]+)\s*$", page, flags=re.M)
    assert len(names) > 30
    private = [n for n in names if any(part.startswith("_") for part in n.split("."))]
    assert not private, private
    import importlib

    for name in names:  # every documented name resolves
        mod, _, attr = name.rpartition(".")
        obj = importlib.import_module(mod)
        assert hasattr(obj, attr) or importlib.util.find_spec(name), name


def test_svg_flavour_without_squidpy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "squidpy", None)  # import squidpy -> ImportError
    sdata = dkan.datasets.toy(n_samples=1, grid_size=6, n_genes=12, seed=0)
    with pytest.raises(ImportError, match=r"dkan\[svg\]"):
        dkan.pp.select_genes(sdata, n_genes=5, flavor="svg")


def test_update_in_place_needs_no_private_spatialdata_api(tmp_path, monkeypatch):
    """The CLI's in-place update reads element names through `elements_paths_on_disk` only (public API)."""
    import numpy as np
    from spatialdata import SpatialData, read_zarr

    from dkan import _keys as K
    from dkan.io._store_write import update_in_place

    toy = dkan.datasets.toy(n_samples=1, grid_size=4, n_genes=6, seed=0)
    toy.write(tmp_path / "toy.zarr")
    private = SpatialData._element_type_and_name_from_element_path  # spatialdata itself still calls it

    def guarded(self, path):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        assert not caller.startswith("dkan"), f"{caller} calls a private SpatialData method"
        return private(self, path)

    monkeypatch.setattr(SpatialData, "_element_type_and_name_from_element_path", guarded)
    sdata = read_zarr(tmp_path / "toy.zarr")
    sdata.tables[K.TABLE].layers["extra"] = np.ones(sdata.tables[K.TABLE].shape, np.float32)
    update_in_place(sdata, K.TABLE)
    assert "extra" in read_zarr(tmp_path / "toy.zarr").tables[K.TABLE].layers


def test_floor_constraints_pin_every_core_dependency_at_its_floor():
    """.ci/constraints-min.txt (used by .ci/check-floors) follows pyproject's floors."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = {}
    for line in (ROOT / ".ci" / "constraints-min.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[req.name.lower()] = Version(next(iter(req.specifier)).version)

    def padded(v: Version) -> tuple[int, ...]:
        return (*v.release, 0, 0, 0)[:3]

    for dep in PYPROJECT["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name in ("torch", "torchvision"):  # local CPU wheels, pinned in .ci/constraints.txt
            continue
        floor = Version(next(s.version for s in req.specifier if s.operator == ">="))
        assert req.name.lower() in pins, f"{req.name} has no pin in .ci/constraints-min.txt"
        assert padded(pins[req.name.lower()]) == padded(floor), (
            f"{req.name}: pin {pins[req.name.lower()]}, floor {floor}"
        )
