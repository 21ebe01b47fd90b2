"""Prediction time: a :class:`~dkan.nn.network.DKAN` wrapper (new genes, test-time dropout), and draws over models."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dkan._config import DKANConfig
from dkan.nn.network import DKAN

__all__ = ["TRAINING_ONLY", "Predictor", "draws", "has_dropout", "rng_devices"]

#: Parts of a DKAN network that prediction never runs (the expression path of the contrastive loss).
TRAINING_ONLY = ("expr_encoder", "exp_cross")


class Predictor(nn.Module):
    """A DKAN network seen by the prediction loop, with extra genes and/or dropout kept on.

    Its ``"pred"`` output is ``(B, G + k)``: the panel's ``G`` predictions, then those of the ``k`` genes whose
    embeddings are ``new_genes``. With ``mc_dropout`` every dropout layer stays in training mode whatever
    ``.eval()`` says (Monte Carlo dropout); everything else (e.g. batch-norm statistics) is in eval mode.

    Parameters
    ----------
    module
        The trained network.
    new_genes
        Embeddings ``(k, Dt)`` of genes outside the panel (on the module's device), or ``None``.
    mc_dropout
        Keep dropout active at prediction time.
    """

    def __init__(self, module: DKAN, *, new_genes: Tensor | None = None, mc_dropout: bool = False) -> None:
        super().__init__()
        self.module = module
        self.new_genes = new_genes
        self.mc_dropout = bool(mc_dropout)
        self.train(module.training)

    @property
    def config(self) -> DKANConfig:
        """The wrapped network's configuration."""
        return self.module.config

    @property
    def n_genes(self) -> int:
        """Number of outputs: panel genes plus new genes."""
        return self.module.n_genes + (0 if self.new_genes is None else len(self.new_genes))

    def encode_slide(self, slide: Tensor, grid: Tensor) -> Tensor:
        """See :meth:`DKAN.encode_slide`."""
        return self.module.encode_slide(slide, grid)

    def train(self, mode: bool = True) -> Predictor:
        """Set the mode; with ``mc_dropout`` the dropout layers stay in training mode."""
        super().train(mode)
        if self.mc_dropout:
            for m in self.module.modules():
                if isinstance(m, nn.Dropout):
                    m.train(True)
        return self

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"pred": (B, G + k)}`` for one batch (see :meth:`DKAN.forward`)."""
        import torch

        out = self.module(batch, with_expression=False, new_genes=self.new_genes)
        pred = out["pred"] if self.new_genes is None else torch.cat([out["pred"], out["pred_new"]], dim=1)
        return {"pred": pred}


def draws(
    run: Callable[[Any, bool], np.ndarray], modules: list[Any], n_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean prediction and per-entry standard deviation over an ensemble and/or test-time dropout.

    ``run(module, mc_dropout)`` returns one prediction array. The mean is the average of the modules'
    deterministic predictions; the standard deviation (``ddof=1``) is over every draw: each module's
    deterministic prediction when there is no dropout sampling (``n_samples == 1``), else its ``n_samples``
    dropout draws (seeded with ``seed + i``, the global torch generator is left as it was). ``None`` when there
    is a single draw.
    """
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"Expected `n_samples` to be an int >= 1, found {n_samples!r}.")
    means = [run(m, False) for m in modules]
    if n_samples == 1:
        samples = means
    else:
        samples = []
        devices, device_type = rng_devices(modules)
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            for j, m in enumerate(modules):
                for i in range(n_samples):
                    torch.manual_seed(seed + j * n_samples + i)
                    samples.append(run(m, True))
    mean = np.mean(means, axis=0).astype(np.float32)
    if len(samples) < 2:
        return mean, None
    return mean, np.std(samples, axis=0, ddof=1).astype(np.float32)


def rng_devices(modules: list[Any]) -> tuple[list[int], str]:
    """``(devices, device_type)`` for ``torch.random.fork_rng``: the accelerator the modules run on, if any.

    Dropout on CUDA draws from the CUDA generator, which ``manual_seed`` reseeds too; forking only the CPU one would
    leave the caller's CUDA generator changed (and draws not reproducible from ``seed`` after other CUDA work).
    """
    params = (next(iter(m.parameters()), None) for m in modules)
    devs = {p.device for p in params if p is not None and p.device.type not in ("cpu", "meta")}
    if not devs:
        return [], "cuda"
    kind = next(iter(devs)).type
    mod = getattr(torch, kind)
    return sorted({d.index if d.index is not None else mod.current_device() for d in devs}), kind


def has_dropout(module: nn.Module, *, skip: Sequence[str] = ()) -> bool:
    """Whether a network has a dropout layer with a non-zero rate (test-time dropout can vary).

    Layers under the top-level children named in ``skip`` are not counted.
    """
    return any(
        isinstance(m, nn.Dropout) and m.p > 0 and name.split(".")[0] not in skip for name, m in module.named_modules()
    )
