"""Compare novelty scorers on frozen her2st / mouse-bulb features (issue 23): how the version-2 rule was chosen.

Reference: the spot features of her2st C2 and C3 (the training sections of ``novelty_her2st.py``). Scored: held-out
sections of the same patient (C4, C5, C6: should be familiar), C4 with colour shifts, darker, grey and blank, and
the mouse olfactory bulb sections MOB1 and MOB2. Each cell: share of spots above the scorer's threshold (the 99th
percentile of the reference's own leave-one-out, or 5-fold out-of-fold, scores) and, in brackets, the median
score over the threshold. Features are extracted once with ``efficientnet_lite0`` at the ``small`` preset's tile
geometry (64 px at 2 µm/px, spot patches only) and kept in ``--features`` (npz).

Usage::

    python benchmarks/novelty_scorers.py --features /tmp/novelty/features.npz --out benchmarks/results/x.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import novelty_her2st as nb

from dkan import _trust as T

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
CHANGES = {
    "C4 +70,-50,40": lambda a: a.astype(int) + np.array([70, -50, 40])[:, None, None],
    "C4 -40,+30,-60": lambda a: a.astype(int) + np.array([-40, 30, -60])[:, None, None],
    "C4 +35,-25,+20": lambda a: a.astype(int) + np.array([35, -25, 20])[:, None, None],
    "C4 x0.6": lambda a: a.astype(float) * 0.6,
    "C4 grey": lambda a: np.repeat(a.astype(float).mean(0, keepdims=True), 3, 0),
    "C4 blank": lambda a: np.full_like(a, 255),
}


def features(sdata) -> np.ndarray:
    import dkan
    from dkan import _keys as K

    dkan.tl.tile(sdata, patch_size=64, region_grid=5, target_mpp=2.0)
    dkan.tl.extract_features(sdata, "efficientnet_lite0", region=False, progress=False, device="cpu")
    table = next(t for t in sdata.tables.values() if K.SPOT_FEATURES in t.obsm)
    return np.asarray(table.obsm[K.SPOT_FEATURES], dtype=np.float32)


def extract(data: Path, out: Path) -> None:
    import dkan
    from dkan.datasets import copy_sdata

    feats = {}
    for name in SECTIONS:
        feats[name] = features(dkan.datasets.her2st(data / "her2st", sections=[name], progress=False))
    base = dkan.datasets.her2st(data / "her2st", sections=["C4"], progress=False)
    for name, fn in CHANGES.items():
        feats[name] = features(nb.recolour(copy_sdata(base), fn))
    for name in ("MOB1", "MOB2"):
        feats[name] = features(nb.mouse_section(data / "stutility_mob", name))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **feats)


def _l2(y):
    return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)


def _knn_scorer(embed, k=10):
    def fit(x):
        ref = embed(x, x)
        thr = np.quantile(T._knn_mean(ref, ref, k, exclude_self=True), 0.99)
        return thr, lambda y: T._knn_mean(embed(y, x), ref, k)

    return fit


def _lof_scorer(embed, k=10):
    def fit(x):
        ref = embed(x, x)
        d, i = T._knn(ref, ref, k, exclude_self=True)
        own = d.mean(1)
        thr = np.quantile(own / own[i].mean(1), 0.99)

        def score(y):
            dy, iy = T._knn(embed(y, x), ref, k)
            return dy.mean(1) / own[iy].mean(1)

        return thr, score

    return fit


def _pca(x, c=32):
    mean = x.mean(0)
    z = x - mean
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    return mean, vt[:c], s[:c] / np.sqrt(len(x) - 1)


def _mahalanobis(x, c=32, folds=5):
    def fit_one(t):
        mean, comp, sd = _pca(t, c)

        def score(y):
            p = (y - mean) @ comp.T
            res = np.sqrt(np.maximum(((y - mean) ** 2).sum(1) - (p**2).sum(1), 0))
            return np.sqrt(((p / sd) ** 2).sum(1) + ((res - res_med) / res_sd).clip(0) ** 2)

        p = (t - mean) @ comp.T
        r = np.sqrt(np.maximum(((t - mean) ** 2).sum(1) - (p**2).sum(1), 0))
        res_med, res_sd = np.median(r), r.std()
        return score

    order = np.random.default_rng(0).permutation(len(x))
    oof = np.empty(len(x))
    for f in range(folds):
        held = order[f::folds]
        oof[held] = fit_one(x[np.setdiff1d(order, held)])(x[held])
    return np.quantile(oof, 0.99), fit_one(x)


def _v(fit):
    def run(x):
        ref = fit(x)
        return float(ref["threshold"][0]), lambda y: T.novelty_scores(ref, y)

    return run


SCORERS = {
    "v1: standardised, 32 PC + residual, 10-NN (old)": _v(T.fit_novelty_v1),
    "10-NN, raw features": _knn_scorer(lambda y, x: y),
    "10-NN, standardised features": _knn_scorer(lambda y, x: (y - x.mean(0)) / np.maximum(x.std(0), 1e-6)),
    "Mahalanobis, 32 PC + residual (raw, 5-fold threshold)": _mahalanobis,
    "10-NN, cosine": _knn_scorer(lambda y, x: _l2(y)),
    "10-NN, cosine of sqrt": _knn_scorer(lambda y, x: _l2(np.sqrt(np.maximum(y, 0)))),
    "local outlier ratio, raw": _lof_scorer(lambda y, x: y),
    "local outlier ratio, cosine": _lof_scorer(lambda y, x: _l2(y)),
    "v2: local outlier ratio, sqrt direction + 0.5 log norm (new)": _v(T.fit_novelty),
}


def table(feats: dict[str, np.ndarray]) -> str:
    ref = np.concatenate([feats["C2"], feats["C3"]]).astype(np.float64)
    names = [n for n in feats if n not in ("C2", "C3")]
    lines = ["| scorer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, fit in SCORERS.items():
        thr, score = fit(ref)
        cells = []
        for n in names:
            s = score(feats[n].astype(np.float64))
            cells.append(f"{(s > thr).mean():.0%} ({np.median(s) / thr:.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=nb.DEFAULT_DATA)
    p.add_argument("--features", type=Path, default=Path("novelty_features.npz"), help="npz cache (made if absent)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not args.features.is_file():
        extract(args.data, args.features)
    text = table(dict(np.load(args.features)))
    print(text)
    if args.out is not None:
        args.out.write_text("# Novelty scorers on frozen her2st / mouse-bulb features (issue 23)\n\n" + text + "\n")
    return text


if __name__ == "__main__":
    main()
