"""Inputs of the inner-protocol candidates that change the model's inputs (``inner_candidates.py``).

``stain``: offline stain augmentation. The ``small`` preset's image encoder is frozen, so colour augmentation
cannot act on the pixels of each training step; it acts once, before feature extraction. Every her2st section gets
a recoloured copy: in optical density (``OD = -log((I + 1) / 256)`` per RGB channel) each channel is scaled by a
factor drawn from ``U(1 - SCALE, 1 + SCALE)`` and shifted by one from ``U(-SHIFT, SHIFT)``, one draw per section (a
stain-intensity change of the whole slide, as between staining batches). The copies' features are extracted by the
same pipeline as the originals (their own cache file); a candidate then trains on the inner-training sections and
their copies, with the same targets. A copy trains on its original's training rows only (the copy of the section that
training holds out for early stopping is left out), so the selection data stays unseen.

``native``: the spot and region features of native-resolution crops (``patch_size`` 224 at the images' own
~0.73 um/px, the reference's patches; :data:`NATIVE`) instead of ``small``'s 64 px at 2 um/px, same encoder.

``trainable``: the crop reader of the trainable patch trunk (:func:`patch_reader`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

SCALE = 0.15  #: optical-density scale jitter per channel, +-
SHIFT = 0.05  #: optical-density shift jitter per channel, +-
SEED = 7  #: seed of the jitter draws (one per section, in the order of the sections)
NATIVE = {"patch_size": 224, "target_mpp": None}  #: the crops of the ``native`` features (the reference's)


def od_jitter(image: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """A ``(c, y, x)`` uint8 image with its per-channel optical density scaled and shifted (float, 0-255 scale)."""
    od = -np.log((image.astype(np.float32) + 1.0) / 256.0)
    return 256.0 * np.exp(-(od * scale[:, None, None] + shift[:, None, None])) - 1.0


def inputs_env(args: Any, env: dict[str, Any], kind: str, build_env: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """``build_env`` of the ``stain`` copies or of the ``native`` features (their cache beside ``--cache``)."""
    from accuracy_her2st import load_prepared

    cfg = env["cfg"].replace(**NATIVE) if kind == "native" else env["cfg"]
    cache = input_cache(args.data, args.cache.with_name(f"{args.cache.stem}_{kind}.h5ad"), cfg, kind)
    sdata, key, _, desc, _ = load_prepared(args.data, cache, cfg.n_genes)
    other = build_env(sdata, key, desc, cfg)
    if [s.name for s in other["samples"]] != [s.name for s in env["samples"]]:
        raise SystemExit(f"The {kind} sections are not the original ones in the same order.")
    return other


def input_cache(data: Path, cache: Path, cfg: Any, kind: str) -> Path:
    """Build (when absent) the prepared-input cache of the recoloured sections or of ``cfg``'s crops."""
    if cache.is_file():
        return cache
    from accuracy_her2st import gene_descriptions, prepare_inputs
    from novelty_her2st import recolour

    import dkan

    sdata = dkan.datasets.her2st(data / "her2st", progress=False)
    if kind == "stain":
        rng = np.random.default_rng(SEED)

        def jitter(image: np.ndarray) -> np.ndarray:
            return od_jitter(image, rng.uniform(1 - SCALE, 1 + SCALE, 3), rng.uniform(-SHIFT, SHIFT, 3))

        recolour(sdata, jitter)
    desc = gene_descriptions(sdata, data, cfg.n_genes)
    prepare_inputs(sdata, cfg, desc, "cpu", cache, progress=False, shared_tiles=False)
    return cache


def patch_reader(env: dict[str, Any], cfg: Any) -> Any:
    """The crop reader of the trainable patch trunk over the sections of ``env`` (in its sample order)."""
    from dkan._data.inputs import build_inputs

    _, reader = build_inputs(env["sdatas"], env["genes"], cfg, table_key=env["key"], with_target=False)
    return reader


@contextmanager
def split_with_copies(n_originals: int) -> Iterator[None]:
    """Make training's validation split on the first ``n_originals`` samples only; the rest are their copies.

    A copy trains on exactly its original's training rows: never on a validation row (nor a block split's buffer),
    so with a held-out section its copy is left out entirely.
    """
    import dkan.train.data as data

    own = data.make_validation_split

    def split(names: list[str], grids: list[np.ndarray], fraction: float, *, strategy: str, seed: int) -> Any:
        n = n_originals
        base = own(names[:n], grids[:n], fraction, strategy=strategy, seed=seed)
        if [len(g) for g in grids[n:]] != [len(g) for g in grids[:n]]:
            raise ValueError("split_with_copies: the samples after the originals must be their copies, in order.")
        none = np.zeros(0, dtype=np.int64)
        return data.ValidationSplit(
            base.train + [r.copy() for r in base.train], base.val + [none] * n, base.strategy,
            f"{base.description}; recoloured copies of the training rows train too", base.n_buffer,
        )  # fmt: skip

    data.make_validation_split = split
    try:
        yield
    finally:
        data.make_validation_split = own
