"""Trust signals in cross-validation (issue 23): how each fold's signals fare on its held-out samples.

Each fold's DKAN model records its trust signals on its own training data (:func:`dkan.tl._trust.fit_trust`: the
validation split of the training samples calibrates the spread and gives each gene's validation PCC; a draw of the
training spots is the novelty reference). On the fold's test samples only, :func:`fold_trust` then measures

* ``coverage_68`` / ``coverage_95``: the share of test entries (spots x panel genes) inside the calibrated
  interval at the nominal level (:data:`LEVELS`), as ``predict(..., interval=)`` builds it;
* ``spearman``: Spearman correlation across genes between the recorded validation PCC and the held-out PCC;
* ``reliable_pcc`` / ``rest_pcc``: mean held-out PCC of the genes whose validation PCC is at least
  :data:`RELIABLE_PCC` (the default of :func:`dkan.tl.reliable_genes`, fixed before any test data is seen) and of
  the other genes;
* ``novel_fraction``: the share of test spots flagged novel (frozen features or, when recorded, colour).

The held-out PCC of a gene is its Pearson r on each test sample, averaged over the test samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dkan import _trust as T

#: Nominal interval levels whose held-out coverage is measured (key suffix -> level).
LEVELS = {"68": 0.68, "95": 0.95}
#: Validation PCC from which a gene counts as reliable (the default of ``dkan.tl.reliable_genes``).
RELIABLE_PCC = 0.3
#: Scalar figures of one fold, in report order.
FIGURES = ("coverage_68", "coverage_95", "spearman", "reliable_pcc", "rest_pcc", "n_reliable", "novel_fraction")


def fold_trust(
    module: Any,
    settings: dict[str, Any],
    arrays: dict[str, np.ndarray],
    tests: list[Any],
    preds: list[np.ndarray],
    emb: np.ndarray,
    cfg: Any,
    dev: Any,
    *,
    read: list[Any] | None = None,
) -> dict[str, Any]:
    """The trust figures of one fold on its test samples ``tests`` (their deterministic predictions ``preds``).

    ``settings``/``arrays`` are what :func:`dkan.tl._trust.fit_trust` returned for the fold's model (fitted on the
    training samples only); ``read`` holds each test sample's patch reader (or None). Returns the scalar
    :data:`FIGURES` plus the per-gene ``val_pcc`` and ``heldout_pcc`` ``(G,)`` and the per-sample
    ``novel_fractions``.
    """
    read = read or [None] * len(tests)
    targets = [s.target.cpu().numpy().astype(np.float32) for s in tests]
    heldout = _mean_pcc([T.pearson_per_gene(p, y) for p, y in zip(preds, targets, strict=True)])
    out: dict[str, Any] = {"heldout_pcc": heldout.astype(np.float32)}
    out["validation"] = (settings.get("calibration") or {}).get("validation")  # the split that calibrated
    out.update(_coverage(module, settings, arrays, tests, preds, targets, emb, cfg, dev, read))
    val = arrays.get("val_pcc")
    out["val_pcc"] = np.full_like(out["heldout_pcc"], np.nan) if val is None else np.asarray(val, np.float32)
    out.update(reliability(out["val_pcc"], heldout))
    out.update(_novelty(arrays, tests))
    return out


def reliability(val_pcc: np.ndarray, heldout_pcc: np.ndarray, threshold: float = RELIABLE_PCC) -> dict[str, float]:
    """Spearman across genes of validation vs held-out PCC; mean held-out PCC of reliable genes and the rest."""
    from scipy.stats import spearmanr

    val, held = np.asarray(val_pcc, np.float64), np.asarray(heldout_pcc, np.float64)
    ok = np.isfinite(val) & np.isfinite(held)
    rho = float(spearmanr(val[ok], held[ok]).statistic) if ok.sum() >= 3 and np.ptp(val[ok]) > 0 else float("nan")
    good = ok & (val >= threshold)
    rest = ok & ~good
    return {
        "spearman": rho,
        "reliable_pcc": float(held[good].mean()) if good.any() else float("nan"),
        "rest_pcc": float(held[rest].mean()) if rest.any() else float("nan"),
        "n_reliable": int(good.sum()),
        "n_rest": int(rest.sum()),
    }


def coverage(pred: np.ndarray, half: np.ndarray, target: np.ndarray) -> float:
    """Share of finite ``target`` entries within ``pred +- half``."""
    ok = np.isfinite(target) & np.isfinite(pred)
    return float((np.abs(target - pred) <= half)[ok].mean()) if ok.any() else float("nan")


def _coverage(module, settings, arrays, tests, preds, targets, emb, cfg, dev, read) -> dict[str, Any]:
    calib = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("calibration.")}
    if not calib:  # no validation spots: no calibration
        return {f"coverage_{k}": float("nan") for k in LEVELS} | {"sigma": None}
    kind = settings["calibration"]["sigma"]
    sds = _test_spread(module, tests, emb, cfg, dev, read, int(settings["calibration"]["draws"]), kind)
    floor = np.asarray(calib["floor"], np.float64)
    pred, target, raw = (np.concatenate(a) for a in (preds, targets, sds))
    out: dict[str, Any] = {"sigma": kind}
    for key, level in LEVELS.items():
        q, _ = T.interval_factor(calib, level)
        out[f"coverage_{key}"] = coverage(pred, np.maximum(raw, floor) * q, target)
    return out


def _test_spread(module, tests, emb, cfg, dev, read, n_draws, kind) -> list[np.ndarray]:
    """Per test sample, the raw spread the calibration scales (MC dropout std, or ones for ``residual``)."""
    import torch

    from dkan.nn.inference import Predictor, draws
    from dkan.train.loop import predict_rows

    if kind == "residual":
        return [np.ones((len(s), emb.shape[0]), np.float32) for s in tests]
    genes = torch.as_tensor(emb, device=dev) if cfg.use_text else None
    out = []
    for s, rd in zip(tests, read, strict=True):
        inp = s.to(dev)

        def run(m: Any, mc: bool, inp: Any = inp, rd: Any = rd) -> np.ndarray:
            return predict_rows(
                Predictor(m, mc_dropout=mc), inp, np.arange(len(inp)), genes, batch_size=cfg.batch_size,
                device=dev, amp=cfg.amp, read_patches=rd,
            )  # fmt: skip

        _, sd = draws(run, [module], n_draws, cfg.seed)
        out.append(sd if sd is not None else np.ones((len(s), emb.shape[0]), np.float32))
    return out


def _novelty(arrays: dict[str, np.ndarray], tests: list[Any]) -> dict[str, Any]:
    """Share of test spots flagged novel, as ``predict`` flags them: frozen features or colour above its threshold.

    The colour half counts only when the model has a colour reference and the test sample its spot colours.
    """
    ref = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("novelty.")}
    colour = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("colour.")}
    if not ref:
        return {"novel_fraction": float("nan"), "novel_fractions": {}}
    thr = float(ref["threshold"][0])
    flags = {}
    for s in tests:
        flag = T.novelty_scores(ref, s.spot.detach().float().cpu().numpy()) > thr
        if colour and getattr(s, "colour", None) is not None:
            flag |= T.colour_novelty(colour, np.asarray(s.colour, dtype=np.float64)) > 1.0
        flags[s.name] = flag
    pooled = np.concatenate(list(flags.values()))
    return {"novel_fraction": float(pooled.mean()), "novel_fractions": {k: float(v.mean()) for k, v in flags.items()}}


def _mean_pcc(per_sample: list[np.ndarray]) -> np.ndarray:
    """Mean over samples of per-gene PCC, ignoring samples where a gene's PCC is undefined (NaN if all are)."""
    r = np.stack(per_sample)
    ok = np.isfinite(r)
    n = ok.sum(0)
    return np.where(n > 0, np.where(ok, r, 0.0).sum(0) / np.maximum(n, 1), np.nan)


def trust_table(trust: list[dict[str, Any]], folds: list[list[str]]):
    """Per-fold scalar figures (rows ``test <group>`` and ``mean``) as a DataFrame."""
    import pandas as pd

    rows = {f"test {','.join(f)}": {k: t.get(k, np.nan) for k in FIGURES} for f, t in zip(folds, trust, strict=True)}
    df = pd.DataFrame(rows).T.astype(float)
    df.loc["mean"] = df.mean(skipna=True)
    return df
