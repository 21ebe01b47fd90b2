"""Inner protocol for choosing DKAN's default: candidates scored on a held-out *training* section of each fold.

For each leave-one-section-out fold of her2st C2-C6 (test section t), the inner held-out section v is the
validation section that training's ``val_split`` picks among the fold's training sections (as
:func:`dkan.train.data.make_validation_split` does for that fold). Each candidate is trained on the remaining
training sections (its own early stopping holding out one of them in turn) and scored on v: the mean over the
fold's panel genes of the Pearson r across v's spots. The tuned probes are fitted on the same inner-training
sections. The test section t is never read: neither its spots nor its targets enter any fit or choice here
(the fold's gene panel is the one chosen on the fold's training sections, v included). A second figure, PCC-HEG,
is the same mean over the fold's 50 most expressed genes on the inner-training sections (v not read either): the
outer benchmark's bars are on both, so a candidate is chosen on both.

Candidates
----------
``default`` (trained)
    the preset as it is.
``default_seed1`` (trained), ``ens2`` (derived)
    a second seed; the mean of the two seeds.
``wide``, ``deep``, ``tokens``, ``reg``, ``long`` (trained), ``blend3_<name>`` (derived)
    the preset with ``d=128``; depth 2-3 in every module; the gene queries attending the region tokens
    (``gene_attend_tokens``); dropout 0.3 and weight decay 1e-2; up to 160 epochs with patience 20. Each is also
    scored in the default's blend, ``(network + ridge_ctx + knn) / 3``. The overrides apply to the current
    ``small`` preset: since width 128 became its default, ``default`` and ``long`` are width 128 too.
``long_seed1`` (trained), ``blend3_long_ens2`` (derived)
    ``long`` with a second seed; the blend with the mean of the two ``long`` seeds.
``stain`` (trained)
    the preset trained on the inner-training sections and a recoloured copy of each (offline stain augmentation
    before the frozen encoder, ``benchmarks/_candidate_inputs.py``); scored on the original v.
``native`` (trained)
    the preset on features of native-resolution crops (224 px at the images' ~0.73 um/px, the reference's
    patches) instead of 64 px at 2 um/px: spot and region features from their own cache beside ``--cache``.
``trainable`` (trained)
    the preset with the patch branch a trainable EfficientNet-Lite0 on the 64 px crops (``patch_trainable``, the
    paper's patch path; flips and rotations each step), the region and slide features still frozen.
``ridge``, ``ridge_ctx``, ``knn`` (probes), ``probes_mean`` (derived)
    the tuned probes fitted on the inner-training sections; ``(ridge_ctx + knn) / 2``.
``blend_half`` (derived from ``default``)
    ``0.5 * DKAN + 0.5 * ridge_ctx``, nothing tuned.
``blend`` (derived)
    per gene ``w * DKAN + (1 - w) * ridge_ctx``, ``w`` from {0, 0.1, ..., 1} chosen on the validation section
    that ``default``'s own training held out (DKAN's prediction there, the probe fitted without it).
``blend_global`` (derived)
    the same with one ``w`` for all genes, chosen on ``default``'s own validation section.
``blend_probes_global`` (derived)
    one ``w`` between DKAN and ``(ridge_ctx + knn) / 2``, chosen on ``default``'s own validation section.
``blend3``, ``blend3_seed1``, ``blend3_ens2``, ``ens2_blend_half`` (derived)
    ``(DKAN + ridge_ctx + knn) / 3`` with the first seed, the second seed or their mean; ``0.5 * ens2 +
    0.5 * ridge_ctx``.
``dkan<w>+probes`` (derived; the sensitivity table)
    ``w * DKAN + (1 - w) * (ridge_ctx + knn) / 2`` for the fixed weights in :data:`SENSITIVITY`.

The ``residual*`` rows of ``benchmarks/results/inner_candidates_small.md`` (and ``.json``) came from the
research-branch version of this script (commit d78595f). They trained DKAN with a library option,
``probe_residual``, under which the network learns the residual over the cross-fitted ``ridge_ctx`` probe. That
option did not land in the library: on these inner figures it matched the probe it starts from (``residual_all``
0.491 vs ``ridge_ctx`` 0.495 over the folds, above it in 2 of 5; shrinking its term or in-sample training terms
gave 0.492-0.497, within noise) and never beat it, so it would have added a training mode with no measured gain.
Without that option those candidates cannot be trained here, so this version leaves them out.

Usage::

    python benchmarks/inner_candidates.py --cache CACHE.h5ad --train default --out DIR         # one process
    python benchmarks/inner_candidates.py --cache CACHE.h5ad --train default_seed1 --out DIR   # another one
    python benchmarks/inner_candidates.py --cache CACHE.h5ad --report --out DIR                # the table

``--cache`` is the prepared-input cache of ``accuracy_her2st.py --cache`` (built when absent, a few minutes).
``--set key=value`` overrides any :class:`dkan.DKANConfig` field of every trained candidate; ``--folds 0,2``
runs a subset of the folds. ``--candidate-val blocks`` trains every candidate on all inner-training sections with
early stopping on spatial blocks inside them (closer to the outer training, which steps on three sections), while
v stays the section the preset's own split would hold out.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from _candidate_inputs import inputs_env, patch_reader, split_with_copies
from accuracy_her2st import DEFAULT_DATA, load_prepared, parse_overrides, prepare_inputs

#: trained candidates: their config overrides (``wide``/``deep``: width and depth; ``tokens``: gene queries attend
#: the region tokens; ``reg``: stronger dropout and weight decay; ``long``: more epochs and patience)
CANDIDATES: dict[str, dict[str, Any]] = {
    "default": {},
    "default_seed1": {"seed": 2022},
    "wide": {"d": 128},
    "deep": {"fusion_depth": 2, "slide_depth": 3, "region_depth": 2, "img_cross_depth": 2, "exp_cross_depth": 2},
    "tokens": {"gene_attend_tokens": True},
    "reg": {f"{m}_dropout": 0.3 for m in ("fusion", "slide", "region", "img_cross", "exp_cross", "text")}
    | {"weight_decay": 1e-2},
    "long": {"max_epochs": 160, "patience": 20, "min_epochs": 40},
    "long_seed1": {"max_epochs": 160, "patience": 20, "min_epochs": 40, "seed": 2022},
    "stain": {},
    "trainable": {"patch_trainable": True},
    "native": {},
}
PROBE_NAMES = ("ridge", "ridge_ctx", "knn")
WEIGHTS = np.round(np.linspace(0, 1, 11), 2)
SENSITIVITY = (0.2, 0.25, 0.4, 0.5, 0.6)  #: fixed DKAN weights against the probe ensemble (report only)
#: candidates that change the network's shape, its training or its training data (each also scored in the blend)
SHAPES = ("wide", "deep", "tokens", "reg", "long", "long_seed1", "stain", "trainable", "native")
SKIP = (" s", " w")  #: columns that are times or chosen weights, not scores
N_HEG = 50  #: size of the HEG set of the second figure (the outer benchmark's ``n_top``)
FIGURES = {
    "pcc_all": "PCC-ALL (mean over the fold's panel genes)",
    "pcc_heg": f"PCC-HEG (mean over the {N_HEG} genes most expressed on the inner-training sections)",
}
log = logging.getLogger("dkan.bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="folder of per-candidate predictions (npz) and the table")
    p.add_argument("--train", choices=tuple(CANDIDATES), default=None)
    p.add_argument("--report", action="store_true")
    p.add_argument("--folds", default=None, help="comma-separated fold indices (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--candidate-val", default=None, choices=("blocks", "random"),
        help="early stopping of the trained candidates on this split of all inner-training sections (default: the "
        "preset's, which holds out one of them); v stays the section the preset's split holds out",
    )  # fmt: skip
    return p.parse_args(argv)


# ---------------------------------------------------------------------- inputs and the inner split
def setup(args: argparse.Namespace) -> dict[str, Any]:
    """The her2st sections with their prepared inputs (``--cache``, built when absent), as :func:`build_env`."""
    from dkan._config import DKANConfig

    cfg = DKANConfig.resolve("small", **parse_overrides(args.overrides))
    if not args.cache.is_file():
        from accuracy_her2st import gene_descriptions

        import dkan

        sdata = dkan.datasets.her2st(args.data / "her2st", progress=False)
        desc = gene_descriptions(sdata, args.data, cfg.n_genes)
        prepare_inputs(sdata, cfg, desc, "cpu", args.cache, progress=False, shared_tiles=False)
    sdata, key, _, desc, _ = load_prepared(args.data, args.cache, cfg.n_genes)
    return build_env(sdata, key, desc, cfg)


def build_env(sdata: Any, key: str | None, desc: Any, cfg: Any) -> dict[str, Any]:
    """Per-fold panels (chosen on each fold's training sections), the model inputs and the inner split of every fold."""
    import torch

    from dkan._data.training import training_inputs
    from dkan.tl._cv import _fold_panels, _sample_groups, make_folds

    plan = _fold_panels(sdata, cfg, "sample", None, 0, key, True)
    dev = torch.device("cpu")
    sdatas, tables, genes, emb, _, _, samples, _ = training_inputs(
        sdata, cfg, dev, table_key=key, image_key=None, descriptions=desc, gene_info=None, progress=False
    )
    groups = _sample_groups(sdatas, tables, "sample", key)
    inner = inner_folds(make_folds(groups, n_folds=None, seed=0), groups, samples, cfg)
    return {"cfg": cfg, "plan": plan, "sdatas": sdatas, "samples": samples, "genes": genes, "emb": emb,
            "inner": inner, "dev": dev, "key": key}  # fmt: skip


def inner_folds(folds: list[list[str]], groups: list[str], samples: list[Any], cfg: Any) -> list[dict[str, Any]]:
    """Per fold: its test groups, the training section ``val_split`` holds out (``held``) and the others."""
    inner = []
    for test in folds:
        train = [i for i, g in enumerate(groups) if g not in test]
        split = own_split(samples, train, cfg)
        held = [train[k] for k, r in enumerate(split.val) if len(r)]
        if len(held) != 1 or any(len(r) for k, r in enumerate(split.train) if train[k] == held[0]):
            raise SystemExit(f"Fold {test}: the validation split is not one whole section ({split.description}).")
        inner.append({"test": test, "held": held[0], "train": [i for i in train if i != held[0]]})
    return inner


def own_split(samples: list[Any], train: list[int], cfg: Any) -> Any:
    """The validation split that training on ``samples[train]`` makes (same function, same inputs)."""
    from dkan.train.data import make_validation_split

    names, grids = [samples[i].name for i in train], [samples[i].grid.numpy() for i in train]
    return make_validation_split(names, grids, cfg.val_fraction, strategy=cfg.val_split, seed=cfg.seed)


def fold_list(args: argparse.Namespace, n: int) -> list[int]:
    return list(range(n)) if args.folds is None else [int(f) for f in args.folds.split(",")]


def fold_samples(env: dict[str, Any], f: int) -> tuple[list[Any], np.ndarray]:
    """The samples with fold ``f``'s targets (its panel) and the panel's gene embeddings."""
    from dkan.tl._cv import _fold_inputs

    fs, femb, _ = _fold_inputs(env["plan"], f, env["sdatas"], env["samples"], env["genes"], env["emb"], env["key"])
    return fs, femb


def probe_prediction(name: str, fs: list[Any], train: list[int], test: int) -> np.ndarray:
    """Probe ``name`` fitted on the ``train`` samples (its parameter tuned on them); its prediction of ``test``."""
    from dkan._evaluation.probes import baseline_fold

    (pred,), _ = baseline_fold(name, fs, train, [test], seed=0, cache={})
    return pred


# ---------------------------------------------------------------------- training
def train_candidate(args: argparse.Namespace, env: dict[str, Any]) -> None:
    """Train one candidate per fold on the inner-training sections; save its predictions on v and on its own val."""
    from dkan.tl._cv_fold import fit_fold, predict_fold
    from dkan.train.fitting import fit_inputs

    cfg = env["cfg"].replace(**CANDIDATES[args.train])
    if args.candidate_val:  # gradient steps on all inner-training sections, early stopping inside them
        cfg = cfg.replace(val_split=args.candidate_val)
    copies = inputs_env(args, env, "stain", build_env) if args.train == "stain" else None
    if args.train == "native":  # the same sections with features of native-resolution crops
        env = inputs_env(args, env, "native", build_env)
    reader = patch_reader(env, cfg) if cfg.patch_trainable else None  # (sample, rows, augment) -> patches
    for f in fold_list(args, len(env["inner"])):
        fold = env["inner"][f]
        fs, femb = fold_samples(env, f)
        t0 = time.perf_counter()
        if copies is not None:  # the same sections and their recoloured copies (benchmarks/_candidate_inputs.py)
            train = [fs[i] for i in fold["train"]]
            recoloured = [fold_samples(copies, f)[0][i] for i in fold["train"]]
            with split_with_copies(len(train)):
                module, result = fit_inputs(train + recoloured, femb, cfg, env["dev"], progress=False)
        else:
            module, result, _ = fit_fold(fs, fold["train"], femb, cfg, env["dev"], reader, False)

        def pred(i: int, module: Any = module, fs: Any = fs, femb: Any = femb) -> np.ndarray:
            return predict_fold(module, fs, [i], femb, cfg, env["dev"], reader)[0]

        own = own_split(fs, fold["train"], cfg)  # the split this training made
        own_val = [fold["train"][k] for k, r in enumerate(own.val) if len(r)]
        out = {"held": pred(fold["held"]), "seconds": time.perf_counter() - t0, "best_epoch": result.best_epoch,
               "epochs": len(result.history)}  # fmt: skip
        if len(own_val) == 1:
            out["own_val"], out["own_val_index"] = pred(own_val[0]), own_val[0]
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez(args.out / f"{args.train}_fold{f}.npz", **out)
        log.warning("%s fold %d: %.0f s, best epoch %s of %d; val %s", args.train, f, out["seconds"],
                    result.best_epoch, len(result.history), result.selection["validation"])  # fmt: skip


# ---------------------------------------------------------------------- scores of the derived candidates
def mean_pcc(pred: np.ndarray, y: np.ndarray) -> float:
    from dkan._evaluation.probes import _mean_pcc

    return _mean_pcc(np.asarray(pred, np.float64), np.asarray(y, np.float64))


def per_gene_pcc(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    p, t = pred - pred.mean(0), y - y.mean(0)
    den = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (p * t).sum(0) / np.where(den > 0, den, 1.0), np.nan)


def default_blends(
    held: np.ndarray, probes: dict[str, np.ndarray], y: np.ndarray, own: dict[str, np.ndarray] | None
) -> dict[str, float]:
    """The DKAN/probe mixtures of ``default``'s prediction ``held`` of v (targets ``y``).

    ``own`` (when training held out one section u): ``dkan``, ``ridge_ctx`` and ``knn`` (the probes fitted on the
    inner-training sections but u) predicting u, and u's targets ``y``: the weights are chosen there.
    """
    rc = probes["ridge_ctx"]
    both = (rc + probes["knn"]) / 2
    row = {"blend_half": mean_pcc(0.5 * held + 0.5 * rc, y)}
    if own is None:
        return row
    du, pv, yu = own["dkan"], own["ridge_ctx"], own["y"]
    scores = np.stack([per_gene_pcc(w * du + (1 - w) * pv, yu) for w in WEIGHTS])
    best = WEIGHTS[np.nanargmax(np.nan_to_num(scores, nan=-2), axis=0)]
    row["blend"] = mean_pcc(best * held + (1 - best) * rc, y)
    row["blend mean w"] = float(best.mean())
    pm = (pv + own["knn"]) / 2
    w3 = WEIGHTS[int(np.nanargmax([mean_pcc(w * du + (1 - w) * pm, yu) for w in WEIGHTS]))]
    row["blend_probes_global"] = mean_pcc(w3 * held + (1 - w3) * both, y)
    row["blend_probes_global w"] = float(w3)
    wg = WEIGHTS[int(np.nanargmax([mean_pcc(w * du + (1 - w) * pv, yu) for w in WEIGHTS]))]
    row["blend_global"] = mean_pcc(wg * held + (1 - wg) * rc, y)
    row["blend_global w"] = float(wg)
    return row


def seed_blends(dk: list[np.ndarray], probes: dict[str, np.ndarray], y: np.ndarray) -> dict[str, float]:
    """The probe ensemble, then the mixtures with one or two DKAN seeds ``dk`` (``default`` first)."""
    rc, kn = probes["ridge_ctx"], probes["knn"]
    both = (rc + kn) / 2
    row = {"probes_mean": mean_pcc(both, y)}
    if dk:
        row["blend3"] = mean_pcc((dk[0] + rc + kn) / 3, y)
        for w in SENSITIVITY:  # DKAN's weight against (ridge_ctx + knn) / 2
            row[f"dkan{w:.2f}+probes"] = mean_pcc(w * dk[0] + (1 - w) * both, y)
    if len(dk) == 2:
        ens = (dk[0] + dk[1]) / 2
        row["blend3_seed1"] = mean_pcc((dk[1] + rc + kn) / 3, y)
        row["blend3_ens2"] = mean_pcc((ens + rc + kn) / 3, y)
        row["ens2"] = mean_pcc(ens, y)
        row["ens2_blend_half"] = mean_pcc(ens / 2 + rc / 2, y)
    return row


def table_text(rows: list[dict[str, Any]]) -> str:
    """The per-fold table with a mean row, then per candidate its folds above the best probe of the fold."""
    import pandas as pd

    table = pd.DataFrame(rows)
    num = table.select_dtypes("number")
    table = pd.concat([table, pd.DataFrame([{"fold (test)": "mean", **num.mean().to_dict()}])], ignore_index=True)
    lines = [table.to_string(index=False, float_format=lambda x: f"{x:.3f}"), ""]
    best_probe = table[list(PROBE_NAMES)].iloc[:-1].max(axis=1).to_numpy()
    for cand in [c for c in table.columns[2:] if c not in PROBE_NAMES and not c.endswith(SKIP)]:
        vals = table[cand].iloc[:-1].to_numpy(dtype=float)
        lines.append(f"{cand}: beats the best probe in {int((vals > best_probe).sum())}/{len(vals)} folds; "
                     f"mean {np.nanmean(vals):.3f} vs best-probe-per-fold mean {best_probe.mean():.3f}")  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------- the report
def report(args: argparse.Namespace, env: dict[str, Any]) -> str:
    """Per fold, each candidate's and probe's mean per-gene PCC on the inner held-out section v.

    Two figures, as the outer benchmark's two bars: over the fold's panel (PCC-ALL) and over its HEG (PCC-HEG: the
    :data:`N_HEG` genes with the largest mean target over the inner-training sections, v and the test section not
    read). Every candidate is scored on the same columns; the weights of the ``blend*`` rows are chosen on those
    columns of ``default``'s own validation section.
    """
    from dkan._metrics import top_heg

    rows: dict[str, list[dict[str, Any]]] = {"pcc_all": [], "pcc_heg": []}
    for f in fold_list(args, len(env["inner"])):
        fold = env["inner"][f]
        fs, _ = fold_samples(env, f)
        v = fold["held"]
        probes = {name: probe_prediction(name, fs, fold["train"], v) for name in PROBE_NAMES}
        saved = {c: dict(np.load(args.out / f"{c}_fold{f}.npz")) for c in CANDIDATES
                 if (args.out / f"{c}_fold{f}.npz").is_file()}  # fmt: skip
        own = own_section(saved["default"], fs, fold) if "default" in saved else None
        heg = top_heg([fs[i].target.numpy() for i in fold["train"]], N_HEG)
        head = {"fold (test)": fold["test"][0], "v": fs[v].name}
        for figure, cols in (("pcc_all", slice(None)), ("pcc_heg", heg)):
            rows[figure].append(head | score_row(fs[v].target.numpy(), probes, saved, own, cols))
    text = "\n\n".join(f"{FIGURES[k]}\n{table_text(r)}" for k, r in rows.items())
    (args.out / "inner_table.txt").write_text(text + "\n")
    (args.out / "inner_table.json").write_text(json.dumps(rows, indent=1, default=float))
    return text


def score_row(
    y: np.ndarray,
    probes: dict[str, np.ndarray],
    saved: dict[str, dict[str, np.ndarray]],
    own: dict[str, np.ndarray] | None,
    cols: slice | np.ndarray,
) -> dict[str, float]:
    """One fold's scores on the gene columns ``cols``: the probes, every saved candidate and the derived ones."""
    y = y[:, cols]
    probes = {name: p[:, cols] for name, p in probes.items()}
    held = {c: z["held"][:, cols] for c, z in saved.items()}
    row = {name: mean_pcc(p, y) for name, p in probes.items()}
    for cand, pred in held.items():
        row[cand] = mean_pcc(pred, y)
        row[f"{cand} s"] = float(saved[cand]["seconds"])
        if cand == "default":
            own_cols = None if own is None else {k: a[:, cols] for k, a in own.items()}
            row.update(default_blends(pred, probes, y, own_cols))
        elif cand in SHAPES:  # the same blend as the default's, with this network
            row[f"blend3_{cand}"] = mean_pcc((pred + probes["ridge_ctx"] + probes["knn"]) / 3, y)
    row.update(seed_blends([held[c] for c in ("default", "default_seed1") if c in held], probes, y))
    if "long" in held and "long_seed1" in held:
        ens = (held["long"] + held["long_seed1"]) / 2
        row["blend3_long_ens2"] = mean_pcc((ens + probes["ridge_ctx"] + probes["knn"]) / 3, y)
    return row


def own_section(z: dict[str, np.ndarray], fs: list[Any], fold: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """DKAN's and the probes' predictions of the section u that ``default``'s training held out, and u's targets."""
    if "own_val" not in z:
        return None
    u = int(z["own_val_index"])
    rest = [i for i in fold["train"] if i != u]
    return {"dkan": z["own_val"], "y": fs[u].target.numpy(),
            **{name: probe_prediction(name, fs, rest, u) for name in ("ridge_ctx", "knn")}}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    env = setup(args)
    if args.train:
        train_candidate(args, env)
    if args.report:
        print(report(args, env))


if __name__ == "__main__":
    main()
