"""Parts of ``shared_tiles_her2st.py``: DKAN trained spot by spot and tested on shared tiles; whole-slide passes."""

from __future__ import annotations

import numpy as np


def dkan_mismatch(sdata, res, desc, layouts: dict[str, tuple[np.ndarray, np.ndarray]], **overrides) -> dict:
    """DKAN trained spot by spot per fold, its test section predicted from spot-by-spot and each variant's tiles.

    One training per fold (the ``small`` preset's network alone, ``probe_blend=False``), so the variants differ only
    in the test section's region features: a model trained by default that then predicts with shared tiles.
    """
    import dataclasses

    import torch

    import dkan.tl._cv as cv
    from dkan._evaluation.folds import summarise_folds
    from dkan.tl._cv_fold import fit_fold, predict_fold

    samples_col = res.obs["sample"].to_numpy()
    extra: dict[str, list[tuple[str, np.ndarray]]] = {n: [] for n in layouts}

    def fold(samples, train, test, emb, cfg, dev, reader, progress, *, trust=False, probes=None):
        module, result, _ = fit_fold(samples, train, emb, cfg, dev, reader, progress)
        outs = predict_fold(module, samples, test, emb, cfg, dev, reader)
        for i in test:
            s, rows = samples[i], np.flatnonzero(samples_col == samples[i].name)
            for name, (tiles, index) in layouts.items():
                variants = list(samples)  # sample i with this layout's region features
                variants[i] = dataclasses.replace(
                    s, region=torch.as_tensor(tiles), region_index=torch.as_tensor(index[rows], dtype=torch.int64)
                )
                extra[name].append((s.name, predict_fold(module, variants, [i], emb, cfg, dev, reader)[0]))
        return outs, result.history, None, outs

    real = cv._dkan_fold
    cv._dkan_fold = fold
    try:
        out = cv.cross_validate(
            sdata, groupby="sample", config="small", baselines=(), descriptions=desc, device="cpu", progress=False,
            panel_per_fold=True, **{"probe_blend": False, **overrides},
        )  # fmt: skip
    finally:
        cv._dkan_fold = real
    names = list(dict.fromkeys(out.obs["sample"]))
    offsets = np.r_[0, np.cumsum([int((out.obs["sample"] == n).sum()) for n in names])]
    preds = {"spot_by_spot": out.predictions["DKAN"]}
    genes = list(out.genes)
    for name, parts in extra.items():
        p = np.full_like(preds["spot_by_spot"], np.nan)
        for sample, pred in parts:
            k = names.index(sample)
            f = int(out.obs["fold"].to_numpy()[offsets[k]])
            cols = [genes.index(g) for g in out.fold_genes[f]]
            p[offsets[k] : offsets[k + 1], cols] = pred
        preds[name] = p
    sets = out.summary.gene_sets
    fold_sets = [{"heg": h, "hvg": v} for h, v in zip(sets["heg"], sets["hvg"], strict=True)]
    summary = summarise_folds(preds, out.target, out.obs, genes, out.fold_genes, fold_sets)
    pf = summary.per_fold
    table = {}
    for name in preds:
        rows = pf[pf["method"] == name]
        table[name] = {
            "pcc_all": float(rows["pcc_all"].mean()),
            "pcc_all_folds": [float(v) for v in rows["pcc_all"]],
            "pcc_heg": float(rows["pcc_heg"].mean()),
        }
        print(
            f"DKAN trained spot by spot, test region tiles {name}: PCC-ALL {table[name]['pcc_all']:.4f} "
            f"({', '.join(f'{v:.3f}' for v in table[name]['pcc_all_folds'])}), PCC-HEG {table[name]['pcc_heg']:.4f}"
        )
    return table


def _row(x: np.ndarray, y: float) -> np.ndarray:
    return np.c_[x, np.full_like(x, y)]


def wsi_passes(subdivisions=(1, 2, 3, 4), *, radius_um: float = 6430.0) -> list[dict]:
    """Encoder passes on whole-slide pseudo-spots (geometry only): a disc of the 100 µm hex layout of
    :func:`dkan.tl.make_spots`, 2 µm/px, 64 px tiles, 5 x 5 regions; every region tile inside the image."""
    from dkan._features.shared_tiles import grid_step, snapped_tiles

    pitch, side, g, r = 50.0, 64, 5, radius_um / 2.0  # px at 2 µm/px
    dy = pitch * np.sqrt(3) / 2
    rows = [
        _row(np.arange(0, 2 * r + pitch, pitch) + (pitch / 2 if i % 2 else 0), i * dy)
        for i in range(int(2 * r / dy) + 2)
    ]
    xy = np.concatenate(rows) + 1000.3
    xy = xy[np.hypot(*(xy - (1000 + r)).T) < r]
    n = len(xy)
    out = [{"subdivide": 0, "spots": n, "passes": n * (1 + g * g)}]
    for d in subdivisions:
        idx = snapped_tiles(xy, tile_side=side, region_side=g * side, grid=g, step=grid_step(side, d))
        tiles = len(np.unique(idx.reshape(-1, 2), axis=0))
        out.append({"subdivide": d, "spots": n, "grid_tiles": tiles, "passes": n + tiles})
    for row in out:
        print(
            f"whole-slide pseudo-spots, subdivide {row['subdivide']}: {row['passes']} passes "
            f"({row['passes'] / n:.2f} per spot, {out[0]['passes'] / row['passes']:.1f}x fewer than spot by spot)"
        )
    return out
