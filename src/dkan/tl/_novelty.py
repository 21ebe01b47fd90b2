"""Novelty of a prediction's spots: frozen-feature novelty, colour novelty, and the flag that joins them.

The numerics live in :mod:`dkan._trust`. At training, :func:`fit_colour_trust` fits the colour reference on the
training spots' patch colours (``SampleInputs.colour``, from ``obsm["dkan_spot_colour"]``); at prediction,
:class:`Novelty` scores each sample and writes ``obs["dkan_novelty"]``, ``obs["dkan_colour_novelty"]`` and
``obs["dkan_novel"]`` (either signal above its threshold).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K
from dkan import _trust as T

if TYPE_CHECKING:
    from anndata import AnnData

    from dkan.train.fitted import DKANModel

logger = logging.getLogger("dkan")

#: Share of novel spots in a sample above which ``predict`` warns that the slide is mostly unfamiliar.
NOVEL_WARN_FRACTION = 0.5
_RECOMPUTE = "`dkan.tl.extract_features(..., force=True)`"


def fit_colour_trust(samples: list[Any]) -> tuple[dict[str, Any] | None, dict[str, np.ndarray]]:
    """Settings (for ``model.meta["trust"]["colour"]``) and ``colour.*`` arrays of the training spots' colours.

    ``(None, {})`` with a logged note when a training sample has no spot colours (features cached by an earlier dkan).
    """
    missing = [s.name for s in samples if s.colour is None]
    if missing or not samples:
        logger.info(
            "No colour reference (the colour half of the novelty flag): sample(s) %s have no `obsm[%r]` (features "
            "computed by an earlier dkan); recompute their features (%s) and train again to add it.",
            ", ".join(missing[:5]), K.SPOT_COLOUR, _RECOMPUTE,
        )  # fmt: skip
        return None, {}
    ref = T.fit_colour(np.concatenate([np.asarray(s.colour, dtype=np.float32) for s in samples]))
    settings = {"threshold": float(ref["threshold"][0]), "quantile": float(ref["quantile"][0])}
    settings["n_spots"] = int(ref["n"][0])
    return settings, {f"colour.{k}": v for k, v in ref.items()}


def prefixed(model: DKANModel, prefix: str) -> dict[str, np.ndarray] | None:
    """The model's ``trust`` arrays named ``f"{prefix}.*"``, without the prefix, or None."""
    arrays = {k.split(".", 1)[1]: v for k, v in model.trust.items() if k.startswith(f"{prefix}.")}
    return arrays or None


