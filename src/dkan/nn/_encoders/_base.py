"""The image-encoder contract and the name -> builder registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Builder = Callable[..., "ImageEncoder"]
_REGISTRY: dict[str, Builder] = {}


class ImageEncoder(nn.Module):
    """An image encoder with declared input normalisation and resolution.

    Inputs of :meth:`forward` and :meth:`forward_tokens` are float tensors ``(B, 3, H, W)`` that are already
    normalised as ``(x - mean) / std`` for ``x`` in [0, 1] (see :meth:`normalize`), at ``H = W = input_size``
    (other sizes work for encoders that accept them, but ``input_size`` is what the weights were trained at).

    Attributes
    ----------
    name
        Registry name (or a description of the wrapped callable).
    mean, std
        Per-channel normalisation statistics (RGB) the weights expect.
    fixed_size
        ``True`` when the network only accepts ``input_size`` inputs (e.g. a ViT with a fixed position
        embedding): crops of another size are resized. Convolutional networks and ViTs with
        ``dynamic_img_size`` take crops at their own size (no resampling, much cheaper for small crops).
    input_size
        Square input resolution in pixels.
    num_features
        Dimension ``D`` of the pooled output of :meth:`forward`.
    token_dim
        Dimension ``C`` of the tokens of :meth:`forward_tokens`.
    weights_hash
        sha256 of the weight file(s) or of the state dict; ``"random"`` for an unseeded random initialisation.
    """

    def __init__(
        self,
        *,
        name: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        input_size: int,
        num_features: int,
        token_dim: int,
        weights_hash: str,
        fixed_size: bool = False,
    ) -> None:
        super().__init__()
        self.fixed_size = bool(fixed_size)
        self.name = name
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.input_size = int(input_size)
        self.num_features = int(num_features)
        self.token_dim = int(token_dim)
        self.weights_hash = weights_hash

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, num_features)`` of normalised images ``(B, 3, H, W)``."""
        raise NotImplementedError

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token map ``(B, T, token_dim)`` of normalised images ``(B, 3, H, W)``."""
        raise NotImplementedError

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise images in [0, 1] with the encoder's ``mean`` and ``std``."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std

    @property
    def info(self) -> dict[str, Any]:
        """Identity of the encoder, for provenance records."""
        return {
            "name": self.name,
            "weights_hash": self.weights_hash,
            "num_features": self.num_features,
            "token_dim": self.token_dim,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, num_features={self.num_features}, token_dim={self.token_dim}, "
            f"input_size={self.input_size}, weights_hash={self.weights_hash[:12]!r}"
        )


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """Flatten a feature map ``(B, C, H, W)`` to tokens ``(B, H*W, C)`` (row-major)."""
    return x.flatten(2).transpose(1, 2)


def register_image_encoder(name: str) -> Callable[[Builder], Builder]:
    """Register a builder under ``name`` (a decorator).

    The builder is called as ``builder(pretrained=..., checkpoint_path=..., **kwargs)`` and returns an
    :class:`ImageEncoder`.

    Parameters
    ----------
    name
        Registry name; must not be taken yet.

    Returns
    -------
    The decorator, which returns the builder unchanged.
    """

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"An image encoder named {name!r} is already registered; choose another `name`.")
        _REGISTRY[name] = builder
        return builder

    return decorator
