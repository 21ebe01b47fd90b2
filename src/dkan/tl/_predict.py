"""`dkan.tl.predict`: spatial expression from H&E with a trained model, written back to the SpatialData."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K
from dkan._data import prepare as prep
from dkan._data.inputs import build_inputs
from dkan._genetext.unseen import new_gene_embeddings, new_genes
from dkan._results import ensure_genes, find_results, mark, results_table
from dkan._scanpy_spatial import add_spatial_uns
from dkan._symbols import missing_genes_hint, use_symbols
from dkan._utils import check_int, check_unique_genes, get_table, iter_samples, resolve_device, uns_get, uns_set
from dkan._version import __version__
from dkan.tl._ensemble import as_models, blend_sample, check_dropout, probe_sets
from dkan.tl._trust import TrustPredict

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from spatialdata import SpatialData

    from dkan.train.fitted import DKANModel

logger = logging.getLogger("dkan")


def predict(
    sdata: SpatialData,
    model: DKANModel | str | os.PathLike | Sequence[DKANModel],
    *,
    key_added: str = K.PRED,
    device: str | torch.device | None = None,
    table_key: str | None = None,
    image_key: str | Mapping[str, str] | None = None,
    batch_size: int = 256,
    overwrite: bool = False,
    um_per_px: float | None = None,
    gene_symbols: str | None = None,
    genes: Sequence[str] | None = None,
    descriptions: Any = None,
    n_samples: int = 1,
    interval: float | None = None,
    progress: bool = True,
) -> str:
    """Predict the expression of the model's gene panel (and of other genes, from their text) at every spot.

    Missing input steps (tiling, frozen features) run with the model's settings. Predictions go to
    ``layers[key_added]`` (float32, spots x genes) of the panel-sized results table (:mod:`dkan._results`):
    ``f"{table_key}_dkan"`` when the slide has a count table (``var`` = the panel, in panel order, plus the genes
    in ``genes``; created or grown as needed, the count table itself is not touched), and when the count table
    holds measured counts, ``layers["dkan_target"]`` of the same table gets the model's normalisation (from the
    counts layer the model was trained on, when the table has it) so that :func:`dkan.tl.evaluate` compares like
    with like. A slide with only an image gets pseudo-spots (:func:`dkan.tl.make_spots`) and the table over them
    (``var_names`` = the panel plus ``genes``) is its own results table. Memory is O(spots x panel).

    The target is normalised exactly as in training: when the table lacks some of the panel genes, whose
    counts made up each spot's training library size, no target is written (a warning says why) rather than
    one on another scale.

    Parameters
    ----------
    sdata
        The SpatialData to predict on.
    model
        A trained :class:`dkan.DKANModel`, or the folder it was saved to (loaded with :meth:`dkan.DKANModel.load`),
        or a list of models with the same panel and inputs (an ensemble, e.g. trained with different seeds): the
        prediction is their mean and ``layers[key_added + "_std"]`` their standard deviation. A model trained with
        ``probe_blend=True`` predicts its panel genes as the mean of the network's and its stored ``ridge_ctx``
        and ``knn`` probes' predictions (genes in ``genes`` and the spread stay the network's);
        ``uns["dkan"]["predict"]["probe_blend"]`` records it.
    key_added
        ``layers`` key of the predictions.
    device
        Device to run on; default CUDA when available.
    table_key
        Table annotating the spots; inferred when there is one.
    image_key
        Image to crop from (inferred per sample by default).
    batch_size
        Spots per forward pass.
    overwrite
        Replace an existing ``layers[key_added]``.
    um_per_px
        Pixel size of the image, needed only to lay pseudo-spots on a slide without a table (see
        :func:`dkan.tl.make_spots`).
    gene_symbols
        ``var`` column holding the gene symbols the model uses, when ``var_names`` are other ids (e.g. Ensembl
        ids of a Visium table); scanpy's name for the same option.
    genes
        Genes outside the model's panel to predict as well. DKAN queries a gene by the embedding of its text, so
        a gene it never saw gets the panel's average per-gene output gain and bias and a prediction from its
        text alone (see the method page for how well that works). They are appended to the results table's
        ``var`` (existing layers get NaN columns for them); they need not be measured.
    descriptions
        Texts of the genes in ``genes`` (a ``{symbol: text}`` mapping, a TSV path or a
        :func:`dkan.tl.describe_genes` frame), embedded with the model's text encoder. Default: their
        embeddings in ``varm["dkan_gene_embedding"]`` when made by that encoder. A gene with neither is an error.
    n_samples
        Test-time dropout draws per model (``> 1``: Monte Carlo dropout). With several draws (or an ensemble),
        the per-spot standard deviation across draws goes to ``layers[key_added + "_std"]`` (``NaN`` where the
        prediction is ``NaN``); the prediction itself stays the deterministic (eval-mode) one, averaged over
        the models. A model without dropout (every ``*_dropout`` at 0) has nothing to sample: ``n_samples > 1``
        is then a ValueError (a warning for the members of an ensemble that lack it).
    interval
        Coverage level of a prediction interval, e.g. ``0.9``: ``layers[key_added + "_lower"]`` and
        ``layers[key_added + "_upper"]`` get its ends, and ``layers[key_added + "_std"]`` the *calibrated*
        standard deviation (the spread scaled per gene so that it matches the root mean square error on the model's
        validation spots). Split-conformal per gene, calibrated at the end of :func:`dkan.tl.train` (see the method
        page, "Can I trust this map?"). A model with dropout then predicts with its calibration's test-time dropout
        draws (10 by default, unless ``n_samples > 1``): 11 forward passes per spot instead of 1; a model without
        dropout uses a per-gene residual scale at no extra cost. Needs one model trained by this dkan version
        (an older model, one trained with ``val_fraction=0`` or an ensemble is refused with a ValueError). Genes
        outside the panel get no interval (NaN) and their spread is scaled by the panel's median factor.
        Whatever ``interval``, the results table gets
        ``var["dkan_val_pcc"]`` (each panel gene's validation PCC), ``obs["dkan_novelty"]`` (how unlike the
        training spots the frozen features are, a local outlier ratio near 1 for familiar spots),
        ``obs["dkan_colour_novelty"]`` (how unlike the training spots the patch colour is: the Mahalanobis distance
        of its optical-density channel shares over the model's threshold, so above 1 is novel; the frozen features
        barely see a stain or scanner colour change) and ``obs["dkan_novel"]`` (either above its threshold) when
        the model records them (they describe the latest prediction into the table, as ``uns["dkan"]["predict"]``
        does). Features computed by an earlier dkan have no spot colours: the colour signal is then skipped with a
        logged note (recompute them with ``dkan.tl.extract_features(..., force=True)``). A warning names the
        samples where most spots are novel and which signal flagged them.
    progress
        Show a progress bar.

    Returns
    -------
    The name of the (results) table holding the predictions.
    """
    models = as_models([_as_model(m) for m in model] if isinstance(model, list | tuple) else [_as_model(model)])
    model = models[0]
    extra = new_genes(model, genes)
    batch_size = check_int(batch_size, "batch_size")
    n_samples = check_int(n_samples, "n_samples")
    check_dropout(models, n_samples)
    probe_sets(models)  # a mixed or broken blend fails here, before any work
    device = resolve_device(device)  # a bad name fails here, before any work
    tkey = _table_for(sdata, model, table_key=table_key, image_key=image_key, um_per_px=um_per_px, extra=extra)
    with use_symbols(sdata.tables[tkey], gene_symbols):
        return _predict_table(
            sdata,
            tkey,
            models,
            extra=extra,
            descriptions=descriptions,
            n_samples=n_samples,
            interval=interval,
            key_added=key_added,
            device=device,
            image_key=image_key,
            batch_size=batch_size,
            overwrite=overwrite,
            progress=progress,
        )


def _predict_table(
    sdata: SpatialData,
    tkey: str,
    models: list[DKANModel],
    *,
    extra: list[str],
    descriptions: Any,
    n_samples: int,
    interval: float | None,
    key_added: str,
    device: torch.device,
    image_key: str | Mapping[str, str] | None,
    batch_size: int,
    overwrite: bool,
    progress: bool,
) -> str:
    """Predict for the spots of table ``tkey`` into its results table; returns the results table's name."""
    model = models[0]
    trust = TrustPredict(models, interval, n_samples, key_added)  # refuses an interval the model cannot give
    n_samples = trust.n_samples
    counts = sdata.tables[tkey]
    check_unique_genes(counts, table_key=tkey)
    measured = _has_counts(counts) and _check_measured(counts, model, tkey)
    std_key = f"{key_added}{K.STD_SUFFIX}" if len(models) > 1 or n_samples > 1 else None
    found = find_results(sdata, tkey)  # checked before anything is written: a refused call writes nothing
    _refuse_existing(found, [key_added, *([std_key] if std_key else []), *trust.layers], overwrite=overwrite)
    new_emb = new_gene_embeddings(found and found[1], model, extra, descriptions) if extra else None
    rkey, _ = results_table(sdata, tkey, create=True)
    ensure_genes(sdata, rkey, list(model.genes), panel=True)
    ensure_genes(sdata, rkey, extra)
    with_target = _model_inputs(
        sdata, tkey, rkey, model, image_key=image_key, device=device, measured=measured, progress=progress
    )
    adata = sdata.tables[rkey]  # normalize may have grown it
    gidx = adata.var_names.get_indexer(list(model.genes) + extra)
    out, out_std = _run_models(
        sdata, tkey, models, gidx, (adata.n_obs, adata.n_vars), trust, new_emb=new_emb, n_samples=n_samples,
        with_std=std_key is not None, device=device, batch_size=batch_size, progress=progress,
    )  # fmt: skip
    adata.layers[key_added] = out
    if out_std is not None:
        adata.layers[std_key] = out_std
    trusted = trust.finish(adata, out, out_std, len(model.genes), gidx)
    record = {
        "layer": key_added,
        "genes": list(model.genes),
        "target_written": with_target,
        "new_genes": extra,
        "std_layer": std_key,
        "n_models": len(models),
        "n_samples": n_samples,
        "probe_blend": bool(model.probes),
        **trusted,
        **_identity(model),
    }
    uns_set(adata, K.UNS_PREDICT, record)
    add_spatial_uns(sdata, tkey, rkey, image_key=image_key)  # scanpy / squidpy spatial plots draw the results
    logger.info("Wrote predictions of %d genes to `%s.layers[%r]`.", int((gidx >= 0).sum()), rkey, key_added)
    return rkey


