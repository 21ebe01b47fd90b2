"""One fold of :func:`dkan.tl.cross_validate`: DKAN trained on the training samples, the probes of its blend."""

from __future__ import annotations

from typing import Any

import numpy as np


def _fold_probes(samples, train, test, seed, cache) -> list[list[np.ndarray]] | None:
    """Per test sample, the ``ridge_ctx`` and ``knn`` probes' predictions, fitted on the ``train`` samples.

    None (the fold's DKAN row is the network alone, with a warning) when the training samples cannot fit them.
    """
    from dkan._evaluation.blend import try_fit_blend_probes
    from dkan._evaluation.probes import probe_input

    fitted = try_fit_blend_probes(samples, train, seed=seed, cache=cache, purpose="this fold")
    if fitted is None:
        return None
    return [[p.predict(probe_input(n, samples, i, cache)) for n, p in fitted.items()] for i in test]


def fit_fold(samples, train, emb, cfg, dev, reader, progress) -> tuple[Any, Any, Any]:
    """DKAN fitted on the ``train`` samples: (network, fit result, the patch reader in their numbering or None)."""
    from dkan.train.fitting import fit_inputs

    sub_reader = (lambda s, rows, aug: reader(train[s], rows, aug)) if reader else None
    module, result = fit_inputs([samples[i] for i in train], emb, cfg, dev, reader=sub_reader, progress=progress)
    return module, result, sub_reader


def eval_reader(reader, i: int):
    """Sample ``i``'s patches without augmentation, or None when the patch trunk is frozen."""
    return (lambda rows: reader(i, rows, False)) if reader else None


def predict_fold(module, samples, test, emb, cfg, dev, reader) -> list[np.ndarray]:
    """The network's prediction of every spot of each ``test`` sample (``reader`` numbers samples as ``samples``)."""
    import torch

    from dkan.train.loop import predict_rows

    genes = torch.as_tensor(emb, device=dev) if cfg.use_text else None
    outs = []
    for i in test:
        s = samples[i].to(dev)
        rd = eval_reader(reader, i)
        outs.append(
            predict_rows(module, s, np.arange(len(s)), genes, batch_size=256, device=dev, amp=cfg.amp, read_patches=rd)
        )
    return outs


def _dkan_fold(
    samples, train, test, emb, cfg, dev, reader, progress, *, trust=False, probes=None
) -> tuple[list, list, Any, list]:
    """Fit on ``train``, predict ``test``: (predictions, history, trust figures or None, network predictions).

    With ``probes`` (per test sample, the probes' predictions) the predictions are the DKAN+probes blend.
    """
    module, result, sub_reader = fit_fold(samples, train, emb, cfg, dev, reader, progress)
    outs = predict_fold(module, samples, test, emb, cfg, dev, reader)
    network = outs
    if probes is not None:
        from dkan._evaluation.blend import blend

        outs = [blend(o, p) for o, p in zip(network, probes, strict=True)]
    if not trust:
        return outs, result.history, None, network
    from dkan._evaluation.trust import fold_trust
    from dkan.tl._trust import fit_trust

    module.eval()
    settings, arrays = fit_trust(
        module,
        [samples[i] for i in train],
        emb,
        cfg,
        dev,
        reader=sub_reader,
        blend=cfg.probe_blend and probes is not None,
    )
    read = [eval_reader(reader, i) for i in test]
    figures = fold_trust(module, settings, arrays, [samples[i] for i in test], outs, emb, cfg, dev, read=read)
    return outs, result.history, figures, network
