from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dkan._config import PRESETS
from dkan.nn.losses import HEADS, DKANLoss, adaptive_weights, nt_xent, nt_xent_dense, supervised_loss


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def outputs(b=5, g=7, d=4, heads=HEADS, grad=False):
    out = {"pred": torch.randn(b, g, requires_grad=grad)}
    out |= {k: torch.randn(b, g) for k in heads}
    out |= {"z_img": torch.randn(b, g, d, requires_grad=grad), "z_exp": torch.randn(b, g, d, requires_grad=grad)}
    return out


def mse(a, b):
    return ((a - b) ** 2).sum() / a.numel()


# ---------------------------------------------------------------- supervised
def test_supervised_loss_direct_formula():
    out, y = outputs(), torch.randn(5, 7)
    lam = 0.3
    expected = mse(out["pred"], y) + sum((1 - lam) * mse(out[k], y) + lam * mse(out[k], out["pred"]) for k in HEADS)
    torch.testing.assert_close(supervised_loss(out, y, distill=lam), expected)
    torch.testing.assert_close(supervised_loss(out, y, distill=None), mse(out["pred"], y))
    partial = {k: out[k] for k in ("pred", "pred_patch")}
    torch.testing.assert_close(
        supervised_loss(partial, y),
        mse(out["pred"], y) + 0.7 * mse(out["pred_patch"], y) + 0.3 * mse(out["pred_patch"], out["pred"]),
    )
    with pytest.raises(ValueError, match="distill"):
        supervised_loss(out, y, distill=1.5)


def test_teacher_is_not_detached():
    out, y = outputs(grad=True), torch.randn(5, 7)
    (grad,) = torch.autograd.grad(supervised_loss(out, y, distill=0.3), out["pred"])
    n = y.numel()
    expected = 2 / n * (out["pred"] - y) + sum(0.3 * 2 / n * (out["pred"] - out[k]) for k in HEADS)
    torch.testing.assert_close(grad, expected.detach())


# ---------------------------------------------------------------- contrastive
def manual_nt_xent(z_img, z_exp, t):
    a = F.normalize(z_img.reshape(-1, z_img.shape[-1]), dim=-1)
    b = F.normalize(z_exp.reshape(-1, z_exp.shape[-1]), dim=-1)
    terms = []
    for i in range(len(a)):
        s = torch.stack([a[i] @ b[j] for j in range(len(b))]) / t
        terms.append(torch.logsumexp(s, 0) - s[i])
    return torch.stack(terms).mean()


def test_dense_nt_xent_direct_formula():
    out = outputs(b=3, g=4, d=5)
    torch.testing.assert_close(
        nt_xent_dense(out["z_img"], out["z_exp"], temperature=0.1), manual_nt_xent(out["z_img"], out["z_exp"], 0.1)
    )


@pytest.mark.parametrize("chunk", [1, 7, 35, 1000, None])
def test_streamed_nt_xent_equals_dense_value_and_gradient(chunk):
    out = outputs(b=5, g=7, d=6, grad=True)
    a, b = out["z_img"], out["z_exp"]
    streamed = nt_xent(a, b, temperature=0.08, chunk_size=chunk)
    dense = nt_xent_dense(a, b, temperature=0.08)
    torch.testing.assert_close(streamed, dense)
    g_stream = torch.autograd.grad(streamed * 2.5, (a, b))  # upstream gradient != 1 is propagated
    g_dense = torch.autograd.grad(dense * 2.5, (a, b))
    for x, y in zip(g_stream, g_dense, strict=True):
        torch.testing.assert_close(x, y)


def test_streamed_nt_xent_gradcheck_float64():
    a = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: nt_xent(x, y, temperature=0.1, chunk_size=3), (a, b))


def test_streamed_nt_xent_never_keeps_the_full_matrix():
    n, d = 400, 8
    a = torch.randn(n, d, requires_grad=True)
    b = torch.randn(n, d, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nt_xent(a, b, temperature=0.1, chunk_size=50)
    assert max(sizes) <= n * d  # dense form would save an n x n matrix
    loss.backward()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nt_xent_dense(a, b, temperature=0.1)
    assert max(sizes) >= n * n  # the hook does see the dense matrix


def test_nt_xent_under_autocast_is_float32():
    out = outputs(b=4, g=5, d=8)
    ref = nt_xent(out["z_img"], out["z_exp"], temperature=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = nt_xent(out["z_img"].bfloat16(), out["z_exp"].bfloat16(), temperature=0.1)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    torch.testing.assert_close(low, ref, atol=0.05, rtol=0.02)


def test_nt_xent_input_errors():
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent(torch.randn(2, 3, 4), torch.randn(2, 4, 4), temperature=0.1)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(2, 3, 4), torch.randn(2, 3, 4), temperature=0.0)


# ---------------------------------------------------------------- weights
@pytest.mark.parametrize(("ls", "lc"), [(0.2, 6.0), (1.0, 1.0), (3.0, 0.5)])
def test_adaptive_weights_closed_form(ls, lc):
    w_sup, w_con = adaptive_weights(torch.tensor(ls, dtype=torch.float64), torch.tensor(lc, dtype=torch.float64))
    assert isinstance(w_sup, float)
    assert math.isclose(w_sup, lc / (lc + 3 * ls)) and math.isclose(w_con, 3 * ls / (lc + 3 * ls))
    assert math.isclose(w_sup + w_con, 1.0)
    w_sup, w_con = adaptive_weights(ls, lc, contrastive_factor=1.0)
    assert math.isclose(w_sup, lc / (lc + ls))


@pytest.mark.parametrize(("ls", "lc"), [(0.0, 1.0), (1.0, -1.0), (float("nan"), 1.0)])
def test_adaptive_weights_fallback(ls, lc):
    assert adaptive_weights(ls, lc) == (1.0, 1.0)


# ---------------------------------------------------------------- combined
def test_dkan_loss_switches():
    out, y = outputs(), torch.randn(5, 7)
    sup = supervised_loss(out, y)
    con = nt_xent_dense(out["z_img"], out["z_exp"], temperature=0.1)
    res = DKANLoss()(out, y)
    w_sup = float(con) / (float(con) + 3 * float(sup))
    torch.testing.assert_close(res["loss"], w_sup * sup + (1 - w_sup) * con)
    torch.testing.assert_close(res["w_sup"], torch.tensor(w_sup))
    fixed = DKANLoss(adaptive=False, fixed_w_sup=2.0, fixed_w_con=0.5)(out, y)
    torch.testing.assert_close(fixed["loss"], 2.0 * sup + 0.5 * con)
    torch.testing.assert_close(DKANLoss(use_contrastive=False)(out, y)["loss"], sup)
    no_distill = DKANLoss(use_contrastive=False, use_distill=False)(out, y)["loss"]
    torch.testing.assert_close(no_distill, F.mse_loss(out["pred"], y))
    eval_out = {k: v for k, v in out.items() if k != "z_exp"}
    res = DKANLoss()(eval_out, y)
    torch.testing.assert_close(res["loss"], sup)
    assert res["con"] == 0


def test_dkan_loss_from_config():
    cfg = PRESETS["cscc"].replace(use_distill=False, adaptive_weights=False, contrastive_chunk=17)
    loss = DKANLoss.from_config(cfg)
    assert loss.temperature == 0.08 and loss.use_distill is False and loss.adaptive is False
    assert loss.chunk_size == 17 and loss.contrastive_factor == 3.0 and loss.distill == 0.3
