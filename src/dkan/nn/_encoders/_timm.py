"""timm-based encoders (UNI, any timm model) and wrapping of user callables."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dkan.nn._encoders._base import IMAGENET_MEAN, IMAGENET_STD, ImageEncoder, map_to_tokens, register_image_encoder
from dkan.nn._encoders._weights import (
    build_with_weights,
    file_sha256,
    read_state_dict,
    resolve_checkpoint,
    state_dict_sha256,
)

logger = logging.getLogger("dkan")

UNI_ENV = "UNI_CKPT_PATH"
UNI_HUB = "hf-hub:MahmoodLab/uni"
UNI_KWARGS = {"init_values": 1e-5, "dynamic_img_size": True, "num_classes": 0}


class TimmEncoder(ImageEncoder):
    """A timm model built with ``num_classes=0``.

    ``forward`` is its pooled output (the CLS token for ViTs); ``forward_tokens`` is ``forward_features`` without
    prefix (CLS / register) tokens for ViTs, or the flattened last feature map for CNNs.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        weights_hash: str,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        input_size: int | None = None,
    ) -> None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        token_dim = int(model.num_features)
        super().__init__(
            name=name,
            mean=mean or tuple(cfg.get("mean", IMAGENET_MEAN)),
            std=std or tuple(cfg.get("std", IMAGENET_STD)),
            input_size=input_size or int(cfg.get("input_size", (3, 224, 224))[-1]),
            num_features=int(getattr(model, "head_hidden_size", None) or token_dim),
            token_dim=token_dim,
            weights_hash=weights_hash,
            fixed_size=hasattr(model, "patch_embed") and not getattr(model, "dynamic_img_size", False),
        )
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.forward_features(x)
        if f.ndim == 4:
            return map_to_tokens(f)
        return f[:, int(getattr(self.model, "num_prefix_tokens", 0)) :]


def _timm_factory(arch: str, **kwargs: Any) -> Callable[[], nn.Module]:
    import timm

    return lambda: timm.create_model(arch, pretrained=False, **kwargs)


@register_image_encoder("uni")
def build_uni(
    *, pretrained: bool = True, checkpoint_path: str | os.PathLike | None = None, **timm_kwargs: Any
) -> TimmEncoder:
    """UNI (Chen et al. 2024): timm ViT-L/16 with ``init_values=1e-5``, ``dynamic_img_size=True``, CLS token (1024-d).

    Parameters
    ----------
    pretrained
        Load the weights; False gives a random network.
    checkpoint_path
        The MahmoodLab ``pytorch_model.bin`` (or a folder holding it); defaults to ``$UNI_CKPT_PATH``, then
        ``<dkan cache>/uni/pytorch_model.bin``. Pass ``"hf-hub:MahmoodLab/uni"`` to download it from the gated
        Hugging Face repository (needs an accepted licence and a token).
    **timm_kwargs
        Extra arguments for ``timm.create_model``.

    Returns
    -------
    The encoder (ImageNet normalisation, 224 px; 196 patch tokens of 1024), in eval mode.
    """
    kwargs = {**UNI_KWARGS, **timm_kwargs}
    extra = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": 224}
    if str(checkpoint_path or "").startswith("hf-hub:"):
        import timm

        model = timm.create_model(str(checkpoint_path), pretrained=True, **kwargs)
        return TimmEncoder(model, name="uni", weights_hash=state_dict_sha256(model.state_dict()), **extra).eval()
    factory = _timm_factory("vit_large_patch16_224", **kwargs)
    if not pretrained and checkpoint_path is None:
        return TimmEncoder(factory(), name="uni", weights_hash="random", **extra).eval()
    path = resolve_checkpoint(
        checkpoint_path,
        what="UNI",
        env=UNI_ENV,
        filename="pytorch_model.bin",
        cache_name="uni/pytorch_model.bin",
        hint=f' Or pass `checkpoint_path="{UNI_HUB}"` to download it (gated; needs a Hugging Face token).',
    )
    model = build_with_weights(factory, read_state_dict(path), source=str(path))
    return TimmEncoder(model, name="uni", weights_hash=file_sha256(path), **extra).eval()


