"""Prediction-time wrapper of a :class:`~dkan.nn.network.DKAN`: genes outside the panel and test-time dropout."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from dkan._config import DKANConfig
from dkan.nn.network import DKAN

__all__ = ["Predictor"]


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