def _refuse_existing(found: tuple[str, AnnData] | None, keys: list[str], *, overwrite: bool) -> None:
    """Refuse to replace an existing prediction layer unless ``overwrite``."""
    for key in keys:
        if found is not None and key in found[1].layers and not overwrite:
            raise ValueError(
                f"`layers[{key!r}]` exists in table `{found[0]}`; pass `overwrite=True` or another `key_added`."
            )


def _model_inputs(
    sdata: SpatialData,
    tkey: str,
    rkey: str,
    model: DKANModel,
    *,
    image_key: Any,
    device: torch.device,
    measured: bool,
    progress: bool,
) -> bool:
    """Tiles and frozen features with the model's settings (checked against it); the target when measured.

    Returns whether ``layers["dkan_target"]`` was written with the model's normalisation.
    """
    prep.ensure_tiles(sdata, model.config, table_key=tkey, image_key=image_key)
    stored = uns_get(sdata.tables[rkey], K.UNS_FEATURES)
    if stored is not None:
        check_features(model, stored)
    feats = prep.ensure_features(
        sdata, model.meta["features"]["encoder"], table_key=tkey, device=device, batch_size=64, progress=progress
    )
    check_features(model, feats)
    return measured and prep.ensure_model_target(sdata, list(model.genes), model.meta["normalize"], table_key=tkey)


