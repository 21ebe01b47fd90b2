"""Run the input steps that ``train`` and ``predict`` need and that the user has not run yet."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K
from dkan._utils import check_unique_genes, get_table, uns_get

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from dkan._config import DKANConfig

logger = logging.getLogger("dkan")


def as_list(sdata: SpatialData | Sequence[SpatialData]) -> list[SpatialData]:
    """One SpatialData or a list of them, as a list (type-checked)."""
    from spatialdata import SpatialData

    items = [sdata] if isinstance(sdata, SpatialData) else list(sdata)
    if not items or not all(isinstance(s, SpatialData) for s in items):
        raise TypeError(f"Expected a SpatialData or a non-empty list of them, found {type(sdata).__name__}.")
    return items


def ensure_panel(tables: list[AnnData], n_genes: int) -> list[str]:
    """The gene panel shared by all tables (computed on their concatenation when missing)."""
    import anndata as ad

    from dkan.pp._select import select_genes

    if all(K.PANEL in t.var for t in tables):
        first = tables[0]
        panel = list(first.var_names[first.var[K.PANEL].to_numpy(bool)])
        common = set.intersection(*(set(t.var_names[t.var[K.PANEL].to_numpy(bool)]) for t in tables))
        return [g for g in panel if g in common]
    both = ad.concat([ad.AnnData(X=t.X, var=t.var[[]], obs=t.obs[[]]) for t in tables], join="inner")
    n = min(n_genes, both.n_vars)
    if n < n_genes:
        logger.info("Only %d genes shared by the training tables; the panel has %d genes, not %d.", n, n, n_genes)
    logger.info("Selecting a gene panel of %d genes (`dkan.pp.select_genes`, reference rule).", n)
    select_genes(both, n_genes=n)
    panel = list(both.var_names[both.var[K.PANEL].to_numpy(bool)])
    for t in tables:
        t.var[K.PANEL] = t.var_names.isin(panel)
    return panel


def _stored(sdata: SpatialData, table_key: str | None) -> AnnData | None:
    """The results table of ``table_key`` when it exists (see :mod:`dkan._results`)."""
    from dkan._results import find_results

    found = find_results(sdata, table_key)
    return None if found is None else found[1]


def ensure_target(
    sdata: SpatialData, genes: list[str], normalize: Mapping[str, Any] | None = None, *, table_key: str | None
) -> None:
    """Write ``layers["dkan_target"]`` of the results table over ``genes`` unless it is there, current.

    Current means: the same genes and settings (``normalize``; none given: any), and computed from the counts
    the table holds now (the fingerprint recorded by :func:`dkan.pp.normalize`). A target computed from other
    counts (the table was changed since, or the fingerprint is missing) is recomputed with its own settings.
    """
    from dkan.pp._normalize import FINGERPRINT, counts_fingerprint
    from dkan.pp._normalize import normalize as pp_normalize

    params = dict(normalize or {})
    res = _stored(sdata, table_key)
    old = uns_get(res, K.UNS_NORMALIZE) if res is not None else None
    if res is not None and K.TARGET in res.layers and old is not None and list(old.get("genes", genes)) == list(genes):
        data_fields = ("genes", "n_zero_library", FINGERPRINT)  # describe the data, not settings: never compared
        if not params or all(old.get(k) == v for k, v in params.items() if k not in data_fields):
            now = counts_fingerprint(
                sdata, genes, layer=old.get("layer"), smooth=bool(old.get("smooth", True)), table_key=table_key
            )
            if old.get(FINGERPRINT) == now:
                return
            logger.warning(
                "The counts of table `%s` are not those `layers[%r]` was computed from (%s); normalising again.",
                get_table(sdata, table_key)[0],
                K.TARGET,
                "no fingerprint recorded" if old.get(FINGERPRINT) is None else "fingerprint differs",
            )
            params = {**{k: old[k] for k in _SETTINGS if k in old}, **params}
    logger.info("Normalising expression of %d genes into `layers[%r]` of the results table.", len(genes), K.TARGET)
    kwargs = {k: v for k, v in params.items() if k in _SETTINGS or (k == "grid" and not isinstance(v, Mapping))}
    pp_normalize(sdata, genes=list(genes), table_key=table_key, **kwargs)


#: Fields of ``uns["dkan"]["normalize"]`` that are normalisation settings (passed back to :func:`dkan.pp.normalize`).
_SETTINGS = ("target_sum", "log", "smooth", "layer")


def ensure_model_target(
    sdata: SpatialData, genes: list[str], normalize: Mapping[str, Any] | None, *, table_key: str
) -> bool:
    """Write ``layers["dkan_target"]`` over the model's ``genes`` exactly as the model was trained, or refuse.

    With library-size scaling (``target_sum``) the training library of a spot was the sum over the whole panel
    (``library_size="panel genes"``); a table lacking some panel genes cannot reproduce it, so no target is
    written (a warning says why) rather than a target on another scale. Without scaling the genes are
    independent and the target is written over the genes present.

    Returns
    -------
    Whether the target layer holds the model's normalisation of the genes present.
    """
    adata = sdata.tables[table_key]
    params = dict(normalize or {})
    if params.get("layer") is not None and params["layer"] not in adata.layers:
        logger.warning(
            "The model was trained on counts in `layers[%r]`, which table `%s` lacks; normalising its `X` instead.",
            params["layer"],
            table_key,
        )
        params["layer"] = None
    present = [g for g in genes if g in adata.var_names]
    scaled = params.get("target_sum", 1e4) is not None
    library = params.get("library_size", "panel genes")
    reason = None
    if scaled and library != "panel genes":
        reason = f"the model's library sizes were sums over {library!r} of its training table"
    elif scaled and len(present) < len(genes):
        lost = [g for g in genes if g not in set(present)]
        reason = (
            f"it lacks {len(lost)} of the model's {len(genes)} genes (e.g. {lost[:5]}), and in training each spot's "
            f"library size was its count summed over all {len(genes)}; a target over the other {len(present)} genes "
            "would be on another scale"
        )
    if reason is None:
        ensure_target(sdata, present, params, table_key=table_key)
        return True
    res = _stored(sdata, table_key)
    old = uns_get(res, K.UNS_NORMALIZE) if res is not None else None
    kept = (
        f" The existing `layers[{K.TARGET!r}]` (normalised over {len((old or {}).get('genes', []))} genes) is left "
        "as it is; do not evaluate against it."
        if res is not None and K.TARGET in res.layers
        else ""
    )
    logger.warning(
        "Not writing `layers[%r]` of table `%s` for evaluation: %s. Evaluate on a table with every panel gene "
        "(a gene that was measured but never detected can be added as a zero-count column).%s",
        K.TARGET,
        table_key,
        reason,
        kept,
    )
    return False


def ensure_tiles(sdata: SpatialData, config: DKANConfig, *, table_key: str | None, image_key: Any) -> None:
    """Compute the tile geometry with the config's settings unless it is there already."""
    from dkan._features.tile import tile

    res = _stored(sdata, table_key)
    want = {"patch_size": config.patch_size, "region_grid": config.region_grid, "target_mpp": config.target_mpp}
    old = uns_get(res, K.UNS_TILE) if res is not None else None
    if old is not None and all(old.get(k) == v for k, v in want.items()):
        return
    if old is not None:
        logger.info("Recomputing the tile geometry: stored %s, wanted %s.", {k: old.get(k) for k in want}, want)
    else:
        logger.info("Tiling spots with %s (`dkan.tl.tile`).", want)
    tile(sdata, table_key=table_key, image_key=image_key, **want)


