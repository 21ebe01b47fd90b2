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
from dkan._evaluation.folds import fold_targets, summarise_folds, training_gene_sets, training_panel
from dkan._evaluation.probes import baseline_fold
from dkan._utils import iter_samples
from dkan.tl._cv_fold import _dkan_fold, _fold_probes

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


#: Row of the network alone when the configuration blends it with the probes (``probe_blend=True``).
NETWORK_ROW = "DKAN_network"
#: Baselines: the training mean, the HEST-Benchmark fixed-alpha ridge and the tuned probes (:mod:`.probes`).
BASELINES = ("mean", "ridge_hest", "ridge", "ridge_ctx", "knn")


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
    baseline_params
        Per baseline, what was fitted in each fold (the tuned probes: the chosen ``alpha`` or ``k`` and the
        inner score of every candidate).
    fold_genes
        With a panel per fold, each fold's panel (``genes`` is their union; predictions and metrics of a fold
        cover its own panel, NaN elsewhere); None with one panel.
    target
        The targets the predictions are scored against, ``(n_spots, n_genes)`` like ``predictions`` (with a panel
        per fold: normalised over each fold's panel, NaN outside it).
    trust
        With ``trust=True``: per fold, the DKAN model's trust figures on its test samples
        (:func:`dkan._evaluation.trust.fold_trust`: interval coverage, validation-vs-held-out PCC, novelty).
    """

    summary: CVSummary
    folds: list[list[str]]
    predictions: dict[str, np.ndarray]
    obs: pd.DataFrame
    genes: list[str]
    histories: dict[str, list[list[dict[str, float]]]] = field(default_factory=dict)
    baseline_params: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    fold_genes: list[list[str]] | None = None
    target: np.ndarray | None = None
    trust: list[dict[str, Any]] | None = None

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
    panel_per_fold: bool | None = None,
    trust: bool = False,
    **overrides: Any,
) -> CVResult:
    """Cross-validate DKAN against baselines and ablations, by group (e.g. patient or section).

    Every input step (tiling, features, gene embeddings) runs once on all samples, so all methods see identical
    folds and identical features. Each DKAN variant picks its checkpoint on a validation split of the training
    samples only. When ``cross_validate`` chooses the gene panel, it chooses it per fold on the training samples
    (and normalises every sample's targets over that panel); HEG and HVG are then chosen per fold on the
    training targets (:mod:`dkan._evaluation.folds`), so no choice sees the test samples.

    Parameters
    ----------
    {sdatas}
    groupby
        ``obs`` column defining the groups held out together (``"patient"``, or ``"sample"`` for
        leave-one-section-out). Every sample must lie in one group.
    n_folds
        ``None``: leave one group out; an int: that many folds over shuffled groups.
    config
        DKAN configuration (preset name, :class:`dkan.DKANConfig` or overrides). With ``probe_blend=True`` the
        ``DKAN`` row (and every ablation's) is the DKAN+probes blend, with the probes fitted per fold exactly as
        the ``ridge_ctx`` and ``knn`` baselines (same training samples, ``seed`` and inner tuning), and the row
        ``"DKAN_network"`` holds the network alone.
    baselines
        Any of ``"mean"`` (training mean per gene), ``"ridge_hest"`` (HEST-Benchmark ridge on the frozen spot
        features, fixed alpha), and the tuned probes ``"ridge"`` (spot features), ``"ridge_ctx"`` (spot features
        and the masked mean of the region tiles) and ``"knn"`` (cosine kNN on the latter). Each probe picks its
        parameter by an inner split of the fold's training samples only (:mod:`dkan._evaluation.probes`);
        the choice per fold is in ``CVResult.baseline_params``.
    ablations
        Any of ``"no_text"``, ``"no_contrastive"``, ``"no_multiscale"``, ``"fixed_weights"``, ``"no_distill"``,
        ``"gene_tokens"`` (gene queries attend over patch and region tokens), ``"shuffled_text"`` (gene
        embeddings permuted across genes: the text-content control).
    seed
        Seed of the fold assignment (``n_folds``) and of the ridge PCA.
    table_key, image_key, descriptions, gene_info, device, progress
        As in :func:`dkan.tl.train`.
    panel_per_fold
        ``None`` (default): choose the panel per fold on the training samples when no table has
        ``var["dkan_panel"]``, else use that panel for every fold (HEG/HVG then on all folds' targets, as the
        reference does). ``True``: always per fold (the flag is then set to the union of the fold panels, which
        the inputs are prepared for). ``False``: one panel (the flagged one, or one chosen on all samples).
    trust
        Record each fold's DKAN trust signals on its training samples only (as :func:`dkan.tl.train` does) and
        measure them on its test samples (``CVResult.trust``). Costs per fold 11 forward passes over the
        validation spots and 10 over the test spots (MC dropout), and a kNN novelty reference.
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
    plan = _fold_panels(sdata, cfg, groupby, n_folds, seed, table_key, panel_per_fold)
    sdatas, tables, genes, emb, _, _, samples, reader = training_inputs(
        sdata, cfg, dev, table_key=table_key, image_key=image_key, descriptions=descriptions, gene_info=gene_info,
        progress=progress,
    )  # fmt: skip
    groups = _sample_groups(sdatas, tables, groupby, table_key)
    folds = make_folds(groups, n_folds=n_folds, seed=seed)
    methods = {"DKAN": cfg, **{a: cfg.replace(**ABLATIONS[a]) for a in ablations}}
    offsets = np.cumsum([0] + [len(s) for s in samples])
    network_rows = [NETWORK_ROW] if cfg.probe_blend else []
    preds = {m: np.full((offsets[-1], len(genes)), np.nan, np.float32) for m in [*methods, *network_rows, *baselines]}
    target = np.full((offsets[-1], len(genes)), np.nan, np.float32)
    histories: dict[str, list] = {m: [] for m in methods}
    params: dict[str, list] = {b: [] for b in baselines}
    context: dict[int, np.ndarray] = {}
    fold_genes, fold_sets, trusts = [], [], []
    for f, test_groups in enumerate(folds):
        test = [i for i, g in enumerate(groups) if g in test_groups]
        train = [i for i, g in enumerate(groups) if g not in test_groups]
        logger.info(
            "Fold %d/%d: test %s (%d samples), train %d samples.", f + 1, len(folds), test_groups, len(test), len(train)
        )
        fsamples, femb, cols = samples, emb, np.arange(len(genes))
        if plan is not None:
            fsamples, femb, cols = _fold_inputs(plan, f, sdatas, samples, genes, emb, table_key)
            fold_genes.append(plan["panels"][f])
            y_train = np.concatenate([fsamples[i].target.numpy() for i in train])
            fold_sets.append(training_gene_sets(y_train, plan["panels"][f]))
        for i in test:
            target[offsets[i] : offsets[i + 1], cols] = fsamples[i].target.numpy()
        probes, tried = None, False
        for name, mcfg in methods.items():
            if mcfg.probe_blend and not tried:  # the baselines' fit: same samples, seed and inner tuning
                probes, tried = _fold_probes(fsamples, train, test, seed, context), True
            memb = shuffle_gene_text(femb, seed) if name == "shuffled_text" else femb
            out, hist, figures, network = _dkan_fold(
                fsamples, train, test, memb, mcfg, dev, reader, progress, trust=trust and name == "DKAN",
                probes=probes if mcfg.probe_blend else None,
            )  # fmt: skip
            histories[name].append(hist)
            if figures is not None:
                trusts.append(figures)
            for i, p, q in zip(test, out, network, strict=True):
                preds[name][offsets[i] : offsets[i + 1], cols] = p
                if name == "DKAN" and network_rows:
                    preds[NETWORK_ROW][offsets[i] : offsets[i + 1], cols] = q
        for name in baselines:
            outs, fitted = baseline_fold(name, fsamples, train, test, seed=seed, cache=context)
            params[name].append(fitted)
            for i, p in zip(test, outs, strict=True):
                preds[name][offsets[i] : offsets[i + 1], cols] = p
    obs = pd.DataFrame(
        {
            K.SAMPLE: np.repeat([s.name for s in samples], np.diff(offsets)),
            "group": np.repeat(groups, np.diff(offsets)),
            "fold": np.repeat([_fold_of(g, folds) for g in groups], np.diff(offsets)),
        }
    )
    if plan is None:
        summary = _summarise(preds, target, obs, genes)
    else:
        summary = summarise_folds(preds, target, obs, genes, fold_genes, fold_sets)
    return CVResult(
        summary, [list(f) for f in folds], preds, obs, genes, histories, params, fold_genes or None, target,
        trusts or None,
    )  # fmt: skip


def _fold_panels(sdata, cfg, groupby, n_folds, seed, table_key, per_fold) -> dict[str, Any] | None:
    """Per fold, the panel of its training samples; flags their union as the panel to prepare. None: one panel."""
    from dkan._data import prepare as prep
    from dkan._utils import get_table

    sdatas = prep.as_list(sdata)
    tables = [get_table(sd, table_key)[1] for sd in sdatas]
    if per_fold is None:
        per_fold = not all(K.PANEL in t.var for t in tables)
    if not per_fold:
        return None
    rows = _sample_rows(sdatas, table_key)
    groups = _sample_groups(sdatas, tables, groupby, table_key)
    folds = make_folds(groups, n_folds=n_folds, seed=seed)
    panels = []
    for test_groups in folds:
        picked = [[r for (k, r), g in zip(rows, groups, strict=True) if k == t and g not in test_groups]
                  for t in range(len(tables))]  # fmt: skip
        panels.append(
            training_panel(tables, [np.concatenate(p) if p else np.zeros(0, int) for p in picked], cfg.n_genes)
        )
    union = list(dict.fromkeys(g for p in panels for g in p))
    if any(K.PANEL in t.var and set(t.var_names[t.var[K.PANEL].to_numpy(bool)]) != set(union) for t in tables):
        logger.warning("cross_validate: panel per fold; `var[%r]` now flags the union of the fold panels.", K.PANEL)
    for t in tables:
        t.var[K.PANEL] = t.var_names.isin(union)
    logger.info(
        "Panels chosen per fold on the training samples: %s genes, %d in all.", [len(p) for p in panels], len(union)
    )
    return {"panels": panels, "rows": rows}


def _fold_inputs(plan, f, sdatas, samples, genes, emb, table_key):
    """The samples with targets normalised over fold ``f``'s panel, its gene embeddings and its columns in ``genes``."""
    import dataclasses

    import torch

    panel = plan["panels"][f]
    cols = pd.Index(genes).get_indexer(panel)
    if (cols < 0).any():
        raise RuntimeError(
            f"Fold {f} panel genes {[g for g, c in zip(panel, cols, strict=False) if c < 0][:5]} were not prepared."
        )
    ys = fold_targets(sdatas, plan["rows"], panel, table_key=table_key)
    fsamples = [dataclasses.replace(s, target=torch.as_tensor(y)) for s, y in zip(samples, ys, strict=True)]
    return fsamples, emb[cols], cols


def _sample_rows(sdatas: list[Any], table_key: str | None) -> list[tuple[int, np.ndarray]]:
    """Per sample (in the order of the model inputs), its SpatialData index and its rows in the count table."""
    return [
        (k, np.asarray(s.obs_idx, dtype=np.int64))
        for k, sd in enumerate(sdatas)
        for s in iter_samples(sd, table_key=table_key, need_image=False)
    ]


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
