"""The training loop: Adam + StepLR, AMP on CUDA, gradient clipping, early stopping, resumable checkpoints, DDP."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dkan._config import DKANConfig
from dkan.train._checkpoint import load_checkpoint, run_identity, save_checkpoint
from dkan.train._selection import finish_selection, should_stop, smoothed_score, update_best
from dkan.train.data import MIN_VAL_SPOTS, SampleInputs, batch_inputs, plan_batches

logger = logging.getLogger("dkan")

#: ``read_patches(sample, rows, augment) -> (B, 3, P, P)`` float tensor of normalised patch crops.
PatchReader = Callable[[int, np.ndarray, bool], Tensor]


class NonFiniteLossError(FloatingPointError, ValueError):
    """A training loss or weight became ``inf`` or ``NaN``; training stops and the last good checkpoint is kept."""


@dataclass
class FitResult:
    """What :func:`fit` returns: the per-epoch history, the selected weights and why they were selected.

    ``best_state`` is ``None`` when the weights of the last epoch are kept (no validation data, or no finite
    validation score); ``selection`` says which epoch was chosen, on which score and why.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    best_state: dict[str, Tensor] | None = None
    best_epoch: int = -1
    best_score: float = -np.inf
    selection: dict[str, Any] = field(default_factory=dict)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def fit(
    module: nn.Module,
    samples: list[SampleInputs],
    train_rows: list[np.ndarray],
    val_rows: list[np.ndarray],
    genes: Tensor | None,
    config: DKANConfig,
    *,
    device: torch.device,
    read_patches: PatchReader | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    accumulate: int = 1,
    identity: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``module`` on batches of one sample each and keep the weights of the best validation epoch.

    The epoch is chosen on ``config.select_metric`` averaged over the last ``config.val_window`` epochs; early
    stopping waits ``config.patience`` epochs without improvement, never before ``config.min_epochs``. Without
    validation rows (``val_fraction=0``) the run lasts ``max_epochs`` and the last epoch's weights are kept.

    Parameters
    ----------
    module
        The DKAN network (already on ``device``).
    samples
        Inputs of every training sample (on ``device``).
    train_rows, val_rows
        Per sample, the rows used for gradient steps and for early stopping / checkpoint choice.
    genes
        Gene embeddings ``(G, Dt)`` on ``device`` (``None`` when ``use_text`` is off).
    config
        Optimisation settings (lr, epochs, patience, StepLR, clipping, AMP, seed, model selection).
    device
        Where the computation runs.
    read_patches
        Reader of augmented patch crops when the patch trunk is trainable; ``None`` uses frozen spot features.
    progress
        Show a progress bar.
    checkpoint
        File to write a resumable checkpoint to after every epoch (atomically).
    resume
        Continue from ``checkpoint`` when it exists; a checkpoint of other data or settings is refused.
    accumulate
        Batches whose gradients are averaged per optimiser step (one process). Under DDP every rank takes one
        batch per step and gradients are averaged across ranks, which equals ``accumulate=world_size`` here.
    identity
        Extra facts the checkpoint must match on resume (e.g. ``{"genes": [...]}``).

    Returns
    -------
    The history, the selected state and the selection record.

    Raises
    ------
    NonFiniteLossError
        When a loss or weight becomes non-finite (the checkpoint of the last good epoch stays on disk).
    ValueError
        When there are no training rows, when ``val_fraction > 0`` but no sample has enough validation rows, or
        when resuming from a checkpoint of other data or settings.
    """
    from tqdm.auto import tqdm

    from dkan.nn.losses import DKANLoss

    has_val = _check_rows(train_rows, val_rows, config)
    loss_fn = DKANLoss.from_config(config)
    ident = {**run_identity(module, samples, genes, config), **(identity or {})}

    rank, world = _dist()
    torch.manual_seed(config.seed + rank)
    net = module
    if world > 1:
        net = nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)
    opt = torch.optim.Adam(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    opt.zero_grad(set_to_none=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_size, gamma=config.gamma)
    use_scaler = device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    result, start, bad = FitResult(), 0, 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if resume and ckpt is not None and ckpt.is_file():
        start, bad = load_checkpoint(ckpt, module, opt, sched, result, ident)
        logger.info("Resumed training from %s at epoch %d.", ckpt, start)

    bar = tqdm(range(start, config.max_epochs), desc="dkan train", disable=not progress or rank != 0, unit="epoch")
    stopped = None
    for epoch in bar:
        module.train()
        plan = plan_batches(train_rows, config.batch_size, seed=config.seed, epoch=epoch, rank=rank, world_size=world)
        if accumulate > 1:
            plan = plan[: len(plan) - len(plan) % accumulate]
        sums: dict[str, Tensor] = {}
        for i, (s, rows) in enumerate(plan):
            patch = read_patches(s, rows, True).to(device, non_blocking=True) if read_patches else None
            batch = batch_inputs(samples[s], torch.as_tensor(rows, device=device), genes, patch=patch)
            with _autocast(device, config.amp):
                out = net(batch)
            loss = loss_fn(_full_precision(out), batch["target"].float())  # targets never rounded to bf16/fp16
            scaler.scale(loss["loss"] / accumulate).backward()
            if (i + 1) % accumulate == 0:
                _step(module, opt, scaler, config.grad_clip)
            for k, v in loss.items():  # summed on the device; one sync per epoch
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        sched.step()
        n_steps = max(len(plan), 1)
        record: dict[str, Any] = {("total" if k == "loss" else k): float(v) / n_steps for k, v in sums.items()}
        _check_finite(module, record, epoch, ckpt, config)
        record["epoch"] = epoch
        if has_val:
            record.update(validation_metrics(module, samples, val_rows, genes, config, device, read_patches))
            record["val_score"] = smoothed_score([*result.history, record], config)
        result.history.append(record)
        bad = update_best(module, result, record, epoch, bad, config) if has_val else 0
        bar.set_postfix(
            {k: f"{record[k]:.3g}" for k in ("total", "sup", "con", "w_sup", "w_con", "val_pcc") if k in record}
        )
        if ckpt is not None and rank == 0:
            save_checkpoint(ckpt, module, opt, sched, result, epoch + 1, bad, ident)
        if has_val and should_stop(bad, epoch, config):
            stopped = epoch
            logger.info(
                "Early stopping at epoch %d (best epoch %d, smoothed validation %s %.4f).",
                epoch, result.best_epoch, config.select_metric, result.best_score,
            )  # fmt: skip
            break
    finish_selection(result, config, has_val=has_val, stopped=stopped)
    return result


def _full_precision(out: dict[str, Tensor]) -> dict[str, Tensor]:
    """Model outputs in float32 at least, so that the loss is computed in full precision under autocast."""
    return {k: v.float() if torch.is_floating_point(v) and v.dtype != torch.float64 else v for k, v in out.items()}


def _check_rows(train_rows: list[np.ndarray], val_rows: list[np.ndarray], config: DKANConfig) -> bool:
    """Refuse splits that cannot train or cannot select; return whether there is validation data to select on."""
    if not sum(len(r) for r in train_rows):
        raise ValueError(
            "No training spots are left after holding out validation data; lower `val_fraction` "
            f"(now {config.val_fraction}) or pass more samples."
        )
    n_val = [len(r) for r in val_rows]
    if config.val_fraction <= 0 or not sum(n_val):
        if config.val_fraction > 0:
            raise ValueError(
                f"`val_fraction={config.val_fraction}` left no validation spots; raise it, or pass "
                "`val_fraction=0` to train for `max_epochs` and keep the last epoch."
            )
        logger.warning(
            "No validation data (val_fraction=0): training runs all %d epochs without early stopping and keeps "
            "the weights of the last epoch.",
            config.max_epochs,
        )
        return False
    if max(n_val) < MIN_VAL_SPOTS:
        raise ValueError(
            f"Too few validation spots to select a model: {n_val} per sample, and a per-gene Pearson r needs at "
            f"least {MIN_VAL_SPOTS} in one sample. Raise `val_fraction` (now {config.val_fraction}), use "
            "`val_split='sections'` with several samples, or pass `val_fraction=0` to train for `max_epochs` and "
            "keep the last epoch."
        )
    if sum(n_val) < 30:
        logger.warning("Model selection rests on %d validation spots only; its score will be noisy.", sum(n_val))
    return True


def _check_finite(module: nn.Module, record: dict[str, Any], epoch: int, ckpt: Path | None, config: DKANConfig) -> None:
    """Stop with :class:`NonFiniteLossError` when an epoch's loss or the weights are not finite."""
    bad = {k: v for k, v in record.items() if not np.isfinite(v)}
    weights_ok = bool(torch.stack([p.detach().isfinite().all() for p in module.parameters()]).all())
    if not bad and weights_ok:
        return
    what = ", ".join(f"`{k}`={v}" for k, v in bad.items()) if bad else "the weights"
    if ckpt is None:
        kept = " No checkpoint was requested (`checkpoint=` keeps one per good epoch)."
    elif ckpt.is_file() and epoch > 0:
        kept = f" The checkpoint of the last good epoch is kept at {str(ckpt)!r}."
    else:
        kept = " No checkpoint of an earlier epoch exists."
    raise NonFiniteLossError(
        f"Training stopped at epoch {epoch}: {what} became non-finite (losses are means over the epoch's steps)."
        f"{kept} Lower `lr` (now {config.lr}), set `grad_clip` (now {config.grad_clip}) or check the inputs for "
        "extreme values."
    )


def _step(module: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip: float | None) -> None:
    if clip is not None:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(module.parameters(), clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


@torch.inference_mode()
def predict_rows(
    module: nn.Module,
    sample: SampleInputs,
    rows: np.ndarray,
    genes: Tensor | None,
    *,
    batch_size: int,
    device: torch.device,
    amp: bool = True,
    read_patches: Callable[[np.ndarray], Tensor] | None = None,
) -> np.ndarray:
    """Predictions ``(len(rows), G)`` for rows of one sample; the slide encoder runs once."""
    was_training = module.training
    module.eval()
    try:
        with _autocast(device, amp):
            tokens = module.encode_slide(sample.spot, sample.grid) if module.config.use_slide else None
            outs = []
            for start in range(0, len(rows), batch_size):
                r = rows[start : start + batch_size]
                patch = read_patches(r).to(device) if read_patches is not None else None
                batch = batch_inputs(sample, torch.as_tensor(r, device=device), genes, patch=patch, slide_tokens=tokens)
                batch.pop("target", None)
                outs.append(module(batch)["pred"].float().cpu())
    finally:
        module.train(was_training)
    n_genes = module.n_genes
    return torch.cat(outs).numpy() if outs else np.zeros((0, n_genes), dtype=np.float32)


@torch.no_grad()
def start_at_mean(
    module: nn.Module,
    samples: list[SampleInputs],
    train_rows: list[np.ndarray],
    genes: Tensor | None,
    target_mean: Tensor,
    config: DKANConfig,
    device: torch.device,
    read_patches: PatchReader | None = None,
    max_rows: int = 2048,
) -> None:
    """Shift the per-gene output bias so that the untrained network's mean prediction is ``target_mean``.

    The randomly initialised output layer shared by all genes gives each gene an offset that the per-gene bias
    (set to the training mean by :meth:`~dkan.nn.network.DKAN.init_from_data`) does not cancel. One forward pass in
    eval mode over up to ``max_rows`` evenly spaced training rows per sample measures the mean prediction per gene;
    the per-gene bias is lowered by its difference from ``target_mean`` (exactly the mean over those rows; in
    float32, without autocast). A no-op for ``gene_output="shared"``.
    """
    if not hasattr(module, "gene_bias") or not hasattr(module, "shift_output"):
        return
    total, count = torch.zeros(module.n_genes, dtype=torch.float64), 0
    for s, rows in enumerate(train_rows):
        rows = np.asarray(rows)
        if len(rows) > max_rows:
            rows = rows[np.linspace(0, len(rows) - 1, max_rows).round().astype(np.int64)]
        if not len(rows):
            continue
        reader = (lambda r, s=s: read_patches(s, r, False)) if read_patches else None
        pred = predict_rows(
            module, samples[s], rows, genes, batch_size=config.batch_size, device=device, amp=False, read_patches=reader
        )
        total += torch.from_numpy(pred).double().sum(0)
        count += len(rows)
    if count:
        module.shift_output((total / count).float() - torch.as_tensor(target_mean, dtype=torch.float32).cpu())


def validation_metrics(
    module: nn.Module,
    samples: list[SampleInputs],
    val_rows: list[np.ndarray],
    genes: Tensor | None,
    config: DKANConfig,
    device: torch.device,
    read_patches: PatchReader | None = None,
) -> dict[str, float]:
    """Validation scores of the current weights.

    ``val_pcc``: mean over (sample, gene) of the Pearson r on the validation rows (the reference's ``R``);
    ``val_mse``: mean squared error over all validation spots and genes; ``val_r2``: mean over (sample, gene) of
    ``1 - MSE / variance`` of the target. Samples with fewer than :data:`MIN_VAL_SPOTS` validation rows are skipped;
    NaN when no value is defined.
    """
    from dkan._metrics import pearson_per_gene

    rs, r2s, sq, n = [], [], 0.0, 0
    for s, rows in enumerate(val_rows):
        if len(rows) < MIN_VAL_SPOTS:
            continue
        reader = (lambda r, s=s: read_patches(s, r, False)) if read_patches else None
        pred = predict_rows(
            module,
            samples[s],
            rows,
            genes,
            batch_size=config.batch_size,
            device=device,
            amp=config.amp,
            read_patches=reader,
        ).astype(np.float64)
        target = samples[s].target[torch.as_tensor(rows, device=samples[s].target.device)].double().cpu().numpy()
        r = pearson_per_gene(pred, target)
        rs.append(r[0] if isinstance(r, tuple) else r)
        err = ((pred - target) ** 2).mean(axis=0)
        var = target.var(axis=0)
        r2s.append(np.where(var > 0, 1.0 - err / np.where(var > 0, var, 1.0), np.nan))
        sq, n = sq + float(err.sum()) * len(rows), n + target.size
    return {"val_pcc": _nanmean(rs), "val_mse": sq / n if n else float("nan"), "val_r2": _nanmean(r2s)}


def _nanmean(parts: list[np.ndarray]) -> float:
    if not parts:
        return float("nan")
    values = np.concatenate(parts)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
