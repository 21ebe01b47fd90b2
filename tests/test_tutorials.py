"""The quick-start notebook runs top to bottom in a kernel of this interpreter and shows a positive held-out PCC."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
IMAGE_TYPES = {"image/png", "image/jpeg"}
CELL_TIMEOUT_S = 1200  # per cell, a guard against hangs; training is the longest cell (minutes on 2 busy CPU cores)


def _outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def test_python3_kernel_is_this_interpreter():
    """``kernel_name="python3"`` must start this venv's python, or the notebook would run against another dkan."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    km = KernelManager(kernel_name="python3")
    km.kernel_spec  # noqa: B018 - resolves the spec like NotebookClient does
    cmd = km.format_kernel_cmd()
    # not resolved: every venv's python is a symlink to the same base interpreter
    assert Path(cmd[0]).absolute() == Path(sys.executable).absolute(), (spec.argv, cmd)


#: The fast test set runs the quick start with a cheap training (seeded random image features, 2 epochs): every
#: cell, plot and the save/load round trip are exercised; whether the model learns is checked in the fast set
#: by tests/test_train.py and here, on the tutorial exactly as published, by the ``slow`` variant.
CHEAP_TRAINING = {"feature_encoder": "dummy", "max_epochs": 2}


@pytest.mark.parametrize(
    "cheap", [pytest.param(True, id="cheap_training"), pytest.param(False, id="as_published", marks=pytest.mark.slow)]
)
def test_quickstart_notebook_executes(tmp_path, cheap):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(TUTORIALS / "quickstart.ipynb", as_version=4)
    if cheap:  # after the imports: every later `dkan.tl.train(...)` call gets the cheap settings
        patch = f"import functools\ndkan.tl.train = functools.partial(dkan.tl.train, **{CHEAP_TRAINING!r})"
        nb.cells.insert(_first_code_cell(nb) + 1, nbformat.v4.new_code_cell(patch))
    # Record the kernel's interpreter, so a kernel of another environment cannot pass silently.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL-PREFIX', sys.prefix)"))
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    text = "\n".join(_outputs_text(c) for c in nb.cells if c.cell_type == "code")
    prefix = re.search(r"KERNEL-PREFIX (\S+)", text)
    assert prefix is not None and Path(prefix.group(1)).resolve() == Path(sys.prefix).resolve()

    pcc = re.search(r"Held-out slide s3: PCC-ALL = (-?[0-9.]+)", text)
    assert pcc is not None, "the summary line of the evaluation is missing"
    if not cheap:
        assert float(pcc.group(1)) > 0.2, f"held-out PCC {pcc.group(1)} is not clearly positive"
    assert "loaded model predicts the same: True" in text

    images = [o for c in nb.cells for o in c.get("outputs", []) if IMAGE_TYPES & set(o.get("data", {}))]
    assert len(images) >= 4, (
        f"expected the training history, spatial_pred, spatialdata-plot and squidpy figures, got {len(images)}"
    )


def _first_code_cell(nb) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")


@pytest.mark.parametrize("name", ["quickstart", "her2st", "he_only"])
def test_tutorial_notebooks_are_valid_and_stored_with_outputs(name):
    """Every tutorial is a valid notebook committed with its outputs (the docs render them) and no errors."""
    import nbformat

    nb = nbformat.read(TUTORIALS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and nb.metadata["kernelspec"]["name"] == "python3"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert all(c.get("execution_count") for c in code), f"{name}.ipynb has cells that were not run"
    assert any(IMAGE_TYPES & set(o.get("data", {})) for c in code for o in c.get("outputs", []))
