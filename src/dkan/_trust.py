"""Trust signals of a prediction, in plain numpy: split-conformal intervals, per-gene reliability, novelty.

* **Intervals.** On held-out (validation) spots, each gene's *normalised score* is ``|y - mu| / sigma`` (``sigma``
  the spread the model reports there, floored). The model keeps, per gene, quantiles of those scores
  (:data:`LEVELS`) and their root mean square. At prediction time the interval at level ``a`` is
  ``mu +- q * sigma`` with ``q`` the split-conformal quantile (level ``ceil((n + 1) a) / n`` of the ``n``
  scores), and the calibrated standard deviation is ``sigma * rms``.
* **Reliability.** Per gene, the Pearson r between prediction and target on the validation spots.
* **Novelty.** Frozen spot features are embedded as the unit direction of their (signed) square root plus a
  weighted log of its norm (:func:`embed`). A spot's novelty is a local outlier ratio: its mean distance to its
  ``k`` nearest reference spots (a capped random subset of the training spots) over those neighbours' own mean
  distance to their ``k`` nearest; the threshold is a high quantile of the reference spots' own leave-one-out
  novelty. Models saved with the earlier reference (version 1: standardised features on 32 principal components,
  plain kNN distance) are still scored with it.
* **Colour.** Frozen features barely move under a stain or scanner colour change, so the colour of each spot's
  patch is checked on its own: its mean optical density per R, G, B channel (:func:`optical_density`), reduced to
  the share of each channel in the total (:func:`colour_embed`: the stain's hue, not how much tissue or stain there
  is). A spot's colour novelty is its Mahalanobis distance to the training spots' shares (mean and covariance) over
  a high quantile of the training spots' own distances (:func:`fit_colour`).
"""

from __future__ import annotations

import math

import numpy as np

#: Quantile levels at which the normalised scores are stored (401 levels, steps of 0.25 %).
LEVELS = np.linspace(0.0, 1.0, 401)
#: Most training spots kept as the novelty reference (a random subset).
MAX_REFERENCE = 2000
#: Floor of the reported spread, relative to each gene's median spread on the validation spots.
SIGMA_FLOOR = 1e-3


