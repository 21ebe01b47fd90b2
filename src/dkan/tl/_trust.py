"""Trust signals of a model: fitted at the end of :func:`dkan.tl.train`, applied by :func:`dkan.tl.predict`.

The numerics live in :mod:`dkan._trust`; this module runs the network on the validation data, stores the result on
the model (``model.trust`` arrays, ``model.meta["trust"]`` settings) and writes the signals to a results table.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from dkan import _keys as K
from dkan import _trust as T
from dkan.tl._novelty import Novelty, fit_colour_trust, prefixed

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from spatialdata import SpatialData

    from dkan._config import DKANConfig
    from dkan.train.fitted import DKANModel

logger = logging.getLogger("dkan")

#: Test-time dropout draws used to calibrate (and later to predict with an interval) a model with dropout.
CALIBRATION_DRAWS = 10
_RETRAIN = (
    "Train the model again with `dkan.tl.train` (this dkan version, `val_fraction > 0`) to record its calibration."
)


def fit_trust(
    module: torch.nn.Module,
    samples: list[Any],
    emb: np.ndarray,
    cfg: DKANConfig,
    dev: torch.device,
    *,
    reader: Any = None,
    blend: bool | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Calibration, per-gene validation PCC, novelty and colour references of a trained network.

    The validation rows are those :func:`dkan.train.fitting.fit_inputs` held out (the same seeded split). With
    ``blend`` (default: ``cfg.probe_blend``) the calibration is made on the DKAN+probes blend, the probes fitted on
    the training rows only; ``settings["calibration"]["probe_blend"]`` is False when they could not be fitted.
    Returns the settings (for ``model.meta["trust"]``) and the arrays (``model.trust``).
    """
    from dkan.train.data import make_validation_split

    split = make_validation_split(
        [s.name for s in samples], [s.grid.numpy() for s in samples], cfg.val_fraction,
        strategy=cfg.val_split, seed=cfg.seed,
    )  # fmt: skip
    novelty = T.fit_novelty(_training_features(samples, T.MAX_REFERENCE, cfg.seed), seed=cfg.seed)
    arrays = {f"novelty.{k}": v for k, v in novelty.items()}
    settings: dict[str, Any] = {"novelty": {"k": int(novelty["k"][0]), "quantile": float(novelty["quantile"][0])}}
    settings["novelty"].update(threshold=float(novelty["threshold"][0]), version=int(novelty["version"][0]))
    settings["colour"], colour = fit_colour_trust(samples)
    arrays.update(colour)
    probes, cache = None, {}
    blend = cfg.probe_blend if blend is None else blend
    if blend and any(len(r) for r in split.val):  # calibrate the blend: probes on training rows only
        from dkan._evaluation.blend import try_fit_blend_probes

        train = list(range(len(samples)))
        probes = try_fit_blend_probes(
            samples, train, seed=cfg.seed, cache=cache, rows=split.train, purpose="the calibration"
        )
    val = _validation_predictions(module, samples, split.val, emb, cfg, dev, reader, probes=probes, cache=cache)
    if val is None:
        logger.info("No validation spots: the model records no calibration and no per-gene validation PCC.")
        return settings, arrays
    mu, sigma, target, pcc, kind = val
    calib = T.fit_conformal(target - mu, sigma)
    arrays.update({f"calibration.{k}": v for k, v in calib.items()})
    arrays["val_pcc"] = pcc.astype(np.float32)
    draws = CALIBRATION_DRAWS if kind == "mc_dropout" else 1
    settings["calibration"] = {"sigma": kind, "draws": draws, "n_spots": len(mu), "validation": split.description}
    settings["calibration"]["probe_blend"] = probes is not None
    logger.info("Calibrated the predictive spread (%s) on %d validation spots (%s).", kind, len(mu), split.description)
    return settings, arrays


