"""In-memory training inputs per sample and the batch plan (every batch comes from one sample)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class SampleInputs:
    """Model inputs of one sample, as tensors.

    ``spot`` holds the frozen features of every spot (the slide encoder's input and, when the patch trunk is
    frozen, the single patch token); ``region``/``mask`` the 5x5 region features; ``grid`` the spot-grid
    positions; ``target`` the normalised expression of the panel genes (``None`` at prediction time).

    Region features come in one of two layouts: spot by spot, ``region`` is ``(n, G*G, D)``; shared tiles,
    ``region`` is ``(n_tiles, D)`` (one row per grid tile) and ``region_index`` ``(n, G*G)`` int64 the row of each
    region tile (-1: outside the image), gathered per batch by :func:`batch_inputs`.
    """

    name: str
    spot: Tensor
    region: Tensor | None
    mask: Tensor | None
    grid: Tensor
    target: Tensor | None = None
    crop_offset: int = 0  #: index of the sample's first spot in the crop dataset
    region_index: Tensor | None = None  #: shared tiles: row of ``region`` per region tile, -1 = none
    colour: np.ndarray | None = None  #: each spot patch's mean optical density per channel ``(n, 3)``; stays on CPU

    def __len__(self) -> int:
        return self.spot.shape[0]

    def to(self, device: torch.device | str) -> SampleInputs:
        """Copy of the inputs on ``device``."""

        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return SampleInputs(
            self.name,
            mv(self.spot),
            mv(self.region),
            mv(self.mask),
            mv(self.grid),
            mv(self.target),
            self.crop_offset,
            mv(self.region_index),
            self.colour,
        )


def batch_inputs(
    sample: SampleInputs,
    rows: Tensor,
    genes: Tensor | None,
    *,
    patch: Tensor | None = None,
    slide_tokens: Tensor | None = None,
) -> dict[str, Tensor]:
    """The model's batch dict for ``rows`` of one sample."""
    batch: dict[str, Tensor] = {"slide_index": rows, "grid": sample.grid, "slide": sample.spot}
    if genes is not None:
        batch["genes"] = genes
    if sample.region is not None:
        batch["region"] = region_rows(sample, rows)
        batch["region_mask"] = sample.mask[rows]
    if slide_tokens is not None:
        batch["slide_tokens"] = slide_tokens
    if patch is None:
        batch["patch_tokens"] = sample.spot[rows][:, None, :]
    else:
        batch["patch"] = patch
    if sample.target is not None:
        batch["target"] = sample.target[rows]
    return batch


def region_rows(sample: SampleInputs, rows: Tensor) -> Tensor:
    """Region features ``(B, G*G, D)`` of ``rows``, gathered from the shared tiles when the sample has them.

    Region tiles with index -1 get zeros, as spot-by-spot features do where the mask is 0.
    """
    if sample.region_index is None:
        return sample.region[rows]
    index = sample.region_index[rows]
    out = sample.region[index.clamp(min=0)]
    return out.masked_fill_((index < 0).unsqueeze(-1), 0.0)


