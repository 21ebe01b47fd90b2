"""Accuracy of DKAN, the baselines (mean, ridge, tuned probes) and the ablations on the her2st sections C2-C6.

Leave-one-section-out over the five serial sections of patient C (the only her2st sections with images in
``../shared/data``): every fold trains on four sections and tests on the fifth. Serial sections of one patient
make this optimistic compared with the paper's leave-one-patient-out over 8 patients (see the results file).
All methods see identical folds and identical inputs: per fold, the 250-gene panel chosen on the four training
sections only (reference rule: detected in >= 10 % of the training spots, top 250 by total counts over them) and
the targets normalised over it, HEG and HVG chosen on the training targets; the frozen image features (computed
once and shared by every method and fold) and the gene-text embeddings of the RefSeq summaries (NCBI gene_info
for synonyms and full names) of the union of the fold panels. The baselines are the training mean, the
HEST-Benchmark ridge (fixed alpha, ``ridge_hest``) and three probes whose parameter is tuned by an inner
leave-one-training-section-out: ``ridge`` (spot features), ``ridge_ctx`` (spot features and the mean of the
region tiles) and ``knn``. Each DKAN variant stops early and picks its checkpoint on validation data held out
of the training sections as the preset's ``val_split`` says (the report names each fold's split); the test
section is never seen during training.

Prints one table (MAE, MSE, PCC ALL/HPG/HEG/HVG, mean ± population std over the five folds), the run time
and the machine, and writes them to ``benchmarks/results/accuracy_her2st_<preset>.md``. Unless ``--no-trust``,
each fold's DKAN model also records its trust signals on its training sections (``cross_validate(trust=True)``)
and the report adds, per fold on the test section, the coverage of the calibrated 68 % / 95 % intervals, the
Spearman of validation vs held-out per-gene PCC, the held-out PCC of the genes with validation PCC >= 0.3 vs the
rest, the share of spots flagged novel, and the issue-23 targets as met / not met (extra cost per fold: 11 forward
passes over the validation spots and 11 over the test section, with MC dropout).

Usage::

    python benchmarks/accuracy_her2st.py --preset small                 # CPU, offline encoders
    python benchmarks/accuracy_her2st.py --preset her2st --device cuda  # needs UNI, ResNet18 (Ciga), BioBERT
    python benchmarks/accuracy_her2st.py --preset her2st --set feature_encoder=efficientnet_lite0 \\
        --set patch_encoder=efficientnet_lite0 --set text_encoder=minilm
    python benchmarks/accuracy_her2st.py --ablations none --set max_epochs=5   # quick smoke run

Options: ``--data DIR`` (shared data folder holding ``her2st/`` and ``gene_text/``; default ``$DKAN_DATA_DIR``
or ``../shared/data``), ``--ablations a,b`` (default: all), ``--baselines``, ``--device``, ``--set key=value``
(any :class:`dkan.DKANConfig` field, repeatable), ``--no-trust``, ``--jobs N`` (DKAN variants trained in N
parallel processes on inputs prepared once; default: the CPU cores, 1 on CUDA), ``--cache FILE`` (h5ad of the
prepared inputs: reused when present, written otherwise), ``--out FILE``, ``--json FILE`` (per-fold metrics,
learning curves and trust figures).
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _her2st_report import (
    dump_json,
    fmt_time,
    git_commit,
    load,
    machine,
    report,
    target_check,
    trust_lines,
    usable_cores,
    validation_splits,
)

from dkan.tl._cv import BASELINES

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("DKAN_DATA_DIR", ROOT.parent / "shared" / "data"))
ALL_ABLATIONS = (
    "no_text",
    "shuffled_text",
    "no_contrastive",
    "no_multiscale",
    "fixed_weights",
    "no_distill",
    "gene_tokens",
)
OFFLINE = {"feature_encoder": "efficientnet_lite0", "patch_encoder": "efficientnet_lite0", "text_encoder": "minilm"}
log = logging.getLogger("dkan.bench")


# ---------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=("small", "her2st"))
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder (her2st/, gene_text/)")
    p.add_argument("--ablations", default="all", help="comma-separated ablation names, 'all' or 'none'")
    p.add_argument("--baselines", default="all", help=f"comma-separated from {', '.join(BASELINES)}; 'all' or 'none'")
    p.add_argument("--device", default=None, help="torch device (default: CUDA when available)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=None, help="results markdown (default benchmarks/results/...)")
    p.add_argument("--json", type=Path, default=None, help="also dump per-fold metrics and learning curves")
    p.add_argument("--jobs", type=int, default=1, help="DKAN variants trained in parallel processes (1: in-process)")
    p.add_argument(
        "--cache", type=Path, default=None, help="h5ad of the prepared table: reused if present, else written"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--no-trust", dest="trust", action="store_false",
        help="skip the issue-23 trust figures (per fold: calibration, val PCC and novelty of the DKAN row)",
    )  # fmt: skip
    p.add_argument(
        "--shared-tiles", nargs="?", type=int, const=1, default=0, metavar="N",
        help="region features from shared grid tiles every 1/N of a tile (extract_features(shared_tiles=N); "
        "N defaults to 1)",
    )  # fmt: skip
    return p.parse_args(argv)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "amp=False", "contrastive_chunk=None"]`` -> typed values (Python literals, else strings)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, found {item!r}.")
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw
    return out


def names(value: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if value in ("none", ""):
        return ()
    if value == "all":
        return allowed
    picked = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in picked if v not in allowed]
    if bad:
        raise SystemExit(f"Unknown {what} {bad}; choose from {list(allowed)}, 'all' or 'none'.")
    return picked


# ---------------------------------------------------------------------- checks before the long run
def check_setup(cfg: Any, device: str | None) -> str:
    """Resolve the device and make sure every encoder of ``cfg`` loads; exit with a clear message otherwise."""
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    heavy = cfg.patch_trainable or cfg.d > 256
    if heavy and not dev.startswith("cuda"):
        raise SystemExit(
            f"This configuration (d={cfg.d}, trainable patch trunk={cfg.patch_trainable}) needs a CUDA GPU, but the "
            f"device is {dev!r} (CUDA available: {torch.cuda.is_available()}). Run `--preset small` on a CPU."
        )
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"`--device {dev}` but CUDA is not available here; use `--device cpu`.")
    import dkan.nn

    wanted = [("feature_encoder", "image")] + ([("patch_encoder", "image")] if cfg.patch_trainable else [])
    wanted.append(("text_encoder", "text"))
    missing = []
    for field, kind in wanted:
        name = getattr(cfg, field)
        if name == OFFLINE[field]:
            continue  # installed from PyPI, always loadable offline
        try:
            (dkan.nn.create_image_encoder if kind == "image" else dkan.nn.create_text_encoder)(name)
        except Exception as err:  # noqa: BLE001 - any loader failure means the same thing here
            missing.append(f"  {field}={name!r}: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
    if missing:
        sets = " ".join(f"--set {k}={v}" for k, v in OFFLINE.items())
        raise SystemExit(
            "Cannot load the encoders of this preset:\n" + "\n".join(missing) + "\nProvide the weights (UNI: "
            "$UNI_CKPT_PATH; ResNet18 Ciga: $DKAN_RESNET18_CIGA; BioBERT: $DKAN_BIOBERT_PATH) or use the offline "
            f"encoders: {sets}"
        )
    return dev


# ---------------------------------------------------------------------- timing


class Stopwatch(logging.Handler):
    """Timestamps of the dkan log messages that mark phases (first fold start, each training start)."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.events: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith(("Fold ", "Training on ", "Early stopping")):
            self.events.append((time.perf_counter(), msg))


