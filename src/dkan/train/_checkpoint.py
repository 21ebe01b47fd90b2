"""Resumable training checkpoints: atomic writes, and a resume refused when data or settings differ."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from dkan._config import DKANConfig
    from dkan.train.data import SampleInputs

#: configuration fields that may change when a run is resumed (they do not change what has been learned so far)
RESUME_FREE = frozenset({"max_epochs", "patience", "min_epochs", "amp", "contrastive_chunk"})


def run_identity(
    module: nn.Module, samples: list[SampleInputs], genes: Tensor | None, config: DKANConfig
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: configuration, model sizes and the training samples."""
    return {
        "config": config.to_dict(),
        "n_genes": int(module.n_genes),
        "gene_dim": None if genes is None else int(genes.shape[1]),
        "feature_dim": int(samples[0].spot.shape[1]) if samples else None,
        "samples": [[s.name, len(s)] for s in samples],
    }


def _identity_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between the identity of a checkpoint and of the current run."""
    out = []
    old_cfg, new_cfg = saved.get("config", {}), current.get("config", {})
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if key not in RESUME_FREE and old_cfg.get(key) != new_cfg.get(key):
            out.append(f"config `{key}`: {old_cfg.get(key)!r} in the checkpoint, {new_cfg.get(key)!r} now")
    for key in sorted((set(saved) | set(current)) - {"config"}):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if isinstance(old, list) and isinstance(new, list):
            first = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
            at = f"first difference at position {first}: {_at(old, first)} vs {_at(new, first)}"
            out.append(f"{key}: {len(old)} in the checkpoint, {len(new)} now ({at})")
        else:
            out.append(f"{key}: {old!r} in the checkpoint, {new!r} now")
    return out


def _at(values: list, i: int) -> str:
    return repr(values[i]) if i < len(values) else "(none)"


def save_checkpoint(path: Path, module, opt, sched, result: Any, epoch: int, bad: int, identity: dict) -> None:
    state: dict[str, Any] = {
        "identity": identity,
        "module": module.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": epoch,
        "bad_epochs": bad,
        "history": result.history,
        "best_state": result.best_state,
        "best_epoch": result.best_epoch,
        "best_score": result.best_score,
        "torch_rng": torch.get_rng_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, module, opt, sched, result: Any, identity: dict) -> tuple[int, int]:
    """Restore a run from ``path`` after checking that it was made on the same data and settings."""
    fresh = "Pass `resume=False` (or another `checkpoint=` file) to start afresh"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated, corrupt or foreign file: torch raises many types
        raise ValueError(
            f"Cannot resume from checkpoint {str(path)!r}: it cannot be read ({type(err).__name__}). {fresh}."
        ) from err
    needed = {"identity", "module", "optimizer", "scheduler", "epoch", "bad_epochs", "history", "torch_rng"}
    if not isinstance(state, dict) or not needed <= set(state):
        missing = sorted(needed - set(state)) if isinstance(state, dict) else "everything"
        raise ValueError(
            f"Cannot resume from {str(path)!r}: not a training checkpoint of this dkan version (missing {missing}). "
            f"{fresh}."
        )
    diffs = _identity_mismatch(state["identity"], identity)
    if diffs:
        raise ValueError(
            f"Cannot resume from checkpoint {str(path)!r}: it was made with other data or settings: "
            f"{'; '.join(diffs[:8])}. {fresh}, or resume with the original data and configuration."
        )
    try:
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"Checkpoint {str(path)!r} does not fit this network ({str(err)[:300]}). {fresh}.") from err
    torch.set_rng_state(state["torch_rng"])
    result.history = list(state["history"])
    result.best_state = state["best_state"]
    result.best_epoch = int(state["best_epoch"])
    result.best_score = float(state["best_score"])
    return int(state["epoch"]), int(state["bad_epochs"])
