"""`DKANModel`: a trained network plus everything needed to reproduce its predictions; atomic save/load."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dkan._config import DKANConfig

_WEIGHTS = "model.safetensors"
_GENES = "genes.safetensors"
_FORMAT = 2
#: Settings of models saved before these config fields existed: raw gene embeddings, one shared output layer.
_BEFORE_CALIBRATION = {"standardize_genes": False, "gene_output": "shared"}

logger = logging.getLogger("dkan")


def build_module(
    config: DKANConfig, *, n_genes: int, gene_dim: int, feature_dim: int, pretrained: bool = True
) -> torch.nn.Module:
    """Build the DKAN network for a configuration (the trainable patch encoder only when the config asks)."""
    from dkan.nn.network import DKAN

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
    trust
        Arrays of the trust signals (:mod:`dkan.tl._trust`): ``calibration.*`` (conformal calibration of the
        spread), ``val_pcc`` (per-gene validation PCC), ``novelty.*`` (novelty reference); settings in
        ``meta["trust"]``. Empty for models saved before dkan recorded them.
    probes
        Arrays of the tuned probes of a ``probe_blend`` model (:mod:`dkan._evaluation.blend`); their fitted
        settings in ``meta["probe_blend"]``. Empty otherwise (the prediction is the network's alone).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        config: DKANConfig,
        genes: list[str],
        gene_embeddings: np.ndarray,
        meta: dict[str, Any],
        history: list[dict[str, float]] | None = None,
        trust: dict[str, np.ndarray] | None = None,
        probes: dict[str, np.ndarray] | None = None,
    ) -> None:
        if len(genes) != len(gene_embeddings):
            raise ValueError(f"{len(genes)} genes but {len(gene_embeddings)} gene embeddings.")
        self.module = module
        self.config = config
        self.genes = list(genes)
        self.gene_embeddings = np.asarray(gene_embeddings, dtype=np.float32)
        self.meta = dict(meta)
        self.history = list(history or [])
        self.trust = {k: np.asarray(v) for k, v in (trust or {}).items()}
        self.probes = {k: np.asarray(v) for k, v in (probes or {}).items()}

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.module.parameters())
        feats = self.meta.get("features", {}).get("encoder")
        return (
            f"DKANModel({len(self.genes)} genes, {n / 1e6:.2f} M parameters, features={feats!r}, "
            f"epochs trained={len(self.history)})"
        )

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model to a folder (weights as safetensors, settings as JSON), crash-safely.

        The folder holds ``dkan.json`` (settings, gene panel, history and SHA-256 checksums of everything) and
        the tensor files it names. :meth:`load` verifies the checksums. A save interrupted at any point (even
        by SIGKILL) leaves either the previous model or the new one at ``path``; its leftovers are removed by
        the next save. Files and folders are created with the permissions of the process umask.

        Parameters
        ----------
        path
            Target folder.
        overwrite
            Replace the dkan model saved at ``path``. A file or a folder that is not a dkan model is never
            overwritten (ValueError).

        Returns
        -------
        The folder written.
        """
        from dkan.train import _store

        path = _store.check_target(path, overwrite=overwrite)
        if path.exists():
            _store.clean_stale(path)
            _store.clean_writer_temps(path)
            files = self._write(path)
            _store.remove_unreferenced(path, set(files.values()))
            return path
        tmp = _store.new_temp_dir(path)
        try:
            self._write(tmp)
            _store.commit_new(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def _write(self, folder: Path) -> dict[str, str]:
        """Write fresh tensor files into ``folder``, then commit them by replacing its manifest."""
        from safetensors.torch import save_file, save_model

        from dkan._version import __version__
        from dkan.train import _store

        tok = _store.token()
        files = {"weights": f"model.{tok}.safetensors", "genes": f"genes.{tok}.safetensors"}
        save_model(self.module, str(folder / files["weights"]))
        trust = {f"trust.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.trust.items()}
        trust.update({f"probe.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.probes.items()})
        save_file({"gene_embeddings": torch.from_numpy(self.gene_embeddings), **trust}, str(folder / files["genes"]))
        for name in files.values():
            _store.follow_umask(folder / name)
            _fsync(folder / name)
        content = json.loads(
            json.dumps(
                {"config": self.config.to_dict(), "genes": self.genes, "meta": self.meta, "history": self.history},
                default=_json_default,
            )
        )
        sums = {role: _store.file_sha256(folder / name) for role, name in files.items()}
        sums["content"] = _store.content_sha256(content)
        manifest = {"format": _FORMAT, "dkan_version": __version__, "files": files, "sha256": sums, **content}
        _store.write_manifest(folder, manifest)
        return files

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, device: str | torch.device | None = None, allow_unchecked: bool = False
    ) -> DKANModel:
        """Rebuild a model saved with :meth:`save` (no pickle is read), verifying its checksums.

        A folder saved by this dkan (format 2) records the SHA-256 of its tensor files and of its settings, gene
        panel and history; any change to them is refused. A format-1 folder (saved before checksums existed)
        carries nothing that shows its gene names, settings or weights are the ones saved, and its ``format``
        field itself is unprotected: it is loaded only with ``allow_unchecked=True``, and never when it holds
        what only format 2 writes (a ``files`` or ``sha256`` field, or tensor files with a random suffix), which
        means a format-2 folder whose format field was edited. Save a trusted format-1 model again to add the
        checksums: ``DKANModel.load(path, allow_unchecked=True).save(path, overwrite=True)``.

        Parameters
        ----------
        path
            Folder written by :meth:`save`.
        device
            Device to put the network on (default CPU).
        allow_unchecked
            Load a format-1 folder, which has no checksums (only when you trust where it came from).

        Returns
        -------
        The model, in eval mode.

        Raises
        ------
        FileNotFoundError
            ``path`` holds no saved model, or a file the manifest names is missing.
        ValueError
            A file is corrupted or edited (checksum mismatch), the manifest is invalid, a tensor is missing or
            has the wrong shape, or the folder is format 1 without ``allow_unchecked=True`` (or claims format 1
            but holds format-2 files); the message names the file and the field.
        """
        from safetensors.torch import load_model

        from dkan._utils import resolve_device
        from dkan.train import _store

        target = resolve_device("cpu" if device is None else device)
        path = Path(path)
        if not (path / _store.MANIFEST).is_file():
            raise FileNotFoundError(f"`path={str(path)!r}` holds no saved dkan model (no {_store.MANIFEST}).")
        meta = _store.read_manifest(path)
        if meta["format"] not in (1, _FORMAT):
            raise ValueError(
                f"Model format {meta['format']!r} in {path / _store.MANIFEST} is not supported (expected "
                f"{_FORMAT}); it was written by another dkan version ({meta.get('dkan_version')})."
            )
        if meta["format"] == 1:
            _check_format_1(path, meta, allow_unchecked=allow_unchecked)
        files = _files(meta)
        if meta["format"] == _FORMAT:
            _verify(path, meta, files)
        else:
            logger.warning("%s was saved without checksums (format 1); save it again to add them.", path)
        config, genes, feature_dim = _parse_content(path, meta)
        emb = _read_tensor(path / files["genes"], "gene_embeddings", ndim=2, rows=len(genes))
        module = build_module(
            config, n_genes=len(genes), gene_dim=emb.shape[1], feature_dim=feature_dim, pretrained=False
        )
        _check_tensors(path / files["weights"], module)
        load_model(module, str(path / files["weights"]), strict=True)
        module.to(target).eval()
        trust = _read_prefixed(path / files["genes"], "trust.")
        probes = _read_prefixed(path / files["genes"], "probe.")
        return cls(module, config, genes, emb, meta["meta"], meta.get("history", []), trust, probes)


def _fsync(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _files(meta: dict[str, Any]) -> dict[str, str]:
    """Tensor files named by a manifest (format 1 used fixed names)."""
    files = meta.get("files", {"weights": _WEIGHTS, "genes": _GENES})
    if not isinstance(files, dict) or set(files) != {"weights", "genes"}:
        raise ValueError(f"The model manifest's field `files` is invalid: {files!r}.")
    for name in files.values():
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"The model manifest's field `files` names an invalid file {name!r}.")
    return files


def _check_format_1(path: Path, meta: dict[str, Any], *, allow_unchecked: bool) -> None:
    """Refuse a format-1 folder that holds format-2 files, and any format-1 folder unless ``allow_unchecked``."""
    from dkan.train import _store

    traits = [f"field `{k}`" for k in ("files", "sha256") if k in meta]
    traits += [f"file {e.name}" for e in sorted(path.iterdir()) if _TOKENISED.match(e.name)]
    if traits:
        raise ValueError(
            f"{path / _store.MANIFEST} says format 1, but the folder holds what only format 2 writes "
            f"({', '.join(traits[:4])}): its format field was edited, so nothing in it can be trusted. Use the "
            "folder as it was saved (or save the model again from its source)."
        )
    if not allow_unchecked:
        raise ValueError(
            f"{path} holds a format-1 model, saved without checksums: nothing shows that its gene names, settings "
            "or weights are the ones saved. If you trust where it came from, load it with "
            "`dkan.DKANModel.load(path, allow_unchecked=True)` and save it again "
            "(`.save(path, overwrite=True)`) to add checksums."
        )


#: Tensor files only format 2 writes (a random suffix per save); format 1 used ``model.safetensors``/``genes...``.
_TOKENISED = re.compile(r"^(model|genes)\.[0-9a-f]{8}\.safetensors$")


def _verify(path: Path, meta: dict[str, Any], files: dict[str, str]) -> None:
    """Compare the recorded SHA-256 of the tensor files and of the JSON content with what is on disk."""
    from dkan.train import _store

    sums = meta.get("sha256")
    if not isinstance(sums, dict):
        raise ValueError(f"{path / _store.MANIFEST} has no `sha256` field: the manifest was edited or truncated.")
    for role, name in files.items():
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} (the model's `{role}` file) is missing; the model folder is incomplete.")
        if _store.file_sha256(file) != sums.get(role):
            raise ValueError(
                f"{file} does not match the checksum recorded in {_store.MANIFEST} (field `sha256.{role}`): the "
                "file is corrupted or was changed after saving."
            )
    content = {k: meta.get(k) for k in ("config", "genes", "meta", "history")}
    if _store.content_sha256(content) != sums.get("content"):
        raise ValueError(
            f"{path / _store.MANIFEST} was edited after saving (field `sha256.content` does not match its config, "
            "genes, meta and history); predictions would be mislabelled. Save the model again."
        )


def _parse_content(path: Path, meta: dict[str, Any]) -> tuple[DKANConfig, list[str], int]:
    """Config, gene list and feature dimension of a manifest, each checked with an error naming the field."""
    where = path / "dkan.json"
    genes = meta.get("genes")
    if not isinstance(genes, list) or not genes or not all(isinstance(g, str) for g in genes):
        raise ValueError(f"{where}: field `genes` must be a non-empty list of gene names.")
    if len(set(genes)) != len(genes):
        raise ValueError(f"{where}: field `genes` holds duplicated names.")
    try:
        config = DKANConfig.from_dict({**_BEFORE_CALIBRATION, **meta["config"]})
        feature_dim = int(meta["meta"]["features"]["dim"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: field `config` or `meta.features.dim` is missing or invalid ({err}).") from None
    return config, genes, feature_dim


def _read_tensor(file: Path, key: str, *, ndim: int, rows: int) -> np.ndarray:
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; the model folder is incomplete.")
    try:
        with safe_open(str(file), framework="pt") as f:
            if key not in f.keys():
                raise ValueError(f"{file} holds no tensor `{key}`.")
            t = f.get_tensor(key)
    except SafetensorError as err:
        raise ValueError(f"{file} is not a readable safetensors file ({err}).") from None
    if t.ndim != ndim or t.shape[0] != rows:
        raise ValueError(f"{file}: tensor `{key}` has shape {tuple(t.shape)}, expected {rows} rows ({ndim}-d).")
    return t.numpy()


def _read_prefixed(file: Path, prefix: str) -> dict[str, np.ndarray]:
    """The ``trust.*`` or ``probe.*`` tensors stored beside the gene embeddings (none where never saved)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return {k[len(prefix) :]: f.get_tensor(k).numpy() for k in f.keys() if k.startswith(prefix)}


def _check_tensors(file: Path, module: torch.nn.Module) -> None:
    """Compare the names and shapes of the tensors in ``file`` with the network's state dict."""
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; the model folder is incomplete.")
    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{file} is not a readable safetensors file ({err}).") from None
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise ValueError(f"{file} lacks tensor(s) {missing[:5]} that the model's config needs.")
    wrong = [f"{k}: {shapes[k]} vs {expected[k]}" for k in expected if shapes[k] != expected[k]]
    if wrong:
        raise ValueError(f"{file}: tensor shapes do not match the model's config (file vs config): {wrong[:5]}.")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"Cannot write {type(obj).__name__} to the model JSON.")
