"""Tuned probes on frozen features: ridge and kNN whose one parameter is chosen on the training data only.

A probe standardises its input, projects it on ``min(256, n_spots, n_features)`` principal components (both
fitted on the training spots), then fits

- ``ridge``: ridge regression on the spot features, ``alpha`` from :data:`ALPHAS`;
- ``ridge_ctx``: the same on ``[spot features, masked mean of the region tiles]``;
- ``knn``: distance-weighted k nearest neighbours (cosine distance between the standardised PCA scores of the
  ``ridge_ctx`` input), ``k`` from :data:`KS`.

The parameter is the one with the highest mean per-gene Pearson r on an inner split of the *training* samples:
leave one training sample out in turn when there are at least :data:`MIN_SECTIONS` of them, else the spatial
block split that training uses for validation (:func:`dkan.train.data.make_validation_split`). The test samples
of a fold are never passed here, so the chosen parameter cannot depend on them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger("dkan")

PROBES = ("ridge", "ridge_ctx", "knn")  #: the tuned probes
#: ridge penalties tried, 1e-3 ... 1e7 (1e4 was the top until her2st chose it in every fold: a grid edge is no tuning)
ALPHAS = tuple(float(10.0**e) for e in range(-3, 8))
KS = (5, 10, 20, 50, 100)  #: neighbour counts tried
MIN_SECTIONS = 3  #: fewest training samples for the inner leave-one-sample-out
BLOCK_FRACTION = 0.2  #: share of each training sample in the inner validation blocks (fewer samples)
_EPS = 1e-8


def probe_features(spot: Any, region: Any = None, mask: Any = None, *, context: bool) -> np.ndarray:
    """Input of a probe: the spot features, or ``[spot, masked mean of the region tiles]`` with ``context``.

    Parameters
    ----------
    spot
        ``(n, D)`` spot features.
    region
        ``(n, T, D)`` region-tile features of every spot (needed with ``context``).
    mask
        ``(n, T)`` 1 where a region tile lies in the image; None: every tile counts.
    context
        Append the masked mean of the region tiles.

    Returns
    -------
    ``(n, D)`` or ``(n, 2 D)`` float64 features.
    """
    x = np.asarray(spot, dtype=np.float64)
    if not context:
        return x
    if region is None:
        raise ValueError("`region` is None but the probe uses region context; compute region features first.")
    r = np.asarray(region, dtype=np.float64)
    m = np.ones(r.shape[:2]) if mask is None else np.asarray(mask, dtype=np.float64)
    mean = (r * m[..., None]).sum(axis=1) / np.maximum(m.sum(axis=1, keepdims=True), 1.0)
    return np.concatenate([x, mean], axis=1)


def inner_splits(grids: list[np.ndarray], *, seed: int) -> tuple[list[tuple[list[np.ndarray], list[np.ndarray]]], str]:
    """Inner validation splits of the training samples: per split, the train and validation rows of each sample.

    Leave-one-sample-out with at least :data:`MIN_SECTIONS` samples, else one spatial block split
    (:func:`dkan.train.data.make_validation_split` with ``strategy="blocks"``).
    """
    from dkan.train.data import make_validation_split

    n = [len(g) for g in grids]
    none = np.zeros(0, dtype=np.int64)
    if len(grids) >= MIN_SECTIONS:
        splits = [
            ([none if s == held else np.arange(k) for s, k in enumerate(n)],
             [np.arange(k) if s == held else none for s, k in enumerate(n)])
            for held in range(len(grids))
        ]  # fmt: skip
        return splits, f"leave one of the {len(grids)} training samples out"
    names = [str(i) for i in range(len(grids))]
    split = make_validation_split(names, grids, BLOCK_FRACTION, strategy="blocks", seed=seed)
    return [(split.train, split.val)], split.description


@dataclass
class _Basis:
    """Standardisation and PCA fitted on training rows."""

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray  #: ``(n_pcs, D)``
    centre: np.ndarray  #: mean of the standardised training rows

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale - self.centre) @ self.components.T


def _fit_basis(x: np.ndarray, n_pcs: int, seed: int) -> _Basis:
    from sklearn.decomposition import PCA

    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (x - mean) / scale
    n_comp = int(min(n_pcs, z.shape[0] - 1, z.shape[1]))
    pca = PCA(n_components=max(n_comp, 1), random_state=seed).fit(z)
    return _Basis(mean, scale, pca.components_, pca.mean_)


def _ridge_all(z: np.ndarray, y: np.ndarray, alphas: tuple[float, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ridge ``(coef, intercept)`` for every alpha, from one SVD of the centred training scores."""
    zm, ym = z.mean(axis=0), y.mean(axis=0)
    u, s, vt = np.linalg.svd(z - zm, full_matrices=False)
    uty = u.T @ (y - ym)
    out = []
    for a in alphas:
        coef = vt.T @ ((s / (s**2 + a))[:, None] * uty)
        out.append((coef, ym - zm @ coef))
    return out


def _unit(z: np.ndarray) -> np.ndarray:
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), _EPS)