# ---------------------------------------------------------------------- the run
def gene_descriptions(sdata: Any, data: Path, n_genes: int) -> pd.DataFrame:
    """Choose the panel of each leave-one-section-out fold on its training sections; describe their union."""
    import dkan
    from dkan._config import DKANConfig
    from dkan.tl._cv import _fold_panels

    plan = _fold_panels(sdata, DKANConfig.resolve("small", n_genes=n_genes), "sample", None, 0, None, True)
    panel = list(dict.fromkeys(g for p in plan["panels"] for g in p))  # flagged as the panel to prepare
    text = data / "gene_text"
    return dkan.tl.describe_genes(
        panel,
        source=text / "human_refseq_summaries_by_symbol.tsv.gz",
        gene_info=text / "Homo_sapiens.gene_info.gz",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    import dkan
    from dkan._config import DKANConfig

    overrides = parse_overrides(args.overrides)
    cfg = DKANConfig.resolve(args.preset, **overrides)
    ablations = names(args.ablations, ALL_ABLATIONS, "ablations")
    baselines = names(args.baselines, BASELINES, "baselines")
    device = check_setup(cfg, args.device)
    if args.jobs is None:
        args.jobs = 1 if device.startswith("cuda") else max(1, min(usable_cores(), 1 + len(ablations)))
    her2st = args.data / "her2st"
    if not (her2st / "ST-cnts").is_dir():
        raise SystemExit(f"No her2st data at {her2st}; pass --data (the folder holding her2st/ and gene_text/).")

    watch = Stopwatch()
    logging.getLogger("dkan").addHandler(watch)
    t0 = time.perf_counter()
    start_load = load()
    sdata = dkan.datasets.her2st(her2st)
    desc = gene_descriptions(sdata, args.data, cfg.n_genes)
    log.info("Gene texts: %s", desc["source"].value_counts().to_dict())
    t_read = time.perf_counter()
    if args.jobs > 1 or args.cache is not None or args.shared_tiles:
        prepare_inputs(
            sdata, cfg, desc, device, args.cache, progress=not args.no_progress, shared_tiles=args.shared_tiles
        )
    t_inputs = time.perf_counter()
    if args.jobs > 1:
        res, train_times = run_parallel(args, cfg, sdata, desc, device, ablations, baselines)
    else:
        res = dkan.tl.cross_validate(
            sdata,
            groupby="sample",
            config=cfg,
            baselines=baselines,
            ablations=ablations,
            descriptions=desc,
            device=device,
            progress=not args.no_progress,
            panel_per_fold=True,
            trust=args.trust,
        )
        train_times = None
    t1 = time.perf_counter()
    if args.jobs == 1 and args.cache is None:  # input steps ran inside cross_validate, up to the first fold
        t_inputs = next((t for t, m in watch.events if m.startswith("Fold ")), t1)
    return {
        "res": res,
        "cfg": cfg,
        "overrides": overrides,
        "device": device,
        "jobs": args.jobs,
        "ablations": ablations,
        "baselines": baselines,
        "text_sources": desc["source"].value_counts().to_dict(),
        "times": {
            "total": t1 - t0,
            "read + panel + descriptions": t_read - t0,
            "inputs (tiles, features, text embeddings)": t_inputs - t_read,
            f"folds (training + baselines + evaluation, {args.jobs} process(es))": t1 - t_inputs,
        },
        "train_times": train_times if train_times is not None else training_times(watch.events, t1),
        "load": (start_load, load()),
        "sections": res.obs["sample"].value_counts(sort=False).to_dict(),
        "validation": fold_validation(sdata, cfg, res.folds),
    }


def fold_validation(sdata: Any, cfg: Any, folds: list[list[str]]) -> dict[str, str]:
    """Per fold, the validation split its DKAN training used (see :func:`_her2st_report.validation_splits`)."""
    from dkan import _keys as K
    from dkan._results import results_table
    from dkan._utils import iter_samples

    _, res = results_table(sdata, None)
    samples = list(iter_samples(sdata, need_image=False))
    grids = [np.asarray(res.obsm[K.GRID][s.obs_idx]) for s in samples]
    return validation_splits(cfg, [s.name for s in samples], grids, folds)


# ---------------------------------------------------------------------- inputs once, methods in parallel
def prepare_inputs(
    sdata: Any, cfg: Any, desc: pd.DataFrame, device: str, cache: Path | None, progress: bool, shared_tiles: int
) -> None:
    """Run the input steps of ``cross_validate`` once (or load them from ``cache``), so later calls skip them."""
    import anndata as ad
    import torch

    from dkan._data import prepare as prep
    from dkan._utils import get_table

    key, table = get_table(sdata, None)
    if cache is not None and cache.is_file():
        log.info("Loading the prepared results table (features, targets, tiles) from %s.", cache)
        res = inject(sdata, key, ad.read_h5ad(cache), source=f"--cache {cache}")
        from dkan import _keys as K

        rec = res.uns[K.UNS][K.UNS_FEATURES]
        stored = int(rec.get("subdivide", 1)) if rec.get("shared_tiles") else 0
        if stored != int(shared_tiles):
            raise ValueError(f"--cache {cache} holds features of another kind than --shared-tiles asks; use another.")
        return
    if shared_tiles:  # computed first, so that the preparation keeps them (dkan._features.shared_tiles)
        import dkan

        prep.ensure_tiles(sdata, cfg, table_key=key, image_key=None)
        dkan.tl.extract_features(
            sdata, cfg.feature_encoder, table_key=key, device=torch.device(device), shared_tiles=int(shared_tiles),
            progress=progress,
        )  # fmt: skip
    prep.prepare_training(
        [sdata], [table], cfg, table_key=key, image_key=None, descriptions=desc, device=torch.device(device),
        progress=progress,
    )  # fmt: skip
    if cache is not None:
        from dkan._results import results_table

        cache.parent.mkdir(parents=True, exist_ok=True)
        results_table(sdata, key)[1].write_h5ad(cache)


def inject(sdata: Any, key: str, prepared: Any, *, source: str) -> Any:
    """Install a saved results table (targets, features, tiles, ``uns["dkan"]``) as the results table of ``key``."""
    from dkan import _keys as K
    from dkan._results import results_key, results_of

    table = sdata.tables[key]
    attrs = prepared.uns.get("spatialdata_attrs", {})
    if attrs.get("region") is not None and not isinstance(attrs["region"], str | list):
        attrs["region"] = [str(r) for r in attrs["region"]]  # h5ad gives a list of regions back as an ndarray
    if results_of(prepared) != key:
        raise SystemExit(f"{source} is not a dkan results table of `{key}` (an older cache layout?); delete it.")
    if list(prepared.obs_names) != list(table.obs_names) or not set(prepared.var_names) <= set(table.var_names):
        raise SystemExit(f"{source} holds other spots or genes than the data; delete it.")
    table.var[K.PANEL] = table.var_names.isin(prepared.var_names[prepared.var[K.PANEL].to_numpy(bool)])
    sdata.tables[results_key(key)] = prepared  # spatialdata validates it (same region / instance keys)
    return sdata.tables[results_key(key)]


def load_prepared(data: Path, cache: Path, n_genes: int) -> tuple[Any, str, Any, pd.DataFrame, list[str]]:
    """The her2st sections with a ``--cache`` results table: ``(sdata, table key, results table, texts, panel)``."""
    import anndata as ad

    import dkan
    from dkan import _keys as K
    from dkan._utils import get_table

    sdata = dkan.datasets.her2st(data / "her2st", progress=False)
    key, _ = get_table(sdata, None)
    desc = gene_descriptions(sdata, data, n_genes)
    res = inject(sdata, key, ad.read_h5ad(cache), source=str(cache))
    return sdata, key, res, desc, list(res.var_names[res.var[K.PANEL].to_numpy(bool)])


def _variant_task(task: dict[str, Any]) -> dict[str, Any]:
    """One DKAN variant (and optionally the baselines) over all folds, in a worker process."""
    import anndata as ad
    import torch

    import dkan
    from dkan._utils import get_table

    torch.set_num_threads(task["threads"])
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("dkan").setLevel(logging.INFO)
    watch = Stopwatch()
    logging.getLogger("dkan").addHandler(watch)
    sdata = dkan.datasets.her2st(task["her2st"])
    inject(sdata, get_table(sdata, None)[0], ad.read_h5ad(task["table"]), source=str(task["table"]))
    t0 = time.perf_counter()
    desc = task["desc"]
    if task["name"] == "shuffled_text":  # same model, each gene embedded from another gene's description
        from dkan.tl._cv import shuffle_gene_text

        desc = desc.copy()
        desc["text"] = shuffle_gene_text(desc["text"].to_numpy())
    res = dkan.tl.cross_validate(
        sdata,
        groupby="sample",
        config=task["cfg"],
        baselines=task["baselines"],
        ablations=(),
        descriptions=desc,
        device=task["device"],
        progress=False,
        panel_per_fold=True,
        trust=task.get("trust", False),
    )
    preds = variant_rows(res.predictions, task["name"])
    return {
        "name": task["name"],
        "preds": preds,
        "history": res.histories["DKAN"],
        "obs": res.obs,
        "genes": res.genes,
        "folds": res.folds,
        "target": res.target,
        "fold_genes": res.fold_genes,
        "gene_sets": res.summary.gene_sets,
        "baseline_params": res.baseline_params,
        "trust": res.trust,
        "train_times": training_times(watch.events, time.perf_counter()),
        "seconds": time.perf_counter() - t0,
    }


def variant_rows(preds: dict[str, Any], name: str) -> dict[str, Any]:
    """A worker's rows under its variant's name: ``DKAN`` -> ``name``, ``DKAN_network`` -> ``name + "_network"``."""
    return {(m.replace("DKAN", name, 1) if m.startswith("DKAN") else m): p for m, p in preds.items()}


def run_parallel(args, cfg, sdata, desc, device, ablations, baselines) -> tuple[Any, list[float]]:
    """Each DKAN variant in its own worker process (``--jobs`` at a time) on the prepared inputs; merged results."""
    import multiprocessing as mp
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    from dkan._results import results_table
    from dkan._utils import get_table
    from dkan.tl._cv import ABLATIONS

    key, _ = get_table(sdata, None)
    table = results_table(sdata, key)[1]  # targets, features, tiles (the prepared inputs)
    threads = max(1, usable_cores() // args.jobs)
    variants = [("DKAN", cfg)] + [(a, cfg.replace(**ABLATIONS[a])) for a in ablations]
    with tempfile.TemporaryDirectory(prefix="dkan_bench_") as tmp:
        path = Path(tmp) / "table.h5ad"
        table.write_h5ad(path)
        tasks = [
            {"name": name, "cfg": vcfg, "baselines": baselines if i == 0 else (), "her2st": args.data / "her2st",
             "table": path, "desc": desc, "device": device, "threads": threads, "trust": args.trust and i == 0}
            for i, (name, vcfg) in enumerate(variants)
        ]  # fmt: skip
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            outs = list(pool.map(_variant_task, tasks))
    return merge_outputs(outs, baselines), [t for o in outs for t in o["train_times"]]


def merge_outputs(outs: list[dict[str, Any]], baselines: tuple[str, ...]) -> Any:
    """One :class:`~dkan.tl._cv.CVResult` from the workers' outputs (same folds, same fold panels)."""
    from dkan.tl._cv import CVResult

    first = outs[0]
    if any(o["fold_genes"] != first["fold_genes"] or o["folds"] != first["folds"] for o in outs):
        raise RuntimeError("The worker processes chose different folds or fold panels; their results cannot merge.")
    preds = {}
    for o in outs:
        preds.update({m: p for m, p in o["preds"].items() if m not in baselines})
    preds.update({m: p for o in outs for m, p in o["preds"].items() if m in baselines})
    target = first["target"]
    if target.shape != next(iter(preds.values())).shape:
        raise RuntimeError(f"Target {target.shape} and predictions {next(iter(preds.values())).shape} differ.")
    summary = score(preds, target, first["obs"], first["genes"], first["fold_genes"], first["gene_sets"])
    histories = {o["name"]: o["history"] for o in outs}
    params = {m: p for o in outs for m, p in o["baseline_params"].items()}
    trust = next((o.get("trust") for o in outs if o["name"] == "DKAN"), None)
    return CVResult(
        summary, first["folds"], preds, first["obs"], first["genes"], histories, params, first["fold_genes"], target,
        trust,
    )  # fmt: skip


#: Rows derived from the out-of-fold predictions: the mean of the named methods' predictions, scored like the others.
#: ``DKAN+probes`` (the network averaged with the two tuned context probes) was chosen by the inner protocol of
#: ``benchmarks/inner_candidates.py`` (one held-out training section per fold; never the test section); it is the
#: library's default (``probe_blend=True``), so the ``X+probes`` rows are only derived for network-alone runs
#: (``--set probe_blend=false``): a blended run's ``DKAN`` row already is that mean, ``DKAN_network`` its network.
BLENDS = {
    "probes": ("ridge_ctx", "knn"),
    "DKAN+probes": ("DKAN", "ridge_ctx", "knn"),
    "no_text+probes": ("no_text", "ridge_ctx", "knn"),
    "shuffled_text+probes": ("shuffled_text", "ridge_ctx", "knn"),
}


def add_blends(res: Any) -> Any:
    """``res`` with the :data:`BLENDS` rows whose members it holds, every method re-scored over the same folds."""
    import dataclasses

    preds = dict(res.predictions)
    blended = "DKAN_network" in preds  # the DKAN rows already average the network with the probes
    for name, members in BLENDS.items():
        if blended and name != "probes":
            continue
        if all(m in preds for m in members):
            preds[name] = np.mean([preds[m] for m in members], axis=0).astype(np.float32)
    if len(preds) == len(res.predictions):
        return res
    summary = score(preds, res.target, res.obs, res.genes, res.fold_genes, res.summary.gene_sets)
    return dataclasses.replace(res, predictions=preds, summary=summary)


def score(preds: dict, target: Any, obs: pd.DataFrame, genes: list[str], fold_genes: Any, gene_sets: dict) -> Any:
    """Per-fold metrics of ``preds``: over one panel, or over each fold's panel with its training HEG/HVG."""
    from dkan._evaluation.folds import summarise_folds
    from dkan.tl._cv import _summarise

    if fold_genes is None:
        return _summarise(preds, target, obs, genes)
    fold_sets = [{"heg": h, "hvg": v} for h, v in zip(gene_sets["heg"], gene_sets["hvg"], strict=True)]
    return summarise_folds(preds, target, obs, genes, fold_genes, fold_sets)


def training_times(events: list[tuple[float, str]], end: float) -> list[float]:
    starts = [i for i, (_, m) in enumerate(events) if m.startswith("Training on ")]
    out = []
    for i in starts:
        nxt = next((t for t, m in events[i + 1 :] if m.startswith(("Training on ", "Fold "))), end)
        out.append(nxt - events[i][0])
    return out


# ---------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("dkan").setLevel(logging.INFO)
    git_commit()  # recorded now: the report names the code that ran
    out = run(args)
    out["res"] = add_blends(out["res"])
    text = report(out, args)
    path = args.out or ROOT / "benchmarks" / "results" / f"accuracy_her2st_{args.preset}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if args.json is not None:
        dump_json(args.json, out["res"])
    print("\n" + out["res"].table().to_string())
    print("\n" + "\n".join(target_check(out["res"])))
    if out["res"].trust:
        print("\n" + "\n".join(trust_lines(out["res"])))
    print(f"\nTotal run time {fmt_time(out['times']['total'])}; machine: {machine()}; load {out['load']}")
    print(f"Results written to {path}")


if __name__ == "__main__":
    main()
