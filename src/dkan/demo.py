"""The main job on an embedded default: train on toy slides, predict a held-out slide, report and plot.

Run with ``python -m dkan.demo [--out DIR]``. Uses the offline encoders (EfficientNet-Lite0 features,
all-MiniLM-L6-v2 gene text) and the ``small`` preset; a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path


def split_toy(seed: int = 0, n_train: int = 3):
    """Toy slides: ``n_train`` for training and one more, held out, as its own SpatialData."""
    from spatialdata import SpatialData

    import dkan
    from dkan import _keys as K

    sdata = dkan.datasets.toy(n_samples=n_train + 1, seed=seed)
    held = f"s{n_train}"
    table = sdata.tables[K.TABLE]
    is_held = (table.obs[K.SAMPLE] == held).to_numpy()

    def part(keep, samples):
        from spatialdata.models import TableModel

        t = table[keep].copy()
        regions = [f"{s}{K.SPOTS_SUFFIX}" for s in samples]
        t.obs[K.REGION] = t.obs[K.REGION].astype(str).astype("category")
        del t.uns["spatialdata_attrs"]
        t = TableModel.parse(t, region=regions, region_key=K.REGION, instance_key=K.INSTANCE)
        return SpatialData(
            images={f"{s}{K.IMAGE_SUFFIX}": sdata.images[f"{s}{K.IMAGE_SUFFIX}"] for s in samples},
            shapes={f"{s}{K.SPOTS_SUFFIX}": sdata.shapes[f"{s}{K.SPOTS_SUFFIX}"] for s in samples},
            tables={K.TABLE: t},
        )

    return part(~is_held, [f"s{i}" for i in range(n_train)]), part(is_held, [held])


def main(argv: list[str] | None = None) -> None:
    """Train, predict, evaluate against baselines, and save a plot and the model."""
    import numpy as np

    import dkan
    from dkan import _keys as K
    from dkan._results import results_table

    parser = argparse.ArgumentParser(prog="python -m dkan.demo", description=__doc__)
    parser.add_argument("--out", default="dkan_demo", help="folder for the plot and the saved model")
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: small preset)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    train_sd, test_sd = split_toy()
    overrides = {} if args.epochs is None else {"max_epochs": args.epochs}
    descriptions = dkan.datasets.toy_gene_descriptions()  # gene text for the text branch, no network needed
    model = dkan.tl.train(train_sd, config="small", descriptions=descriptions, **overrides)
    dkan.tl.predict(test_sd, model)
    res = dkan.tl.evaluate(test_sd)
    table = results_table(test_sd)[1]  # the panel-sized table dkan writes to (dkan._results)
    train_res = results_table(train_sd)[1]
    y_train = train_res[:, model.genes].layers[K.TARGET]
    ridge = dkan.tl.fit_ridge(train_res.obsm[K.SPOT_FEATURES], y_train)
    table.layers["ridge"] = np.full(table.shape, np.nan, np.float32)
    table.layers["ridge"][:, table.var_names.get_indexer(model.genes)] = ridge.predict(table.obsm[K.SPOT_FEATURES])
    res_ridge = dkan.tl.evaluate(test_sd, pred_layer="ridge")
    network = _network_alone(model)  # the default model averages its network with two tuned probes
    if network is not None:
        dkan.tl.predict(test_sd, network, key_added="network", overwrite=True, progress=False)
        res_net = dkan.tl.evaluate(test_sd, pred_layer="network")

    gene = res.per_gene.sort_values("pearson", ascending=False)["gene"].iloc[0]
    dkan.pl.spatial_pred(test_sd, gene, save=out / f"spatial_pred_{gene}.png")
    dkan.pl.training_history(model, save=out / "training_history.png")
    model.save(out / "model", overwrite=True)
    print(f"\nHeld-out toy slide, {table.n_obs} spots, {len(model.genes)} genes:")
    rows = [("DKAN (network + tuned probes)", res)]
    rows += [("DKAN network alone", res_net)] if network is not None else []
    rows += [("ridge (HEST alpha, spot only)", res_ridge)]
    for label, r in rows:
        print(f"  {label:<30} PCC-ALL {r.summary['pcc_all']:.3f}   MSE {r.summary['mse']:.3f}")
    print(f"  mean-of-training baseline: PCC undefined (constant), MSE {_mean_mse(y_train, table, model):.3f}")
    print(f"Wrote {out / f'spatial_pred_{gene}.png'}, {out / 'training_history.png'} and {out / 'model'}")
    print(f"Done in {time.perf_counter() - t0:.0f} s.")


def _network_alone(model):
    """The same trained network without its stored probes (None when the model has none)."""
    from dkan.train.fitted import DKANModel

    if not model.probes:
        return None
    meta = {k: v for k, v in model.meta.items() if k != "probe_blend"}
    return DKANModel(model.module, model.config, model.genes, model.gene_embeddings, meta, model.history, model.trust)


def _mean_mse(y_train, table, model) -> float:
    import numpy as np

    from dkan import _keys as K

    y = table[:, model.genes].layers[K.TARGET]
    return float(np.mean((y - y_train.mean(0)) ** 2))


if __name__ == "__main__":
    main()
