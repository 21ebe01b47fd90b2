"""Ensembles for :func:`dkan.tl.predict`: one panel and one set of inputs, their dropout, the probe blend."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dkan.train.fitted import DKANModel

logger = logging.getLogger("dkan")

#: Fields of ``model.meta`` that must agree between the members of an ensemble.
_SAME_META = ("features", "tile", "normalize", "gene_embedding")


def as_models(model: DKANModel | Sequence[DKANModel]) -> list[DKANModel]:
    """One model or an ensemble (a non-empty list of models with the same panel and input settings)."""
    from dkan.train.fitted import DKANModel

    models = [model] if isinstance(model, DKANModel) else list(model) if isinstance(model, Sequence) else None
    if not models or not all(isinstance(m, DKANModel) for m in models):
        raise TypeError(
            f"Expected `model` to be a DKANModel or a non-empty list of them, found {type(model).__name__}."
        )
    first = models[0]
    for i, m in enumerate(models[1:], start=1):
        if m.genes != first.genes:
            raise ValueError(f"`model[{i}]` predicts other genes than `model[0]`; an ensemble needs one gene panel.")
        diff = [k for k in _SAME_META if m.meta.get(k) != first.meta.get(k)]
        if diff or m.config.use_text != first.config.use_text:
            raise ValueError(
                f"`model[{i}]` was trained on other inputs than `model[0]` (differs in {diff or ['use_text']}); "
                "an ensemble needs models trained with the same features, tiles, normalisation and gene texts."
            )
    return models


def check_dropout(models: list[DKANModel], n_samples: int) -> None:
    """Refuse test-time dropout draws (``n_samples > 1``) from models without dropout; warn for some of an ensemble.

    Without a dropout layer every draw is the same, so the standard deviation layer would be ~0 everywhere
    (rounding noise) and look like perfect confidence.
    """
    from dkan.nn.inference import TRAINING_ONLY, has_dropout

    if n_samples <= 1:
        return
    without = [i for i, m in enumerate(models) if not has_dropout(m.module, skip=TRAINING_ONLY)]
    if not without:
        return
    if len(without) == len(models):
        who = "the model has no" if len(models) == 1 else f"none of the {len(models)} models has a"
        fix = (
            "pass `n_samples=1`, or an ensemble (a list of models trained with different seeds) for a spread"
            if len(models) == 1
            else "pass `n_samples=1`: the ensemble's spread alone gives the standard deviation"
        )
        raise ValueError(
            f"`n_samples={n_samples}` asks for test-time dropout draws, but {who} dropout layer with a non-zero "
            "rate on its prediction path (trained with `*_dropout` at 0): every draw would be the same and the "
            f"standard deviation about 0 everywhere. Retrain with dropout, or {fix}."
        )
    logger.warning(
        "predict: model(s) %s of the ensemble have no dropout, so their %d draws are all the same; the standard "
        "deviation mixes their single predictions with the others' dropout draws.",
        without,
        n_samples,
    )


def probe_sets(models: list[DKANModel]) -> list[tuple[dict, dict]] | None:
    """Per model, its stored probes and their settings (``probe_blend`` models); None when no model has them.

    An ensemble mixing blended and network-only models is refused: its prediction would be neither.
    """
    from dkan._evaluation.blend import check_arrays

    has = [bool(m.probes) for m in models]
    if not any(has):
        return None
    if not all(has):
        raise ValueError(
            f"`model`: {sum(has)} of the {len(models)} models carry the DKAN+probes blend (`probe_blend=True`) and "
            "the others do not; predict with models trained with the same `probe_blend`."
        )
    sets = []
    for k, m in enumerate(models):
        check_arrays(m.probes, m.meta.get("probe_blend"), n_genes=len(m.genes), where=f"model {k}")
        sets.append((m.probes, m.meta["probe_blend"]))
    return sets


def blend_sample(sets: list[tuple[dict, dict]], sample: object, pred: np.ndarray, n_panel: int) -> np.ndarray:
    """``pred`` with its first ``n_panel`` columns (the panel) replaced by mean(network, ridge_ctx, knn).

    ``sample`` is one sample's model inputs (on the CPU); each probe's prediction is its mean over the models.
    """
    from dkan._evaluation.blend import blend, predict_probes
    from dkan._evaluation.probes import context_input

    x = context_input(sample)
    parts = [predict_probes(arrays, settings, x) for arrays, settings in sets]
    probes = [np.mean([p[j] for p in parts], axis=0) for j in range(len(parts[0]))]
    out = pred.copy()
    out[:, :n_panel] = blend(pred[:, :n_panel], probes)
    return out
