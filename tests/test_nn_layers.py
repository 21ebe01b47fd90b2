from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dkan.nn.layers import (
    PEGH,
    CrossEncoder,
    ExpressionEncoder,
    FeedForward,
    MultiHeadAttention,
    RelativePositionBias,
    SlideEncoder,
    TransformerEncoder,
    attend,
    attention_weights,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- attention
def test_relative_position_bias_classes():
    rpb = RelativePositionBias(heads=3, grid=(5, 5))
    assert rpb.table.shape == (3, 25) and torch.all(rpb.table == 0)
    idx = rpb.index
    assert idx.shape == (25, 25) and torch.equal(idx, idx.T)
    assert idx.unique().numel() == 25 and torch.all(idx.diagonal() == 0)
    # token 0 = (0,0), token 7 = (1,2): |dr|=1, |dc|=2 -> class 1*5+2
    assert idx[0, 7] == 7 and idx[12, 6] == idx[12, 8] == idx[12, 16] == 1 * 5 + 1
    with torch.no_grad():
        rpb.table.copy_(torch.randn(3, 25))
    bias = rpb()
    assert bias.shape == (3, 25, 25)
    assert torch.equal(bias[:, 12, 6], bias[:, 12, 18])  # same offset class, same value


def test_attention_weights_mask_and_softmax():
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8)
    mask = torch.tensor([[True, False, True, True, False, True], [True] * 6])
    w = attention_weights(q, k, scale=8**-0.5, key_mask=mask)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 4))
    assert torch.all(w[0, :, :, 1] == 0) and torch.all(w[0, :, :, 4] == 0)
    assert torch.all(w[1] > 0)
    # fully masked row: finite, uniform (reference semantics), never NaN
    w = attention_weights(q, k, scale=1.0, key_mask=torch.zeros(2, 6, dtype=torch.bool))
    torch.testing.assert_close(w, torch.full_like(w, 1 / 6))
    with pytest.raises(ValueError, match="key_mask"):
        attention_weights(q, k, scale=1.0, key_mask=torch.ones(2, 5, dtype=torch.bool))


def test_sdpa_path_matches_explicit_form():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    fast = attend(q, k, v, scale=0.3)
    explicit = attention_weights(q, k, scale=0.3) @ v
    torch.testing.assert_close(fast, explicit)
    all_valid = attend(q, k, v, scale=0.3, key_mask=torch.ones(2, 7, dtype=torch.bool))
    torch.testing.assert_close(fast, all_valid)


def test_cross_attention_ignores_masked_keys():
    attn = MultiHeadAttention(16, 4).eval()
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 2] = False
    base = attn(x, ctx, mask)
    assert base.shape == (2, 3, 16)
    ctx2 = ctx.clone()
    ctx2[:, 2] += 5.0
    torch.testing.assert_close(attn(x, ctx2, mask), base)  # masked tile: no effect
    assert not torch.allclose(attn(x, ctx2, None), attn(x, ctx, None))  # unmasked: it matters


def test_single_key_cross_attention_is_query_independent():
    attn = MultiHeadAttention(16, 4).eval()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 1, 16)
    out = attn(x, ctx)
    torch.testing.assert_close(out, out[:, :1].expand_as(out))


def test_relative_bias_used_and_checked():
    attn = MultiHeadAttention(16, 2, grid=(3, 3)).eval()
    x = torch.randn(2, 9, 16)
    before = attn(x)
    with torch.no_grad():
        attn.rel_bias.table.normal_()
    assert not torch.allclose(attn(x), before)
    with pytest.raises(ValueError, match="Relative-position bias"):
        attn(torch.randn(2, 8, 16))


def test_single_head_has_no_output_projection():
    assert isinstance(MultiHeadAttention(8, 1).to_out, torch.nn.Identity)
    assert isinstance(MultiHeadAttention(8, 2).to_out, torch.nn.Sequential)
    with pytest.raises(ValueError, match="heads"):
        MultiHeadAttention(10, 3)


