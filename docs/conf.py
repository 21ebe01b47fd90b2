"""Sphinx configuration for dkan."""

from __future__ import annotations

import dkan

project = "dkan"
author = "dkan developers"
copyright = "2026, dkan developers"  # noqa: A001
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
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
typehints_document_rtype = False
always_document_param_types = False
myst_enable_extensions = ["colon_fence", "dollarmath"]
nb_execution_mode = "off"  # tutorials are executed by the test suite; docs render stored outputs
exclude_patterns = ["_build", "**.ipynb_checkpoints", "generated/*.inc"]
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
}
intersphinx_disabled_reftypes = ["*"]
html_theme = "sphinx_book_theme"
html_title = "dkan"
nitpicky = False
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header", "autosummary.import_cycle"]