def pearson_per_gene(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson r of each column ``(n, G) -> (G,)``; NaN where a column is constant or ``n < 2``."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if len(p) < 2:
        return np.full(p.shape[1], np.nan)
    p, t = p - p.mean(0), t - t.mean(0)
    den = np.sqrt((p * p).sum(0) * (t * t).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (p * t).sum(0) / np.where(den > 0, den, 1.0), np.nan)


def sigma_floor(sigma: np.ndarray) -> np.ndarray:
    """Per-gene floor of the spread ``(n, G) -> (G,)``: :data:`SIGMA_FLOOR` times its median (tiny if that is 0)."""
    med = np.median(np.asarray(sigma, dtype=np.float64), axis=0)
    return np.where(med > 0, SIGMA_FLOOR * med, 1e-12)


def fit_conformal(residual: np.ndarray, sigma: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene calibration from validation residuals ``y - mu`` and spreads ``sigma`` (both ``(n, G)``).

    Returns
    -------
    ``quantiles`` ``(len(LEVELS), G)`` of the normalised scores, ``rms`` ``(G,)`` their root mean square, ``floor``
    ``(G,)`` the spread floor, ``n`` ``(1,)`` the number of calibration spots.
    """
    residual = np.asarray(residual, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if residual.shape != sigma.shape or residual.ndim != 2 or len(residual) < 2:
        raise ValueError(f"Need residuals and spreads of one shape (n >= 2, G); found {residual.shape}, {sigma.shape}.")
    floor = sigma_floor(sigma)
    scores = np.abs(residual) / np.maximum(sigma, floor)
    return {
        "quantiles": np.quantile(scores, LEVELS, axis=0).astype(np.float32),
        "rms": np.sqrt(np.mean(scores**2, axis=0)).astype(np.float32),
        "floor": floor.astype(np.float32),
        "n": np.array([len(scores)], dtype=np.int64),
    }


def conformal_level(level: float, n: int) -> tuple[float, bool]:
    """The score quantile level giving coverage ``level`` with ``n`` calibration spots; whether it is attainable.

    Split conformal: the ``ceil((n + 1) level)``-th smallest of ``n`` scores. When that exceeds ``n`` the exact
    interval is unbounded; the largest score is used and ``False`` returned.
    """
    rank = math.ceil((n + 1) * level)
    return min(rank / n, 1.0), rank <= n


def interval_factor(calibration: dict[str, np.ndarray], level: float) -> tuple[np.ndarray, bool]:
    """Per-gene multiplier ``q`` of the spread for a ``level`` interval (``mu +- q sigma``), and if attainable."""
    q_level, ok = conformal_level(level, int(calibration["n"][0]))
    table = np.asarray(calibration["quantiles"], dtype=np.float64)
    return np.array([np.interp(q_level, LEVELS, table[:, g]) for g in range(table.shape[1])]), ok


def calibrated_sigma(sigma: np.ndarray, calibration: dict[str, np.ndarray]) -> np.ndarray:
    """The spread ``(n, G)`` floored and scaled so that its square matches the mean squared validation error."""
    floor = np.asarray(calibration["floor"], dtype=np.float64)
    return (np.maximum(sigma, floor) * np.asarray(calibration["rms"], dtype=np.float64)).astype(np.float32)


# --------------------------------------------------------------------------------------------- novelty
#: Version of the novelty reference :func:`fit_novelty` writes (1: the PCA kNN distance of models saved earlier).
NOVELTY_VERSION = 2
#: Weight of the log feature norm next to the unit direction in the novelty embedding (see :func:`embed`).
NORM_WEIGHT = 0.5


def embed(features: np.ndarray, norm_scale: float) -> np.ndarray:
    """The novelty embedding ``(n, d) -> (n, d + 1)``: direction of the signed square root, and its log norm.

    Frozen CNN features are non-negative and heavy-tailed; the square root (sign kept for encoders with negative
    features) tempers the few large activations, and the unit direction compares *which* features fire, not how
    strongly. A weak or blank input (features near 0) keeps a distinct direction and, through the last coordinate
    ``NORM_WEIGHT * log(norm / norm_scale)``, its small norm.
    """
    r = np.sign(features) * np.sqrt(np.abs(features))
    norm = np.linalg.norm(r, axis=1)
    unit = r / np.maximum(norm, 1e-12)[:, None]
    log_norm = np.log(np.maximum(norm, 1e-6 * norm_scale) / norm_scale)
    return np.concatenate([unit, NORM_WEIGHT * log_norm[:, None]], axis=1)


def fit_novelty(
    features: np.ndarray, *, max_reference: int = MAX_REFERENCE, k: int = 10, quantile: float = 0.99, seed: int = 0
) -> dict[str, np.ndarray]:
    """The novelty reference of training features ``(n, d)``: embedded reference spots and their own density.

    A spot's novelty (:func:`novelty_scores`) is a local outlier ratio: its mean distance to its ``k`` nearest
    reference spots (in the :func:`embed` space) over those neighbours' own mean distance to their ``k`` nearest
    other reference spots. About 1 inside the training distribution, whether that region is dense or sparse.

    Returns
    -------
    ``reference`` ``(m, d + 1)`` (embedded reference spots, float16), ``own`` ``(m,)`` (their leave-one-out mean
    kNN distance), ``norm_scale``, ``k``, ``threshold`` (the ``quantile`` of the reference's leave-one-out novelty),
    ``quantile`` and ``version`` (:data:`NOVELTY_VERSION`), each ``(1,)``.
    """
    x = _training_rows(features, max_reference, seed)
    norms = np.linalg.norm(np.sqrt(np.abs(x)), axis=1)
    norm_scale = float(np.median(norms)) if np.median(norms) > 0 else 1.0
    points = embed(x, norm_scale).astype(np.float16).astype(np.float64)  # scored as stored
    k = max(1, min(k, len(points) - 1))
    dist, idx = _knn(points, points, k, exclude_self=True)
    own = dist.mean(1)
    own = np.maximum(own, 1e-6 * max(float(np.median(own)), 1e-12))
    loo = own / own[idx].mean(1)
    return {
        "reference": points.astype(np.float16),
        "own": own.astype(np.float32),
        "norm_scale": np.array([norm_scale], dtype=np.float32),
        "k": np.array([k], dtype=np.int64),
        "threshold": np.array([np.quantile(loo, quantile)], dtype=np.float32),
        "quantile": np.array([quantile], dtype=np.float32),
        "version": np.array([NOVELTY_VERSION], dtype=np.int64),
    }


def novelty_version(reference: dict[str, np.ndarray]) -> int:
    """1 for the PCA kNN reference of models saved before :data:`NOVELTY_VERSION` 2, else its stored version."""
    return int(reference["version"][0]) if "version" in reference else 1


def novelty_scores(reference: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Novelty ``(n,)`` of features ``(n, d)`` against a reference of :func:`fit_novelty` (or a version-1 one)."""
    x = np.asarray(features, dtype=np.float64)
    if novelty_version(reference) == 1:
        return _novelty_scores_v1(reference, x)
    points = np.asarray(reference["reference"], dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != points.shape[1] - 1:
        raise ValueError(f"Features of shape {x.shape} do not match the novelty reference ({points.shape[1] - 1}).")
    dist, idx = _knn(embed(x, float(reference["norm_scale"][0])), points, int(reference["k"][0]))
    own = np.asarray(reference["own"], dtype=np.float64)
    return (dist.mean(1) / own[idx].mean(1)).astype(np.float32)


def _knn(query: np.ndarray, points: np.ndarray, k: int, *, exclude_self: bool = False, chunk: int = 1024):
    """Distances ``(n, k)`` and indices of the ``k`` nearest ``points`` of each query row (itself excluded if asked)."""
    dist = np.empty((len(query), k))
    idx = np.empty((len(query), k), dtype=np.int64)
    p2 = (points * points).sum(1)
    for start in range(0, len(query), chunk):
        q = query[start : start + chunk]
        d2 = np.maximum((q * q).sum(1)[:, None] + p2[None, :] - 2.0 * q @ points.T, 0.0)
        if exclude_self:
            d2[np.arange(len(q)), np.arange(start, start + len(q))] = np.inf
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        idx[start : start + len(q)] = part
        dist[start : start + len(q)] = np.sqrt(np.take_along_axis(d2, part, axis=1))
    return dist, idx


def _training_rows(features: np.ndarray, max_reference: int, seed: int) -> np.ndarray:
    """At most ``max_reference`` rows of the training features, checked, as float64."""
    x = np.asarray(features)
    if x.ndim != 2 or len(x) < 3:
        raise ValueError(f"Need training features of shape (n >= 3, d); found shape {x.shape}.")
    if len(x) > max_reference:  # subsample before any copy
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), max_reference, replace=False))]
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("The training features hold non-finite values; recompute them (dkan.tl.extract_features).")
    return x