def _training_features(samples: list[Any], cap: int, seed: int) -> np.ndarray:
    """Frozen spot features of at most ``cap`` training spots drawn at random over all samples (float32)."""
    sizes = np.array([len(s) for s in samples])
    pick = np.arange(sizes.sum())
    if len(pick) > cap:
        pick = np.sort(np.random.default_rng(seed).choice(len(pick), cap, replace=False))
    owner = np.searchsorted(np.cumsum(sizes), pick, side="right")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    parts = [samples[i].spot[pick[owner == i] - starts[i]].cpu().numpy() for i in np.unique(owner)]
    return np.concatenate(parts).astype(np.float32)


def _validation_predictions(
    module: Any,
    samples: list[Any],
    val_rows: list[np.ndarray],
    emb: np.ndarray,
    cfg: Any,
    dev: Any,
    reader: Any,
    *,
    probes: dict[str, Any] | None = None,
    cache: dict[int, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str] | None:
    """``(mu, sigma, target, per-gene PCC, sigma kind)`` over the validation rows, or None without any.

    With ``probes`` (fitted on the training rows), ``mu`` is the DKAN+probes blend; ``sigma`` stays the network's.
    """
    import torch

    from dkan.nn.inference import TRAINING_ONLY, Predictor, draws, has_dropout
    from dkan.train.data import MIN_VAL_SPOTS
    from dkan.train.loop import predict_rows

    genes = torch.as_tensor(emb, device=dev) if cfg.use_text else None
    kind = "mc_dropout" if has_dropout(module, skip=TRAINING_ONLY) else "residual"
    n_draws = CALIBRATION_DRAWS if kind == "mc_dropout" else 1
    mus, sigmas, targets, pccs = [], [], [], []
    for s, rows in enumerate(val_rows):
        if len(rows) < MIN_VAL_SPOTS:
            continue
        inp = samples[s].to(dev)
        rd = (lambda r, s=s: reader(s, r, False)) if reader else None

        def run(m: Any, mc: bool, inp: Any = inp, rd: Any = rd, rows: np.ndarray = rows) -> np.ndarray:
            return predict_rows(
                Predictor(m, mc_dropout=mc), inp, rows, genes, batch_size=cfg.batch_size, device=dev,
                amp=cfg.amp, read_patches=rd,
            )  # fmt: skip

        mu, sd = draws(run, [module], n_draws, cfg.seed)
        if probes is not None:
            from dkan._evaluation.blend import blend
            from dkan._evaluation.probes import probe_input

            x = probe_input("ridge_ctx", samples, s, {} if cache is None else cache)[rows]
            mu = blend(mu, [p.predict(x) for p in probes.values()])
        target = samples[s].target[torch.as_tensor(rows)].cpu().numpy().astype(np.float32)
        mus.append(mu)
        sigmas.append(sd if sd is not None else np.ones_like(mu))
        targets.append(target)
        pccs.append(T.pearson_per_gene(mu, target))
    if not mus:
        return None
    r = np.stack(pccs)
    ok = np.isfinite(r)
    n_ok = ok.sum(0)
    pcc = np.where(n_ok > 0, np.where(ok, r, 0.0).sum(0) / np.maximum(n_ok, 1), np.nan)  # NaN: undefined everywhere
    return np.concatenate(mus), np.concatenate(sigmas), np.concatenate(targets), pcc, kind


def calibration(model: DKANModel) -> dict[str, np.ndarray] | None:
    """The model's conformal calibration arrays (:func:`dkan._trust.fit_conformal`), or None."""
    arrays = {k.split(".", 1)[1]: v for k, v in model.trust.items() if k.startswith("calibration.")}
    return arrays or None


def novelty_reference(model: DKANModel) -> dict[str, np.ndarray] | None:
    """The model's novelty reference (:func:`dkan._trust.fit_novelty`), or None."""
    return prefixed(model, "novelty")


class TrustPredict:
    """What :func:`dkan.tl.predict` adds from the model's trust signals: intervals, ``var`` PCC, ``obs`` novelty.

    Built before anything is written (it refuses an interval the model cannot give); ``add_sample`` scores the
    novelty (frozen features and colour, :class:`dkan.tl._novelty.Novelty`) of each sample's spots; ``finish``
    writes everything and returns the record for ``uns``.
    """

    def __init__(self, models: list[DKANModel], interval: float | None, n_samples: int, key_added: str) -> None:
        self.model = models[0]
        self.interval = _check_interval(interval, models)
        self.calib = calibration(self.model) if self.interval is not None else None
        settings = (self.model.meta.get(K.UNS_TRUST) or {}).get("calibration") or {}
        self.residual = self.calib is not None and settings.get("sigma") == "residual"
        if self.calib is not None and settings.get("sigma") == "mc_dropout" and n_samples == 1:
            n_samples = int(settings.get("draws", CALIBRATION_DRAWS))
            logger.info(
                "`interval=%s`: predicting with %d test-time dropout draws (as calibrated).",
                interval,
                n_samples,
            )
        self.n_samples = n_samples
        self.keys = {"lower": f"{key_added}{K.LOWER_SUFFIX}", "upper": f"{key_added}{K.UPPER_SUFFIX}"}
        self.std_key = f"{key_added}{K.STD_SUFFIX}"
        self.novelty = Novelty(self.model)

    @property
    def layers(self) -> list[str]:
        """The extra layers this prediction writes (checked for ``overwrite`` by the caller)."""
        return [self.keys["lower"], self.keys["upper"], self.std_key] if self.interval is not None else []

    def add_sample(self, name: str, obs_idx: np.ndarray, spot: Any, colour: np.ndarray | None = None) -> None:
        """Score the novelty of one sample's spots (``spot``: frozen features, a tensor; ``colour``: patch colours)."""
        self.novelty.add(name, obs_idx, spot, colour)

    def finish(
        self, adata: AnnData, pred: np.ndarray, std: np.ndarray | None, n_panel: int, cols: np.ndarray
    ) -> dict[str, Any]:
        """Write the signals into the results table ``adata``; ``cols`` are the columns of panel + extra genes.

        ``pred``/``std`` are the full-width prediction and spread layers (``std`` None without draws).
        """
        self._write_pcc(adata, cols[:n_panel])
        record: dict[str, Any] = {"interval": self.interval, "std_calibrated": False, **self.novelty.write(adata)}
        if self.calib is None:  # intervals of an earlier prediction into this key no longer match it
            for key in self.keys.values():
                adata.layers.pop(key, None)
            return record
        panel, extra = cols[:n_panel], cols[n_panel:]
        raw = np.ones((len(pred), len(panel)), np.float32) if self.residual or std is None else std[:, panel]
        sigma = T.calibrated_sigma(raw, self.calib)
        q, ok = T.interval_factor(self.calib, self.interval)
        if not ok:
            logger.warning(
                "`interval=%s` needs more than the %d calibration spots for an exact bound; the largest "
                "calibration score is used.", self.interval, int(self.calib["n"][0]),
            )  # fmt: skip
        half = np.maximum(raw, self.calib["floor"]) * q.astype(np.float32)
        out_std = np.full_like(pred, np.nan) if std is None else std.copy()
        out_std[:, panel] = sigma
        if len(extra) and std is not None:  # genes outside the panel: the panel's median scale
            out_std[:, extra] = std[:, extra] * float(np.median(self.calib["rms"]))
        lower, upper = np.full_like(pred, np.nan), np.full_like(pred, np.nan)
        lower[:, panel], upper[:, panel] = pred[:, panel] - half, pred[:, panel] + half
        nan = ~np.isfinite(pred)
        for arr in (lower, upper, out_std):
            arr[nan] = np.nan
        adata.layers[self.std_key] = out_std
        adata.layers[self.keys["lower"]], adata.layers[self.keys["upper"]] = lower, upper
        record.update({"std_calibrated": True, "std_layer": self.std_key})
        record.update({"lower_layer": self.keys["lower"], "upper_layer": self.keys["upper"]})
        return record

    def _write_pcc(self, adata: AnnData, panel_cols: np.ndarray) -> None:
        pcc = self.model.trust.get("val_pcc")
        if pcc is None:  # a model without the record: drop an earlier model's, which would mislabel these genes
            adata.var.drop(columns=[K.VAL_PCC], errors="ignore", inplace=True)
            return
        col = np.full(adata.n_vars, np.nan, dtype=np.float32)
        col[panel_cols] = pcc
        adata.var[K.VAL_PCC] = col


def _check_interval(interval: float | None, models: list[DKANModel]) -> float | None:
    """``interval`` checked: a level in (0, 1) for one model that has a calibration, else an error saying why."""
    if interval is None:
        return None
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not 0 < float(interval) < 1:
        raise ValueError(f"`interval` must be a coverage level in (0, 1), e.g. 0.9; found {interval!r}.")
    if len(models) > 1:
        raise ValueError(
            f"`interval={interval}` needs a single model (each model is calibrated on its own validation data); "
            f"found an ensemble of {len(models)}. Predict with one model, or drop `interval`."
        )
    if calibration(models[0]) is None:
        raise ValueError(
            f"`interval={interval}`: this model has no calibration of its spread (`model.trust` holds no "
            "`calibration.*` arrays: it was saved before dkan recorded one, or trained with `val_fraction=0`). "
            + _RETRAIN
        )
    return float(interval)


def reliable_genes(data: SpatialData | DKANModel, *, min_pcc: float = 0.3, table_key: str | None = None) -> list[str]:
    """Genes whose prediction the model could check on its validation data: validation PCC at least ``min_pcc``.

    Parameters
    ----------
    data
        A trained :class:`dkan.DKANModel`, or a SpatialData predicted by one (its results table's
        ``var["dkan_val_pcc"]``, written by :func:`dkan.tl.predict`).
    min_pcc
        Smallest per-gene Pearson r on the model's validation spots.
    table_key
        With a SpatialData: the table holding the predictions (or the count table whose results table does).

    Returns
    -------
    Gene names, ordered by decreasing validation PCC.
    """
    from dkan.train.fitted import DKANModel

    if isinstance(min_pcc, bool) or not isinstance(min_pcc, int | float):
        raise TypeError(f"`min_pcc` must be a number, found {type(min_pcc).__name__}.")
    if isinstance(data, DKANModel):
        pcc = data.trust.get("val_pcc")
        if pcc is None:
            raise ValueError("This model records no per-gene validation PCC. " + _RETRAIN)
        names, values = np.asarray(data.genes), np.asarray(pcc, dtype=np.float64)
    else:
        adata = _table_with_pcc(data, table_key)
        names, values = np.asarray(adata.var_names), adata.var[K.VAL_PCC].to_numpy(dtype=np.float64)
    keep = np.isfinite(values) & (values >= min_pcc)
    order = np.argsort(-values[keep], kind="stable")
    return [str(g) for g in names[keep][order]]


def _table_with_pcc(sdata: Any, table_key: str | None) -> AnnData:
    from spatialdata import SpatialData

    from dkan._results import find_results

    if not isinstance(sdata, SpatialData):
        raise TypeError(f"`data` must be a SpatialData or a dkan.DKANModel, found {type(sdata).__name__}.")
    keys = [table_key] if table_key is not None else list(sdata.tables)
    for key in keys:
        if key not in sdata.tables:
            raise KeyError(f"`table_key={key!r}` not found; tables: {list(sdata.tables)}.")
        found = find_results(sdata, key)
        for adata in (sdata.tables[key], found[1] if found is not None else None):
            if adata is not None and K.VAL_PCC in adata.var:
                return adata
    raise KeyError(
        f"No table holds `var[{K.VAL_PCC!r}]`; run `dkan.tl.predict` with a model trained by this dkan version, "
        "or pass the model itself."
    )
