from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from dkan._config import PRESETS, DKANConfig

# reference section 1.12: (depth, heads, mlp_ratio, dropout) per module and dataset
TABLE = {
    "her2st": {
        "fusion": (1, 4, 4, 0.4),
        "slide": (5, 8, 4, 0.3),
        "region": (4, 4, 4, 0.3),
        "img_cross": (4, 4, 4, 0.3),
        "exp_cross": (3, 4, 4, 0.3),
        "text": (3, 4, 4, 0.3),
    },
    "stnet": {
        "fusion": (3, 16, 4, 0.4),
        "slide": (3, 8, 2, 0.1),
        "region": (4, 8, 4, 0.3),
        "img_cross": (4, 8, 4, 0.3),
        "exp_cross": (4, 8, 4, 0.3),
        "text": (4, 8, 4, 0.3),
    },
    "cscc": {
        "fusion": (2, 8, 4, 0.1),
        "slide": (2, 16, 1, 0.1),
        "region": (4, 16, 1, 0.3),
        "img_cross": (4, 8, 4, 0.3),
        "exp_cross": (4, 8, 4, 0.3),
        "text": (4, 8, 4, 0.3),
    },
}
TAU = {"her2st": 0.1, "stnet": 0.1, "cscc": 0.08}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_reference_presets_exact(name):
    cfg = PRESETS[name]
    for module, (depth, heads, mlp, drop) in TABLE[name].items():
        assert getattr(cfg, f"{module}_depth") == depth
        assert getattr(cfg, f"{module}_heads") == heads
        assert getattr(cfg, f"{module}_mlp_ratio") == mlp
        assert getattr(cfg, f"{module}_dropout") == drop
    assert cfg.temperature == TAU[name]
    common = {
        "d": 1024,
        "dropout_expr": 0.3,
        "distill": 0.3,
        "contrastive_factor": 3.0,
        "lr": 1e-4,
        "weight_decay": 0.0,
        "batch_size": 128,
        "max_epochs": 200,
        "patience": 20,
        "step_size": 50,
        "gamma": 0.9,
        "seed": 2021,
        "n_genes": 250,
        "patch_size": 224,
        "region_grid": 5,
        "pegh_kernel": 3,
        "patch_encoder": "resnet18_ciga",
        "feature_encoder": "uni",
        "text_encoder": "biobert",
        "use_text": True,
        "use_contrastive": True,
        "adaptive_weights": True,
        "use_distill": True,
        "gene_attend_tokens": False,
    }
    for key, value in common.items():
        assert getattr(cfg, key) == value, key


def test_small_is_default_and_cheap():
    assert DKANConfig.resolve(None) == PRESETS["small"] == DKANConfig()
    small = PRESETS["small"]
    assert small.d == 128 and small.batch_size == 32 and small.max_epochs <= 100 and small.patience <= 10
    assert small.patch_encoder == "efficientnet_lite0" and small.text_encoder == "minilm"
    # the default blends the network with the tuned probes; the authors' presets keep their network alone
    assert small.probe_blend and not any(PRESETS[p].probe_blend for p in ("her2st", "stnet", "cscc"))


def test_resolve_forms():
    assert DKANConfig.resolve("stnet") == PRESETS["stnet"]
    cfg = DKANConfig.resolve("cscc", lr=1e-3)
    assert cfg.lr == 1e-3 and cfg.temperature == 0.08
    cfg = DKANConfig.resolve({"preset": "her2st", "batch_size": 8})
    assert cfg.batch_size == 8 and cfg.slide_depth == 5
    cfg = DKANConfig.resolve({"batch_size": 8})
    assert cfg.batch_size == 8 and cfg.d == 128
    base = DKANConfig(d=32, fusion_heads=4)
    assert DKANConfig.resolve(base) is base
    assert DKANConfig.resolve(base, seed=1).seed == 1
    assert DKANConfig.from_preset("her2st", use_text=False).use_text is False


def test_unknown_keys_name_valid_ones():
    with pytest.raises(TypeError, match="slide_depth"):
        DKANConfig.resolve("small", slide_deepth=3)
    with pytest.raises(TypeError, match="Valid names"):
        DKANConfig.resolve({"nope": 1})
    with pytest.raises(TypeError, match="nope"):
        DKANConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="her2st"):
        DKANConfig.resolve("her2")
    with pytest.raises(TypeError, match="config"):
        DKANConfig.resolve(3)


@pytest.mark.parametrize(
    ("overrides", "exc", "match"),
    [
        ({"d": 64, "slide_heads": 5}, ValueError, "slide_heads"),
        ({"text_dropout": 1.0}, ValueError, "text_dropout"),
        ({"region_grid": 4}, ValueError, "region_grid"),
        ({"pegh_kernel": 2}, ValueError, "pegh_kernel"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"slide_depth": 0}, ValueError, "slide_depth"),
        ({"grad_clip": -1.0}, ValueError, "grad_clip"),
        ({"val_fraction": 1.0}, ValueError, "val_fraction"),
        ({"batch_size": True}, TypeError, "batch_size"),
        ({"batch_size": 2.5}, TypeError, "batch_size"),
        ({"use_text": 1}, TypeError, "use_text"),
        ({"patch_encoder": ""}, TypeError, "patch_encoder"),
    ],
)
def test_validation(overrides, exc, match):
    with pytest.raises(exc, match=match):
        DKANConfig.resolve("small", **overrides)


def test_frozen_and_float_coercion():
    cfg = DKANConfig(lr=1)
    assert isinstance(cfg.lr, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name):
    cfg = PRESETS[name].replace(contrastive_chunk=64, grad_clip=None)
    back = DKANConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg


def test_config_import_is_torch_free():
    code = "import sys, dkan._config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