# --------------------------------------------------------------------------------------------- colour
#: Optical density of each 8-bit value, ``-log10((I + 1) / 256)``: 0 for white (255), about 2.4 for black.
OD_TABLE = -np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)
#: Added to each channel's optical density before taking shares: a blank (white) patch gets equal shares.
COLOUR_EPS = 0.01
#: Variance added to the covariance of the shares (a share difference of 0.001 is invisible).
COLOUR_VAR_FLOOR = 1e-6


def optical_density(patches: np.ndarray) -> np.ndarray:
    """Mean optical density per channel of uint8 patches ``(B, 3, P, P) -> (B, 3)`` float32 (white: 0)."""
    x = np.asarray(patches)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"Need uint8 patches of shape (B, 3, P, P); found {x.dtype} {x.shape}.")
    n_px = x.shape[2] * x.shape[3]
    counts = np.array([[np.bincount(x[b, c].ravel(), minlength=256) for c in range(3)] for b in range(len(x))])
    return (counts.reshape(len(x), 3, 256) @ OD_TABLE / max(n_px, 1)).astype(np.float32)


def colour_embed(od: np.ndarray) -> np.ndarray:
    """Shares of the R and G channels in a spot's optical density ``(n, 3) -> (n, 2)`` (B is the rest)."""
    x = np.maximum(np.asarray(od, dtype=np.float64), 0.0) + COLOUR_EPS
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"Need optical densities of shape (n, 3); found {x.shape}.")
    return x[:, :2] / x.sum(1, keepdims=True)