class Novelty:
    """Scores each sample's spots against the model's feature and colour references; writes the ``obs`` columns."""

    def __init__(self, model: DKANModel) -> None:
        self.features = prefixed(model, "novelty")
        self.colour = prefixed(model, "colour")
        if self.features is not None and T.novelty_version(self.features) == 1:
            logger.info(
                "The model holds the version-1 novelty reference (saved by an earlier dkan): `obs[%r]` is scored with "
                "it, which misses blank and other-tissue input; train the model again for the current one.", K.NOVELTY,
            )  # fmt: skip
        if self.colour is None and self.features is not None:
            logger.info(
                "The model has no colour reference (saved by an earlier dkan, or trained on features without spot "
                "colours): `obs[%r]` rests on the frozen features alone, which miss a stain or scanner colour change. "
                "To add it, recompute the training data's features (%s) and train again.", K.NOVEL, _RECOMPUTE,
            )  # fmt: skip
        self.feature_scores: list[tuple[str, np.ndarray, np.ndarray]] = []
        self.colour_scores: list[tuple[str, np.ndarray, np.ndarray]] = []
        self.no_colour: list[str] = []

    def add(self, name: str, obs_idx: np.ndarray, spot: Any, colour: np.ndarray | None) -> None:
        """Score one sample: ``spot`` its frozen features (a tensor), ``colour`` its spot colours or None."""
        idx = np.asarray(obs_idx)
        if self.features is not None:
            feats = spot.detach().float().cpu().numpy()
            self.feature_scores.append((name, idx, T.novelty_scores(self.features, feats)))
        if self.colour is not None and colour is None:
            self.no_colour.append(name)
        elif self.colour is not None:
            self.colour_scores.append((name, idx, T.colour_novelty(self.colour, colour)))

    def write(self, adata: AnnData) -> dict[str, Any]:
        """Write the ``obs`` columns (dropping those of an earlier prediction it does not write); the ``uns`` record.

        The record holds, per sample, the share of flagged spots (``novel_fraction``: either signal), and of spots
        flagged by the frozen features (``feature_novel_fraction``) and by the colour (``colour_novel_fraction``);
        None where that signal was not scored.
        """
        if self.no_colour:
            logger.info(
                "No colour novelty for sample(s) %s: their features were computed by an earlier dkan, without the "
                "spot colours `obsm[%r]`; recompute them (%s) to add it.",
                ", ".join(self.no_colour[:5]), K.SPOT_COLOUR, _RECOMPUTE,
            )  # fmt: skip
        if self.features is None and self.colour is None:
            logger.info("The model has no novelty reference (saved before dkan recorded one): no `obs[%r]`.", K.NOVEL)
        thr = float(self.features["threshold"][0]) if self.features is not None else np.inf
        feat = _column(adata.n_obs, self.feature_scores, K.NOVELTY, adata)
        col = _column(adata.n_obs, self.colour_scores, K.COLOUR_NOVELTY, adata)
        if feat is None and col is None:
            adata.obs.drop(columns=[K.NOVEL], errors="ignore", inplace=True)  # an earlier model's
            return {"novel_fraction": None, "feature_novel_fraction": None, "colour_novel_fraction": None}
        novel = np.zeros(adata.n_obs, dtype=bool)
        if feat is not None:
            novel |= feat > thr
        if col is not None:
            novel |= col > 1.0
        adata.obs[K.NOVEL] = novel
        names = list(dict.fromkeys(n for n, _, _ in [*self.feature_scores, *self.colour_scores]))
        rows = {n: i for n, i, _ in [*self.feature_scores, *self.colour_scores]}
        record = {
            "novel_fraction": {n: float(novel[rows[n]].mean()) for n in names if len(rows[n])},
            "feature_novel_fraction": _fractions(self.feature_scores, thr) if feat is not None else None,
            "colour_novel_fraction": _fractions(self.colour_scores, 1.0) if col is not None else None,
        }
        _warn_mostly_novel(record)
        return record


def _column(n_obs: int, scores: list[tuple[str, np.ndarray, np.ndarray]], key: str, adata: AnnData) -> Any:
    """Write ``obs[key]`` from per-sample scores (NaN for spots without one); drop it and return None without any."""
    if not scores:
        adata.obs.drop(columns=[key], errors="ignore", inplace=True)  # an earlier model's
        return None
    out = np.full(n_obs, np.nan, dtype=np.float32)
    for _, idx, s in scores:
        out[idx] = s
    adata.obs[key] = out
    return out


def _fractions(scores: list[tuple[str, np.ndarray, np.ndarray]], threshold: float) -> dict[str, float]:
    return {name: float((s > threshold).mean()) for name, _, s in scores if len(s)}


def _warn_mostly_novel(record: dict[str, Any]) -> None:
    """One warning naming the samples where most spots are flagged, and which signal flagged them."""
    feat, col = record["feature_novel_fraction"] or {}, record["colour_novel_fraction"] or {}
    parts, by_colour = [], False
    for name, frac in record["novel_fraction"].items():
        if frac <= NOVEL_WARN_FRACTION:
            continue
        signals = {"frozen features": feat.get(name), "colour": col.get(name)}
        fired = [s for s, f in signals.items() if f is not None and f > NOVEL_WARN_FRACTION]
        which = {0: "frozen features and colour together", 1: fired[0]}.get(len(fired), "frozen features and colour")
        detail = ", ".join(f"{s} {f:.0%}" for s, f in signals.items() if f is not None)
        parts.append(f"{name}: {frac:.0%} of spots, flagged by the {which} ({detail})")
        by_colour |= "colour" in which
    if parts:
        hint = " (a colour change may be another stain or scanner)" if by_colour else ""
        logger.warning(
            "Most spots look unlike the training data (frozen-feature or colour novelty above the model's "
            "threshold): %s. Predictions there are extrapolations%s; see `obs[%r]`.", "; ".join(parts), hint, K.NOVEL,
        )  # fmt: skip
