"""DKAN losses: supervised MSE with head distillation, streamed NT-Xent, adaptive weighting.

Everything follows the authors' ``compute_loss`` / ``nt_xent_loss`` (reference section 2). The one departure is memory:
the reference materialises the ``(B*G) x (B*G)`` similarity matrix (32 000^2 at B=128, G=250); :func:`nt_xent` streams
it in row chunks with a custom backward, so memory grows linearly in ``B*G`` and the value and gradient equal the
dense form (:func:`nt_xent_dense`) within float tolerance.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from dkan._config import DKANConfig

__all__ = ["HEADS", "DKANLoss", "adaptive_weights", "nt_xent", "nt_xent_dense", "supervised_loss"]

#: Output keys of the intermediate heads that are distilled towards the final prediction.
HEADS = ("pred_fusion", "pred_patch", "pred_region", "pred_slide")

_CHUNK_ELEMENTS = 1 << 24  # rows * columns of one similarity block when chunk_size is automatic (64 MiB fp32)


def supervised_loss(out: Mapping[str, Tensor], target: Tensor, *, distill: float | None = 0.3) -> Tensor:
    """Supervised loss of the reference.

    ``MSE(pred, y) + sum_k [(1 - distill) MSE(pred_k, y) + distill MSE(pred_k, pred)]`` over the heads ``pred_k`` of
    :data:`HEADS` present in ``out``. The teacher ``pred`` is not detached (as in the reference), so the distillation
    terms also move the final prediction.

    Parameters
    ----------
    out
        Model outputs; needs ``"pred"`` (B, G).
    target
        ``(B, G)`` expression.
    distill
        Distillation weight lambda; ``None`` leaves the heads out of the loss entirely (the "w/o distillation"
        ablation).

    Returns
    -------
    Scalar loss.
    """
    pred = out["pred"]
    target = target.to(pred.dtype)
    loss = F.mse_loss(pred, target)
    if distill is None:
        return loss
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"Expected `distill` in [0, 1] or None, found {distill}.")
    for key in HEADS:
        if key in out:
            head = out[key]
            loss = loss + (1.0 - distill) * F.mse_loss(head, target) + distill * F.mse_loss(head, pred)
    return loss


def _flat_unit(z: Tensor) -> Tensor:
    """Flatten to (N, d) and L2-normalise rows, in float32 at least (float64 stays float64)."""
    z = z.reshape(-1, z.shape[-1])
    return F.normalize(z if z.dtype == torch.float64 else z.float(), dim=-1)


def nt_xent_dense(z_img: Tensor, z_exp: Tensor, *, temperature: float) -> Tensor:
    """Compute the reference's NT-Xent with the full similarity matrix (tests, benchmarks; quadratic memory).

    Rows of ``z_img`` (B, G, d) and ``z_exp`` are flattened to ``(B*G, d)`` and L2-normalised; the loss is the
    cross-entropy of ``S = Z_img Z_exp^T / temperature`` with the diagonal as targets (positive = same spot and same
    gene), one direction only.
    """
    a, b = _flat_unit(z_img), _flat_unit(z_exp)
    logits = a @ b.T / temperature
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


class _StreamedNTXent(torch.autograd.Function):
    """Mean over rows of ``logsumexp_j(a_i . b_j / t) - a_i . b_i / t`` without holding the full matrix."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, temperature: float, chunk: int) -> Tensor:
        with torch.autocast(a.device.type, enabled=False):
            a_t = a / temperature  # scale once, not every block
            lse = torch.cat([torch.logsumexp(a_t[i : i + chunk] @ b.T, dim=1) for i in range(0, len(a), chunk)])
            positive = (a_t * b).sum(dim=1)
        ctx.save_for_backward(a_t, b, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return (lse - positive).mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        a_t, b, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        scale = grad / len(a_t)
        grad_a = torch.empty_like(a_t)
        grad_b = torch.zeros_like(b)
        with torch.autocast(a_t.device.type, enabled=False):
            for i in range(0, len(a_t), chunk):
                rows = slice(i, i + chunk)
                p = torch.addmm(-lse[rows, None], a_t[rows], b.T).exp_()  # softmax rows of this block, in place
                grad_a[rows] = p @ b
                grad_b.addmm_(p.T, a_t[rows])
        # d/da_i = (sum_j p_ij b_j - b_i) / t ; d/db_j = sum_i p_ij a_i / t - a_j / t  (a_t = a / t)
        grad_a = (grad_a - b) * (scale / t)
        grad_b = (grad_b - a_t) * scale
        return grad_a, grad_b, None, None


def nt_xent(z_img: Tensor, z_exp: Tensor, *, temperature: float, chunk_size: int | None = None) -> Tensor:
    """Compute the reference's one-directional NT-Xent, streamed in row chunks.

    Same value and gradient as :func:`nt_xent_dense`, but only a ``chunk_size x (B*G)`` block of the similarity matrix
    exists at any time (recomputed in the backward pass). Computed in float32 (float64 inputs stay float64) whatever
    the autocast state.

    Parameters
    ----------
    z_img, z_exp
        ``(B, G, d)`` (or ``(N, d)``) image-path and expression-path gene tokens; row ``i`` of one is the positive
        of row ``i`` of the other.
    temperature
        Softmax temperature (0.1 her2st/stnet, 0.08 cSCC).
    chunk_size
        Rows per block; default keeps a block at about 2^24 entries.

    Returns
    -------
    Scalar loss.
    """
    if z_img.shape != z_exp.shape:
        raise ValueError(
            f"Expected `z_img` and `z_exp` of equal shape, found {tuple(z_img.shape)} and {tuple(z_exp.shape)}."
        )
    if temperature <= 0:
        raise ValueError(f"Expected `temperature` > 0, found {temperature}.")
    a, b = _flat_unit(z_img), _flat_unit(z_exp)
    n = max(len(a), 1)
    chunk = max(1, _CHUNK_ELEMENTS // n) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"Expected `chunk_size` >= 1, found {chunk_size}.")
    return _StreamedNTXent.apply(a, b, float(temperature), chunk)


def adaptive_weights(
    l_sup: float | Tensor, l_con: float | Tensor, *, contrastive_factor: float = 3.0
) -> tuple[float, float]:
    """Compute the reference's per-step loss weights from detached loss values.

    Reciprocals ``1/l_sup`` and ``contrastive_factor/l_con``, renormalised to sum to one; in closed form
    ``w_sup = l_con / (l_con + f l_sup)`` and ``w_con = f l_sup / (l_con + f l_sup)``. Returns ``(1.0, 1.0)`` when
    either loss is <= 0 (reference) or not finite.
    """
    s, c = float(l_sup), float(l_con)
    if not (math.isfinite(s) and math.isfinite(c)) or s <= 0 or c <= 0:
        return 1.0, 1.0
    inv_s, inv_c = 1.0 / s, 1.0 / c
    w_sup = inv_s / (inv_s + inv_c)
    w_con = contrastive_factor * inv_c / (inv_s + inv_c)
    total = w_sup + w_con
    return w_sup / total, w_con / total


@dataclasses.dataclass(frozen=True)
class DKANLoss:
    """The full DKAN objective with its ablation switches.

    Parameters
    ----------
    temperature
        NT-Xent temperature.
    distill
        Distillation lambda.
    contrastive_factor
        Factor on the contrastive weight in :func:`adaptive_weights`.
    use_contrastive
        Add the NT-Xent term (when the outputs hold ``"z_exp"``; with ``"genes_subset"`` (k,) the term compares
        ``z_exp`` (B, k, d) with those genes of ``z_img``).
    adaptive
        Adaptive weights; otherwise ``fixed_w_sup`` and ``fixed_w_con``.
    use_distill
        Distil the intermediate heads; otherwise only ``MSE(pred, y)``.
    fixed_w_sup, fixed_w_con
        Weights when ``adaptive`` is off.
    chunk_size
        Rows per NT-Xent block.
    contrastive_genes
        Genes drawn at random per call (the same for every spot) for the NT-Xent term; ``None``: all genes.
    """

    temperature: float = 0.1
    distill: float = 0.3
    contrastive_factor: float = 3.0
    use_contrastive: bool = True
    adaptive: bool = True
    use_distill: bool = True
    fixed_w_sup: float = 1.0
    fixed_w_con: float = 1.0
    chunk_size: int | None = None
    contrastive_genes: int | None = None

    @classmethod
    def from_config(cls, config: DKANConfig) -> DKANLoss:
        """Loss settings of a :class:`~dkan._config.DKANConfig`."""
        return cls(
            temperature=config.temperature,
            distill=config.distill,
            contrastive_factor=config.contrastive_factor,
            use_contrastive=config.use_contrastive,
            adaptive=config.adaptive_weights,
            use_distill=config.use_distill,
            fixed_w_sup=config.fixed_w_sup,
            fixed_w_con=config.fixed_w_con,
            chunk_size=config.contrastive_chunk,
            contrastive_genes=config.contrastive_genes,
        )

    def __call__(self, out: Mapping[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        """Compute the loss.

        Returns
        -------
        ``"loss"`` (scalar with gradient), and detached ``"sup"``, ``"con"`` (0 when not computed), ``"w_sup"``,
        ``"w_con"``.
        """
        sup = supervised_loss(out, target, distill=self.distill if self.use_distill else None)
        zero = sup.new_zeros(())
        if not (self.use_contrastive and "z_exp" in out):
            return {"loss": sup, "sup": sup.detach(), "con": zero, "w_sup": zero + 1.0, "w_con": zero}
        z_img, z_exp = out["z_img"], out["z_exp"]
        k = self.contrastive_genes
        if "genes_subset" in out:  # the model ran the expression path for these genes only
            z_img = z_img[:, out["genes_subset"]]
        elif k is not None and z_img.ndim == 3 and z_img.shape[1] > k:  # same random genes for every spot
            idx = torch.randperm(z_img.shape[1], device=z_img.device)[:k]
            z_img, z_exp = z_img[:, idx], z_exp[:, idx]
        con = nt_xent(z_img, z_exp, temperature=self.temperature, chunk_size=self.chunk_size)
        if self.adaptive:
            w_sup, w_con = adaptive_weights(sup.detach(), con.detach(), contrastive_factor=self.contrastive_factor)
        else:
            w_sup, w_con = self.fixed_w_sup, self.fixed_w_con
        loss = w_sup * sup + w_con * con
        return {"loss": loss, "sup": sup.detach(), "con": con.detach(), "w_sup": zero + w_sup, "w_con": zero + w_con}