def build_timm(
    arch: str,
    *,
    pretrained: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    download: bool = False,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    input_size: int | None = None,
    **timm_kwargs: Any,
) -> TimmEncoder:
    """Any timm architecture, with weights from a local file or (``download=True``) timm's own source.

    Parameters
    ----------
    arch
        timm model name (``timm.list_models()``), or an ``hf-hub:`` id.
    pretrained
        Load weights; False gives a random network.
    checkpoint_path
        A state-dict file (``.safetensors``, ``.bin``, ``.pth``) for the architecture; classifier keys are dropped.
    download
        With ``pretrained=True`` and no ``checkpoint_path``: let timm fetch its pretrained weights.
    mean, std, input_size
        Override the normalisation / resolution of the model's ``pretrained_cfg``.
    **timm_kwargs
        Extra arguments for ``timm.create_model``.

    Returns
    -------
    The encoder, in eval mode.
    """
    import timm

    kwargs = {"num_classes": 0, **timm_kwargs}
    extra = {"mean": mean, "std": std, "input_size": input_size}
    name = f"timm:{arch}"
    if checkpoint_path is not None:
        path = str(checkpoint_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"`checkpoint_path={path!r}` for timm model {arch!r} does not exist.")
        factory = _timm_factory(arch, **kwargs)
        sd = _drop_classifier(read_state_dict(path), factory)
        model = build_with_weights(factory, sd, source=path)
        return TimmEncoder(model, name=name, weights_hash=file_sha256(path), **extra).eval()
    if pretrained and not download:
        raise FileNotFoundError(
            f"No weights for timm model {arch!r}: pass `checkpoint_path=` to a local state dict, `download=True` to "
            "let timm fetch its pretrained weights (network), or `pretrained=False` for random weights."
        )
    model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    digest = state_dict_sha256(model.state_dict()) if pretrained else "random"
    return TimmEncoder(model, name=name, weights_hash=digest, **extra).eval()


def _drop_classifier(sd: dict[str, torch.Tensor], factory: Callable[[], nn.Module]) -> dict[str, torch.Tensor]:
    """Drop the classification-head keys of a full-model checkpoint (the encoder is built without a head)."""
    with torch.device("meta"):
        model = factory()
    heads = (model.pretrained_cfg or {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    expected = set(model.state_dict())
    dropped = [k for k in sd if k not in expected and any(k.startswith(f"{h}.") for h in heads)]
    if dropped:
        logger.info("Ignoring classifier keys of the checkpoint: %s", dropped)
    return {k: v for k, v in sd.items() if k not in dropped}


class CallableEncoder(ImageEncoder):
    """Wrap a callable or module mapping ``(B, 3, H, W)`` to ``(B, D)``, ``(B, T, D)`` or ``(B, D, h, w)``.

    Pooled features are the output itself (2-d) or its token / spatial mean; tokens are the module's own
    ``forward_tokens`` if it has one, else the 3-d / 4-d output as tokens, else ``(B, 1, D)``.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        name: str | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        input_size: int = 224,
        weights_hash: str | None = None,
    ) -> None:
        probe = _probe(fn, input_size)
        if probe.ndim not in (2, 3, 4):
            raise TypeError(
                f"The image encoder callable returned shape {tuple(probe.shape)} for input (2, 3, {input_size}, "
                f"{input_size}); it must return (B, D), (B, T, D) or (B, D, h, w)."
            )
        dim = int(probe.shape[1] if probe.ndim in (2, 4) else probe.shape[2])
        if weights_hash is None:
            sd = fn.state_dict() if isinstance(fn, nn.Module) else {}
            weights_hash = state_dict_sha256(sd) if sd else f"callable:{getattr(fn, '__qualname__', repr(fn))}"
        super().__init__(
            name=name or f"callable:{type(fn).__name__ if isinstance(fn, nn.Module) else fn.__qualname__}",
            mean=mean,
            std=std,
            input_size=input_size,
            num_features=dim,
            token_dim=dim,
            weights_hash=weights_hash,
        )
        if isinstance(fn, nn.Module):
            self.module = fn
        else:
            self._fn = fn

    @property
    def fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The wrapped callable."""
        return self.module if "module" in self._modules else self._fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fn(x)
        return y if y.ndim == 2 else y.mean(dim=(2, 3)) if y.ndim == 4 else y.mean(dim=1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.fn, "forward_tokens"):
            return self.fn.forward_tokens(x)
        y = self.fn(x)
        return y[:, None, :] if y.ndim == 2 else map_to_tokens(y) if y.ndim == 4 else y


def _probe(fn: Callable[[torch.Tensor], torch.Tensor], input_size: int) -> torch.Tensor:
    """Run ``fn`` once on zeros to learn its output shape."""
    device = next((p.device for p in fn.parameters()), None) if isinstance(fn, nn.Module) else None
    x = torch.zeros(2, 3, input_size, input_size, device=device)
    was_training = fn.training if isinstance(fn, nn.Module) else False
    if isinstance(fn, nn.Module):
        fn.eval()
    try:
        with torch.no_grad():
            out = fn(x)
    finally:
        if isinstance(fn, nn.Module):
            fn.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"The image encoder callable returned {type(out).__name__}; it must return a torch.Tensor.")
    return out
