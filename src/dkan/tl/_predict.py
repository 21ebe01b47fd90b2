"""`dkan.tl.predict`: spatial expression from H&E with a trained model, written back to the SpatialData."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K
from dkan._data import prepare as prep
from dkan._utils import check_int, check_unique_genes, resolve_device, uns_get, uns_set

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
        prediction is their mean and ``layers[key_added + "_std"]`` their standard deviation.
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
        the models.
    progress
        Show a progress bar.

    Returns
    -------
    The name of the (results) table holding the predictions.
    """
    from dkan._symbols import use_symbols
    from dkan.tl._ensemble import as_models, new_genes

    models = as_models([_as_model(m) for m in model] if isinstance(model, list | tuple) else [_as_model(model)])
    model = models[0]
    extra = new_genes(model, genes)
    batch_size = check_int(batch_size, "batch_size")
    n_samples = check_int(n_samples, "n_samples")
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
    key_added: str,
    device: str | torch.device | None,
    image_key: str | Mapping[str, str] | None,
    batch_size: int,
    overwrite: bool,
    progress: bool,
) -> str:
    """Predict for the spots of table ``tkey`` into its results table; returns the results table's name."""
    from tqdm.auto import tqdm

    from dkan._results import ensure_genes, find_results, results_table
    from dkan.tl._ensemble import draws, new_gene_embeddings
    from dkan.tl._train import build_inputs, resolve_device
    from dkan.train.loop import predict_rows

    model = models[0]
    counts = sdata.tables[tkey]
    check_unique_genes(counts, table_key=tkey)
    measured = _has_counts(counts) and _check_measured(counts, model, tkey)
    found = find_results(sdata, tkey)  # checked before anything is written: a refused call writes nothing
    std_key = f"{key_added}{K.STD_SUFFIX}"
    for key in (key_added, std_key) if len(models) > 1 or n_samples > 1 else (key_added,):
        if found is not None and key in found[1].layers and not overwrite:
            raise ValueError(
                f"`layers[{key!r}]` exists in table `{found[0]}`; pass `overwrite=True` or another `key_added`."
            )
    new_emb = new_gene_embeddings(found and found[1], model, extra, descriptions) if extra else None
    rkey, _ = results_table(sdata, tkey, create=True)
    ensure_genes(sdata, rkey, list(model.genes), panel=True)
    ensure_genes(sdata, rkey, extra)
    dev = resolve_device(device)
    cfg = model.config
    prep.ensure_tiles(sdata, cfg, table_key=tkey, image_key=image_key)
    stored = uns_get(sdata.tables[rkey], K.UNS_FEATURES)
    if stored is not None:
        check_features(model, stored)
    feats = prep.ensure_features(
        sdata, model.meta["features"]["encoder"], table_key=tkey, device=dev, batch_size=64, progress=progress
    )
    check_features(model, feats)
    with_target = measured and prep.ensure_model_target(
        sdata, list(model.genes), model.meta["normalize"], table_key=tkey
    )
    adata = sdata.tables[rkey]  # normalize may have grown it

    samples, reader = build_inputs([sdata], model.genes, cfg, table_key=tkey, with_target=False)
    import torch

    from dkan.nn.inference import Predictor

    modules = [m.module.to(dev).eval() for m in models]
    genes = torch.as_tensor(model.gene_embeddings, device=dev) if cfg.use_text else None
    extra_t = torch.as_tensor(new_emb, device=dev) if new_emb is not None else None
    from dkan._utils import iter_samples

    out = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)  # panel (+ requested genes) wide
    out_std = out.copy() if len(models) > 1 or n_samples > 1 else None
    gidx = adata.var_names.get_indexer(list(model.genes) + extra)
    keep = gidx >= 0
    for s, (inp, smp) in enumerate(
        tqdm(
            list(zip(samples, iter_samples(sdata, table_key=tkey, need_image=False), strict=True)),
            desc="dkan predict",
            disable=not progress,
        )
    ):
        rd = (lambda r, s=s: reader(s, r, False)) if reader else None
        inp = inp.to(dev)

        def run(module: Any, mc: bool, inp: Any = inp, rd: Any = rd) -> np.ndarray:
            wrapped = Predictor(module, new_genes=extra_t, mc_dropout=mc)
            rows = np.arange(len(inp))
            return predict_rows(
                wrapped, inp, rows, genes, batch_size=batch_size, device=dev, amp=cfg.amp, read_patches=rd
            )

        pred, std = draws(run, modules, n_samples, cfg.seed)
        out[np.ix_(smp.obs_idx, gidx[keep])] = pred[:, keep]
        if out_std is not None:
            out_std[np.ix_(smp.obs_idx, gidx[keep])] = std[:, keep]
    for m in models:
        m.module.cpu()
    adata.layers[key_added] = out
    if out_std is not None:
        adata.layers[std_key] = out_std
    uns_set(
        adata,
        K.UNS_PREDICT,
        {
            "layer": key_added,
            "genes": list(model.genes),
            "target_written": with_target,
            "new_genes": extra,
            "std_layer": std_key if out_std is not None else None,
            "n_models": len(models),
            "n_samples": n_samples,
            **_identity(model),
        },
    )
    logger.info("Wrote predictions of %d genes to `%s.layers[%r]`.", int(keep.sum()), rkey, key_added)
    return rkey


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
    from dkan._version import __version__

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
    from dkan._results import mark

    if table_key is not None or len(sdata.tables):
        from dkan._utils import get_table

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
    from dkan._symbols import missing_genes_hint

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
