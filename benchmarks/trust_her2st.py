"""Predictions a user can trust, measured on her2st C2-C6 leave-one-section-out (issue 14, items 1, 3 and 4).

Four measurements on the inputs of ``accuracy_her2st.py`` (the ``--cache`` h5ad of the prepared table: panel,
targets, frozen spot/region features; gene texts embedded once with the preset's text encoder):

1. **Ensemble**: per fold, DKAN trained with three seeds (the default ``seed`` and two others); the ensemble's
   mean prediction is scored like every row of the accuracy table, beside the single default-seed model.
2. **Uncertainty** on the held-out section, of the ensemble std (ddof=1 over the three members) and of Monte
   Carlo dropout (``--mc`` draws of the default-seed model): Pearson/Spearman correlation of the predicted std with
   the absolute error (pooled over spots x genes and the mean of per-gene correlations), and the coverage of the
   ±1σ / ±2σ intervals.
3. **Genes outside the training panel**: a seeded random ``--unseen-fraction`` of the panel (same genes in every
   fold) is left out of training; the model predicts them from their text embeddings (``dkan.nn.Predictor`` with
   ``new_genes``, the array path of ``dkan.tl.predict(genes=...)``); baselines: the model's prediction of the
   nearest seen gene by cosine similarity of the text embeddings, zero, and the gene's mean over the training
   sections (an oracle: it uses the measured values of the held-out genes there).
4. **Inner protocol for the calibrated output**: with one section held out entirely (``--outer``, never looked
   at), leave one of the other four out in turn and compare ``gene_output`` values (default: ``affine``, the
   default, vs ``shared``, the reference's shared output layer).

Everything is array-level (training and prediction functions returning numpy arrays); the count table is only
read. Trainings run in ``--jobs`` worker processes with one torch thread each; finished trainings are kept in
``--work`` so an interrupted run resumes.

Usage::

    python benchmarks/trust_her2st.py --cache /tmp/bench/her2st_spot.h5ad --jobs 2
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
from _her2st_report import git_commit, load, machine
from _trust import ensemble, gene_metrics, holdout_genes, nearest_seen, uncertainty_metrics
from accuracy_her2st import DEFAULT_DATA, OFFLINE, ROOT, load_prepared, parse_overrides

log = logging.getLogger("dkan.bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=("small",))
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--cache", type=Path, required=True, help="prepared table of accuracy_her2st.py --cache")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", default="2021,1,2", help="ensemble seeds; the first is the single-model row")
    p.add_argument("--mc", type=int, default=10, help="MC dropout draws of the first-seed model")
    p.add_argument("--unseen-fraction", type=float, default=0.2)
    p.add_argument("--unseen-seed", type=int, default=0)
    p.add_argument("--outer", default="C6", help="section held out of the inner protocol")
    p.add_argument("--inner-outputs", default="affine,shared", help="gene_output values compared")
    p.add_argument("--parts", default="ensemble,unseen,inner")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--deadline", default=None, help="HH:MM (UTC): stop training then and report what finished")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench/trust_work"), help="finished trainings")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "trust_her2st_small.md")
    return p.parse_args(argv)


# ---------------------------------------------------------------------- inputs
def prepare(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    """Model inputs of every section (tensors with targets), the panel and its text embeddings."""
    import torch

    from dkan._data import prepare as prep
    from dkan._data.inputs import build_inputs

    sdata, key, _, desc, _ = load_prepared(args.data, args.cache, cfg.n_genes)
    table = sdata.tables[key]  # the count table, as dkan.tl.train passes it; results come from the cache
    dev = torch.device("cpu")
    genes, emb, _, _ = prep.prepare_training(
        [sdata], [table], cfg, table_key=key, image_key=None, descriptions=desc, device=dev, progress=False
    )
    samples, reader = build_inputs([sdata], genes, cfg, table_key=key, with_target=True)
    if reader is not None:
        raise SystemExit("This benchmark needs a frozen patch trunk (the small preset); found a trainable one.")
    return {"samples": samples, "emb": np.asarray(emb, np.float32), "genes": list(genes)}


# ---------------------------------------------------------------------- one training (worker process)
def _fit_predict(samples, train, test, emb, cfg, *, new=None, mc=0) -> dict[str, Any]:
    import torch

    from dkan.nn.inference import Predictor, draws
    from dkan.train.fitting import fit_inputs
    from dkan.train.loop import predict_rows

    dev = torch.device("cpu")
    t0 = time.perf_counter()
    module, result = fit_inputs([samples[i] for i in train], emb, cfg, dev, progress=False)
    genes_t = torch.as_tensor(emb)
    new_t = None if new is None else torch.as_tensor(new)
    s = samples[test]

    def run(m: Any, dropout: bool) -> np.ndarray:
        w = Predictor(m, new_genes=new_t, mc_dropout=dropout)
        return predict_rows(w, s, np.arange(len(s)), genes_t, batch_size=256, device=dev, amp=cfg.amp)

    out = {"pred": run(module, False), "selection": dict(result.selection), "epochs": len(result.history)}
    if mc > 1:
        out["mc_mean"], out["mc_std"] = draws(run, [module], mc, cfg.seed)
    out["seconds"] = time.perf_counter() - t0
    return out


def run_task(task: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """One training described by ``task`` (kind, fold, config), on the inputs pickled at ``task["inputs"]``."""
    import dataclasses

    import torch

    torch.set_num_threads(1)
    path = Path(task["work"]) / f"{task['name']}.pkl"
    if path.is_file():
        return task["name"], pickle.loads(path.read_bytes())
    data = torch.load(task["inputs"], weights_only=False)
    samples, emb, cfg = data["samples"], data["emb"], task["cfg"]
    if task["kind"] == "unseen":
        seen, unseen = task["seen"], task["unseen"]
        samples = [dataclasses.replace(s, target=s.target[:, torch.as_tensor(seen)]) for s in samples]
        out = _fit_predict(samples, task["train"], task["test"], emb[seen], cfg, new=emb[unseen])
    else:
        out = _fit_predict(samples, task["train"], task["test"], emb, cfg, mc=task.get("mc", 0))
    out["load"] = load()
    path.write_bytes(pickle.dumps(out))
    return task["name"], out


def make_tasks(args: argparse.Namespace, cfg: Any, names: list[str], n_genes: int, inputs: Path) -> list[dict]:
    """Every training, ordered fold by fold (the outer section's fold last), so a cut-short run has whole folds."""
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = set(args.parts.split(","))
    n = len(names)
    base = {"work": str(args.work), "inputs": str(inputs)}
    held = holdout_genes(n_genes, args.unseen_fraction, args.unseen_seed)
    seen = np.setdiff1d(np.arange(n_genes), held)
    outer = names.index(next(s for s in names if args.outer in s))
    rest = [i for i in range(n) if i != outer]
    tasks = []
    for f in [*rest, outer]:
        train = [i for i in range(n) if i != f]
        for j, sd in enumerate(seeds if "ensemble" in parts else []):
            tasks.append({**base, "kind": "seed", "name": f"seed{sd}_{names[f]}", "cfg": cfg.replace(seed=sd),
                          "train": train, "test": f, "mc": args.mc if j == 0 else 0})  # fmt: skip
            if j == 0 and "unseen" in parts:
                tasks.append({**base, "kind": "unseen", "name": f"unseen_{names[f]}", "cfg": cfg, "train": train,
                              "test": f, "seen": seen, "unseen": held})  # fmt: skip
        if "inner" in parts and f != outer:
            for o in args.inner_outputs.split(","):
                tasks.append({**base, "kind": "inner", "name": f"inner_{o}_{names[f]}", "output": o, "test": f,
                              "cfg": cfg.replace(gene_output=o), "train": [i for i in rest if i != f]})  # fmt: skip
    return tasks


def run_all(tasks: list[dict], jobs: int, deadline: float | None) -> dict[str, dict]:
    """Run the tasks; with ``deadline`` (``time.time()``), stop waiting then and keep what finished."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    done: dict[str, dict] = {}
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))
    pending = {pool.submit(run_task, t) for t in tasks}
    while pending:
        left = None if deadline is None else deadline - time.time()
        if left is not None and left <= 0:
            log.warning("Deadline reached: %d of %d trainings finished; the rest is left out.", len(done), len(tasks))
            for fut in pending:
                fut.cancel()
            for proc in list(pool._processes.values()):  # the running trainings, ours only
                proc.terminate()
            break
        finished, pending = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
        for fut in finished:
            name, out = fut.result()
            done[name] = out
            log.warning("done %s (%.0f s, load %s) [%d/%d]", name, out["seconds"], load(), len(done), len(tasks))
    pool.shutdown(wait=False, cancel_futures=True)
    return done


# ---------------------------------------------------------------------- analysis
def accuracy(done, data, seeds) -> tuple[Any, dict[str, np.ndarray]]:
    """CVSummary of the single-seed rows, the ensemble mean and the training-mean baseline (same folds)."""
    import pandas as pd

    from dkan.tl._cv import _summarise

    samples, names = data["samples"], [s.name for s in data["samples"]]
    folds = [f for f in range(len(samples)) if all(f"seed{sd}_{names[f]}" in done for sd in seeds)]
    if not folds:
        return None
    target = np.concatenate([samples[f].target.numpy() for f in folds])
    rows = {f"DKAN seed {sd}": [] for sd in seeds}
    rows["DKAN ensemble"], rows["mean"] = [], []
    for f in folds:
        s = samples[f]
        members = [done[f"seed{sd}_{names[f]}"]["pred"] for sd in seeds]
        for sd, p in zip(seeds, members, strict=True):
            rows[f"DKAN seed {sd}"].append(p)
        rows["DKAN ensemble"].append(ensemble(members)[0])
        ytr = np.concatenate([samples[i].target.numpy() for i in range(len(samples)) if i != f])
        rows["mean"].append(np.broadcast_to(ytr.mean(0), (len(s), ytr.shape[1])))
    preds = {m: np.concatenate(v).astype(np.float32) for m, v in rows.items()}
    sizes = [len(samples[f]) for f in folds]
    labels = [names[f] for f in folds]
    obs = pd.DataFrame({"sample": np.repeat(labels, sizes), "group": np.repeat(labels, sizes),
                        "fold": np.repeat(np.arange(len(folds)), sizes)})  # fmt: skip
    return _summarise(preds, target, obs, data["genes"]), labels


def uncertainty(done, data, seeds) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {"ensemble": {}, "MC dropout": {}}
    for s in data["samples"]:
        y, name = s.target.numpy(), s.name
        if all(f"seed{sd}_{name}" in done for sd in seeds):
            mean, std = ensemble([done[f"seed{sd}_{name}"]["pred"] for sd in seeds])
            out["ensemble"][name] = uncertainty_metrics(mean, std, y)
        d = done.get(f"seed{seeds[0]}_{name}")
        if d is not None and "mc_std" in d:
            out["MC dropout"][name] = uncertainty_metrics(d["mc_mean"], d["mc_std"], y)
    return out


def unseen(done, data, args) -> dict[str, dict[str, dict[str, float]]]:
    emb, n = data["emb"], len(data["genes"])
    held = holdout_genes(n, args.unseen_fraction, args.unseen_seed)
    seen = np.setdiff1d(np.arange(n), held)
    near = nearest_seen(emb[held], emb[seen])
    out: dict[str, dict[str, dict[str, float]]] = {}
    samples = data["samples"]
    for f, s in enumerate(samples):
        if f"unseen_{s.name}" not in done:
            continue
        p = done[f"unseen_{s.name}"]["pred"]
        y = s.target.numpy()[:, held]
        ytr = np.concatenate([samples[i].target.numpy()[:, held] for i in range(len(samples)) if i != f])
        out[s.name] = {
            "DKAN from text": gene_metrics(p[:, len(seen) :], y),
            "nearest seen gene": gene_metrics(p[:, near], y),
            "zero": gene_metrics(np.zeros_like(y), y),
            "training mean (oracle)": gene_metrics(np.broadcast_to(ytr.mean(0), y.shape), y),
            "DKAN seen genes (reference)": gene_metrics(p[:, : len(seen)], s.target.numpy()[:, seen]),
        }
    return out


def inner(done, data, args) -> Any:
    """CVSummary of each ``gene_output`` value over the inner folds (the outer section never enters)."""
    import pandas as pd

    from dkan.tl._cv import _summarise

    samples = data["samples"]
    names = [s.name for s in samples]
    outer = next(s for s in names if args.outer in s)
    outputs = args.inner_outputs.split(",")
    rest = [i for i, s in enumerate(names) if s != outer and all(f"inner_{o}_{s}" in done for o in outputs)]
    if not rest:
        return None
    target = np.concatenate([samples[i].target.numpy() for i in rest])
    preds = {
        o: np.concatenate([done[f"inner_{o}_{names[i]}"]["pred"] for i in rest]).astype(np.float32) for o in outputs
    }
    sizes = [len(samples[i]) for i in rest]
    labels = [names[i] for i in rest]
    obs = pd.DataFrame({"sample": np.repeat(labels, sizes), "group": np.repeat(labels, sizes),
                        "fold": np.repeat(np.arange(len(rest)), sizes)})  # fmt: skip
    return _summarise(preds, target, obs, data["genes"]), labels


# ---------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    import torch

    from dkan._config import DKANConfig

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)
    git_commit()  # recorded now: the report names the code that ran
    cfg = DKANConfig.resolve(args.preset, **{**OFFLINE, **parse_overrides(args.overrides)})
    t0, load0 = time.perf_counter(), load()
    data = prepare(args, cfg)
    args.work.mkdir(parents=True, exist_ok=True)
    inputs = args.work / "inputs.pt"
    torch.save(data, inputs)
    names = [s.name for s in data["samples"]]
    tasks = make_tasks(args, cfg, names, len(data["genes"]), inputs)
    log.warning("%d sections %s, %d genes; %d trainings, %d jobs", len(names), names, len(data["genes"]),
                len(tasks), args.jobs)  # fmt: skip
    t_inputs = time.perf_counter()
    deadline = None
    if args.deadline:
        import datetime as dt

        hh, mm = map(int, args.deadline.split(":"))
        now = dt.datetime.now(dt.UTC)
        deadline = now.replace(hour=hh, minute=mm, second=0).timestamp()
    done = run_all(tasks, args.jobs, deadline)
    for t in tasks:  # finished by a worker but not collected before the deadline
        path = args.work / f"{t['name']}.pkl"
        if t["name"] not in done and path.is_file():
            done[t["name"]] = pickle.loads(path.read_bytes())
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = set(args.parts.split(","))
    results: dict[str, Any] = {"names": names, "missing": [t["name"] for t in tasks if t["name"] not in done]}
    if "ensemble" in parts:
        results["accuracy"] = accuracy(done, data, seeds)
        results["uncertainty"] = uncertainty(done, data, seeds)
    if "unseen" in parts:
        results["unseen"] = unseen(done, data, args)
        held = holdout_genes(len(data["genes"]), args.unseen_fraction, args.unseen_seed)
        results["unseen_genes"] = [data["genes"][i] for i in held]
    if "inner" in parts:
        results["inner"] = inner(done, data, args)
    t1 = time.perf_counter()
    meta = {
        "commit": git_commit(),
        "machine": machine(),
        "load": (load0, load()),
        "times": {"total": t1 - t0, "inputs": t_inputs - t0, "trainings": t1 - t_inputs},
        "train_seconds": {k: v["seconds"] for k, v in done.items()},
        "epochs": {k: v["epochs"] for k, v in done.items()},
        "jobs": args.jobs,
        "cfg": cfg,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    from _trust_report import to_json, write_report

    text = write_report(results, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(to_json(results, meta), indent=1, default=str))
    print(text)
    print(f"Results written to {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
