"""Where shared-tile region features lose accuracy on her2st, measured with the tuned ``ridge_ctx`` probe.

Leave-one-section-out over her2st C2-C6 (the protocol of ``accuracy_her2st.py``: fold panels, targets, gene sets
and the ``ridge_ctx`` probe of :func:`dkan.tl.cross_validate`, DKAN itself not trained). The inputs come from an
``accuracy_her2st.py --cache`` table (spot features, spot-by-spot region features, tile geometry); every variant
keeps those spot features and replaces only the region features:

- ``spot_by_spot``: the cached features (the region window read whole, resized, cut into tiles);
- ``exact_tiles``: each region tile cropped at its exact position and resized alone (isolates the resampling);
- ``grid/N``: the nearest tile of a grid with a step of ``1/N`` tile (``grid/1`` is ``shared_tiles=True``);
- ``grid/N+patch``: the same with the centre cell taken from the spot patch (encoded anyway, so free).

Per variant: encoder passes (spots + distinct region tiles), the distance between each region cell's exact
position and the tile used (mean / max, in tiles), and ``ridge_ctx`` PCC-ALL per fold. Tile features are
encoded once per distinct pixel position and cached in ``--work`` (``.npz``), so reruns take seconds.

``--mismatch`` also fits the probe on spot-by-spot features and tests it on a variant's (a model trained by
default that then predicts with shared tiles); ``--wsi-geometry`` prints the encoder passes of each grid on
whole-slide pseudo-spots (geometry only, no data).

Usage::

    python benchmarks/accuracy_her2st.py --preset small --cache her2st_small.h5ad --ablations none --baselines mean
    python benchmarks/shared_tiles_her2st.py --cache her2st_small.h5ad --work /tmp/tiles [--variants ...] [--mismatch]
    python benchmarks/shared_tiles_her2st.py --wsi-geometry
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("dkan.bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from accuracy_her2st import DEFAULT_DATA

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--wsi-geometry", action="store_true", help="only the whole-slide pass counts (no data)")
    p.add_argument("--cache", type=Path, default=None, help="accuracy_her2st.py --cache table (spot by spot)")
    p.add_argument("--work", type=Path, default=Path("shared_tiles_work"), help="folder for the encoded tiles (npz)")
    p.add_argument("--variants", default="spot_by_spot,exact_tiles,grid/1,grid/1+patch,grid/2,grid/2+patch")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-probe", dest="probe", action="store_false", help="geometry and feature error only")
    p.add_argument("--max-epochs", type=int, default=None, help="override of the preset (smoke runs)")
    p.add_argument(
        "--dkan-mismatch", action="store_true",
        help="train DKAN spot by spot per fold (5 trainings) and predict each test section from spot-by-spot and "
        "from every variant's region tiles",
    )  # fmt: skip
    p.add_argument(
        "--mismatch", action="store_true",
        help="also: probe fitted on spot-by-spot features, test section from the variant's (a model trained by "
        "default, then predicting with shared tiles)",
    )  # fmt: skip
    return p.parse_args(argv)


def variant_origins(res, name: str) -> dict[str, tuple[np.ndarray, float]]:
    """Per sample: the ``(n, G*G, 2)`` pixel corners ``(y0, x0)`` of the tiles a variant uses, and the tile side."""
    from dkan import _keys as K
    from dkan._features.shared_tiles import snapped_tiles, tile_origins

    geo = res.uns[K.UNS][K.UNS_TILE]
    grid = int(geo["region_grid"])
    spot_px = np.asarray(res.obsm[K.SPOT_PX], dtype=float)
    samples = res.obs["sample"].to_numpy()
    div = 0 if name == "exact_tiles" else int(name.split("/")[1].split("+")[0])
    out = {}
    for sample, rec in geo["samples"].items():
        rows = np.flatnonzero(samples == sample)
        side = int(rec["patch_side"])
        step = 1.0 if div == 0 else side / div  # step 1 px: every tile at its exact (integer) position
        idx = snapped_tiles(spot_px[rows], tile_side=side, region_side=int(rec["region_side"]), grid=grid, step=step)
        out[sample] = (tile_origins(idx, step), side)
    return out


def exact_origins(res) -> dict[str, np.ndarray]:
    """Per sample: the exact (float) region-tile corners ``(y0, x0)``, ``(n, G*G, 2)``."""
    from dkan import _keys as K
    from dkan._features.tile import window_origins

    geo = res.uns[K.UNS][K.UNS_TILE]
    g = int(geo["region_grid"])
    spot_px = np.asarray(res.obsm[K.SPOT_PX], dtype=float)
    samples = res.obs["sample"].to_numpy()
    out = {}
    for sample, rec in geo["samples"].items():
        rows = np.flatnonzero(samples == sample)
        rs = int(rec["region_side"])
        o = window_origins(spot_px[rows], rs).astype(float)
        k = np.arange(g) * rs / g
        oy = np.broadcast_to(o[:, 1, None, None] + k[None, :, None], (len(rows), g, g))
        ox = np.broadcast_to(o[:, 0, None, None] + k[None, None, :], (len(rows), g, g))
        out[sample] = np.stack([oy.reshape(len(rows), -1), ox.reshape(len(rows), -1)], axis=-1)
    return out


def encode_positions(sdata, res, positions: dict[str, np.ndarray], work: Path) -> dict[str, dict]:
    """Features of every distinct tile corner per sample, encoded once and cached in ``work``."""
    import torch
    from tqdm.auto import tqdm

    from dkan import _keys as K
    from dkan._features.encoding import Preprocess
    from dkan._features.levels import image_levels, rgb
    from dkan._features.shared_tiles import _encode_tiles
    from dkan.nn.image_encoders import create_image_encoder

    geo = res.uns[K.UNS][K.UNS_TILE]
    enc = create_image_encoder(res.uns[K.UNS][K.UNS_FEATURES]["encoder"]).eval().to(memory_format=torch.channels_last)
    prep, dev = Preprocess(enc, torch.device("cpu")), torch.device("cpu")
    out = {}
    for sample, wanted in positions.items():
        rec = geo["samples"][sample]
        path = work / f"tiles_{sample}.npz"
        have = dict(np.load(path)) if path.is_file() else {"origins": np.zeros((0, 2), np.int64), "feats": None}
        known = {tuple(o) for o in have["origins"].tolist()}
        new = np.array([o for o in np.unique(wanted, axis=0).tolist() if tuple(o) not in known], dtype=np.int64)
        if len(new):
            level = rgb(image_levels(sdata.images[rec["image_key"]])[int(rec["level"])])
            t0 = time.perf_counter()
            with torch.inference_mode(), tqdm(total=len(new), desc=f"{sample} tiles", unit="tile") as bar:
                feats = _encode_tiles(
                    level, new, int(rec["patch_side"]), int(geo["patch_size"]), enc, prep, None, 26 * 64, dev, bar
                )
            log.info("%s: encoded %d tiles in %.1f s", sample, len(new), time.perf_counter() - t0)
            origins = np.concatenate([have["origins"], new])
            feats = feats if have["feats"] is None else np.concatenate([have["feats"], feats])
            np.savez(path, origins=origins, feats=feats)
            have = {"origins": origins, "feats": feats}
        out[sample] = have
    return out


def region_layout(res, name: str, store: dict[str, dict]) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(tiles, index)`` of a variant (shared-tile layout) and its geometry figures."""
    from dkan import _keys as K

    mask = np.asarray(res.obsm[K.REGION_MASK], dtype=bool)
    samples = res.obs["sample"].to_numpy()
    origins = variant_origins(res, name)
    exact = exact_origins(res)
    spot = np.asarray(res.obsm[K.SPOT_FEATURES], dtype=np.float32)
    g2 = mask.shape[1]
    index = np.full(mask.shape, -1, dtype=np.int64)
    parts, n_tiles, dists, distinct = [], 0, [], 0
    for sample, (orig, side) in origins.items():
        rows = np.flatnonzero(samples == sample)
        valid = mask[rows]
        used, inverse = np.unique(orig[valid], axis=0, return_inverse=True)
        distinct += len(used)
        have = store[sample]
        lookup = {tuple(o): i for i, o in enumerate(have["origins"].tolist())}
        parts.append(have["feats"][[lookup[tuple(o)] for o in used.tolist()]])
        block = np.full(valid.shape, -1, dtype=np.int64)
        block[valid] = n_tiles + inverse.ravel()
        n_tiles += len(used)
        d = np.hypot(*(orig - exact[sample]).transpose(2, 0, 1)) / side
        if name.endswith("+patch"):
            d[:, g2 // 2] = 0.0
        dists.append(d[valid])
        index[rows] = block
    tiles = np.concatenate(parts)
    if name.endswith("+patch"):  # centre cell: the spot's own patch features (row n_tiles + spot)
        tiles = np.concatenate([tiles, spot])
        centre = index[:, g2 // 2] >= 0
        index[centre, g2 // 2] = n_tiles + np.flatnonzero(centre)
        # a grid tile used only by centre cells is no longer needed
        kept = np.unique(index[index >= 0])
        distinct = int((kept < n_tiles).sum())
    dist = np.concatenate(dists)
    figures = {
        "region_tiles_encoded": int(distinct),
        "encoder_passes": int(len(spot) + distinct),
        "passes_per_spot": float((len(spot) + distinct) / len(spot)),
        "offset_mean_tiles": float(dist.mean()),
        "offset_max_tiles": float(dist.max()),
    }
    return tiles, index, figures


def feature_error(tiles: np.ndarray, index: np.ndarray, region: np.ndarray, mask: np.ndarray) -> dict:
    """Relative L2 distance to the spot-by-spot features: per valid region cell, and of each spot's masked mean."""
    from dkan._features.shared_tiles import gather

    cells, means = [], []
    for start in range(0, len(index), 128):
        sl = slice(start, start + 128)
        got, want, m = gather(tiles, index[sl]), region[sl], mask[sl]
        err = np.linalg.norm(got - want, axis=-1) / np.maximum(np.linalg.norm(want, axis=-1), 1e-8)
        cells.append(err[m])
        w = m[..., None].astype(np.float32)
        gm, wm = (got * w).sum(1) / w.sum(1), (want * w).sum(1) / w.sum(1)
        means.append(np.linalg.norm(gm - wm, axis=-1) / np.linalg.norm(wm, axis=-1))
    cell, mean = float(np.concatenate(cells).mean()), float(np.concatenate(means).mean())
    return {"cell_rel_error": cell, "mean_rel_error": mean}


def context_inputs(res, region_rows) -> dict[str, np.ndarray]:
    """Per sample, the ``ridge_ctx`` input ``[spot, masked mean of the region tiles]`` (float64)."""
    from dkan import _keys as K

    spot = np.asarray(res.obsm[K.SPOT_FEATURES], dtype=np.float64)
    mask = np.asarray(res.obsm[K.REGION_MASK], dtype=np.float64)
    samples = res.obs["sample"].to_numpy()
    out = {}
    for name in dict.fromkeys(samples):
        rows = np.flatnonzero(samples == name)
        reg = region_rows(rows).astype(np.float64)
        m = mask[rows]
        mean = (reg * m[..., None]).sum(1) / np.maximum(m.sum(1, keepdims=True), 1.0)
        out[str(name)] = np.concatenate([spot[rows], mean], axis=1)
    return out


def probe_folds(sdata, desc, mismatch: tuple[dict, dict] | None = None) -> dict:
    """``ridge_ctx`` over the leave-one-section-out folds of ``accuracy_her2st.py`` (DKAN not trained).

    ``mismatch``: per-sample context inputs ``(train, test)``: the probe is fitted on the first (spot-by-spot
    features, as a model trained by default) and predicts the test section from the second (a variant's).
    """
    import dkan.tl._cv as cv
    from dkan._evaluation.probes import fit_probe

    def no_dkan(samples, train, test, emb, cfg, dev, reader, progress, *, trust=False, probes=None):
        zeros = [np.zeros(tuple(samples[i].target.shape), np.float32) for i in test]
        return zeros, [], None, zeros

    def crossed(name, samples, train, test, *, seed, cache=None):
        y = [samples[i].target.numpy() for i in train]
        grids = [samples[i].grid.numpy() for i in train]
        model = fit_probe(name, [mismatch[0][samples[i].name] for i in train], y, grids, seed=seed)
        return [model.predict(mismatch[1][samples[i].name]) for i in test], dict(model.params)

    real, real_bf = cv._dkan_fold, cv.baseline_fold
    cv._dkan_fold = no_dkan
    if mismatch is not None:
        cv.baseline_fold = crossed
    try:
        res = cv.cross_validate(
            sdata, groupby="sample", config="small", baselines=("ridge_ctx",), descriptions=desc, device="cpu",
            progress=False, panel_per_fold=True, probe_blend=False,
        )  # fmt: skip
    finally:
        cv._dkan_fold, cv.baseline_fold = real, real_bf
    pf = res.summary.per_fold
    pf = pf[pf["method"] == "ridge_ctx"]
    return {
        "pcc_all_folds": [float(v) for v in pf["pcc_all"]],
        "pcc_all": float(pf["pcc_all"].mean()),
        "pcc_heg": float(pf["pcc_heg"].mean()),
        "alphas": [p.get("alpha") for p in res.baseline_params["ridge_ctx"]],
    }


def install(res, name: str, tiles: np.ndarray | None, index: np.ndarray | None, region: np.ndarray) -> None:
    """Put a variant's region features in the results table (spot layout for spot by spot, else shared tiles)."""
    from dkan import _keys as K

    res.obsm.pop(K.REGION_FEATURES, None)
    res.obsm.pop(K.REGION_INDEX, None)
    res.uns.pop(K.REGION_TILES, None)
    if tiles is None:
        res.obsm[K.REGION_FEATURES] = region
    else:
        res.uns[K.REGION_TILES] = tiles.astype(np.float32)
        res.obsm[K.REGION_INDEX] = index.astype(np.int32)


def load_cache(data: Path, cache: Path, n_genes: int):
    """her2st with the cached results table installed (``region`` of its table attributes made a list again)."""
    import anndata as ad
    from accuracy_her2st import gene_descriptions, inject

    import dkan
    from dkan._utils import get_table

    sdata = dkan.datasets.her2st(data / "her2st", progress=False)
    key, _ = get_table(sdata, None)
    desc = gene_descriptions(sdata, data, n_genes)
    table = ad.read_h5ad(cache)
    attrs = table.uns["spatialdata_attrs"]
    if not isinstance(attrs["region"], str):  # h5ad reads the list back as an array, which spatialdata rejects
        attrs["region"] = [str(r) for r in attrs["region"]]
    return sdata, inject(sdata, key, table, source=str(cache)), desc


def main(argv: list[str] | None = None) -> None:
    from _shared_tiles_extra import dkan_mismatch, wsi_passes

    from dkan import _keys as K
    from dkan._config import DKANConfig

    args = parse_args(argv)
    if args.wsi_geometry:
        wsi_passes()
        return
    if args.cache is None:
        raise SystemExit("--cache FILE is needed (an accuracy_her2st.py --cache table, spot by spot).")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    args.work.mkdir(parents=True, exist_ok=True)
    n_genes = DKANConfig.resolve("small").n_genes
    sdata, res, desc = load_cache(args.data, args.cache, n_genes)
    region = np.asarray(res.obsm[K.REGION_FEATURES], dtype=np.float32)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    grids = [n for n in names if n != "spot_by_spot"]
    wanted: dict[str, list[np.ndarray]] = {}
    mask = np.asarray(res.obsm[K.REGION_MASK], dtype=bool)
    samples = res.obs["sample"].to_numpy()
    for n in grids:
        for sample, (orig, _) in variant_origins(res, n).items():
            wanted.setdefault(sample, []).append(orig[mask[samples == sample]])
    store = encode_positions(sdata, res, {s: np.concatenate(v) for s, v in wanted.items()}, args.work)
    if args.dkan_mismatch:
        layouts = {n: region_layout(res, n, store)[:2] for n in grids}
        extra = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
        table = dkan_mismatch(sdata, res, desc, layouts, **extra)
        if args.json is not None:
            args.json.write_text(json.dumps(table, indent=1))
        return
    results = {}
    for n in names:
        t0 = time.perf_counter()
        if n == "spot_by_spot":
            install(res, n, None, None, region)
            fig = {"region_tiles_encoded": int(mask.sum()), "encoder_passes": int(len(mask) + mask.sum())}
            fig.update(passes_per_spot=fig["encoder_passes"] / len(mask), offset_mean_tiles=0.0, offset_max_tiles=0.0)
        else:
            tiles, index, fig = region_layout(res, n, store)
            install(res, n, tiles, index, region)
            fig.update(feature_error(tiles, index, region, mask))
        if args.probe:
            fig.update(probe_folds(sdata, desc))
        if args.mismatch and n != "spot_by_spot":
            from dkan._features.shared_tiles import gather

            exact = context_inputs(res, lambda rows: region[rows])
            ctx = context_inputs(res, lambda rows, t=tiles, i=index: gather(t, i[rows]))
            cross = probe_folds(sdata, desc, (exact, ctx))
            fig.update({f"mismatch_{k}": v for k, v in cross.items()})
        results[n] = fig
        log.info("%s: %s (%.0f s)", n, json.dumps(fig), time.perf_counter() - t0)
    base = results.get("spot_by_spot", {}).get("encoder_passes")
    head = "| variant | passes (per spot) | fewer than spot by spot | offset mean / max (tiles) | ridge_ctx PCC-ALL |"
    print(head + " per fold |")
    print("|---|---|---|---|---|---|")
    for n, f in results.items():
        if "cell_rel_error" in f:
            err = f"per cell {f['cell_rel_error']:.3f}, of the mean {f['mean_rel_error']:.3f}"
            print(f"{n}: relative feature error {err}")
        if "mismatch_pcc_all" in f:
            folds = ", ".join(f"{v:.3f}" for v in f["mismatch_pcc_all_folds"])
            print(f"{n}: fitted on spot by spot, tested on it: PCC-ALL {f['mismatch_pcc_all']:.4f} ({folds})")
        if "pcc_all" not in f:
            continue
        ratio = f"{base / f['encoder_passes']:.2f}x" if base else "n/a"
        folds = ", ".join(f"{v:.3f}" for v in f["pcc_all_folds"])
        print(
            f"| {n} | {f['encoder_passes']} ({f['passes_per_spot']:.1f}) | {ratio} | "
            f"{f['offset_mean_tiles']:.3f} / {f['offset_max_tiles']:.3f} | {f['pcc_all']:.4f} | {folds} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