def fit_colour(od: np.ndarray, *, quantile: float = 0.99) -> dict[str, np.ndarray]:
    """The colour reference of the training spots' optical densities ``(n, 3)`` (:func:`optical_density`).

    Returns
    -------
    ``mean`` ``(2,)`` and ``precision`` ``(2, 2)`` (inverse covariance) of the :func:`colour_embed` shares,
    ``threshold`` (the ``quantile`` of the training spots' own Mahalanobis distances), ``quantile`` and ``n``
    (training spots), each ``(1,)``.
    """
    x = np.asarray(od, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3 or len(x) < 3 or not np.isfinite(x).all():
        raise ValueError(f"Need finite training optical densities of shape (n >= 3, 3); found shape {x.shape}.")
    z = colour_embed(x)
    mean = z.mean(0)
    precision = np.linalg.inv(np.cov(z.T) + COLOUR_VAR_FLOOR * np.eye(2))
    ref = {"mean": mean, "precision": precision}
    threshold = max(float(np.quantile(colour_distance(ref, x), quantile)), 1e-6)
    return {
        "mean": mean.astype(np.float32),
        "precision": precision.astype(np.float32),
        "threshold": np.array([threshold], dtype=np.float32),
        "quantile": np.array([quantile], dtype=np.float32),
        "n": np.array([len(x)], dtype=np.int64),
    }


def colour_distance(reference: dict[str, np.ndarray], od: np.ndarray) -> np.ndarray:
    """Mahalanobis distance ``(n,)`` of optical densities ``(n, 3)`` to a :func:`fit_colour` reference."""
    d = colour_embed(od) - np.asarray(reference["mean"], dtype=np.float64)
    prec = np.asarray(reference["precision"], dtype=np.float64)
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, prec, d), 0.0)).astype(np.float32)


def colour_novelty(reference: dict[str, np.ndarray], od: np.ndarray) -> np.ndarray:
    """Colour novelty ``(n,)``: the :func:`colour_distance` over the reference's threshold (above 1: novel)."""
    return (colour_distance(reference, od) / float(reference["threshold"][0])).astype(np.float32)


# ------------------------------------------------------------------ version 1 (models saved before version 2)
def fit_novelty_v1(
    features: np.ndarray,
    *,
    max_reference: int = MAX_REFERENCE,
    n_components: int = 32,
    k: int = 10,
    quantile: float = 0.99,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The version-1 reference (standardised features on 32 PCs plus the residual norm; mean kNN distance).

    Kept to score models saved with it. It missed real unfamiliar input (a blank slide, mouse tissue against a
    her2st model): weak or featureless inputs land near the centre of the standardised cloud, close to everything.
    """
    x = _training_rows(features, max_reference, seed)
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 1e-8 * max(float(scale.max()), 1e-30), scale, 1.0)
    z = (x - mean) / scale
    c = max(1, min(n_components, z.shape[1], len(z) - 1))
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    ref = {"mean": mean, "scale": scale, "components": vt[:c]}
    points = _project(ref, x)
    k = max(1, min(k, len(points) - 1))
    loo = _knn_mean(points, points, k, exclude_self=True)
    out = {name: np.asarray(v, dtype=np.float32) for name, v in ref.items()}
    out["reference"] = points.astype(np.float32)
    out["k"] = np.array([k], dtype=np.int64)
    out["threshold"] = np.array([np.quantile(loo, quantile)], dtype=np.float32)
    out["quantile"] = np.array([quantile], dtype=np.float32)
    return out


def _novelty_scores_v1(reference: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Version-1 novelty: mean distance to the ``k`` nearest reference spots."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(reference["mean"]):
        raise ValueError(f"Features of shape {x.shape} do not match the novelty reference ({len(reference['mean'])}).")
    points = _project(reference, x)
    return _knn_mean(points, np.asarray(reference["reference"], dtype=np.float64), int(reference["k"][0])).astype(
        np.float32
    )


def _project(ref: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Standardised features on the components, plus the norm of the residual as a last coordinate."""
    z = (x - np.asarray(ref["mean"], dtype=np.float64)) / np.asarray(ref["scale"], dtype=np.float64)
    comp = np.asarray(ref["components"], dtype=np.float64)
    proj = z @ comp.T
    rest = np.sqrt(np.maximum((z * z).sum(1) - (proj * proj).sum(1), 0.0))
    return np.concatenate([proj, rest[:, None]], axis=1)


def _knn_mean(query: np.ndarray, points: np.ndarray, k: int, *, exclude_self: bool = False) -> np.ndarray:
    """Mean Euclidean distance of each query row to its ``k`` nearest ``points`` (itself excluded if asked)."""
    return _knn(query, points, k, exclude_self=exclude_self)[0].mean(1)
