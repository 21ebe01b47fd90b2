"""In-memory training inputs per sample and the batch plan (every batch comes from one sample)."""

from __future__ import annotations

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
    """

    name: str
    spot: Tensor
    region: Tensor | None
    mask: Tensor | None
    grid: Tensor
    target: Tensor | None = None
    crop_offset: int = 0  #: index of the sample's first spot in the crop dataset

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
        batch["region"] = sample.region[rows]
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
