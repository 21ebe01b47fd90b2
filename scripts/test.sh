#!/usr/bin/env bash
# The project's test command: lint, the test suite (incl. the quick-start notebook), the docs build.
set -euo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check src tests benchmarks docs
ruff format --check src tests benchmarks
lint-imports  # import layers, see docs/architecture.md and [tool.importlinter] in pyproject.toml
pytest -q -m "not gpu and not slow" --durations=20
sphinx-build -W --keep-going -b html -q docs docs/_build/html