def _run_models(
    sdata: SpatialData,
    tkey: str,
    models: list[DKANModel],
    gidx: np.ndarray,
    shape: tuple[int, int],
    trust: TrustPredict,
    *,
    new_emb: np.ndarray | None,
    n_samples: int,
    with_std: bool,
    device: torch.device,
    batch_size: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Predictions (and their standard deviation over models and dropout draws) as ``shape`` arrays, NaN elsewhere.

    Column ``gidx[j]`` of the output gets the model's gene ``j`` (the panel, then the new genes); ``-1`` is skipped.
    Each sample's frozen spot features and patch colours go to ``trust`` (novelty).
    """
    import torch
    from tqdm.auto import tqdm

    from dkan.nn.inference import draws

    cfg = models[0].config
    sets = probe_sets(models)
    samples, reader = build_inputs([sdata], models[0].genes, cfg, table_key=tkey, with_target=False)
    # each member queries the genes with its own embeddings (members may be trained on other texts of the panel)
    members = [_Member(m.module.to(device).eval(), torch.as_tensor(m.gene_embeddings, device=device)) for m in models]
    extra = torch.as_tensor(new_emb, device=device) if new_emb is not None else None
    out = np.full(shape, np.nan, dtype=np.float32)  # panel (+ requested genes) wide
    out_std = out.copy() if with_std else None
    keep = gidx >= 0
    pairs = list(zip(samples, iter_samples(sdata, table_key=tkey, need_image=False), strict=True))
    for s, (inp, smp) in enumerate(tqdm(pairs, desc="dkan predict", disable=not progress)):
        rd = (lambda r, s=s: reader(s, r, False)) if reader else None
        inp = inp.to(device)
        run = _runner(inp, extra, read=rd, device=device, batch_size=batch_size, amp=cfg.amp, use_text=cfg.use_text)
        pred, std = draws(run, members, n_samples, cfg.seed)
        if sets is not None:  # DKAN+probes on the panel; the spread stays the network's
            pred = blend_sample(sets, samples[s], pred, len(models[0].genes))
        trust.add_sample(smp.name, smp.obs_idx, inp.spot, inp.colour)
        out[np.ix_(smp.obs_idx, gidx[keep])] = pred[:, keep]
        if out_std is not None:
            out_std[np.ix_(smp.obs_idx, gidx[keep])] = std[:, keep]
    for m in models:
        m.module.cpu()
    return out, out_std


def _runner(
    inp: Any, extra: Any, *, read: Any, device: torch.device, batch_size: int, amp: bool, use_text: bool
) -> Callable[[_Member, bool], np.ndarray]:
    """``run(member, mc_dropout) -> (n, genes)``: one sample's prediction by one member (for ``draws``)."""
    from dkan.nn.inference import Predictor
    from dkan.train.loop import predict_rows

    rows = np.arange(len(inp))

    def run(member: _Member, mc: bool) -> np.ndarray:
        wrapped = Predictor(member.module, new_genes=extra, mc_dropout=mc)
        genes = member.genes if use_text else None
        return predict_rows(wrapped, inp, rows, genes, batch_size=batch_size, device=device, amp=amp, read_patches=read)

    return run


class _Member:
    """One model of an ensemble as the prediction loop sees it: its network and its own gene embeddings."""

    def __init__(self, module: Any, genes: Any) -> None:
        self.module, self.genes = module, genes

    def parameters(self) -> Any:
        """The network's parameters (where it runs: see :func:`dkan.nn.inference.rng_devices`)."""
        return self.module.parameters()


def _as_model(model: Any) -> DKANModel:
    """``model`` itself, or the model saved in the folder ``model`` names (:meth:`DKANModel.load`)."""
    from dkan.train.fitted import DKANModel

    if isinstance(model, DKANModel):
        return model
    if isinstance(model, str | os.PathLike):
        logger.info("Loading the model saved in %s.", model)
        return DKANModel.load(model)
    raise TypeError(
        f"`model` must be a `dkan.DKANModel` or the folder of a saved model; found {type(model).__name__}. "
        "Train one with `dkan.tl.train` or load one with `dkan.DKANModel.load(path)`."
    )


def check_features(model: DKANModel, feats: dict[str, Any]) -> None:
    """Refuse features that differ from the ones the model was trained on."""
    want = model.meta["features"]
    diffs = {k: (feats.get(k), want.get(k)) for k in ("encoder", "weights_hash", "dim") if feats.get(k) != want.get(k)}
    if diffs:
        raise ValueError(
            f"The slide's frozen features differ from the model's (found, model): {diffs}. Re-extract them with "
            f"`dkan.tl.extract_features(sdata, encoder={want.get('encoder')!r}, overwrite=True)`."
        )


def _identity(model: DKANModel) -> dict[str, Any]:
    return {"dkan_version": __version__, "features": model.meta["features"], "tile": model.meta["tile"]}


def _has_counts(adata: AnnData) -> bool:
    return adata.n_vars > 0 and adata.X is not None and float(abs(adata.X).sum()) > 0


def _table_for(
    sdata: SpatialData,
    model: DKANModel,
    *,
    table_key: str | None,
    image_key: Any,
    um_per_px: float | None,
    extra: Sequence[str] = (),
) -> str:
    """The table to predict into; on an H&E-only slide, pseudo-spots and a new table over the panel (+ ``extra``)."""
    if table_key is not None or len(sdata.tables):
        tkey, adata = get_table(sdata, table_key)
        if adata.n_vars == 0:  # an empty table over pseudo-spots: it is its own results table
            mark(adata, tkey)
        return tkey
    from dkan._features.make_spots import make_spots

    logger.info("No table on this slide: laying pseudo-spots over the tissue (`dkan.tl.make_spots`).")
    _, tkey = make_spots(sdata, image_key=image_key if isinstance(image_key, str) else None, um_per_px=um_per_px)
    mark(sdata.tables[tkey], tkey)
    return tkey


def _check_measured(counts: AnnData, model: DKANModel, tkey: str) -> bool:
    """Whether the count table shares genes with the model (an error when it shares none: a naming mismatch)."""
    gidx = counts.var_names.get_indexer(model.genes)
    if (gidx < 0).all():
        raise ValueError(
            f"None of the model's {len(model.genes)} genes is in table `{tkey}` (e.g. {model.genes[:3]}); "
            "predict on a table with the model's gene symbols, or on a slide without a table. "
            + missing_genes_hint(counts, model.genes)
        )
    if (gidx < 0).any():
        lost = [g for g, i in zip(model.genes, gidx, strict=True) if i < 0]
        logger.warning("%d model genes are not measured in table `%s`: %s", len(lost), tkey, lost[:10])
    return True
