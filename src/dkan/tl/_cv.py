"""`dkan.tl.cross_validate`: DKAN, baselines and ablations on identical folds and identical features."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dkan import _keys as K
from dkan._docs import shared_docs
from dkan._utils import iter_samples

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from dkan._config import DKANConfig
    from dkan._evaluation.combine import CVSummary

logger = logging.getLogger("dkan")

#: Ablations as configuration switches (name -> overrides).
ABLATIONS: dict[str, dict[str, Any]] = {
    "no_text": {"use_text": False},
    "no_contrastive": {"use_contrastive": False},
    "no_multiscale": {"use_region": False, "use_slide": False},
    "fixed_weights": {"adaptive_weights": False},
    "no_distill": {"use_distill": False},
    "gene_tokens": {"gene_attend_tokens": True},
    "shuffled_text": {},  # same model, gene embeddings permuted across genes (see shuffle_gene_text)
}


def shuffle_gene_text(emb: np.ndarray, seed: int = 0) -> np.ndarray:
    """Gene embeddings with rows permuted across genes (a derangement): text of the wrong genes, same statistics.

    The control that isolates what the text *content* is worth, as opposed to ``no_text`` (a learned per-gene
    table, i.e. per-gene capacity without text).
    """
    n = len(emb)
    if n < 2:
        return emb.copy()
    order = np.random.default_rng(seed).permutation(n)
    source = np.empty(n, dtype=np.int64)
    source[order] = np.roll(order, -1)  # one random n-cycle: no gene keeps its own text
    return emb[source]


BASELINES = ("mean", "ridge")


@dataclass
class CVResult:
    """What :func:`cross_validate` returns.

    Attributes
    ----------
    summary
        Metrics per method and fold, mean ± population std (``summary.table()`` prints the paper's table).
    folds
        Test groups of each fold.
    predictions
        Out-of-fold predictions per method, ``(n_spots, n_genes)`` in the order of ``obs``.
    obs
        Sample, group and fold of every spot.
    genes
        The gene panel (prediction columns).
    histories
        Training history of each DKAN variant per fold.
    """

    summary: CVSummary
    folds: list[list[str]]
    predictions: dict[str, np.ndarray]
    obs: pd.DataFrame
    genes: list[str]
    histories: dict[str, list[list[dict[str, float]]]] = field(default_factory=dict)

    def table(self, *, digits: int = 3) -> pd.DataFrame:
        """Method x metric table of ``"mean ± std"`` strings."""
        return self.summary.table(digits=digits)


@shared_docs
def cross_validate(
    sdata: SpatialData | Sequence[SpatialData],
    *,
    groupby: str = K.PATIENT,
    n_folds: int | None = None,
    config: DKANConfig | str | Mapping[str, Any] | None = None,
    baselines: Sequence[str] = BASELINES,
    ablations: Sequence[str] = (),
    seed: int = 0,
    table_key: str | None = None,
    image_key: str | Mapping[str, str] | None = None,
    descriptions: Any = None,
    gene_info: Any = None,
    device: str | None = None,
    progress: bool = True,
    **overrides: Any,
) -> CVResult:
    """Cross-validate DKAN against baselines and ablations, by group (e.g. patient or section).

    Every input step (panel, normalisation, tiling, features, gene embeddings) runs once on all samples, so all
    methods see identical folds and identical features. Each DKAN variant picks its checkpoint on a
    validation split of the training samples only.

    Parameters
    ----------
    {sdatas}
    groupby
        ``obs`` column defining the groups held out together (``"patient"``, or ``"sample"`` for
        leave-one-section-out). Every sample must lie in one group.
    n_folds
        ``None``: leave one group out; an int: that many folds over shuffled groups.
    config
        DKAN configuration (preset name, :class:`dkan.DKANConfig` or overrides).
    baselines
        Any of ``"mean"`` (training mean per gene) and ``"ridge"`` (HEST-Benchmark ridge on frozen spot
        features).
    ablations
        Any of ``"no_text"``, ``"no_contrastive"``, ``"no_multiscale"``, ``"fixed_weights"``, ``"no_distill"``,
        ``"gene_tokens"`` (gene queries attend over patch and region tokens), ``"shuffled_text"`` (gene
        embeddings permuted across genes: the text-content control).
    seed
        Seed of the fold assignment (``n_folds``) and of the ridge PCA.
    table_key, image_key, descriptions, gene_info, device, progress
        As in :func:`dkan.tl.train`.
    **overrides
        Configuration fields to override.

    Returns
    -------
    The per-method, per-fold metrics and the out-of-fold predictions.
    """
    from dkan._config import DKANConfig
    from dkan._data.training import training_inputs
    from dkan._utils import resolve_device

    unknown = sorted(set(ablations) - set(ABLATIONS)) + sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"Unknown ablations/baselines {unknown}; choose from {list(ABLATIONS)} and {list(BASELINES)}.")
    cfg = DKANConfig.resolve(config, **overrides)
    dev = resolve_device(device)
    sdatas, tables, genes, emb, _, _, samples, reader = training_inputs(
        sdata, cfg, dev, table_key=table_key, image_key=image_key, descriptions=descriptions, gene_info=gene_info,
        progress=progress,
    )  # fmt: skip
    groups = _sample_groups(sdatas, tables, groupby, table_key)
    folds = make_folds(groups, n_folds=n_folds, seed=seed)
    methods = {"DKAN": cfg, **{a: cfg.replace(**ABLATIONS[a]) for a in ablations}}
    offsets = np.cumsum([0] + [len(s) for s in samples])
    preds = {m: np.full((offsets[-1], len(genes)), np.nan, np.float32) for m in [*methods, *baselines]}
    histories: dict[str, list] = {m: [] for m in methods}
    for f, test_groups in enumerate(folds):
        test = [i for i, g in enumerate(groups) if g in test_groups]
        train = [i for i, g in enumerate(groups) if g not in test_groups]
        logger.info(
            "Fold %d/%d: test %s (%d samples), train %d samples.", f + 1, len(folds), test_groups, len(test), len(train)
        )
        for name, mcfg in methods.items():
            memb = shuffle_gene_text(emb, seed) if name == "shuffled_text" else emb
            out, hist = _dkan_fold(samples, train, test, memb, mcfg, dev, reader, progress)
            histories[name].append(hist)
            for i, p in zip(test, out, strict=True):
                preds[name][offsets[i] : offsets[i + 1]] = p
        for name in baselines:
            for i, p in zip(test, _baseline_fold(name, samples, train, test, seed), strict=True):
                preds[name][offsets[i] : offsets[i + 1]] = p
    obs = pd.DataFrame(
        {
            K.SAMPLE: np.repeat([s.name for s in samples], np.diff(offsets)),
            "group": np.repeat(groups, np.diff(offsets)),
            "fold": np.repeat([_fold_of(g, folds) for g in groups], np.diff(offsets)),
        }
    )
    target = np.concatenate([s.target.numpy() for s in samples])
    summary = _summarise(preds, target, obs, genes)
    return CVResult(summary, [list(f) for f in folds], preds, obs, genes, histories)


def make_folds(groups: Sequence[str], *, n_folds: int | None, seed: int) -> list[list[str]]:
    """Groups held out per fold: one group each (``n_folds=None``) or ``n_folds`` shuffled sets."""
    uniq = list(dict.fromkeys(groups))
    if len(uniq) < 2:
        raise ValueError(f"Cross-validation needs at least 2 groups, found {uniq}; choose another `groupby`.")
    if n_folds is None:
        return [[g] for g in uniq]
    if not 2 <= n_folds <= len(uniq):
        raise ValueError(f"`n_folds` must be in [2, {len(uniq)}] for {len(uniq)} groups, found {n_folds}.")
    order = np.random.default_rng(seed).permutation(len(uniq))
    return [[uniq[i] for i in chunk] for chunk in np.array_split(order, n_folds)]


def _fold_of(group: str, folds: list[list[str]]) -> int:
    return next(f for f, gs in enumerate(folds) if group in gs)


def _sample_groups(sdatas: list[Any], tables: list[Any], groupby: str, table_key: str | None) -> list[str]:
    out = []
    for sd, adata in zip(sdatas, tables, strict=True):
        if groupby not in adata.obs:
            raise KeyError(f"`groupby={groupby!r}` is not an obs column; available: {list(adata.obs.columns)}.")
        for s in iter_samples(sd, table_key=table_key, need_image=False):
            values = adata.obs[groupby].iloc[s.obs_idx].astype(str).unique()
            if len(values) != 1:
                raise ValueError(
                    f"Sample {s.name!r} spans several `{groupby}` groups {list(values)}; group by samples."
                )
            out.append(values[0])
    return out


def _dkan_fold(samples, train, test, emb, cfg, dev, reader, progress) -> tuple[list[np.ndarray], list[dict]]:
    from dkan.train.fitting import fit_inputs
    from dkan.train.loop import predict_rows

    sub_reader = (lambda s, rows, aug: reader(train[s], rows, aug)) if reader else None
    module, result = fit_inputs([samples[i] for i in train], emb, cfg, dev, reader=sub_reader, progress=progress)
    import torch

    genes = torch.as_tensor(emb, device=dev) if cfg.use_text else None
    outs = []
    for i in test:
        rd = (lambda rows, i=i: reader(i, rows, False)) if reader else None
        s = samples[i].to(dev)
        outs.append(
            predict_rows(module, s, np.arange(len(s)), genes, batch_size=256, device=dev, amp=cfg.amp, read_patches=rd)
        )
    return outs, result.history


def _baseline_fold(name: str, samples, train, test, seed: int) -> list[np.ndarray]:
    from dkan._evaluation.baselines import fit_mean, fit_ridge

    y = np.concatenate([samples[i].target.numpy() for i in train])
    if name == "mean":
        model = fit_mean(y)
    else:
        model = fit_ridge(np.concatenate([samples[i].spot.numpy() for i in train]), y, seed=seed)
    return [np.asarray(model.predict(samples[i].spot.numpy()), dtype=np.float32) for i in test]


def _summarise(preds: dict[str, np.ndarray], target: np.ndarray, obs: pd.DataFrame, genes: list[str]) -> CVSummary:
    import anndata as ad

    from dkan._evaluation.combine import combine_folds
    from dkan._evaluation.evaluate import evaluate

    results = {}
    for name, p in preds.items():
        adata = ad.AnnData(X=target, obs=obs.set_axis(obs.index.astype(str)), var=pd.DataFrame(index=genes))
        adata.layers["pred"], adata.layers["target"] = p, target
        results[name] = evaluate(adata, pred_layer="pred", target_layer="target", groupby=K.SAMPLE, fold="fold")
    return combine_folds(results)