def _knn_all(zq: np.ndarray, zt: np.ndarray, y: np.ndarray, ks: tuple[int, ...]) -> list[np.ndarray]:
    """Distance-weighted kNN predictions (cosine distance) of the query rows for every k, in one pass."""
    kmax = min(max(ks), len(zt))
    out = [np.empty((len(zq), y.shape[1])) for _ in ks]
    qt, tt = _unit(zq), _unit(zt)
    for start in range(0, len(zq), 1024):
        sim = qt[start : start + 1024] @ tt.T
        idx = np.argpartition(-sim, kmax - 1, axis=1)[:, :kmax] if kmax < sim.shape[1] else np.argsort(-sim, axis=1)
        order = np.argsort(-np.take_along_axis(sim, idx, axis=1), axis=1, kind="stable")
        idx = np.take_along_axis(idx, order, axis=1)
        dist = np.clip(1.0 - np.take_along_axis(sim, idx, axis=1), 0.0, None)
        w_all = 1.0 / (dist + 1e-6)
        for j, k in enumerate(ks):
            kk = min(k, kmax)
            w = w_all[:, :kk]
            out[j][start : start + 1024] = np.einsum("qk,qkg->qg", w, y[idx[:, :kk]]) / w.sum(axis=1, keepdims=True)
    return out


