"""Ensembles for :func:`dkan.tl.predict`: a list of models with one panel and one set of inputs, and their dropout."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

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
