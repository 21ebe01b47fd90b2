"""Sphinx configuration for dkan.

At build time this file copies the notebooks of ``tutorials/`` into ``docs/_tutorials/`` (git-ignored; myst-nb
renders their stored outputs, nothing is executed) and writes the ``--help`` text of the command line into
``docs/_generated/`` so that the CLI page always matches the code.
"""

from __future__ import annotations

import io
import os
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import dkan

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

project = "dkan"
author = "dkan developers"
copyright = "2026, dkan developers"
version = release = dkan.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
]
autosummary_generate = True
templates_path = ["_templates"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
typehints_document_rtype = False
always_document_param_types = False
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the quick start is executed by the test suite; docs render stored outputs
exclude_patterns = ["_build", "**.ipynb_checkpoints", "generated/*.inc"]
# Links into the documentation of the libraries dkan's signatures name. The inventories are fetched over the
# network; an unreachable one is a warning, and `-W` turns it into a failed build. So they are used on Read the
# Docs (online) and when DKAN_DOCS_INTERSPHINX=1; offline builds (the test command, laptops) skip them and
# render those types as plain text instead of links.
_INTERSPHINX = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/docs/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
}
_ONLINE = bool(os.environ.get("READTHEDOCS") or os.environ.get("DKAN_DOCS_INTERSPHINX"))
intersphinx_mapping = _INTERSPHINX if _ONLINE else {}
html_theme = "sphinx_book_theme"
html_title = "dkan"
nitpicky = False
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header", "autosummary.import_cycle"]


def _copy_tutorials() -> None:
    """Copy ``tutorials/*.ipynb`` into ``docs/_tutorials`` (replacing stale copies)."""
    target = DOCS / "_tutorials"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    for nb in sorted((ROOT / "tutorials").glob("*.ipynb")):
        shutil.copy2(nb, target / nb.name)


def _write_cli_help() -> None:
    """Write ``dkan --help``, ``dkan train --help`` and ``dkan predict --help`` into ``docs/_generated``."""
    from dkan.cli import build_parser

    target = DOCS / "_generated"
    target.mkdir(exist_ok=True)
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps help to $COLUMNS; fix it so the page does not depend on a terminal
    try:
        for name, argv in {"cli_main": [], "cli_train": ["train"], "cli_predict": ["predict"]}.items():
            buf = io.StringIO()
            with redirect_stdout(buf):
                try:
                    build_parser().parse_args([*argv, "--help"])
                except SystemExit:
                    pass
            (target / f"{name}.txt").write_text(buf.getvalue())
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


_copy_tutorials()
_write_cli_help()
