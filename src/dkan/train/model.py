"""`DKANModel`: a trained network plus everything needed to reproduce its predictions; atomic save/load."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dkan.train.config import DKANConfig

_WEIGHTS = "model.safetensors"
_GENES = "genes.safetensors"
_META = "dkan.json"
_FORMAT = 1


def build_module(
    config: DKANConfig, *, n_genes: int, gene_dim: int, feature_dim: int, pretrained: bool = True
) -> torch.nn.Module:
    """Build the DKAN network for a configuration (the trainable patch encoder only when the config asks)."""
    from dkan.nn.model import DKAN

    patch_encoder, channels = None, feature_dim
    if config.patch_trainable:
        from dkan.nn.image_encoders import create_image_encoder

        patch_encoder = create_image_encoder(config.patch_encoder, pretrained=pretrained)
        channels = patch_encoder.token_dim
    return DKAN(
        config,
        n_genes=n_genes,
        gene_dim=gene_dim,
        feature_dim=feature_dim,
        patch_encoder=patch_encoder,
        patch_channels=channels,
    )


class DKANModel:
    """A trained DKAN network with its gene panel, gene embeddings and the settings of every input step.

    Returned by :func:`dkan.tl.train`; consumed by :func:`dkan.tl.predict`.

    Parameters
    ----------
    module
        The torch network (:class:`dkan.nn.DKAN`).
    config
        The configuration it was built and trained with.
    genes
        Gene panel, in output order.
    gene_embeddings
        Gene-semantic embeddings, ``(len(genes), d_text)``.
    meta
        Settings of the input steps: ``features`` (encoder name, weights hash, dim), ``tile`` (patch size,
        region grid, target µm/px), ``normalize`` (parameters), ``gene_embedding`` (text encoder, pooling).
    history
        Per-epoch training record (losses, loss weights, validation score).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        config: DKANConfig,
        genes: list[str],
        gene_embeddings: np.ndarray,
        meta: dict[str, Any],
        history: list[dict[str, float]] | None = None,
    ) -> None:
        if len(genes) != len(gene_embeddings):
            raise ValueError(f"{len(genes)} genes but {len(gene_embeddings)} gene embeddings.")
        self.module = module
        self.config = config
        self.genes = list(genes)
        self.gene_embeddings = np.asarray(gene_embeddings, dtype=np.float32)
        self.meta = dict(meta)
        self.history = list(history or [])

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.module.parameters())
        feats = self.meta.get("features", {}).get("encoder")
        return (
            f"DKANModel({len(self.genes)} genes, {n / 1e6:.2f} M parameters, features={feats!r}, "
            f"epochs trained={len(self.history)})"
        )

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model to a folder (weights as safetensors, settings as JSON), atomically.

        Parameters
        ----------
        path
            Target folder.
        overwrite
            Replace an existing folder. The old one is removed only after the new one is complete.

        Returns
        -------
        The folder written.
        """
        from safetensors.torch import save_file, save_model

        import dkan

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"`path={str(path)!r}` exists; pass `overwrite=True` to replace it.")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_model(self.module, str(tmp / _WEIGHTS))
            save_file({"gene_embeddings": torch.from_numpy(self.gene_embeddings)}, str(tmp / _GENES))
            meta = {
                "format": _FORMAT,
                "dkan_version": dkan.__version__,
                "config": self.config.to_dict(),
                "genes": self.genes,
                "meta": self.meta,
                "history": self.history,
            }
            (tmp / _META).write_text(json.dumps(meta, indent=1, default=_json_default))
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device | None = None) -> DKANModel:
        """Rebuild a model saved with :meth:`save` (no pickle is read).

        Parameters
        ----------
        path
            Folder written by :meth:`save`.
        device
            Device to put the network on (default CPU).

        Returns
        -------
        The model, in eval mode.
        """
        from safetensors.torch import load_file, load_model

        path = Path(path)
        if not (path / _META).is_file():
            raise FileNotFoundError(f"`path={str(path)!r}` holds no saved dkan model (no {_META}).")
        meta = json.loads((path / _META).read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"Model format {meta.get('format')} at {path} is not supported (expected {_FORMAT}).")
        config = DKANConfig.from_dict(meta["config"])
        emb = load_file(str(path / _GENES))["gene_embeddings"].numpy()
        module = build_module(
            config,
            n_genes=len(meta["genes"]),
            gene_dim=emb.shape[1],
            feature_dim=int(meta["meta"]["features"]["dim"]),
            pretrained=False,
        )
        load_model(module, str(path / _WEIGHTS), strict=True)
        module.to(device or "cpu").eval()
        return cls(module, config, meta["genes"], emb, meta["meta"], meta["history"])


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a complete folder into place; an existing ``dst`` is kept until the move succeeded."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"Cannot write {type(obj).__name__} to the model JSON.")