def _mean_pcc(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean over genes of the Pearson r across spots (NaN r of constant genes left out)."""
    p, t = pred - pred.mean(axis=0), y - y.mean(axis=0)
    den = np.sqrt((p**2).sum(axis=0) * (t**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, (p * t).sum(axis=0) / np.where(den > 0, den, 1.0), np.nan)
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


@dataclass
class ProbePredictor:
    """A fitted probe; ``params`` records the chosen parameter and the inner scores of every candidate."""

    kind: str  #: "ridge", "ridge_ctx" or "knn"
    basis: _Basis
    coef: np.ndarray | None  #: ridge: ``(n_pcs, n_genes)``
    intercept: np.ndarray | None  #: ridge: ``(n_genes,)``
    train_scores: np.ndarray | None  #: knn: PCA scores of the training spots
    train_targets: np.ndarray | None  #: knn: their targets
    params: dict[str, Any] = field(default_factory=dict)

    def predict(self, X: Any) -> np.ndarray:
        """Return ``(n_spots, n_genes)`` float32 predictions for probe inputs ``X`` (see :func:`probe_features`)."""
        x = np.asarray(X, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.basis.mean):
            raise ValueError(f"`X` has shape {x.shape}; the probe was fitted on {len(self.basis.mean)} columns.")
        z = self.basis.transform(x)
        if self.kind == "knn":
            pred = _knn_all(z, self.train_scores, self.train_targets, (int(self.params["k"]),))[0]
        else:
            pred = z @ self.coef + self.intercept
        return pred.astype(np.float32)


def _scores(kind: str, x_tr, y_tr, x_va, y_va, *, n_pcs: int, seed: int) -> np.ndarray:
    """Inner mean per-gene r of every candidate parameter on one inner split."""
    basis = _fit_basis(x_tr, n_pcs, seed)
    z_tr, z_va = basis.transform(x_tr), basis.transform(x_va)
    if kind == "knn":
        preds = _knn_all(z_va, z_tr, y_tr, KS)
    else:
        preds = [z_va @ c + b for c, b in _ridge_all(z_tr, y_tr, ALPHAS)]
    return np.array([_mean_pcc(p, y_va) for p in preds])


def fit_probe(
    kind: str,
    X: list[Any],
    Y: list[Any],
    grids: list[Any],
    *,
    n_pcs: int = 256,
    seed: int = 0,
) -> ProbePredictor:
    """Fit a tuned probe on training samples only, choosing its parameter by an inner split of them.

    Parameters
    ----------
    kind
        ``"ridge"``, ``"ridge_ctx"`` (both ridge; the caller passes spot or context inputs, see
        :func:`probe_features`) or ``"knn"``.
    X, Y, grids
        Per training sample: inputs ``(n, D)``, targets ``(n, G)`` and integer grid positions ``(n, 2)``.
    n_pcs
        Principal components kept (capped by the spots and features).
    seed
        Seed of the PCA and of the inner block split.

    Returns
    -------
    A :class:`ProbePredictor`; ``params`` holds the chosen ``alpha`` or ``k``, the inner split and its scores.
    """
    if kind not in PROBES:
        raise ValueError(f"Unknown probe `kind={kind!r}`; choose from {list(PROBES)}.")
    if not (len(X) == len(Y) == len(grids)) or not X:
        raise ValueError(
            f"`X`, `Y` and `grids` need one entry per training sample; found {len(X)}, {len(Y)}, {len(grids)}."
        )
    xs = [np.asarray(x, dtype=np.float64) for x in X]
    ys = [np.asarray(y, dtype=np.float64) for y in Y]
    splits, how = inner_splits([np.asarray(g) for g in grids], seed=seed)
    table = []

    def cat(arrs: list[np.ndarray], rows: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([a[r] for a, r in zip(arrs, rows, strict=True)])

    for tr, va in splits:
        table.append(_scores(kind, cat(xs, tr), cat(ys, tr), cat(xs, va), cat(ys, va), n_pcs=n_pcs, seed=seed))
    inner = np.nanmean(np.vstack(table), axis=0)
    grid = KS if kind == "knn" else ALPHAS
    best = int(np.nanargmax(inner)) if np.isfinite(inner).any() else 0
    if kind != "knn" and best == len(grid) - 1:
        logger.warning(
            "Probe %s: the inner split chose the largest alpha tried (%g); the grid may be too narrow.",
            kind,
            grid[best],
        )
    x_all, y_all = np.concatenate(xs), np.concatenate(ys)
    basis = _fit_basis(x_all, n_pcs, seed)
    z = basis.transform(x_all)
    name = "k" if kind == "knn" else "alpha"
    params = {
        "baseline": kind,
        name: grid[best],
        "inner_split": how,
        "inner_pcc": {str(v): float(s) for v, s in zip(grid, inner, strict=True)},
        "n_pcs": int(z.shape[1]),
        "n_train": len(x_all),
    }
    if kind == "knn":
        return ProbePredictor(kind, basis, None, None, z, y_all, params)
    coef, intercept = _ridge_all(z, y_all, (grid[best],))[0]
    return ProbePredictor(kind, basis, coef, intercept, None, None, params)


def baseline_fold(
    name: str,
    samples: list[Any],
    train: list[int],
    test: list[int],
    *,
    seed: int,
    cache: dict[int, np.ndarray] | None = None,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Fit baseline ``name`` on the ``train`` samples only; predict the ``test`` samples. Returns predictions, params.

    ``cache`` keeps the context inputs (spot and region mean) of each sample between folds and probes.
    """
    from dkan._evaluation.baselines import fit_mean, fit_ridge

    y = [samples[i].target.numpy() for i in train]
    if name == "mean":
        model = fit_mean(np.concatenate(y))
    elif name == "ridge_hest":
        model = fit_ridge(np.concatenate([samples[i].spot.numpy() for i in train]), np.concatenate(y), seed=seed)
    else:
        cache = {} if cache is None else cache
        model = fit_probes([name], samples, train, seed=seed, cache=cache)[name]
        outs = [np.asarray(model.predict(probe_input(name, samples, i, cache)), dtype=np.float32) for i in test]
        return outs, dict(model.params)
    return [np.asarray(model.predict(samples[i].spot.numpy()), dtype=np.float32) for i in test], dict(model.params)


def fit_probes(
    names: list[str],
    samples: list[Any],
    train: list[int],
    *,
    seed: int,
    cache: dict[int, np.ndarray] | None = None,
    rows: list[np.ndarray] | None = None,
) -> dict[str, ProbePredictor]:
    """Fit the tuned probes ``names`` on the ``train`` samples (only ``rows[k]`` of ``train[k]`` when given).

    The one fitting path of the probes: the baselines of :func:`dkan.tl.cross_validate` and the probes a model
    stores with ``DKANConfig(probe_blend=True)`` both come from here. Samples left without rows are skipped.
    """
    cache = {} if cache is None else cache
    picked = [(i, slice(None) if rows is None else np.asarray(rows[k])) for k, i in enumerate(train)]
    picked = [(i, r) for i, r in picked if rows is None or len(r)]
    if not picked:
        raise ValueError("No training rows to fit the probes on; check `rows` (every entry is empty).")
    out = {}
    for name in names:
        x = [probe_input(name, samples, i, cache)[r] for i, r in picked]
        y = [samples[i].target.numpy()[r] for i, r in picked]
        grids = [samples[i].grid.numpy()[r] for i, r in picked]
        out[name] = fit_probe(name, x, y, grids, seed=seed)
    return out


def probe_input(name: str, samples: list[Any], i: int, cache: dict[int, np.ndarray]) -> np.ndarray:
    """Input of probe ``name`` for sample ``i``: its spot features (``ridge``), else :func:`context_input`."""
    return samples[i].spot.numpy().astype(np.float64) if name == "ridge" else _context_input(samples, i, cache)


def context_input(sample: Any) -> np.ndarray:
    """``[spot features, masked mean of the region tiles]`` of one sample's model inputs (float64)."""
    return _context_input([sample], 0, {})


def _context_input(samples: list[Any], i: int, cache: dict[int, np.ndarray]) -> np.ndarray:
    """``[spot features, masked mean of the region tiles]`` of sample ``i`` (cached)."""
    if i not in cache:
        import torch

        from dkan.train.data import region_rows

        s = samples[i]
        if s.region is None:
            raise ValueError(
                f"Sample {s.name!r} has no region features; the `ridge_ctx` and `knn` baselines need them "
                "(use a configuration with `use_region=True`, or the baselines `mean`, `ridge`, `ridge_hest`)."
            )
        means = []
        for rows in torch.arange(len(s)).split(512):
            reg, m = region_rows(s, rows).float(), s.mask[rows].float()
            means.append(((reg * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)).numpy())
        cache[i] = np.concatenate([s.spot.numpy(), np.concatenate(means)], axis=1).astype(np.float64)
    return cache[i]
