"""Markdown and JSON report of ``benchmarks/trust_her2st.py``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from _her2st_report import fmt_time, md_table

METRICS = ("mae", "mse", "pcc_all", "pcc_hpg", "pcc_heg", "pcc_hvg")


def fold_table(summary: Any, labels: list[str], metric: str) -> pd.DataFrame:
    """Method x fold table of one metric, with the mean over folds."""
    t = summary.per_fold.pivot(index="method", columns="fold", values=metric).reindex(summary.methods)
    t.columns = [f"test {labels[int(f)]}" for f in t.columns]
    t["mean"] = t.mean(axis=1)
    return t.round(3)


def nested_table(res: dict[str, dict[str, dict[str, float]]]) -> pd.DataFrame:
    """``{row: {fold: {metric: value}}}`` -> rows ``(row, fold)`` plus ``(row, mean)``, metric columns."""
    rows = {}
    for name, folds in res.items():
        df = pd.DataFrame(folds).T
        for fold, r in df.iterrows():
            rows[f"{name} / {fold}"] = r
        rows[f"**{name} / mean**"] = df.mean(axis=0)
    return pd.DataFrame(rows).T.round(3)


def unseen_table(res: dict[str, dict[str, dict[str, float]]]) -> pd.DataFrame:
    """Method x (fold metric) table of the unseen-gene results, with means."""
    methods = list(next(iter(res.values())))
    out = {}
    for m in methods:
        row = {}
        for fold, by_method in res.items():
            for k, v in by_method[m].items():
                row[f"{k.split(' ')[0]} {fold}"] = v
        for k in by_method[m]:
            row[f"{k.split(' ')[0]} mean"] = float(np.nanmean([by[m][k] for by in res.values()]))
        out[m] = row
    df = pd.DataFrame(out).T
    order = [c for c in df.columns if c.startswith("PCC")] + [c for c in df.columns if c.startswith("MSE")]
    return df[order].round(3)


def write_report(results: dict[str, Any], meta: dict[str, Any]) -> str:
    names = results["names"]
    cfg = meta["cfg"]
    secs = list(meta["train_seconds"].values())
    lines = [
        "# Trust on her2st (small preset, offline encoders): ensembles, uncertainty, unseen genes, inner protocol",
        "",
        f"Commit: {meta['commit']}  ",
        f"Machine: {'; '.join(f'{k}: {v}' for k, v in meta['machine'].items())}  ",
        f"Load average (1/5/15 min) at start: {meta['load'][0]}; at end: {meta['load'][1]}  ",
        f"Total run time: {fmt_time(meta['times']['total'])} (inputs {fmt_time(meta['times']['inputs'])}; "
        f"{len(secs)} trainings in {meta['jobs']} processes, 1 torch thread each: "
        f"{fmt_time(meta['times']['trainings'])}, {np.mean(secs):.0f} s per training on average, "
        f"min {np.min(secs):.0f}, max {np.max(secs):.0f})  ",
        f"Sections (leave-one-section-out folds): {names}; encoders {cfg.feature_encoder} / {cfg.text_encoder}; "
        f"gene_output={cfg.gene_output}; max_epochs {cfg.max_epochs}, min_epochs {cfg.min_epochs}, patience "
        f"{cfg.patience}, val_split {cfg.val_split}.  ",
        f"Arguments: {meta['args']}",
        "",
    ]
    if results.get("missing"):
        lines += [f"**Cut short**: {len(results['missing'])} trainings did not finish in time and are left out: "
                  f"{', '.join(results['missing'])}. Tables below cover the folds that finished.", ""]  # fmt: skip
    if results.get("accuracy") is not None:
        acc, acc_names = results["accuracy"]
        lines += ["## 1. Ensemble of 3 seeds vs single models (same folds, same features)", "",
                  md_table(acc.table()), ""]  # fmt: skip
        for m in METRICS:
            lines += [f"Per fold, {m}:", "", md_table(fold_table(acc, acc_names, m)), ""]
        lines += ["## 2. Uncertainty on the held-out section", "",
                  "Correlation of the predicted std with |target - mean prediction| (pooled over spots x genes; and"
                  " the mean over genes of the per-gene correlation across spots), and the fraction of targets"
                  " within mean ± 1σ / ± 2σ (Gaussian: 0.683 / 0.954). Ensemble: std (ddof=1) of the 3 seeds' "
                  "predictions around their mean; MC dropout: std of the dropout draws of the first-seed model "
                  "around its deterministic prediction.", "",
                  md_table(nested_table(results["uncertainty"]), "source / test section"), ""]  # fmt: skip
    if results.get("unseen"):
        genes = results["unseen_genes"]
        lines += ["## 3. Genes outside the training panel", "",
                  f"{len(genes)} of the panel's genes (seeded random 20 %, same in every fold) left out of training:"
                  f" {', '.join(genes)}. PCC: mean over the held-out genes of the per-gene Pearson r on the held-out"
                  " section (undefined for the constant baselines); MSE over spots x held-out genes. 'Training mean"
                  " (oracle)' uses the measured values of the held-out genes in the training sections, which the"
                  " text model never sees. 'DKAN seen genes' is the same model on the genes it was trained on.",
                  "", md_table(unseen_table(results["unseen"])), ""]  # fmt: skip
    if results.get("inner") is not None:
        summ, labels = results["inner"]
        lines += ["## 4. Inner protocol: gene_output calibrated vs shared", "",
                  f"Outer test section {meta['args']['outer']} never used; leave-one-out over {labels}.", "",
                  md_table(summ.table()), ""]  # fmt: skip
        for m in ("pcc_all", "pcc_heg", "mse"):
            lines += [f"Per inner fold, {m}:", "", md_table(fold_table(summ, labels, m)), ""]
    lines += ["## Epochs run per training", "", ", ".join(f"{k}: {v}" for k, v in meta["epochs"].items()), ""]
    return "\n".join(lines)


def to_json(results: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in meta.items() if k != "cfg"}
    out["config"] = {k: getattr(meta["cfg"], k) for k in ("seed", "gene_output", "max_epochs", "patience")}
    out["names"], out["missing"] = results["names"], results.get("missing", [])
    if results.get("accuracy") is not None:
        out["accuracy_sections"] = results["accuracy"][1]
        out["accuracy_per_fold"] = results["accuracy"][0].per_fold.to_dict(orient="records")
    if "uncertainty" in results:
        out["uncertainty"] = results["uncertainty"]
    if results.get("unseen"):
        out["unseen"], out["unseen_genes"] = results["unseen"], results["unseen_genes"]
    if results.get("inner") is not None:
        out["inner_per_fold"] = results["inner"][0].per_fold.to_dict(orient="records")
        out["inner_sections"] = results["inner"][1]
    return out
