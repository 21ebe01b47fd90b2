"""Where does DKAN (small preset) lose accuracy on her2st? Each head of one trained model, against ridge.

Leave-one-section-out like ``accuracy_her2st.py`` (same panel, targets, frozen features, gene texts, read from its
``--cache`` h5ad), but for every fold it keeps one trained DKAN and scores, on the held-out section and on the
training spots, every output of the network: the final gene-query prediction ``pred`` and the four intermediate
linear heads (``pred_fusion``, ``pred_patch``, ``pred_region``, ``pred_slide``), next to the ridge baseline. It
also splits each method's held-out MSE into the part explained by a per-gene offset of the whole section (the
squared difference of the means) and the rest. This is a diagnosis after the fact, not model selection: nothing
here feeds back into the presets.

Usage::

    python benchmarks/accuracy_her2st.py --preset small --cache /tmp/her2st_small.h5ad   # writes the cache
    python benchmarks/diagnose_her2st.py --cache /tmp/her2st_small.h5ad [--folds C2,C4] [--set max_epochs=40]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_her2st import DEFAULT_DATA, load_prepared, machine, parse_overrides

HEADS = ("pred", "pred_fusion", "pred_patch", "pred_region", "pred_slide")


def outputs(module, sample, genes, device) -> dict[str, np.ndarray]:
    """Every prediction head of ``module`` on all spots of one sample (eval mode, slide encoded once)."""
    import torch

    from dkan.train.data import batch_inputs

    module.eval()
    with torch.inference_mode():
        tokens = module.encode_slide(sample.spot, sample.grid) if module.config.use_slide else None
        rows = torch.arange(len(sample), device=device)
        batch = batch_inputs(sample, rows, genes, slide_tokens=tokens)
        batch.pop("target", None)
        out = module(batch)
    return {k: out[k].float().cpu().numpy() for k in HEADS if k in out}


def scores(pred: np.ndarray, y: np.ndarray, y_train_mean: np.ndarray) -> dict[str, float]:
    from dkan._metrics import pearson_per_gene

    r, _ = pearson_per_gene(pred, y)
    offset = float(np.mean((pred.mean(0) - y.mean(0)) ** 2))
    return {
        "PCC-ALL": float(np.nanmean(r)),
        "MSE": float(np.mean((pred - y) ** 2)),
        "MSE offset": offset,
        "MSE rest": float(np.mean((pred - y) ** 2)) - offset,
        "MSE train mean": float(np.mean((y - y_train_mean) ** 2)),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, required=True, help="prepared table written by accuracy_her2st.py --cache")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--folds", default="all", help="held-out sections, comma-separated, or 'all'")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)

    import torch

    import dkan
    from dkan._data.inputs import build_inputs
    from dkan._data.prepare import gene_embeddings
    from dkan._evaluation.baselines import fit_ridge
    from dkan.train.fitting import fit_inputs

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg = dkan.DKANConfig.resolve("small", **parse_overrides(args.overrides))
    sdata, key, _, desc, genes = load_prepared(args.data, args.cache, cfg.n_genes)
    emb, _ = gene_embeddings(sdata, genes, table_key=key, text_encoder=cfg.text_encoder, descriptions=desc)
    samples, _ = build_inputs([sdata], genes, cfg, table_key=key, with_target=True)
    names = [s.name for s in samples]
    folds = names if args.folds == "all" else args.folds.split(",")
    dev = torch.device("cpu")
    gene_t = torch.as_tensor(emb) if cfg.use_text else None
    rows = []
    for held in folds:
        test = names.index(held)
        train = [i for i in range(len(samples)) if i != test]
        module, _ = fit_inputs([samples[i] for i in train], emb, cfg, dev, progress=False)
        y_tr = np.concatenate([samples[i].target.numpy() for i in train])
        y = samples[test].target.numpy()
        mean = y_tr.mean(0)
        ridge = fit_ridge(np.concatenate([samples[i].spot.numpy() for i in train]), y_tr, seed=cfg.seed).predict(
            samples[test].spot.numpy()
        )
        held_out = outputs(module, samples[test], gene_t, dev)
        seen = {k: np.concatenate([outputs(module, samples[i], gene_t, dev)[k] for i in train]) for k in held_out}
        for name, pred in [*held_out.items(), ("ridge", ridge)]:
            row = {"held-out": held, "output": name, **scores(pred, y, mean)}
            if name in seen:
                fit = scores(seen[name], y_tr, mean)
                row["PCC-ALL train spots"], row["MSE offset train spots"] = fit["PCC-ALL"], fit["MSE offset"]
            rows.append(row)
        print(pd.DataFrame([r for r in rows if r["held-out"] == held]).round(4).to_string(index=False), flush=True)
    df = pd.DataFrame(rows)
    summary = df.drop(columns="held-out").groupby("output", sort=False).mean().round(4)
    print(f"\nMean over folds {folds} (config small, {cfg.max_epochs} epochs max):")
    print(summary.to_markdown())
    print(f"\nmachine: {machine()}; wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
