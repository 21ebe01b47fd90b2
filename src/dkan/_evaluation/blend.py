"""DKAN+probes: the equal-weight mean of the network's and the tuned ``ridge_ctx`` and ``knn`` probes' predictions.

With ``DKANConfig(probe_blend=True)`` a model carries both probes (fitted by :func:`.probes.fit_probes`, the path
the baselines of :func:`dkan.tl.cross_validate` use) as plain arrays:

- ``ridge_ctx.weight`` ``(D, G)`` and ``ridge_ctx.bias`` ``(G,)``: standardisation, PCA and ridge folded into one
  affine map of the raw probe input ``[spot features, masked mean of the region tiles]``;
- ``knn.mean``, ``knn.scale``, ``knn.components``, ``knn.centre`` (the standardisation and PCA), ``knn.scores``
  and ``knn.targets`` (the training spots' PCA scores and targets); ``k`` is in the model's meta.

The blend covers the panel genes only; genes queried by text stay network-only.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from dkan._evaluation.probes import ProbePredictor, _Basis, fit_probes

logger = logging.getLogger("dkan")

#: The probes of the blend, in the order they are averaged.
BLEND_PROBES = ("ridge_ctx", "knn")
#: Array names a model stores for the blend (``probe.<name>`` tensors).
ARRAY_NAMES = (
    "ridge_ctx.weight", "ridge_ctx.bias",
    "knn.mean", "knn.scale", "knn.components", "knn.centre", "knn.scores", "knn.targets",
)  # fmt: skip


def fit_blend_probes(
    samples: list[Any],
    train: list[int],
    *,
    seed: int,
    cache: dict[int, np.ndarray] | None = None,
    rows: list[np.ndarray] | None = None,
) -> dict[str, ProbePredictor]:
    """The ``ridge_ctx`` and ``knn`` probes on the ``train`` samples (their ``rows`` only, when given)."""
    return fit_probes(list(BLEND_PROBES), samples, train, seed=seed, cache=cache, rows=rows)


def try_fit_blend_probes(
    samples: list[Any],
    train: list[int],
    *,
    seed: int,
    cache: dict[int, np.ndarray] | None = None,
    rows: list[np.ndarray] | None = None,
    purpose: str = "the blend",
) -> dict[str, ProbePredictor] | None:
    """:func:`fit_blend_probes`, or None with one warning when the data cannot fit them (too few spots or samples).

    The probes tune their parameter on an inner split of the training spots; a tiny training set (a few dozen
    spots) or one without region features has none. The caller then falls back to the network alone.
    """
    try:
        return fit_blend_probes(samples, train, seed=seed, cache=cache, rows=rows)
    except ValueError as err:
        logger.warning(
            "DKAN+probes (`probe_blend=True`): the ridge_ctx and knn probes for %s cannot be fitted on this training "
            "data (%s); the network alone is used instead. Set `probe_blend=False` to silence this.",
            purpose,
            err,
        )
        return None


def blend(network: np.ndarray, probe_preds: list[np.ndarray]) -> np.ndarray:
    """Equal-weight mean of the network's prediction and each probe's, float32."""
    parts = [np.asarray(network, dtype=np.float64), *(np.asarray(p, dtype=np.float64) for p in probe_preds)]
    return (sum(parts) / len(parts)).astype(np.float32)


def probe_arrays(probes: dict[str, ProbePredictor]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays a model stores for the blend and the fitted settings (for ``model.meta["probe_blend"]``)."""
    ridge, knn = probes["ridge_ctx"], probes["knn"]
    rb = ridge.basis
    proj = rb.components.T @ ridge.coef  # (D, G) on the standardised input
    weight = proj / rb.scale[:, None]
    bias = ridge.intercept - (rb.mean / rb.scale + rb.centre) @ proj
    kb = knn.basis
    arrays = {
        "ridge_ctx.weight": weight, "ridge_ctx.bias": bias,
        "knn.mean": kb.mean, "knn.scale": kb.scale, "knn.components": kb.components, "knn.centre": kb.centre,
        "knn.scores": knn.train_scores, "knn.targets": knn.train_targets,
    }  # fmt: skip
    arrays = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}
    settings = {name: dict(p.params) for name, p in probes.items()}
    return arrays, settings


def check_arrays(arrays: dict[str, np.ndarray], settings: Any, *, n_genes: int, where: str) -> None:
    """Refuse stored probe arrays that are incomplete or do not fit the model's panel (naming what is wrong)."""
    missing = [n for n in ARRAY_NAMES if n not in arrays]
    if missing:
        raise ValueError(f"{where}: the probe tensors {['probe.' + n for n in missing]} are missing.")
    if not isinstance(settings, dict) or "k" not in (settings.get("knn") or {}):
        raise ValueError(f"{where}: the model stores probe tensors but `meta.probe_blend.knn.k` is missing.")
    w, t = arrays["ridge_ctx.weight"], arrays["knn.targets"]
    if w.ndim != 2 or w.shape[1] != n_genes or t.ndim != 2 or t.shape[1] != n_genes:
        raise ValueError(
            f"{where}: probe tensors `ridge_ctx.weight` {w.shape} / `knn.targets` {t.shape} do not have one column "
            f"per panel gene ({n_genes})."
        )


def predict_probes(arrays: dict[str, np.ndarray], settings: dict[str, Any], x: Any) -> list[np.ndarray]:
    """``[ridge_ctx, knn]`` predictions ``(n, G)`` float32 of probe inputs ``x`` (:func:`.probes.context_input`)."""
    x = np.asarray(x, dtype=np.float64)
    weight = arrays["ridge_ctx.weight"]
    if x.ndim != 2 or x.shape[1] != weight.shape[0]:
        raise ValueError(f"The probe input has shape {x.shape}; the model's probes take {weight.shape[0]} columns.")
    ridge = (x @ weight + arrays["ridge_ctx.bias"]).astype(np.float32)
    basis = _Basis(arrays["knn.mean"], arrays["knn.scale"], arrays["knn.components"], arrays["knn.centre"])
    knn = ProbePredictor("knn", basis, None, None, arrays["knn.scores"], arrays["knn.targets"], dict(settings["knn"]))
    return [ridge, knn.predict(x)]
