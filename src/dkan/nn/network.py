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
* Gene embeddings are centred and scaled per dimension over the training panel before the text projection
  (``standardize_genes``; the statistics are buffers, so prediction and genes queried later use the training panel's).
* The gene-query output has a per-gene gain and bias (``gene_output="affine"``), the bias and the intermediate heads'
  biases initialised to the training mean (:meth:`DKAN.init_from_data`; training then removes the shared layer's
  random per-gene offset, :func:`dkan.train.loop.start_at_mean`); the reference has one output layer and bias shared
  by all genes.
* The output heads (the gene output and the intermediate heads) run in float32 with autocast off, so predictions and
  validation scores under bf16/fp16 autocast are not rounded to half precision.
* ``use_text=False`` replaces the text embeddings with a learned gene embedding table (the "w/o text" ablation);
  ``use_region=use_slide=False`` keeps the patch branch only ("w/o multi-scale"), the fusion query then being the
  mean patch token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dkan._config import DKANConfig
from dkan.nn._build import proj as _proj
from dkan.nn._build import require as _require
from dkan.nn._build import spec as _spec
from dkan.nn.layers import CrossEncoder, ExpressionEncoder, SlideEncoder, TransformerEncoder
from dkan.nn.layers.dropout import use_numpy_dropout

__all__ = ["DKAN"]


class DKAN(nn.Module):
    """Dual-path knowledge-augmented contrastive alignment network.

    Parameters
    ----------
    config
        A :class:`~dkan._config.DKANConfig`, a preset name, a mapping of overrides or ``None`` (``small``).
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
        if cfg.use_text and cfg.standardize_genes:
            # per-dimension centre and scale of the panel's embeddings (identity until set_gene_statistics)
            self.register_buffer("gene_center", torch.zeros(self.gene_dim))
            self.register_buffer("gene_scale", torch.ones(self.gene_dim))
        else:
            self.gene_table = nn.Parameter(torch.randn(self.n_genes, d) * 0.02)
        self.text_encoder = TransformerEncoder(**_spec(cfg, "text"))
        self.expr_encoder = ExpressionEncoder(self.n_genes, d, cfg.dropout_expr)
        self.img_cross = CrossEncoder(**_spec(cfg, "img_cross"))
        self.exp_cross = CrossEncoder(**_spec(cfg, "exp_cross"))
        self.head_gene = nn.Linear(d, 1)
        if cfg.gene_output in ("bias", "affine"):  # per-gene output bias (set to the training mean by init_from_data)
            self.gene_bias = nn.Parameter(torch.zeros(self.n_genes))
        if cfg.gene_output == "affine":
            self.gene_gain = nn.Parameter(torch.ones(self.n_genes))
        use_numpy_dropout(self, cfg.numpy_dropout)  # torch's dropout unless the config opts in

    # ------------------------------------------------------------------ helpers
    def _float(self, x: Tensor) -> Tensor:
        dtype = self.head_gene.weight.dtype
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x

    @staticmethod
    def _head(layer: nn.Linear, x: Tensor) -> Tensor:
        """``layer(x)`` in the layer's own precision (float32) with autocast off, so outputs are never bf16/fp16."""
        kind = x.device.type
        if not torch.amp.is_autocast_available(kind):
            return layer(x.to(layer.weight.dtype))
        with torch.autocast(kind, enabled=False):
            return layer(x.to(layer.weight.dtype))

    # ------------------------------------------------------------------ data-dependent initialisation
    @torch.no_grad()
    def set_gene_statistics(self, genes: Tensor) -> None:
        """Store the per-dimension mean and standard deviation of the panel's gene embeddings ``(G, Dt)``.

        With ``config.standardize_genes`` the embeddings are centred and scaled with these statistics before the
        text projection, here and for any gene queried later (:meth:`encode_new_genes`), so the component shared by all
        genes no longer dominates the gene-specific one. A standard deviation below 1 % of the mean one (a
        dimension nearly constant over the panel) is raised to that floor so that new genes stay bounded.
        """
        if not (self.config.use_text and self.config.standardize_genes):
            raise ValueError(
                "This model was built with `use_text=False` or `standardize_genes=False`; it does not standardise "
                "gene embeddings."
            )
        genes = self._check_genes(genes).float()
        std = genes.std(dim=0, unbiased=False) if len(genes) > 1 else torch.ones_like(genes[0])
        floor = 0.01 * float(std.mean()) + 1e-8
        self.gene_center.copy_(genes.mean(dim=0))
        self.gene_scale.copy_(std.clamp_min(floor))

    @torch.no_grad()
    def init_from_data(self, *, genes: Tensor | None = None, target_mean: Tensor | None = None) -> None:
        """Data-dependent initialisation before training.

        Parameters
        ----------
        genes
            The panel's gene embeddings ``(G, Dt)``: stored by :meth:`set_gene_statistics`.
        target_mean
            Mean training target per gene ``(G,)``. With ``gene_output`` ``"bias"`` or ``"affine"`` it becomes the
            initial per-gene output bias and the initial bias of the intermediate heads (the shared output layer's
            bias starts at zero; ignored with ``"shared"``, the reference's initialisation). The randomly initialised
            shared layer still adds a per-gene offset; training removes it from the per-gene bias with one forward
            pass over training spots (:func:`dkan.train.loop.start_at_mean`), so that the first prediction's mean
            over those spots is the training mean. A zero-initialised shared layer would do that without a forward
            pass, but halved the held-out PCC of a short synthetic run.
        """
        if genes is not None and self.config.use_text and self.config.standardize_genes:
            self.set_gene_statistics(genes)
        if target_mean is None:
            return
        mean = torch.as_tensor(target_mean, dtype=torch.float32).reshape(-1)
        if mean.shape != (self.n_genes,):
            raise ValueError(f"Expected `target_mean` of shape ({self.n_genes},), found {tuple(mean.shape)}.")
        if not torch.isfinite(mean).all():
            raise ValueError("`target_mean` holds NaN or infinite values; check the training targets.")
        if not hasattr(self, "gene_bias"):  # gene_output="shared": the reference's initialisation
            return
        self.gene_bias.copy_(mean.to(self.gene_bias))
        self.head_gene.bias.zero_()
        for name in ("head_fusion", "head_patch", "head_region", "head_slide"):
            head = getattr(self, name, None)
            if head is not None:
                head.bias.copy_(mean.to(head.bias))

    @torch.no_grad()
    def shift_output(self, offset: Tensor) -> None:
        """Subtract ``offset`` ``(G,)`` from every gene's output (its per-gene bias); see :func:`start_at_mean`.

        With ``gene_output="shared"`` (no per-gene bias: the reference) nothing changes.
        """
        if not hasattr(self, "gene_bias"):
            return
        offset = torch.as_tensor(offset, dtype=torch.float32).reshape(-1)
        if offset.shape != (self.n_genes,) or not torch.isfinite(offset).all():
            raise ValueError(f"Expected a finite `offset` of shape ({self.n_genes},), found {tuple(offset.shape)}.")
        self.gene_bias.sub_(offset.to(self.gene_bias))

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

    def _check_genes(self, genes: Tensor | None, n: int | None = None) -> Tensor:
        if genes is None:
            raise KeyError("Batch key 'genes' (G, Dt) is required when `use_text=True`.")
        if genes.ndim == 3 and genes.shape[0] == 1:
            genes = genes[0]
        n = self.n_genes if n is None else n
        if genes.ndim != 2 or genes.shape[1] != self.gene_dim or (n >= 0 and genes.shape[0] != n):
            want = f"({n if n >= 0 else 'k'}, {self.gene_dim})"
            raise ValueError(f"Expected `genes` of shape {want}, found {tuple(genes.shape)}.")
        return genes

    def _gene_inputs(self, genes: Tensor) -> Tensor:
        """Standardise (``config.standardize_genes``) and project gene embeddings (..., Dt) to (..., d)."""
        genes = self._float(genes)
        if self.config.standardize_genes:
            genes = (genes - self._float(self.gene_center)) / self._float(self.gene_scale)
        return self.text_proj(genes)

    def encode_genes(self, genes: Tensor | None = None) -> Tensor:
        """Gene embeddings (G, Dt) to gene query tokens (1, G, d), computed once and broadcast by the caller."""
        if self.config.use_text:
            tokens = self._gene_inputs(self._check_genes(genes))
        else:
            tokens = self.gene_table
        return self.text_encoder(tokens[None])

    def encode_new_genes(self, genes: Tensor, extra: Tensor) -> Tensor:
        """Gene query tokens (k, d) of ``extra`` embeddings (k, Dt) of genes outside the panel ``genes`` (G, Dt).

        Each new gene goes through the text transformer together with the panel, on its own (one sequence of
        ``G + 1`` tokens per new gene), so its token does not depend on which other new genes are queried.
        """
        if not self.config.use_text:
            raise ValueError("This model was built with `use_text=False` (a gene table); it cannot query new genes.")
        panel = self._gene_inputs(self._check_genes(genes))
        new = self._gene_inputs(self._check_genes(extra, n=-1))
        seqs = torch.cat([panel[None].expand(len(new), -1, -1), new[:, None]], dim=1)
        return self.text_encoder(seqs)[:, -1]

    def _gene_output(self, z: Tensor, *, new: bool = False) -> Tensor:
        """Per-gene output of gene tokens ``z`` (B, G, d); ``new``: tokens of genes outside the panel (averages)."""
        pred = self._head(self.head_gene, z)[..., 0]  # float32 even under autocast; gain and bias stay float32
        cfg = self.config
        if cfg.gene_output == "affine":
            gain = self.gene_gain if not new else self.gene_gain.mean().expand(z.shape[1])
            pred = pred * gain
        if cfg.gene_output in ("bias", "affine"):
            bias = self.gene_bias if not new else self.gene_bias.mean().expand(z.shape[1])
            pred = pred + bias
        return pred

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
        self,
        batch: Mapping[str, Tensor],
        *,
        with_expression: bool | None = None,
        genes_subset: Tensor | None = None,
        new_genes: Tensor | None = None,
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
        new_genes
            Embeddings (k, Dt) of genes outside the panel to query as well (see :meth:`encode_new_genes`); their
            output uses the panel's average per-gene gain and bias.

        Returns
        -------
        ``"pred"`` (B, G), ``"pred_fusion"``, ``"pred_patch"`` and, when enabled, ``"pred_region"``,
        ``"pred_slide"`` (B, G); ``"z_img"`` (B, G, d); ``"z_exp"`` (B, G, d) when the expression path ran, or
        (B, k, d) with ``"genes_subset"`` (k,) when it ran for a subset; ``"pred_new"`` (B, k) with ``new_genes``.
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

        out["pred_fusion"] = self._head(self.head_fusion, fused)
        out["pred_patch"] = self._head(self.head_patch, patch.mean(dim=1))
        if region is not None:
            out["pred_region"] = self._head(self.head_region, region.mean(dim=1))
        if cfg.use_slide:
            out["pred_slide"] = self._head(self.head_slide, query)

        genes = self.encode_genes(batch.get("genes"))
        context, context_mask = self._gene_context(fused, patch, region, mask)
        z_img = self.img_cross(genes.expand(n, -1, -1), context, context_mask)
        out["z_img"] = z_img
        out["pred"] = self._gene_output(z_img)
        if new_genes is not None:
            tokens = self.encode_new_genes(_require(batch, "genes", "to query new genes"), new_genes)
            z_new = self.img_cross(tokens[None].expand(n, -1, -1), context, context_mask)
            out["pred_new"] = self._gene_output(z_new, new=True)

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
