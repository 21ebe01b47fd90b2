"""The package version (read by hatch at build time, see ``[tool.hatch.version]`` in pyproject.toml)."""

__version__ = "0.1.0"
