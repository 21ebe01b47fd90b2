"""Fit a fresh DKAN network on per-sample inputs (validation split, seeding, best-epoch weights); join DDP."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from dkan._config import DKANConfig

logger = logging.getLogger("dkan")


def fit_inputs(
    samples: list[Any],
    emb: np.ndarray,
    cfg: DKANConfig,
    dev: torch.device,
    *,
    reader: Any = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    genes: list[str] | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Build a network and fit it on per-sample inputs; returns it (selected weights loaded, in eval mode).

    The validation data is held out of ``samples`` as ``cfg.val_split`` says; ``result.selection`` records
    which epoch was chosen, on which data and why. ``genes`` (names) make a resumed checkpoint check the panel.
    """
    import torch

    from dkan.train.data import make_validation_split
    from dkan.train.fitted import build_module
    from dkan.train.loop import fit, start_at_mean

    split = make_validation_split(
        [s.name for s in samples],
        [s.grid.numpy() for s in samples],
        cfg.val_fraction,
        strategy=cfg.val_split,
        seed=cfg.seed,
    )
    train_rows, val_rows = split.train, split.val
    logger.info(
        "Training on %d samples, %d spots, %d genes, on %s; validation: %d spots, %s.",
        len(samples), sum(map(len, train_rows)), emb.shape[0], dev, sum(map(len, val_rows)), split.description,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    module = build_module(cfg, n_genes=emb.shape[0], gene_dim=emb.shape[1], feature_dim=samples[0].spot.shape[1])
    seen = [s.target[torch.as_tensor(r, dtype=torch.long)] for s, r in zip(samples, train_rows, strict=True)]
    target_mean = torch.cat(seen).float().mean(0)  # training mean per gene
    module.init_from_data(genes=torch.as_tensor(emb), target_mean=target_mean)
    module.to(dev)
    samples = [s.to(dev) for s in samples]
    genes_t = torch.as_tensor(emb, device=dev) if cfg.use_text else None
    if not (resume and checkpoint is not None and os.path.isfile(checkpoint)):  # the first prediction is the mean
        start_at_mean(module, samples, train_rows, genes_t, target_mean, cfg, dev, read_patches=reader)
    result = fit(
        module,
        samples,
        train_rows,
        val_rows,
        genes_t,
        cfg,
        device=dev,
        read_patches=reader,
        progress=progress,
        checkpoint=checkpoint,
        resume=resume,
        identity={"genes": list(genes) if genes is not None else None, "validation": split.description},
    )
    result.selection["validation"] = split.description
    if result.best_state is not None:
        module.load_state_dict(result.best_state)
    return module.eval(), result


def init_distributed() -> str | None:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``); return this rank's device.

    Training then runs under PyTorch DDP: each rank takes a disjoint share of the per-sample batches and
    gradients are averaged across ranks (NCCL on CUDA, gloo on CPU).
    """
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        logger.info("Joined DDP process group (%s), rank %d.", backend, torch.distributed.get_rank())
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"