def plan_batches(
    rows_per_sample: list[np.ndarray],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[tuple[int, np.ndarray]]:
    """Shuffled batches ``(sample, rows)``; each batch holds spots of one sample only.

    Grouping by sample means the slide encoder runs once per step on one sample, instead of once per distinct
    sample present in a random batch (the reference's strategy). With ``world_size > 1`` every rank gets the
    same number of batches (the plan is truncated to a multiple of ``world_size``) in a disjoint share.
    """
    rng = np.random.default_rng([seed, epoch])
    plan = []
    for s, rows in enumerate(rows_per_sample):
        rows = rng.permutation(rows)
        n_batches = max(1, int(np.ceil(len(rows) / batch_size)))
        plan.extend((s, chunk) for chunk in np.array_split(rows, n_batches) if len(chunk))
    order = rng.permutation(len(plan))
    plan = [plan[i] for i in order]
    usable = len(plan) - len(plan) % world_size if world_size > 1 else len(plan)
    return plan[rank:usable:world_size]


def split_validation(n_rows: list[int], fraction: float, *, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random train/validation rows within each training sample (the test samples are never touched)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for n in n_rows:
        perm = rng.permutation(n)
        k = round(n * fraction) if fraction > 0 else 0
        k = min(k, n - 1)
        val.append(np.sort(perm[:k]))
        train.append(np.sort(perm[k:]))
    return train, val


#: Chebyshev grid distance within which a training spot would share counts with a validation spot through the
#: 3x3 (square) or hexagonal neighbour smoothing of the targets: each target mixes spots within one step.
BUFFER_STEPS = 2
#: validation spots of one sample below which its Pearson r per gene is undefined; such samples are not scored
MIN_VAL_SPOTS = 3


@dataclass
class ValidationSplit:
    """Per sample, the rows used for gradient steps and those used for model selection, and how they were chosen."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    strategy: str  #: "sections", "blocks", "random" or "none"
    description: str  #: one phrase for logs and the model's selection record
    n_buffer: int = 0  #: spots left out of both (blocks: too close to a validation spot)


def make_validation_split(
    names: list[str], grids: list[np.ndarray], fraction: float, *, strategy: str, seed: int
) -> ValidationSplit:
    """Hold validation data out of the training samples (never the test samples).

    Parameters
    ----------
    names
        Sample names.
    grids
        Per sample, the ``(n, 2)`` integer grid positions of its spots.
    fraction
        Share of the data to hold out (``0``: none).
    strategy
        ``"sections"``, ``"blocks"``, ``"random"`` or ``"auto"`` (see :class:`~dkan._config.DKANConfig`).
    seed
        Random seed.

    Returns
    -------
    The split.
    """
    sizes = [len(g) for g in grids]
    if fraction <= 0:
        empty = [np.zeros(0, dtype=np.int64) for _ in sizes]
        return ValidationSplit([np.arange(n) for n in sizes], empty, "none", "no validation data (val_fraction=0)")
    if strategy == "auto":
        strategy = "sections" if len(sizes) >= 3 else "blocks"
    if strategy == "sections":
        return _section_split(names, sizes, fraction, seed=seed)
    if strategy == "blocks":
        split = _block_split(grids, fraction, seed=seed)
        if not sum(len(t) for t in split.train):
            raise ValueError(
                f"`val_split='blocks'` leaves no training spots: the samples ({sizes} spots) are too small for "
                f"validation blocks with a {BUFFER_STEPS}-step buffer around them. Use `val_split='random'`, "
                "`val_split='sections'` (with 2 or more samples), a smaller `val_fraction`, or `val_fraction=0`."
            )
        return split
    if strategy == "random":
        train, val = split_validation(sizes, fraction, seed=seed)
        return ValidationSplit(train, val, "random", f"a random {fraction:.0%} of the spots of every training sample")
    raise ValueError(f"Unknown `val_split={strategy!r}`; use 'auto', 'sections', 'blocks' or 'random'.")


def _section_split(names: list[str], sizes: list[int], fraction: float, *, seed: int) -> ValidationSplit:
    if len(sizes) < 2:
        raise ValueError(
            f"`val_split='sections'` needs at least 2 training samples, found {len(sizes)} ({names}); use "
            "`val_split='blocks'` (spatial blocks inside each sample) or train on more samples."
        )
    k = min(max(1, round(fraction * len(sizes))), len(sizes) - 1)
    held = set(np.random.default_rng(seed).permutation(len(sizes))[:k].tolist())
    none = np.zeros(0, dtype=np.int64)
    train = [none if s in held else np.arange(n) for s, n in enumerate(sizes)]
    val = [np.arange(n) if s in held else none for s, n in enumerate(sizes)]
    chosen = [names[s] for s in sorted(held)]
    return ValidationSplit(train, val, "sections", f"held-out training sections {chosen}")


def _block_split(grids: list[np.ndarray], fraction: float, *, seed: int) -> ValidationSplit:
    rng = np.random.default_rng(seed)
    train, val, n_buffer = [], [], 0
    for grid in grids:
        v = _blocks(np.asarray(grid, dtype=np.int64), fraction, rng)
        near = _within(grid, grid[v], BUFFER_STEPS) & ~v
        n_buffer += int(near.sum())
        val.append(np.flatnonzero(v))
        train.append(np.flatnonzero(~v & ~near))
    desc = (
        f"spatial blocks of about {fraction:.0%} of the spots of every training sample, {n_buffer} spot(s) within "
        f"{BUFFER_STEPS} grid steps of them left out of training"
    )
    return ValidationSplit(train, val, "blocks", desc, n_buffer)


def _blocks(grid: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Mask of the spots in randomly chosen square blocks of the grid, about ``fraction`` of them."""
    want = round(len(grid) * fraction)
    if want == 0:
        return np.zeros(len(grid), dtype=bool)
    n_blocks = max(1, want // 50)  # few large blocks: the left-out ring around a block grows with its perimeter
    side = max(1, math.ceil(math.sqrt(want / n_blocks)))
    cell = (grid + rng.integers(0, side, size=2)) // side
    codes = cell[:, 0] * (1 << 32) + cell[:, 1]
    mask = np.zeros(len(grid), dtype=bool)
    for code in rng.permutation(np.unique(codes)):
        mask |= codes == code
        if mask.sum() >= want:
            break
    return mask


def _within(grid: np.ndarray, centres: np.ndarray, steps: int) -> np.ndarray:
    """Mask of the spots within Chebyshev distance ``steps`` of any of ``centres`` on the grid."""
    if not len(centres):
        return np.zeros(len(grid), dtype=bool)
    reach = np.arange(-steps, steps + 1)
    shifted = (centres[:, None, None, :] + np.stack(np.meshgrid(reach, reach, indexing="ij"), -1)).reshape(-1, 2)
    code = (1 << 32) + 1  # grid coordinates are >= 0, shifts >= -steps: keep the codes unique
    return np.isin((grid[:, 0] + steps) * code + grid[:, 1], (shifted[:, 0] + steps) * code + shifted[:, 1])
