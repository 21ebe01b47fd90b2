"""The DKAN network (pure torch): multi-scale image branch, gene text encoder and the dual gene-query paths.

Forward math follows the authors' code (``models/DKAN.py`` / ``models/module.py`` of github.com/coffeeNtv/DKAN), with
these documented departures:

* Dropout follows ``module.training`` everywhere; the reference leaves the output-projection dropout of its slide and
  text encoders on at validation and test time (its bug 1), so its predictions are stochastic and ours are not.
* The gene text encoder runs once per step on ``(1, G, d)`` and is broadcast over the batch; the expression path reuses
  that encoding unless ``config.separate_exp_text`` (the reference encodes ``B`` identical copies twice per step).
  Identical in eval; in training only the dropout noise differs.
* Text embeddings whose width differs from ``d`` are projected by a Linear layer *before* the text transformer, as the
  paper describes (the reference projects after it, and only in a configuration it never uses).
* PEGH uses explicit scatter/gather on the spot grid (order independent, any grid, duplicates averaged).
* Masked keys are filled with ``torch.finfo(dtype).min`` of the score dtype.
* ``gene_attend_tokens=True`` (not in the reference) lets gene queries attend over the fused token and the patch and
  region tokens; the default keeps the reference's single fused key, where the attention weight is identically one.
* ``use_text=False`` replaces the text embeddings with a learned gene embedding table (the "w/o text" ablation);
  ``use_region=use_slide=False`` keeps the patch branch only ("w/o multi-scale"), the fusion query then being the
  mean patch token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dkan.nn.layers import CrossEncoder, ExpressionEncoder, SlideEncoder, TransformerEncoder
from dkan.nn.layers.dropout import use_numpy_dropout
from dkan.train.config import DKANConfig

__all__ = ["DKAN"]


def _proj(n_in: int, n_out: int) -> nn.Module:
    """Linear map when widths differ, identity otherwise (the reference's convention)."""
    return nn.Linear(n_in, n_out) if n_in != n_out else nn.Identity()


def _spec(cfg: DKANConfig, prefix: str) -> dict[str, Any]:
    return {
        "dim": cfg.d,
        "depth": getattr(cfg, f"{prefix}_depth"),
        "heads": getattr(cfg, f"{prefix}_heads"),
        "mlp_ratio": getattr(cfg, f"{prefix}_mlp_ratio"),
        "dropout": getattr(cfg, f"{prefix}_dropout"),
    }


def _require(batch: Mapping[str, Tensor], key: str, why: str) -> Tensor:
    if key not in batch:
        raise KeyError(f"Batch key {key!r} is required {why}; found keys {sorted(batch)}.")
    return batch[key]


class DKAN(nn.Module):
    """Dual-path knowledge-augmented contrastive alignment network.

    Parameters
    ----------
    config
        A :class:`~dkan.train.config.DKANConfig`, a preset name, a mapping of overrides or ``None`` (``small``).
    n_genes
        Number of genes ``G`` predicted (the panel size).
    gene_dim
        Width ``Dt`` of the gene text embeddings (ignored when ``use_text`` is off).
    feature_dim
        Width ``Df`` of the frozen region and slide features.
    patch_encoder
        Trainable patch trunk. Called as ``patch_encoder.forward_tokens(x)`` when it has that method, else
        ``patch_encoder(x)``; either must return a token map ``(B, T, C)`` or a feature map ``(B, C, h, w)``. ``None``
        builds ``config.patch_encoder`` from :func:`dkan.nn.create_image_encoder`.
    patch_channels
        ``C``; default ``patch_encoder.num_features``.
    **overrides
        Configuration overrides (e.g. the ablation switches ``use_text``, ``use_region``, ``use_slide``,
        ``gene_attend_tokens``).
    """

    def __init__(
        self,
        config: DKANConfig | str | Mapping[str, Any] | None,
        n_genes: int,
        gene_dim: int,
        feature_dim: int,
        patch_encoder: nn.Module | None = None,
        patch_channels: int | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        cfg = DKANConfig.resolve(config, **overrides)
        self.config = cfg
        self.n_genes, self.gene_dim, self.feature_dim = int(n_genes), int(gene_dim), int(feature_dim)
        if patch_encoder is None and patch_channels is None:
            from dkan.nn.image_encoders import create_image_encoder

            patch_encoder = create_image_encoder(cfg.patch_encoder)
        if patch_channels is None:
            patch_channels = getattr(patch_encoder, "num_features", None)
            if patch_channels is None:
                raise TypeError(
                    f"Cannot infer `patch_channels` from {type(patch_encoder).__name__} (no `num_features`); pass it."
                )
        self.patch_channels = int(patch_channels)
        d = cfg.d

        self.patch_encoder = patch_encoder
        self.patch_proj = _proj(self.patch_channels, d)
        if cfg.use_region:
            self.region_proj = _proj(self.feature_dim, d)
            grid = (cfg.region_grid, cfg.region_grid)
            self.region_encoder = TransformerEncoder(**_spec(cfg, "region"), grid=grid, final_norm=True)
            self.head_region = nn.Linear(d, self.n_genes)
        if cfg.use_slide:
            self.slide_proj = _proj(self.feature_dim, d)
            self.slide_encoder = SlideEncoder(**_spec(cfg, "slide"), kernel_size=cfg.pegh_kernel)
            self.head_slide = nn.Linear(d, self.n_genes)
        self.fusion = CrossEncoder(**_spec(cfg, "fusion"))
        self.fusion_norm = nn.LayerNorm(d)
        self.head_fusion = nn.Linear(d, self.n_genes)
        self.head_patch = nn.Linear(d, self.n_genes)

        if cfg.use_text:
            self.text_proj = _proj(self.gene_dim, d)
        else:
            self.gene_table = nn.Parameter(torch.randn(self.n_genes, d) * 0.02)
        self.text_encoder = TransformerEncoder(**_spec(cfg, "text"))
        self.expr_encoder = ExpressionEncoder(self.n_genes, d, cfg.dropout_expr)
        self.img_cross = CrossEncoder(**_spec(cfg, "img_cross"))
        self.exp_cross = CrossEncoder(**_spec(cfg, "exp_cross"))
        self.head_gene = nn.Linear(d, 1)
        use_numpy_dropout(self, cfg.numpy_dropout)  # torch's dropout unless the config opts in

    # ------------------------------------------------------------------ helpers
    def _float(self, x: Tensor) -> Tensor:
        dtype = self.head_gene.weight.dtype
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x

    # ------------------------------------------------------------------ encoders
    def encode_patch(self, x: Tensor) -> Tensor:
        """Patch images (B, 3, H, W) to tokens (B, T, d)."""
        enc = self.patch_encoder
        if enc is None:
            raise ValueError("This model has no patch encoder (frozen patch branch); pass batch['patch_tokens'].")
        out = enc.forward_tokens(x) if hasattr(enc, "forward_tokens") else enc(x)
        if out.ndim == 4:
            out = out.flatten(2).transpose(1, 2)
        if out.ndim != 3 or out.shape[-1] != self.patch_channels:
            raise ValueError(
                f"Expected the patch encoder to return (B, T, {self.patch_channels}) or "
                f"(B, {self.patch_channels}, h, w), found {tuple(out.shape)}."
            )
        return self.patch_proj(self._float(out))

    def encode_region(self, region: Tensor, mask: Tensor | None = None) -> Tensor:
        """Region features (B, k*k, Df) with validity ``mask`` (B, k*k) to tokens (B, k*k, d)."""
        k2 = self.config.region_grid**2
        if region.ndim != 3 or region.shape[1:] != (k2, self.feature_dim):
            raise ValueError(f"Expected `region` of shape (B, {k2}, {self.feature_dim}), found {tuple(region.shape)}.")
        return self.region_encoder(self.region_proj(self._float(region)), key_mask=mask)

    def encode_slide(self, slide: Tensor, grid: Tensor) -> Tensor:
        """Frozen features (n_p, Df) of all spots of one sample at grid positions (n_p, 2) to tokens (n_p, d)."""
        if not self.config.use_slide:
            raise ValueError("This model was built with `use_slide=False`; it has no slide encoder.")
        if slide.ndim != 2 or slide.shape[1] != self.feature_dim:
            raise ValueError(f"Expected `slide` of shape (n_p, {self.feature_dim}), found {tuple(slide.shape)}.")
        return self.slide_encoder(self.slide_proj(self._float(slide)), grid)

    def encode_genes(self, genes: Tensor | None = None) -> Tensor:
        """Gene embeddings (G, Dt) to gene query tokens (1, G, d), computed once and broadcast by the caller."""
        if self.config.use_text:
            if genes is None:
                raise KeyError("Batch key 'genes' (G, Dt) is required when `use_text=True`.")
            if genes.ndim == 3 and genes.shape[0] == 1:
                genes = genes[0]
            if genes.shape != (self.n_genes, self.gene_dim):
                raise ValueError(
                    f"Expected `genes` of shape ({self.n_genes}, {self.gene_dim}), found {tuple(genes.shape)}."
                )
            tokens = self.text_proj(self._float(genes))
        else:
            tokens = self.gene_table
        return self.text_encoder(tokens[None])

    def encode_expression(self, target: Tensor) -> Tensor:
        """Expression (B, G) to one token per spot (B, d)."""
        return self.expr_encoder(self._float(target))

    # ------------------------------------------------------------------ forward
    def _slide_token(self, batch: Mapping[str, Tensor]) -> Tensor:
        index = _require(batch, "slide_index", "when `use_slide=True`")
        tokens = batch.get("slide_tokens")
        if tokens is None:
            why = "when `use_slide=True` and no 'slide_tokens' are given"
            tokens = self.encode_slide(_require(batch, "slide", why), _require(batch, "grid", why))
        return tokens[index.long()]

    def _fuse(self, query: Tensor, scales: list[tuple[Tensor, Tensor | None]]) -> Tensor:
        q = query[:, None]
        return self.fusion_norm(sum(self.fusion(q, kv, m)[:, 0] for kv, m in scales))

    def _gene_context(
        self, fused: Tensor, patch: Tensor, region: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        if not self.config.gene_attend_tokens:
            return fused[:, None], None
        parts = [fused[:, None], patch] + ([region] if region is not None else [])
        if region is None or mask is None:
            return torch.cat(parts, dim=1), None
        lead = torch.ones(mask.shape[0], 1 + patch.shape[1], dtype=torch.bool, device=mask.device)
        return torch.cat(parts, dim=1), torch.cat([lead, mask.bool()], dim=1)

    def forward(
        self, batch: Mapping[str, Tensor], *, with_expression: bool | None = None, genes_subset: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Predict expression for a batch of spots of one sample.

        Parameters
        ----------
        batch
            ``"patch"`` (B, 3, H, W) or frozen ``"patch_tokens"`` (B, T, C); ``"region"`` (B, k*k, Df) and optional
            ``"region_mask"`` (B, k*k) bool, True = valid; ``"slide"`` (n_p, Df) and ``"grid"`` (n_p, 2) long for
            all spots of the sample, or precomputed
            ``"slide_tokens"`` (n_p, d) from :meth:`encode_slide`; ``"slide_index"`` (B,) rows of the batch spots in
            the slide; ``"genes"`` (G, Dt); optional ``"target"`` (B, G).
        with_expression
            Run the expression path (needs ``"target"``). Default: in training mode when ``"target"`` is present and
            ``config.use_contrastive``.
        genes_subset
            Gene indices (k,) the expression path runs for. Default: all genes, or in training mode with
            ``config.contrastive_genes = k < G`` a fresh random draw of ``k`` genes (the only ones the NT-Xent
            term uses; the gene queries do not interact in the cross encoder, so their outputs are the same).

        Returns
        -------
        ``"pred"`` (B, G), ``"pred_fusion"``, ``"pred_patch"`` and, when enabled, ``"pred_region"``,
        ``"pred_slide"`` (B, G); ``"z_img"`` (B, G, d); ``"z_exp"`` (B, G, d) when the expression path ran, or
        (B, k, d) with ``"genes_subset"`` (k,) when it ran for a subset.
        """
        cfg = self.config
        if "patch_tokens" in batch:  # frozen patch branch: precomputed tokens (B, T, C)
            patch = self.patch_proj(self._float(batch["patch_tokens"]))
        else:
            patch = self.encode_patch(self._float(_require(batch, "patch", "unless 'patch_tokens' are given")))
        n = patch.shape[0]
        out: dict[str, Tensor] = {}
        scales: list[tuple[Tensor, Tensor | None]] = [(patch, None)]
        region = mask = None
        if cfg.use_region:
            mask = batch.get("region_mask")
            region = self.encode_region(_require(batch, "region", "when `use_region=True`"), mask)
            scales.append((region, mask))
        query = self._slide_token(batch) if cfg.use_slide else patch.mean(dim=1)
        fused = self._fuse(query, scales)

        out["pred_fusion"] = self.head_fusion(fused)
        out["pred_patch"] = self.head_patch(patch.mean(dim=1))
        if region is not None:
            out["pred_region"] = self.head_region(region.mean(dim=1))
        if cfg.use_slide:
            out["pred_slide"] = self.head_slide(query)

        genes = self.encode_genes(batch.get("genes"))
        context, context_mask = self._gene_context(fused, patch, region, mask)
        z_img = self.img_cross(genes.expand(n, -1, -1), context, context_mask)
        out["z_img"] = z_img
        out["pred"] = self.head_gene(z_img)[..., 0]

        if with_expression is None:
            with_expression = self.training and cfg.use_contrastive and "target" in batch
        if with_expression:
            h = self.encode_expression(_require(batch, "target", "for the expression path"))
            genes_exp = self.encode_genes(batch.get("genes")) if cfg.separate_exp_text else genes
            k = cfg.contrastive_genes
            if genes_subset is None:
                draw = self.training and k is not None and k < self.n_genes
                genes_subset = torch.randperm(self.n_genes, device=h.device)[:k] if draw else None
            if genes_subset is not None:
                genes_exp = genes_exp[:, genes_subset]
                out["genes_subset"] = genes_subset
            out["z_exp"] = self.exp_cross(genes_exp.expand(n, -1, -1), h[:, None])
        return out