# ---------------------------------------------------------------- blocks
def test_feedforward_and_stacks_shapes():
    ff = FeedForward(8, 24, 0.1)
    assert ff[0].out_features == 24 and ff(torch.randn(2, 3, 8)).shape == (2, 3, 8)
    enc = TransformerEncoder(16, 2, 4, 2.0, 0.1, final_norm=True)
    assert len(enc.layers) == 2 and isinstance(enc.norm, torch.nn.LayerNorm)
    assert enc(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    assert isinstance(TransformerEncoder(16, 1, 4, 2.0).norm, torch.nn.Identity)
    cross = CrossEncoder(16, 2, 4, 2.0)
    assert cross(torch.randn(2, 7, 16), torch.randn(2, 3, 16)).shape == (2, 7, 16)
    with pytest.raises(ValueError, match="depth"):
        TransformerEncoder(16, 0, 4, 2.0)


def test_region_encoder_masking_self_attention():
    enc = TransformerEncoder(16, 2, 2, 2.0, 0.0, grid=(5, 5), final_norm=True).eval()
    for layer in enc.layers:
        torch.nn.init.normal_(layer.attn.rel_bias.table)
    x = torch.randn(3, 25, 16)
    mask = torch.ones(3, 25, dtype=torch.bool)
    mask[:, [0, 4, 20, 24]] = False
    out = enc(x, key_mask=mask)
    x2 = x.clone()
    x2[:, 0] = torch.randn(3, 16) * 10
    out2 = enc(x2, key_mask=mask)
    torch.testing.assert_close(out2[:, mask[0]], out[:, mask[0]])  # valid tokens never see the masked tile
    assert not torch.allclose(enc(x2), enc(x))  # the same tile, unmasked, changes the output


def test_expression_encoder_formula():
    enc = ExpressionEncoder(10, 16, 0.3).eval()
    y = torch.randn(4, 10)
    p = enc.proj(y)
    expected = F.layer_norm(p + enc.mlp[1](F.gelu(p)), (16,), enc.norm.weight, enc.norm.bias)
    torch.testing.assert_close(enc(y), expected)


# ---------------------------------------------------------------- PEGH
def dense_pegh(module: PEGH, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Reference: scatter (mean) into a dense zero grid, conv2d + grid, gather the occupied cells."""
    pos = grid - grid.amin(0)
    h, w = (int(v) + 1 for v in pos.amax(0))
    dense = torch.zeros(x.shape[1], h, w, dtype=x.dtype)
    count = torch.zeros(h, w, dtype=x.dtype)
    for i, (r, c) in enumerate(pos.tolist()):
        dense[:, r, c] += x[i]
        count[r, c] += 1
    dense = dense / count.clamp(min=1)
    conv = F.conv2d(
        dense[None], module.conv.weight, module.conv.bias, padding=module.kernel_size // 2, groups=x.shape[1]
    )
    return torch.stack([x[i] + conv[0, :, r, c] for i, (r, c) in enumerate(pos.tolist())])


def square_grid():
    r, c = torch.meshgrid(torch.arange(6), torch.arange(7), indexing="ij")
    keep = torch.rand(42) > 0.25
    return torch.stack([r.flatten(), c.flatten()], 1)[keep] + torch.tensor([3, 10])


def hex_grid():
    # Visium: array_col parity equals array_row parity, every other cell is empty
    cells = [(r, c) for r in range(6) for c in range(12) if c % 2 == r % 2]
    return torch.tensor(cells)


def irregular_grid():
    flat = torch.randperm(30 * 40)[:60]
    return torch.stack([flat // 40 - 7, flat % 40], 1)


@pytest.mark.parametrize("make_grid", [square_grid, hex_grid, irregular_grid])
@pytest.mark.parametrize("kernel", [3, 5])
def test_pegh_matches_dense_conv_and_is_order_free(make_grid, kernel):
    pegh = PEGH(8, kernel)
    torch.nn.init.normal_(pegh.conv.weight)
    torch.nn.init.normal_(pegh.conv.bias)
    grid = make_grid()
    x = torch.randn(len(grid), 8)
    out = pegh(x, grid)
    torch.testing.assert_close(out, dense_pegh(pegh, x, grid))
    perm = torch.randperm(len(grid))
    torch.testing.assert_close(pegh(x[perm], grid[perm]), out[perm])
    torch.testing.assert_close(pegh(x, grid + 1000), out)  # translation invariant


def test_pegh_zero_rows_and_gradients():
    pegh = PEGH(4)
    grid = hex_grid()
    x = torch.randn(len(grid), 4, requires_grad=True)
    with torch.no_grad():
        x[3] = 0.0  # an all-zero row must not vanish (the reference's sparse round trip drops it)
    out = pegh(x, grid)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert pegh.conv.weight.grad is not None and pegh.conv.weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_pegh_duplicates():
    grid = torch.tensor([[0, 0], [0, 1], [1, 1], [0, 1]])
    x = torch.randn(4, 6)
    pegh = PEGH(6)
    torch.nn.init.normal_(pegh.conv.weight)
    torch.testing.assert_close(pegh(x, grid), dense_pegh(pegh, x, grid))
    with pytest.raises(ValueError, match="duplicate"):
        PEGH(6, duplicates="error")(x, grid)
    with pytest.raises(TypeError, match="integer"):
        pegh(x, grid.float())


def test_slide_encoder_is_permutation_equivariant():
    enc = SlideEncoder(16, 2, 2, 2.0, 0.0).eval()
    torch.nn.init.normal_(enc.pos.conv.weight)
    grid = irregular_grid()
    x = torch.randn(len(grid), 16)
    out = enc(x, grid)
    assert out.shape == (len(grid), 16)
    perm = torch.randperm(len(grid))
    torch.testing.assert_close(enc(x[perm], grid[perm]), out[perm], atol=1e-5, rtol=1e-5)
    assert len(SlideEncoder(16, 1, 2, 2.0).rest) == 0


@pytest.mark.parametrize("numpy_mask", [False, True])
def test_dropout_cpu_mask_statistics_gradient_and_seed(numpy_mask):
    from dkan.nn.layers import Dropout

    x = torch.randn(64, 50, 40, requires_grad=True)
    drop = Dropout(0.25, numpy_mask=numpy_mask)
    assert isinstance(drop, torch.nn.Dropout) and drop.state_dict() == {}
    torch.manual_seed(1)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    torch.manual_seed(1)
    torch.testing.assert_close(drop(x), y)  # reproducible from torch's seed
    assert not torch.equal(drop(x), y)  # and a fresh mask on the next call
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert (Dropout(1.0).train()(x) == 0).all()


def test_dropout_is_torchs_own_unless_the_config_opts_in():
    from dkan.nn import DKAN
    from dkan.nn.layers import Dropout
    from dkan.train import DKANConfig

    x = torch.randn(8, 16, 32)
    drop = Dropout(0.3).train()
    torch.manual_seed(5)
    y = drop(x)
    torch.manual_seed(5)
    assert torch.equal(y, torch.nn.functional.dropout(x, 0.3, training=True))  # same draw as torch.nn.Dropout

    cfg = DKANConfig(d=16, use_region=False, use_slide=False, patch_trainable=False)

    def masks(config):
        model = DKAN(config, 6, 8, 8, torch.nn.Conv2d(3, 4, 3), patch_channels=4)
        return [m.numpy_mask for m in model.modules() if isinstance(m, Dropout)]

    assert masks(cfg) and not any(masks(cfg))
    assert all(masks(cfg.replace(numpy_dropout=True)))
