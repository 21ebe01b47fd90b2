from __future__ import annotations

import pytest
import torch
from torch import nn

from dkan._config import DKANConfig
from dkan.nn.losses import DKANLoss
from dkan.nn.network import DKAN

G, DT, DF, C = 6, 12, 10, 8
CFG = DKANConfig(
    d=16, fusion_heads=2, slide_heads=2, region_heads=2, img_cross_heads=2, exp_cross_heads=2, text_heads=2
)


class TinyConv(nn.Module):
    """Patch trunk stub returning a (B, C, h, w) map."""

    num_features = C

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 8, stride=8)

    def forward(self, x):
        return self.conv(x)


class TokenEncoder(TinyConv):
    """Registry-style encoder exposing forward_tokens -> (B, T, C)."""

    def forward(self, x):  # pooled features: must not be used by DKAN
        raise AssertionError("DKAN must call forward_tokens")

    def forward_tokens(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)


def make_model(encoder=None, **overrides) -> DKAN:
    torch.manual_seed(0)
    return DKAN(CFG, G, DT, DF, encoder or TinyConv(), **overrides)


def make_batch(b=4, n_p=15, seed=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(36, generator=g)[:n_p]
    mask = torch.ones(b, 25, dtype=torch.bool)
    mask[:, [0, 1, 2, 3, 4]] = False
    return {
        "patch": torch.randn(b, 3, 32, 32, generator=g),
        "region": torch.randn(b, 25, DF, generator=g),
        "region_mask": mask,
        "slide": torch.randn(n_p, DF, generator=g),
        "grid": torch.stack([flat // 6, flat % 6], 1),
        "slide_index": torch.tensor([3, 0, 7, 11])[:b],
        "genes": torch.randn(G, DT, generator=g),
        "target": torch.rand(b, G, generator=g),
    }


def test_forward_shapes_train_and_eval():
    model = make_model()
    batch = make_batch()
    out = model.train()(batch)
    for key in ("pred", "pred_fusion", "pred_patch", "pred_region", "pred_slide"):
        assert out[key].shape == (4, G), key
    assert out["z_img"].shape == out["z_exp"].shape == (4, G, 16)
    out = model.eval()(batch)
    assert "z_exp" not in out and out["pred"].shape == (4, G)
    assert model(batch, with_expression=True)["z_exp"].shape == (4, G, 16)
    assert "z_exp" not in model.train()({k: v for k, v in batch.items() if k != "target"})
    # text projected before the transformer (gene_dim 12 != d 16)
    assert isinstance(model.text_proj, nn.Linear) and model.text_proj.in_features == DT


def test_forward_backward_reaches_every_branch():
    model = make_model().train()
    batch = make_batch()
    out = model(batch)
    loss = DKANLoss(temperature=0.1)(out, batch["target"])["loss"]
    loss.backward()
    for name in (
        "patch_encoder.conv.weight",
        "region_encoder.layers.0.attn.rel_bias.table",
        "slide_encoder.pos.conv.weight",
        "text_proj.weight",
        "expr_encoder.proj.weight",
        "exp_cross.layers.0.ff.0.weight",
        "head_gene.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_eval_is_deterministic_and_train_is_not():
    model = make_model()
    batch = make_batch()
    model.eval()
    torch.testing.assert_close(model(batch)["pred"], model(batch)["pred"], rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(batch)["pred"], model(batch)["pred"])


def test_precomputed_slide_tokens_and_spot_order():
    model = make_model().eval()
    batch = make_batch()
    ref = model(batch)["pred"]
    with torch.no_grad():
        tokens = model.encode_slide(batch["slide"], batch["grid"])
    assert tokens.shape == (15, 16)
    fast = {k: v for k, v in batch.items() if k not in ("slide", "grid")} | {"slide_tokens": tokens}
    torch.testing.assert_close(model(fast)["pred"], ref)
    # permuting the slide's spot order (and the batch indices with it) changes nothing
    perm = torch.randperm(15)
    where = torch.argsort(perm)
    shuffled = batch | {
        "slide": batch["slide"][perm],
        "grid": batch["grid"][perm],
        "slide_index": where[batch["slide_index"]],
    }
    torch.testing.assert_close(model(shuffled)["pred"], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attend_tokens", [False, True])
def test_region_mask_respected(attend_tokens):
    model = make_model(gene_attend_tokens=attend_tokens).eval()
    batch = make_batch()
    ref = model(batch)["pred"]
    changed = batch | {"region": batch["region"].clone()}
    changed["region"][:, 0] += 3.0  # tile 0 is masked
    torch.testing.assert_close(model(changed)["pred"], ref)
    changed["region"][:, 12] += 3.0  # centre tile is valid
    assert not torch.allclose(model(changed)["pred"], ref)


def test_gene_attend_tokens_option():
    default, attend = make_model().eval(), make_model(gene_attend_tokens=True).eval()
    attend.load_state_dict(default.state_dict())  # same parameters, different key set
    batch = make_batch()
    a, b = default(batch), attend(batch)
    assert b["pred"].shape == (4, G) and not torch.allclose(a["pred"], b["pred"])
    torch.testing.assert_close(a["pred_fusion"], b["pred_fusion"])


def test_text_encoded_once_per_step():
    calls = []
    for separate, expected in ((False, 1), (True, 2)):
        model = make_model(separate_exp_text=separate).train()
        calls.clear()
        model.text_encoder.register_forward_hook(lambda *a: calls.append(1))
        out = model(make_batch())
        assert len(calls) == expected and "z_exp" in out


def test_ablations():
    batch = make_batch()
    no_text = make_model(use_text=False).train()
    out = no_text({k: v for k, v in batch.items() if k != "genes"})
    assert out["pred"].shape == (4, G) and no_text.gene_table.shape == (G, 16)
    assert not hasattr(no_text, "text_proj")
    patch_only = make_model(use_region=False, use_slide=False).train()
    out = patch_only({k: batch[k] for k in ("patch", "genes", "target")})
    assert {"pred_region", "pred_slide"}.isdisjoint(out) and "z_exp" in out
    assert not hasattr(patch_only, "slide_encoder") and not hasattr(patch_only, "region_encoder")
    with pytest.raises(ValueError, match="use_slide"):
        patch_only.encode_slide(batch["slide"], batch["grid"])
    no_con = make_model(use_contrastive=False).train()
    assert "z_exp" not in no_con(batch)


def test_forward_tokens_encoder_and_input_errors():
    model = make_model(TokenEncoder()).eval()
    batch = make_batch()
    assert model(batch)["pred"].shape == (4, G)
    with pytest.raises(KeyError, match="slide_index"):
        model({k: v for k, v in batch.items() if k != "slide_index"})
    with pytest.raises(KeyError, match="genes"):
        model({k: v for k, v in batch.items() if k != "genes"})
    with pytest.raises(ValueError, match="genes"):
        model(batch | {"genes": torch.randn(G + 1, DT)})
    with pytest.raises(ValueError, match="region"):
        model(batch | {"region": torch.randn(4, 9, DF)})
    bad = DKAN(CFG, G, DT, DF, TinyConv(), patch_channels=C + 1)
    with pytest.raises(ValueError, match="patch encoder"):
        bad(batch)
    with pytest.raises(TypeError, match="patch_channels"):
        DKAN(CFG, G, DT, DF, nn.Identity())


def test_her2st_parameter_count_matches_reference():
    class ResNet18Trunk(nn.Module):  # 11.18 M parameters, 512 channels, like the reference's trunk
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(11_176_512))

    with torch.device("meta"):
        model = DKAN("her2st", 250, 1024, 1024, ResNet18Trunk(), 512)
    total = sum(p.numel() for p in model.parameters())
    assert 263e6 < total < 269e6  # reference section 1.13: ~266 M
    assert isinstance(model.text_proj, nn.Identity) and isinstance(model.region_proj, nn.Identity)