def ensure_features(
    sdata: SpatialData, encoder: str, *, table_key: str | None, device: Any, batch_size: int, progress: bool = True
) -> dict[str, Any]:
    """Frozen spot and region features with ``encoder`` (computed when missing); returns their provenance."""
    from dkan._features.extract import extract_features

    res = _stored(sdata, table_key)
    if res is None or uns_get(res, K.UNS_FEATURES) is None or K.SPOT_FEATURES not in res.obsm:
        logger.info("Extracting frozen %r features of every spot and region (`dkan.tl.extract_features`).", encoder)
    extract_features(
        sdata, encoder=encoder, table_key=table_key, device=device, batch_size=batch_size, progress=progress
    )
    return dict(uns_get(_stored(sdata, table_key), K.UNS_FEATURES))


def gene_embeddings(
    sdata: SpatialData,
    genes: list[str],
    *,
    table_key: str | None,
    text_encoder: str,
    descriptions: Any,
    describe_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Gene-semantic embeddings of ``genes`` (from the results table's ``varm`` when present, else computed there).

    Only ``genes`` (the panel) are embedded, never every gene of the count table. Stored embeddings of the same
    encoder are reused when no texts are given (``descriptions`` and ``describe_kwargs`` both ``None``), or when the
    given texts are those they were made from (the per-gene ``text_sha1`` that :func:`dkan.tl.embed_genes` records);
    otherwise the genes are embedded again from the given texts, with a warning.
    """
    from dkan._genetext.embed import embed_genes, gene_texts, text_sha1
    from dkan._results import results_table

    texts = None
    if descriptions is not None or describe_kwargs:
        texts = gene_texts(genes, descriptions, describe_kwargs=describe_kwargs or {})
    res = _stored(sdata, table_key)
    rec = uns_get(res, K.UNS_GENE_EMBEDDING) if res is not None else None
    if res is not None and K.GENE_EMBEDDING in res.varm and rec is not None and rec.get("encoder") == text_encoder:
        if set(genes) <= set(res.var_names):
            emb = np.asarray(res[:, genes].varm[K.GENE_EMBEDDING], dtype=np.float32)
            changed = [] if texts is None else _changed_texts(rec, res, genes, [text_sha1(t) for t in texts["text"]])
            if np.isfinite(emb).all() and not changed:
                return emb, dict(rec)
            if changed:
                logger.warning(
                    "The stored gene embeddings (`varm[%r]`) were made from other texts than `descriptions` gives "
                    "for %d of %d genes (e.g. %s); embedding them again from the given texts.",
                    K.GENE_EMBEDDING, len(changed), len(genes), changed[:5],
                )  # fmt: skip
    logger.info("Embedding the texts of the %d panel genes with %r (`dkan.tl.embed_genes`).", len(genes), text_encoder)
    embed_genes(
        sdata,
        descriptions=texts if texts is not None else descriptions,
        text_encoder=text_encoder,
        table_key=table_key,
        genes=list(genes),
        describe_kwargs=describe_kwargs,
        progress=progress,
    )
    _, res = results_table(sdata, table_key)
    emb = np.asarray(res[:, genes].varm[K.GENE_EMBEDDING], dtype=np.float32)
    return emb, dict(uns_get(res, K.UNS_GENE_EMBEDDING))


def _changed_texts(rec: Mapping[str, Any], res: AnnData, genes: list[str], sha: list[str]) -> list[str]:
    """Genes whose text hash ``sha`` differs from the one recorded by ``embed_genes`` (or that has none)."""
    names = list(rec.get("genes", [str(g) for g in res.var_names]))
    stored = dict(zip(names, rec.get("text_sha1", []), strict=False))
    return [g for g, h in zip(genes, sha, strict=True) if stored.get(g) != h]


def prepare_training(
    sdatas: list[SpatialData],
    tables: list[AnnData],
    cfg: DKANConfig,
    *,
    table_key: str | None,
    image_key: Any,
    descriptions: Any,
    device: Any,
    progress: bool = True,
    describe_kwargs: Mapping[str, Any] | None = None,
) -> tuple[list[str], np.ndarray, dict[str, Any], dict[str, Any]]:
    """Run every missing input step on the training data.

    Returns
    -------
    The gene panel, its embeddings, the feature provenance and the gene-embedding provenance.
    """
    for sd, adata in zip(sdatas, tables, strict=True):
        check_unique_genes(adata, table_key=get_table(sd, table_key)[0])
    genes = ensure_panel(tables, cfg.n_genes)
    feats = []
    for sd in sdatas:
        ensure_target(sd, genes, table_key=table_key)
        ensure_tiles(sd, cfg, table_key=table_key, image_key=image_key)
        feats.append(
            ensure_features(
                sd, cfg.feature_encoder, table_key=table_key, device=device, batch_size=64, progress=progress
            )
        )
    ids = {(r.get("encoder"), r.get("weights_hash")) for r in feats}
    if len(ids) > 1:
        raise ValueError(
            f"The training SpatialData objects hold features of different encoders {sorted(map(str, ids))}; "
            "re-run `dkan.tl.extract_features(..., overwrite=True)` with one encoder on all of them."
        )
    emb, emb_rec = gene_embeddings(
        sdatas[0],
        genes,
        table_key=table_key,
        text_encoder=cfg.text_encoder,
        descriptions=descriptions,
        describe_kwargs=describe_kwargs,
        progress=progress,
    )
    return genes, emb, feats[0], emb_rec
