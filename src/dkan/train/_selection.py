"""Model selection: a smoothed validation score on a chosen metric, early stopping, and the record of the choice."""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from dkan._config import DKANConfig

logger = logging.getLogger("dkan")


def _raw_score(record: dict[str, Any], metric: str) -> float:
    """Higher-is-better score of one epoch on ``metric``."""
    if metric == "pcc":
        return record["val_pcc"]
    if metric == "mse":
        return -record["val_mse"]
    return 0.5 * (record["val_pcc"] + record["val_r2"])


def smoothed_score(history: list[dict[str, Any]], config: DKANConfig) -> float:
    """Mean score of the last ``val_window`` epochs (NaN-aware; NaN when none is finite)."""
    raw = np.array([_raw_score(r, config.select_metric) for r in history[-config.val_window :]], dtype=float)
    return float(np.nanmean(raw)) if np.isfinite(raw).any() else float("nan")


def update_best(module: nn.Module, result: Any, record: dict, epoch: int, bad: int, config: DKANConfig) -> int:
    """Snapshot the weights when the smoothed score improves; return the number of epochs without improvement."""
    first = min(config.val_window, config.max_epochs) - 1  # the first epoch with a full window
    if epoch < first:
        return 0
    score = record["val_score"]
    if np.isfinite(score) and (result.best_state is None or score > result.best_score):
        result.best_score = score
        result.best_epoch = epoch
        result.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in module.state_dict().items()})
        return 0
    return bad + 1


def should_stop(bad: int, epoch: int, config: DKANConfig) -> bool:
    """Whether training stops after ``epoch``: ``config.patience`` epochs in a row without improvement.

    As in Lightning's ``EarlyStopping``: ``patience=2`` stops at the second epoch without improvement (``0`` at the
    first one); never before ``config.min_epochs`` epochs have run.
    """
    return bad > 0 and bad >= config.patience and epoch + 1 >= config.min_epochs


def finish_selection(result: Any, config: DKANConfig, *, has_val: bool, stopped: int | None) -> None:
    """Mark the chosen epoch in the history and say in ``result.selection`` which it is and why."""
    last = int(result.history[-1]["epoch"]) if result.history else -1
    end = (
        f"early stopping at epoch {stopped} ({config.patience} epochs without improvement)"
        if stopped is not None
        else f"ran to max_epochs={config.max_epochs}"
    )
    if not has_val:
        result.best_state, result.best_epoch, result.best_score = None, last, float("nan")
        reason = "no validation data (val_fraction=0): the weights of the last epoch are kept"
    elif result.best_state is None:
        result.best_epoch, result.best_score = last, float("nan")
        reason = f"the validation {config.select_metric} was never finite: the weights of the last epoch are kept"
        logger.warning("Model selection: %s.", reason)
    else:
        span = f"epochs {max(result.best_epoch - config.val_window + 1, 0)}-{result.best_epoch}"
        reason = (
            f"best validation {_METRIC_NAMES[config.select_metric]}"
            + (f", mean over {span}" if config.val_window > 1 else "")
            + f" ({result.best_score:.4g}); weights of epoch {result.best_epoch}"
        )
    for r in result.history:
        r.pop("selected", None)
        if int(r["epoch"]) == result.best_epoch:
            r["selected"] = True
    result.selection = {
        "epoch": result.best_epoch,
        "metric": config.select_metric if has_val else None,
        "score": result.best_score,
        "window": config.val_window,
        "stopped": end,
        "reason": reason,
    }
    logger.info("Model selection: %s; %s.", reason, end)


_METRIC_NAMES = {"pcc": "mean PCC", "mse": "MSE (as -MSE)", "both": "(PCC + R2) / 2"}
