"""The training loop: Adam + StepLR, AMP on CUDA, gradient clipping, early stopping, resumable checkpoints, DDP."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dkan.train.config import DKANConfig
from dkan.train.data import SampleInputs, batch_inputs, plan_batches

logger = logging.getLogger("dkan")

#: ``read_patches(sample, rows, augment) -> (B, 3, P, P)`` float tensor of normalised patch crops.
PatchReader = Callable[[int, np.ndarray, bool], Tensor]


@dataclass
class FitResult:
    """What :func:`fit` returns: the per-epoch history and the best weights on the validation rows."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, Tensor] | None = None
    best_epoch: int = -1
    best_score: float = -np.inf


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
) -> FitResult:
    """Train ``module`` on batches of one sample each and keep the weights with the best validation PCC.

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
        Optimisation settings (lr, epochs, patience, StepLR, clipping, AMP, seed).
    device
        Where the computation runs.
    read_patches
        Reader of augmented patch crops when the patch trunk is trainable; ``None`` uses frozen spot features.
    progress
        Show a progress bar.
    checkpoint
        File to write a resumable checkpoint to after every epoch (atomically).
    resume
        Continue from ``checkpoint`` when it exists.
    accumulate
        Batches whose gradients are averaged per optimiser step (one process). Under DDP every rank takes one
        batch per step and gradients are averaged across ranks, which equals ``accumulate=world_size`` here.

    Returns
    -------
    The history and the best state.
    """
    from tqdm.auto import tqdm

    from dkan.nn.losses import DKANLoss

    loss_fn = DKANLoss.from_config(config)

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
        start, bad = _load_checkpoint(ckpt, module, opt, sched, result)
        logger.info("Resumed training from %s at epoch %d.", ckpt, start)

    bar = tqdm(range(start, config.max_epochs), desc="dkan train", disable=not progress or rank != 0, unit="epoch")
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
                loss = loss_fn(out, batch["target"])
            scaler.scale(loss["loss"] / accumulate).backward()
            if (i + 1) % accumulate == 0:
                _step(module, opt, scaler, config.grad_clip)
            for k, v in loss.items():  # summed on the device; one sync per epoch
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        sched.step()
        record = {("total" if k == "loss" else k): float(v) / max(len(plan), 1) for k, v in sums.items()}
        record["epoch"] = epoch
        record["val_pcc"] = validation_score(module, samples, val_rows, genes, config, device, read_patches)
        result.history.append(record)
        bad = _update_best(module, result, record, epoch, bad)
        bar.set_postfix(
            {k: f"{record[k]:.3g}" for k in ("total", "sup", "con", "w_sup", "w_con", "val_pcc") if k in record}
        )
        if ckpt is not None and rank == 0:
            _save_checkpoint(ckpt, module, opt, sched, result, epoch + 1, bad)
        if bad > config.patience:
            logger.info(
                "Early stopping at epoch %d (best epoch %d, val PCC %.4f).", epoch, result.best_epoch, result.best_score
            )
            break
    return result


def _step(module: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip: float | None) -> None:
    if clip is not None:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(module.parameters(), clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def _update_best(module: nn.Module, result: FitResult, record: dict, epoch: int, bad: int) -> int:
    score = record["val_pcc"]
    if result.best_state is None or (np.isfinite(score) and score > result.best_score):
        result.best_score = score if np.isfinite(score) else -np.inf
        result.best_epoch = epoch
        result.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in module.state_dict().items()})
        return 0
    return bad + 1


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


def validation_score(
    module: nn.Module,
    samples: list[SampleInputs],
    val_rows: list[np.ndarray],
    genes: Tensor | None,
    config: DKANConfig,
    device: torch.device,
    read_patches: PatchReader | None = None,
) -> float:
    """Mean over (sample, gene) of the Pearson r on the validation rows (the reference's ``R``)."""
    from dkan.tl._metrics import pearson_per_gene

    rs = []
    for s, rows in enumerate(val_rows):
        if len(rows) < 3:
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
        )
        target = samples[s].target[torch.as_tensor(rows, device=samples[s].target.device)].float().cpu().numpy()
        r = pearson_per_gene(pred, target)
        rs.append(r[0] if isinstance(r, tuple) else r)
    if not rs:
        return float("nan")
    allr = np.concatenate(rs)
    return float(np.nanmean(allr)) if np.isfinite(allr).any() else float("nan")


def _save_checkpoint(path: Path, module, opt, sched, result: FitResult, epoch: int, bad: int) -> None:
    state: dict[str, Any] = {
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


def _load_checkpoint(path: Path, module, opt, sched, result: FitResult) -> tuple[int, int]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["module"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    result.history = list(state["history"])
    result.best_state = state["best_state"]
    result.best_epoch = int(state["best_epoch"])
    result.best_score = float(state["best_score"])
    return int(state["epoch"]), int(state["bad_epochs"])
