"""Hyper-parameters of a DKAN run: a frozen dataclass and named presets.

The ``her2st``, ``stnet`` and ``cscc`` presets carry the exact values of the authors' configuration files
(``config/{her2st,stnet,skin}/*.yaml`` of github.com/coffeeNtv/DKAN); ``small`` is a scaled-down variant that trains
in minutes on a laptop CPU and is the default.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from dkan._presets import PRESET_VALUES

__all__ = ["PRESETS", "DKANConfig"]

_MODULES = ("fusion", "slide", "region", "img_cross", "exp_cross", "text")
#: choices of ``DKANConfig.select_metric`` and ``DKANConfig.val_split``
SELECT_METRICS = ("pcc", "mse", "both")
VAL_SPLITS = ("auto", "sections", "blocks", "random")


@dataclasses.dataclass(frozen=True)
class DKANConfig:
    """All hyper-parameters of a DKAN model and its training run.

    Instances are immutable; derive variants with :meth:`replace`, :meth:`from_preset` or :meth:`resolve`.
    Field defaults are the ``small`` preset.

    Attributes
    ----------
    d
        Model width shared by every module.
    fusion_depth, fusion_heads, fusion_mlp_ratio, fusion_dropout
        Cross encoder fusing the slide token with the patch and region tokens.
    slide_depth, slide_heads, slide_mlp_ratio, slide_dropout
        Slide ("WSI") encoder over all spots of a sample; PEGH sits after its first layer.
    region_depth, region_heads, region_mlp_ratio, region_dropout
        Region ("neighbor") encoder over the ``region_grid`` x ``region_grid`` tiles.
    img_cross_depth, img_cross_heads, img_cross_mlp_ratio, img_cross_dropout
        Gene-query cross encoder of the image path.
    exp_cross_depth, exp_cross_heads, exp_cross_mlp_ratio, exp_cross_dropout
        Gene-query cross encoder of the expression path.
    text_depth, text_heads, text_mlp_ratio, text_dropout
        Transformer across the gene (text) embeddings.
    dropout_expr
        Dropout of the expression encoder.
    pegh_kernel
        Kernel size of the depthwise convolution of the slide positional encoding (odd).
    temperature
        NT-Xent temperature.
    distill
        Distillation weight lambda of the four intermediate heads.
    contrastive_factor
        Extra factor on the contrastive weight in the adaptive weighting (3 in the reference).
    fixed_w_sup, fixed_w_con
        Loss weights used when ``adaptive_weights`` is off.
    contrastive_chunk
        Rows per chunk of the streamed NT-Xent (``None``: chosen automatically).
    contrastive_genes
        Genes drawn at random (the same for every spot of the step) for the NT-Xent term; ``None`` uses all
        genes as the reference does. The loss matrix has ``(batch_size * contrastive_genes)^2`` entries, so
        ``small`` uses 32 of 250 genes: about 60 times less NT-Xent work per step, which makes it affordable on
        a CPU (with all genes it took about 85 % of a CPU training step at batch 32).
    lr, weight_decay
        Adam learning rate and weight decay (the reference uses plain Adam, no decay).
    batch_size, max_epochs, patience
        Spots per step, epoch limit, early-stopping patience (training stops at the ``patience``-th epoch in a row
        without improvement of the smoothed validation score, as Lightning's ``EarlyStopping`` does).
    min_epochs
        Early stopping never ends a run before this many epochs (``small``: 20; the reference presets: 0, as in the
        authors' code). Any epoch can still be selected.
    val_window
        Model selection and early stopping use the mean validation score of the last ``val_window`` epochs
        (``small``: 3; the reference presets: 1, the raw score as in the authors' code); the weights kept are those
        of the window's last epoch. Epochs before the first full window are not selected (unless the run is
        shorter than the window).
    select_metric
        Validation score that chooses the epoch: ``"pcc"`` (mean per-gene Pearson r, the reference's ``R``),
        ``"mse"`` (lowest mean squared error) or ``"both"`` (mean of the PCC and of the per-gene R² =
        1 - MSE / variance, so that both correlation and level count).
    step_size, gamma
        StepLR schedule, stepped per epoch.
    seed
        Random seed.
    grad_clip
        Maximum gradient norm (``None``: no clipping, as in the reference).
    amp
        Mixed precision on CUDA.
    val_fraction
        Share of the training data held out for early stopping and checkpoint choice (the reference uses the
        test fold instead; see the docs). ``0``: no validation; training runs ``max_epochs`` and keeps the last
        epoch's weights (said in the log and in ``model.meta["train"]["selection"]``).
    val_split
        How the validation data is held out of the training samples: ``"sections"`` (``max(1, round(val_fraction
        * n))`` whole samples, at least one left for training), ``"blocks"`` (square blocks of grid spots in every
        sample, about ``val_fraction`` of its spots, and the spots within two grid steps of them left out of
        training, so that no training target shares counts with a validation target through the 3x3
        smoothing), ``"random"`` (a random ``val_fraction`` of the spots of each sample, the first dkan release:
        training and validation targets share counts) or ``"auto"``: ``"sections"`` with at least 3 training
        samples, else ``"blocks"``.
    n_genes
        Size of the gene panel.
    patch_size
        Patch side in pixels; a region is ``region_grid`` x ``region_grid`` patches.
    target_mpp
        Resolution (µm/px) the crops are resampled to; ``None`` keeps native pixels (the reference). ``small``
        uses 64 px at 2 µm/px: a 128 µm field, close to the reference's 224 px at ~0.73 µm/px (163 µm).
    patch_trainable
        ``True``: the patch branch is the trainable CNN ``patch_encoder`` run on augmented crops every step
        (the reference). ``False`` (``small``): the patch branch reads the frozen spot features as one token, so
        an epoch needs no image reads; much faster on a CPU.
    region_grid
        Side of the region grid (odd).
    patch_encoder, feature_encoder, text_encoder
        Registry names of the trainable patch trunk, the frozen region/slide feature encoder and the gene text
        encoder.
    use_text
        ``False``: a learned gene embedding table replaces the text embeddings ("w/o text" ablation).
    use_contrastive
        ``False``: no expression path loss ("w/o contrastive").
    use_region, use_slide
        ``False`` for both: patch branch only ("w/o multi-scale").
    adaptive_weights
        ``False``: fixed loss weights ``fixed_w_sup`` / ``fixed_w_con``.
    use_distill
        ``False``: the intermediate heads are left out of the loss ("w/o distillation").
    gene_attend_tokens
        ``True``: gene queries attend over the fused token and the patch and region tokens instead of the
        reference's single fused key.
    separate_exp_text
        ``True``: run the text encoder a second time for the expression path (reference behaviour, different
        dropout noise); ``False`` reuses the image path's encoding.
    standardize_genes
        Centre and scale the gene embeddings per dimension over the training panel before the text projection
        (``False``: the raw embeddings, as the reference).
    gene_output
        Output of the gene-query path: ``"shared"`` (the reference: one linear layer shared by all genes),
        ``"bias"`` (plus a per-gene bias initialised to the training mean) or ``"affine"`` (plus a per-gene gain
        and bias).
    numpy_dropout
        ``True``: dropout masks on the CPU are drawn with numpy (faster there, see
        :class:`dkan.nn.layers.Dropout`); ``False`` (default): torch's own dropout on every device.
    probe_blend
        ``True`` (default; off in the authors' presets): :func:`dkan.tl.train` also fits the tuned ``ridge_ctx``
        and ``knn`` probes (:mod:`dkan._evaluation.probes`) on all training spots and stores them with the model;
        :func:`dkan.tl.predict` then gives the panel genes the equal-weight mean of the network's and the two
        probes' predictions ("DKAN+probes", see the method page). Genes outside the panel stay network-only.
        Needs region features; when the training data cannot fit the probes (a few dozen spots), training warns
        and the model predicts with the network alone. ``False``: the network alone.
    """

    d: int = 128
    fusion_depth: int = 1
    fusion_heads: int = 2
    fusion_mlp_ratio: float = 2.0
    fusion_dropout: float = 0.1
    slide_depth: int = 2
    slide_heads: int = 2
    slide_mlp_ratio: float = 2.0
    slide_dropout: float = 0.1
    region_depth: int = 1
    region_heads: int = 2
    region_mlp_ratio: float = 2.0
    region_dropout: float = 0.1
    img_cross_depth: int = 1
    img_cross_heads: int = 4
    img_cross_mlp_ratio: float = 2.0
    img_cross_dropout: float = 0.1
    exp_cross_depth: int = 1
    exp_cross_heads: int = 4
    exp_cross_mlp_ratio: float = 2.0
    exp_cross_dropout: float = 0.1
    text_depth: int = 1
    text_heads: int = 4
    text_mlp_ratio: float = 2.0
    text_dropout: float = 0.1
    dropout_expr: float = 0.3
    pegh_kernel: int = 3
    temperature: float = 0.1
    distill: float = 0.3
    contrastive_factor: float = 3.0
    fixed_w_sup: float = 1.0
    fixed_w_con: float = 1.0
    contrastive_chunk: int | None = None
    contrastive_genes: int | None = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    max_epochs: int = 80
    patience: int = 10
    min_epochs: int = 20
    val_window: int = 3
    select_metric: str = "pcc"
    step_size: int = 30
    gamma: float = 0.9
    seed: int = 2021
    grad_clip: float | None = 1.0
    amp: bool = True
    val_fraction: float = 0.1
    val_split: str = "auto"
    n_genes: int = 250
    patch_size: int = 64
    target_mpp: float | None = 2.0
    patch_trainable: bool = False
    region_grid: int = 5
    patch_encoder: str = "efficientnet_lite0"
    feature_encoder: str = "efficientnet_lite0"
    text_encoder: str = "minilm"
    use_text: bool = True
    use_contrastive: bool = True
    use_region: bool = True
    use_slide: bool = True
    adaptive_weights: bool = True
    use_distill: bool = True
    gene_attend_tokens: bool = False
    separate_exp_text: bool = False
    standardize_genes: bool = True
    gene_output: str = "affine"
    numpy_dropout: bool = False
    probe_blend: bool = True

    DEFAULT_PRESET: ClassVar[str] = "small"

    def __post_init__(self) -> None:
        _check_types(self)
        _check_finite(self)
        _check_values(self)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of all configuration fields."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def _check_keys(cls, keys: Any, *, what: str) -> None:
        unknown = sorted(set(keys) - set(cls.field_names()))
        if unknown:
            raise TypeError(f"Unknown {what} {unknown} for `DKANConfig`. Valid names: {list(cls.field_names())}.")

    def replace(self, **overrides: Any) -> DKANConfig:
        """Return a copy with ``overrides`` applied (validated)."""
        self._check_keys(overrides, what="override(s)")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DKANConfig:
        """Build the preset ``name`` (see :data:`PRESETS`) with keyword ``overrides``."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"Unknown preset `config={name!r}`. Choose one of {sorted(PRESETS)}.")
        return PRESETS[name].replace(**overrides)

    @classmethod
    def resolve(cls, config: str | DKANConfig | Mapping[str, Any] | None = None, **overrides: Any) -> DKANConfig:
        """Turn what a user passes as ``config=`` into a :class:`DKANConfig`.

        Parameters
        ----------
        config
            ``None`` (the ``small`` preset), a preset name, a :class:`DKANConfig`, or a mapping of field overrides
            that may name its base preset under the key ``"preset"`` (default ``small``).
        **overrides
            Field values applied last.

        Returns
        -------
        The resolved configuration.
        """
        if config is None:
            base = PRESETS[cls.DEFAULT_PRESET]
        elif isinstance(config, DKANConfig):
            base = config
        elif isinstance(config, str):
            base = cls.from_preset(config)
        elif isinstance(config, Mapping):
            values = dict(config)
            preset = values.pop("preset", cls.DEFAULT_PRESET)
            base = cls.from_preset(preset, **values)
        else:
            raise TypeError(
                "Expected `config` to be None, a preset name, a DKANConfig or a mapping, "
                f"found {type(config).__name__}."
            )
        return base.replace(**overrides) if overrides else base

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dictionary of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DKANConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys take the field defaults."""
        if not isinstance(values, Mapping):
            raise TypeError(f"Expected `values` to be a mapping, found {type(values).__name__}.")
        cls._check_keys(values, what="key(s)")
        return cls(**values)


# ---------------------------------------------------------------------- validation
_INT_FIELDS = {f.name for f in dataclasses.fields(DKANConfig) if f.type in ("int", "int | None")}
_FLOAT_FIELDS = {f.name for f in dataclasses.fields(DKANConfig) if f.type in ("float", "float | None")}
_BOOL_FIELDS = {f.name for f in dataclasses.fields(DKANConfig) if f.type == "bool"}
_STR_FIELDS = {f.name for f in dataclasses.fields(DKANConfig) if f.type == "str"}
_OPTIONAL = {f.name for f in dataclasses.fields(DKANConfig) if "None" in str(f.type)}


def _check_types(cfg: DKANConfig) -> None:
    for name in DKANConfig.field_names():
        value = getattr(cfg, name)
        if value is None and name in _OPTIONAL:
            continue
        if name in _BOOL_FIELDS:
            ok = isinstance(value, bool)
            expected = "a bool"
        elif name in _INT_FIELDS:
            ok = isinstance(value, int) and not isinstance(value, bool)
            expected = "an int"
        elif name in _FLOAT_FIELDS:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if ok:  # store floats as floats so equality and JSON round trips are stable
                object.__setattr__(cfg, name, float(value))
            expected = "a number"
        else:
            ok = isinstance(value, str) and bool(value)
            expected = "a non-empty str"
        if not ok:
            raise TypeError(f"Expected `{name}` to be {expected}, found {value!r} ({type(value).__name__}).")


def _check_finite(cfg: DKANConfig) -> None:
    """Every number must be finite: ``inf``/``nan`` in a rate, weight or ratio only ever trains a NaN model."""
    for name in sorted(_FLOAT_FIELDS):
        value = getattr(cfg, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"Expected `{name}` to be a finite number, found {value!r}; pass a finite value.")


def _require(cond: bool, name: str, expected: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"Expected `{name}` to be {expected}, found {value!r}.")


def _check_values(cfg: DKANConfig) -> None:
    _require(cfg.d >= 1, "d", ">= 1", cfg.d)
    for mod in _MODULES:
        depth, heads = getattr(cfg, f"{mod}_depth"), getattr(cfg, f"{mod}_heads")
        mlp, drop = getattr(cfg, f"{mod}_mlp_ratio"), getattr(cfg, f"{mod}_dropout")
        _require(depth >= 1, f"{mod}_depth", ">= 1", depth)
        _require(heads >= 1 and cfg.d % heads == 0, f"{mod}_heads", f"a divisor of d={cfg.d}", heads)
        _require(mlp > 0 and int(cfg.d * mlp) >= 1, f"{mod}_mlp_ratio", "> 0", mlp)
        _require(0.0 <= drop < 1.0, f"{mod}_dropout", "in [0, 1)", drop)
    _require(0.0 <= cfg.dropout_expr < 1.0, "dropout_expr", "in [0, 1)", cfg.dropout_expr)
    _require(cfg.pegh_kernel >= 1 and cfg.pegh_kernel % 2 == 1, "pegh_kernel", "an odd int >= 1", cfg.pegh_kernel)
    _require(cfg.region_grid >= 1 and cfg.region_grid % 2 == 1, "region_grid", "an odd int >= 1", cfg.region_grid)
    _require(cfg.temperature > 0, "temperature", "> 0", cfg.temperature)
    _require(0.0 <= cfg.distill <= 1.0, "distill", "in [0, 1]", cfg.distill)
    _require(cfg.contrastive_factor > 0, "contrastive_factor", "> 0", cfg.contrastive_factor)
    _require(cfg.fixed_w_sup >= 0 and cfg.fixed_w_con >= 0, "fixed_w_sup/fixed_w_con", ">= 0", cfg.fixed_w_sup)
    chunk = cfg.contrastive_chunk
    _require(chunk is None or chunk >= 1, "contrastive_chunk", "None or >= 1", chunk)
    cg = cfg.contrastive_genes
    _require(cg is None or cg >= 1, "contrastive_genes", "None or >= 1", cg)
    # Adam steps move every weight by about `lr`: above 1 the network diverges within a step or two
    _require(0 < cfg.lr <= 1, "lr", "in (0, 1] (typical: 1e-4 to 1e-2)", cfg.lr)
    _require(0 <= cfg.weight_decay <= 1, "weight_decay", "in [0, 1] (typical: 0 to 1e-2)", cfg.weight_decay)
    _require(cfg.batch_size >= 1, "batch_size", ">= 1", cfg.batch_size)
    _require(cfg.max_epochs >= 1, "max_epochs", ">= 1", cfg.max_epochs)
    _require(cfg.patience >= 0, "patience", ">= 0", cfg.patience)
    _require(cfg.min_epochs >= 0, "min_epochs", ">= 0", cfg.min_epochs)
    _require(cfg.val_window >= 1, "val_window", ">= 1", cfg.val_window)
    _require(cfg.select_metric in SELECT_METRICS, "select_metric", f"one of {SELECT_METRICS}", cfg.select_metric)
    _require(cfg.val_split in VAL_SPLITS, "val_split", f"one of {VAL_SPLITS}", cfg.val_split)
    _require(cfg.step_size >= 1, "step_size", ">= 1", cfg.step_size)
    _require(0 < cfg.gamma <= 1, "gamma", "in (0, 1]", cfg.gamma)
    _require(cfg.grad_clip is None or cfg.grad_clip > 0, "grad_clip", "None or > 0", cfg.grad_clip)
    _require(0.0 <= cfg.val_fraction < 1.0, "val_fraction", "in [0, 1)", cfg.val_fraction)
    _require(cfg.n_genes >= 1, "n_genes", ">= 1", cfg.n_genes)
    _require(cfg.patch_size >= 1, "patch_size", ">= 1", cfg.patch_size)
    _require(cfg.target_mpp is None or cfg.target_mpp > 0, "target_mpp", "None or > 0", cfg.target_mpp)
    outputs = ("shared", "bias", "affine")
    _require(cfg.gene_output in outputs, "gene_output", f"one of {outputs}", cfg.gene_output)


#: Named configurations: ``small`` (default, CPU friendly) and the authors' ``her2st``, ``stnet``, ``cscc``.
PRESETS: dict[str, DKANConfig] = {name: DKANConfig(**values) for name, values in PRESET_VALUES.items()}
