"""Reporting helpers of the her2st accuracy benchmark: machine description, markdown tables, the report, JSON."""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from _machine import cpu_model

from dkan._evaluation.probes import PROBES

if TYPE_CHECKING:
    import argparse

ROOT = Path(__file__).resolve().parents[1]
#: The paper's HER2+ row for DKAN (Table 1; leave-one-patient-out over 8 patients, UNI/ResNet18/BioBERT).
PAPER = {"MAE": "0.361 ± 0.04", "MSE": "0.224 ± 0.06", "PCC-ALL": "0.330 ± 0.13", "PCC-HPG": "0.531 ± 0.15",
         "PCC-HEG": "0.317 ± 0.09", "PCC-HVG": "0.304 ± 0.07"}  # fmt: skip


def machine() -> dict[str, str]:
    import torch

    cpu = cpu_model(platform.processor() or platform.machine())
    cores = usable_cores()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": f"{cpu}, {cores} cores usable (torch threads {torch.get_num_threads()})",
        "gpu": gpu,
        "python / torch": f"{platform.python_version()} / {torch.__version__}",
        "os": platform.platform(),
    }


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


@functools.cache
def git_commit() -> str:
    """The checkout's commit (and whether it had uncommitted changes) when first asked: call it as a run starts, so
    a report written at the end names the code that ran, not a commit made meanwhile."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
        return out.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def best_probe(res: Any) -> str | None:
    """The tuned probe with the highest mean PCC-ALL (None when no probe ran)."""
    s = res.summary.summary
    ran = [p for p in PROBES if p in s.index]
    return max(ran, key=lambda p: s.loc[p, "pcc_all_mean"]) if ran else None


def target_check(res: Any) -> list[str]:
    s = res.summary.summary
    best = best_probe(res)
    lines = []
    comparisons = [("DKAN", o) for o in (best, "probes", "ridge_hest", "no_text", "shuffled_text")]
    comparisons += [("DKAN_network", best)]  # the network alone, when DKAN is the default blend
    comparisons += [("DKAN+probes", o) for o in (best, "probes", "no_text+probes", "shuffled_text+probes")]
    for method, other in dict.fromkeys(comparisons):
        if other is None or method not in s.index or other not in s.index:
            continue
        lines += _compare(res, method, other, tag=" (best tuned probe)" if other == best else "")
    mse_lines = [
        f"- MSE: {m} {s.loc[m, 'mse_mean']:.4f} vs {best} {s.loc[best, 'mse_mean']:.4f}"
        + (" (not above)" if s.loc[m, "mse_mean"] <= s.loc[best, "mse_mean"] else " (ABOVE)")
        for m in ("DKAN", "DKAN_network", "DKAN+probes")
        if best is not None and m in s.index
    ]
    return lines + mse_lines


def _compare(res: Any, method: str, other: str, *, tag: str = "") -> list[str]:
    pf, s = res.summary.per_fold, res.summary.summary
    out = []
    for metric, label in (("pcc_all", "PCC-ALL"), ("pcc_heg", "PCC-HEG")):
        a, b = s.loc[method, f"{metric}_mean"], s.loc[other, f"{metric}_mean"]
        fa = pf[pf["method"] == method].set_index("fold")[metric]
        fb = pf[pf["method"] == other].set_index("fold")[metric].reindex(fa.index)
        wins = int((fa > fb).sum())
        verdict = "beats" if a > b else "does NOT beat"
        out.append(
            f"- {method} {verdict} {other}{tag} on {label}: {a:.3f} vs {b:.3f} (difference {a - b:+.3f}; "
            f"{method} higher in {wins}/{len(fa)} folds)"
        )
    return out


def per_fold_table(res: Any, metric: str) -> pd.DataFrame:
    pf = res.summary.per_fold
    t = pf.pivot(index="method", columns="fold", values=metric).reindex(res.summary.methods)
    t.columns = [f"test {res.folds[int(f)][0]}" if str(f).isdigit() else str(f) for f in t.columns]
    return t.round(3)


def probe_table(res: Any) -> pd.DataFrame:
    """Parameter each tuned probe chose per fold (by its inner split of the training sections)."""
    rows = {}
    for name in PROBES:
        fitted = getattr(res, "baseline_params", {}).get(name)
        if fitted:
            key = "k" if name == "knn" else "alpha"
            rows[f"{name} ({key})"] = {f"test {f[0]}": f"{p[key]:g}" for f, p in zip(res.folds, fitted, strict=True)}
    return pd.DataFrame(rows).T


def epochs_table(res: Any) -> pd.DataFrame:
    rows = {}
    for method, folds in res.histories.items():
        ran = [len(h) for h in folds]
        chosen = [_selected(h) for h in folds]
        val = [float(h[i]["val_pcc"]) if i >= 0 else float("nan") for h, i in zip(folds, chosen, strict=True)]
        rows[method] = {
            "epochs run": " ".join(map(str, ran)),
            "selected epoch": " ".join(map(str, chosen)),
            "val PCC there": " ".join(f"{v:.3f}" for v in val),
        }
    return pd.DataFrame(rows).T


def _selected(history: list[dict]) -> int:
    """Index of the epoch training kept (its ``selected`` flag; older histories: the best validation PCC)."""
    if not history:
        return -1
    flagged = [i for i, r in enumerate(history) if r.get("selected")]
    return flagged[0] if flagged else int(np.nanargmax([r["val_pcc"] for r in history]))


def panel_rule(res: Any, n_genes: int) -> str:
    """The panel and HEG/HVG rule of this run, as one phrase."""
    if getattr(res, "fold_genes", None):
        sizes = sorted({len(p) for p in res.fold_genes})
        return (
            f": {'/'.join(map(str, sizes))} genes per fold, chosen on the fold's training sections only (reference "
            "rule: detected in >= 10 % of the training spots, top by total counts over them; never the test "
            f"section), {len(res.genes)} genes over all folds; HEG and HVG chosen per fold on the training spots' "
            "targets"
        )
    return (
        f": one panel of {n_genes} genes for all folds, reference rule on all sections (test sections included); "
        "HEG/HVG on the pooled labels of all folds"
    )


def md_table(df: pd.DataFrame, index_name: str = "method") -> str:
    cols = [index_name, *map(str, df.columns)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += [
        "| " + " | ".join([str(i), *map(str, row)]) + " |" for i, row in zip(df.index, df.to_numpy(), strict=True)
    ]
    return "\n".join(lines)


def fmt_time(seconds: float) -> str:
    return f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def validation_splits(cfg: Any, names: list[str], grids: list[np.ndarray], folds: list[list[str]]) -> dict[str, str]:
    """Per fold (test sections joined by ", "), the description of the validation split its DKAN training used.

    Made by the function training calls (:func:`dkan.train.data.make_validation_split`) on the same inputs: the fold's
    training sections in sample order, their spot grids, and ``cfg``'s ``val_fraction``, ``val_split`` and ``seed``.
    """
    from dkan.train.data import make_validation_split

    out = {}
    for test in folds:
        keep = [i for i, n in enumerate(names) if n not in set(test)]
        split = make_validation_split(
            [names[i] for i in keep], [grids[i] for i in keep], cfg.val_fraction, strategy=cfg.val_split, seed=cfg.seed
        )
        out[", ".join(test)] = split.description
    return out


def validation_protocol(cfg: Any, splits: dict[str, str]) -> str:
    """One sentence of the protocol: how early stopping and the checkpoint choice held data out, fold by fold."""
    if cfg.val_fraction <= 0:
        return f"No validation data (`val_fraction=0`): every run lasts {cfg.max_epochs} epochs and keeps the last."
    folds = "; ".join(f"test {k}: {v}" for k, v in splits.items())
    return (
        f"Early stopping and checkpoint choice use validation data held out of the training sections only "
        f"(`val_split={cfg.val_split!r}`, `val_fraction={cfg.val_fraction}`), never the test section: {folds}."
    )


def report(out: dict[str, Any], args: argparse.Namespace) -> str:
    res, cfg = out["res"], out["cfg"]
    table = res.table()
    cmd = "python benchmarks/accuracy_her2st.py " + " ".join(sys.argv[1:])
    mach = machine()
    tt = out["train_times"]
    lines = [
        f"# her2st accuracy benchmark, preset `{args.preset}`",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; dkan commit {git_commit()}  ",
        f"Device: {out['device']}; " + "; ".join(f"{k}: {v}" for k, v in mach.items()) + "  ",
        f"Load average (1/5/15 min) at start: {out['load'][0]}; at end: {out['load'][1]}  ",
        f"Total run time: {fmt_time(out['times']['total'])}",
        "",
        "## Protocol",
        "",
        f"- Data: her2st sections {', '.join(f'{k} ({v} spots)' for k, v in out['sections'].items())}, all from "
        "patient C (the only sections with images here). Leave-one-section-out: 5 folds, each tests on one section "
        "and trains on the other four.",
        "- **Serial sections of one patient make leave-one-section-out optimistic**: train and test share the "
        "patient, the tumour and the staining batch. These numbers are not comparable to the paper's "
        "leave-one-patient-out over 8 patients, which also uses other encoders (UNI, ResNet18, BioBERT).",
        f"- Panel and gene sets{panel_rule(res, cfg.n_genes)}; targets: library size 1e4 over the fold's panel, "
        "log10(1+x), 3x3 grid smoothing. HPG is chosen on each method's own fold results (reference protocol, "
        "test-selected).",
        f"- Inputs shared by every method and fold: frozen `{cfg.feature_encoder}` features of each spot "
        f"({cfg.patch_size} px crops at {cfg.target_mpp} µm/px) and of its {cfg.region_grid}x{cfg.region_grid} "
        f"region ({region_kind(getattr(args, 'shared_tiles', 0))}); `{cfg.text_encoder}` embeddings of the gene "
        f"descriptions (sources: {out['text_sources']}).",
        f"- DKAN preset `{args.preset}`"
        + (f" with overrides {out['overrides']}" if out["overrides"] else "")
        + f": d={cfg.d}, lr={cfg.lr}, batch {cfg.batch_size}, <= {cfg.max_epochs} epochs, patience {cfg.patience}, "
        f"trainable patch trunk {cfg.patch_trainable}, NT-Xent over {cfg.contrastive_genes or 'all'} random genes per "
        f"step, grad clip {cfg.grad_clip}. " + validation_protocol(cfg, out["validation"]),
        "- Baselines (same features, same targets): `mean` = training mean per gene; `ridge_hest` = "
        "HEST-Benchmark protocol on the frozen spot features (standardise, PCA to 256, fixed ridge alpha = "
        "100 / (n_features x n_targets)); tuned probes (standardise, PCA to min(256, ...) fitted on the training "
        "spots): `ridge` on the spot features and `ridge_ctx` on [spot features, masked mean of the region "
        "tiles], alpha from {1e-3, ..., 1e7}; `knn` = cosine kNN on the standardised PCA of the `ridge_ctx` "
        "input, distance-weighted, k from {5, 10, 20, 50, 100}. Each probe's parameter is the one with the best "
        "mean per-gene PCC on an inner leave-one-training-section-out (the test section is never used); the "
        "choice per fold is listed below.",
        "",
        "## Results (mean ± population std over the 5 folds)",
        "",
        md_table(table),
        "",
        "Paper, HER2+ (DKAN, Table 1), for orientation only (not comparable: leave-one-patient-out over 8 "
        "patients, UNI/ResNet18/BioBERT):",
        "",
        md_table(pd.DataFrame([PAPER], index=["DKAN (paper)"])),
        "",
        "## Target: DKAN vs the best tuned probe, the probe mix and the controls (same folds)",
        "",
        *target_check(res),
        "",
        "## Per fold",
        "",
        "PCC-ALL:",
        "",
        md_table(per_fold_table(res, "pcc_all")),
        "",
        "PCC-HEG:",
        "",
        md_table(per_fold_table(res, "pcc_heg")),
        "",
        *trust_section(res),
        "## Tuned probes: parameter chosen per fold",
        "",
        md_table(probe_table(res), "probe") if len(probe_table(res)) else "(no tuned probe in this run)",
        "",
        "## Training (per fold, test section order " + ", ".join(f[0] for f in res.folds) + ")",
        "",
        md_table(epochs_table(res)),
        "",
        "## Time",
        "",
        *[f"- {k}: {fmt_time(v)}" for k, v in out["times"].items()],
        f"- DKAN trainings: {len(tt)}, {np.mean(tt):.0f} s each on average (min {np.min(tt):.0f}, max {np.max(tt):.0f})"
        if tt
        else "- no DKAN training",
        "",
    ]
    return "\n".join(lines)


def dump_json(path: Path, res: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "folds": res.folds,
        "per_fold": res.summary.per_fold.to_dict(orient="records"),
        "histories": res.histories,
        "gene_sets": {k: v for k, v in res.summary.gene_sets.items() if k != "hpg"},
        "baseline_params": getattr(res, "baseline_params", {}),
        "fold_genes": getattr(res, "fold_genes", None),
        "trust": [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in t.items()} for t in res.trust or []],
    }
    path.write_text(json.dumps(payload, indent=1, default=float))


# ---------------------------------------------------------------------- trust figures (issue 23)
#: Issue-23 targets on the trust figures: (label, test on the per-fold table) -> met / not met, never hard-coded.
NOVEL_FEW = 0.10  # "few" novel spots on a held-out her2st section: at most this share, in every fold


def trust_frame(res: Any) -> pd.DataFrame:
    """Per-fold trust figures of the DKAN row (and their mean), from ``res.trust``."""
    from dkan._evaluation.trust import trust_table

    return trust_table(res.trust, res.folds)


def trust_lines(res: Any) -> list[str]:
    """The issue-23 targets, each ``met`` or ``not met`` from the per-fold figures."""
    t = trust_frame(res)
    folds, mean = t.drop(index="mean"), t.loc["mean"]
    n = len(folds)
    wins = int((folds["reliable_pcc"] > folds["rest_pcc"]).sum())  # NaN (no gene on a side) counts as a loss

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return [
        f"- 68 % interval covers {mean['coverage_68']:.1%} of held-out values (target 63-73 %): "
        + verdict(0.63 <= mean["coverage_68"] <= 0.73),
        f"- 95 % interval covers {mean['coverage_95']:.1%} (target 90-97 %): "
        + verdict(0.90 <= mean["coverage_95"] <= 0.97),
        f"- Spearman (validation PCC vs held-out PCC, across genes) {mean['spearman']:.3f} mean (target >= 0.5): "
        + verdict(mean["spearman"] >= 0.5),
        f"- genes with validation PCC >= 0.3 have a higher held-out mean PCC than the rest in {wins}/{n} folds "
        f"(target {n}/{n}): " + verdict(wins == n),
        f"- held-out her2st spots flagged novel: {mean['novel_fraction']:.1%} mean, at most "
        f"{folds['novel_fraction'].max():.1%} in a fold (target: few, i.e. <= {NOVEL_FEW:.0%} in every fold): "
        + verdict(bool((folds["novel_fraction"] <= NOVEL_FEW).all())),
    ]


def trust_section(res: Any) -> list[str]:
    """Markdown section of the trust figures, or nothing when the run did not measure them."""
    if not getattr(res, "trust", None):
        return []
    t = trust_frame(res)
    shown = pd.DataFrame(
        {
            "cover 68 %": t["coverage_68"].map("{:.1%}".format),
            "cover 95 %": t["coverage_95"].map("{:.1%}".format),
            "Spearman val/held-out PCC": t["spearman"].map("{:.3f}".format),
            "held-out PCC, reliable (n)": [
                f"{p:.3f} ({n:.0f})" for p, n in zip(t["reliable_pcc"], t["n_reliable"], strict=True)
            ],
            "held-out PCC, rest": t["rest_pcc"].map("{:.3f}".format),
            "novel spots": t["novel_fraction"].map("{:.1%}".format),
        },
        index=t.index,
    )
    split = next((x.get("validation") for x in res.trust if x.get("validation")), "the training validation split")
    sigma = next((x.get("sigma") for x in res.trust if x.get("sigma")), "none")
    return [
        "## Can I trust this map? (issue 23; DKAN row, per fold)",
        "",
        "Each fold's model records its trust signals on its training sections only, as `dkan.tl.train` does: the "
        f"spread ({sigma}) is calibrated (split conformal, per gene) and each gene's validation PCC recorded on "
        f"{split}; the novelty reference is a draw of the training spots' frozen features (threshold: 99th "
        "percentile of their own leave-one-out kNN distance). The figures below are measured on the test section "
        "only: coverage of the nominal 68 % and 95 % intervals over its spots x panel genes; Spearman across genes "
        "between validation and held-out PCC; mean held-out PCC of the genes with validation PCC >= 0.3 (the "
        "default of `dkan.tl.reliable_genes`, fixed before any test data) and of the rest; share of its spots "
        "flagged novel.",
        "",
        md_table(shown, "fold"),
        "",
        *trust_lines(res),
        "",
    ]


def region_kind(shared_tiles: int) -> str:
    """How the region tiles were made: spot by spot, or shared grid tiles ``1/N`` of a tile apart."""
    if not shared_tiles:
        return "spot-centred region tiles, spot by spot"
    step = "a tile" if int(shared_tiles) == 1 else f"1/{int(shared_tiles)} of a tile"
    return f"shared grid tiles {step} apart, `--shared-tiles {int(shared_tiles)}`"
