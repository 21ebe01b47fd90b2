"""Field values of the named presets: the authors' ``her2st``, ``stnet`` and ``cscc`` configurations.

They carry the exact values of the authors' configuration files (``config/{her2st,stnet,skin}/*.yaml`` of
github.com/coffeeNtv/DKAN); ``small`` is the dataclass defaults. Plain mappings: :mod:`dkan._config` turns them into
:class:`~dkan.DKANConfig` objects (:data:`dkan.train.PRESETS`).
"""

from __future__ import annotations

from typing import Any


def _module(prefix: str, depth: int, heads: int, mlp: float, dropout: float) -> dict[str, Any]:
    return {
        f"{prefix}_depth": depth,
        f"{prefix}_heads": heads,
        f"{prefix}_mlp_ratio": float(mlp),
        f"{prefix}_dropout": dropout,
    }


def _reference(tau: float, modules: dict[str, tuple[int, int, float, float]], **extra: Any) -> dict[str, Any]:
    """Values shared by the authors' three configs plus the per-dataset module table (reference section 1.12)."""
    values: dict[str, Any] = {
        "d": 1024,
        "dropout_expr": 0.3,
        "pegh_kernel": 3,
        "temperature": tau,
        "distill": 0.3,
        "contrastive_factor": 3.0,
        "contrastive_genes": None,
        "lr": 1e-4,
        "weight_decay": 0.0,
        "batch_size": 128,
        "max_epochs": 200,
        "patience": 20,
        "min_epochs": 0,
        "val_window": 1,
        "step_size": 50,
        "gamma": 0.9,
        "seed": 2021,
        "grad_clip": None,
        "n_genes": 250,
        "patch_size": 224,
        "target_mpp": None,
        "patch_trainable": True,
        "region_grid": 5,
        "patch_encoder": "resnet18_ciga",
        "feature_encoder": "uni",
        "text_encoder": "biobert",
        "probe_blend": False,  # the authors' network alone
    }
    for prefix, spec in modules.items():
        values.update(_module(prefix, *spec))
    values.update(extra)
    return values


#: Field values of the named configurations (``small``: the field defaults); built in :data:`dkan.train.PRESETS`.
PRESET_VALUES: dict[str, dict[str, Any]] = {
    "small": {},
    "her2st": _reference(
        0.1,
        {
            "fusion": (1, 4, 4, 0.4),
            "slide": (5, 8, 4, 0.3),
            "region": (4, 4, 4, 0.3),
            "img_cross": (4, 4, 4, 0.3),
            "exp_cross": (3, 4, 4, 0.3),
            "text": (3, 4, 4, 0.3),
        },
    ),
    "stnet": _reference(
        0.1,
        {
            "fusion": (3, 16, 4, 0.4),
            "slide": (3, 8, 2, 0.1),
            "region": (4, 8, 4, 0.3),
            "img_cross": (4, 8, 4, 0.3),
            "exp_cross": (4, 8, 4, 0.3),
            "text": (4, 8, 4, 0.3),
        },
    ),
    "cscc": _reference(
        0.08,
        {
            "fusion": (2, 8, 4, 0.1),
            "slide": (2, 16, 1, 0.1),
            "region": (4, 16, 1, 0.3),
            "img_cross": (4, 8, 4, 0.3),
            "exp_cross": (4, 8, 4, 0.3),
            "text": (4, 8, 4, 0.3),
        },
    ),
}
