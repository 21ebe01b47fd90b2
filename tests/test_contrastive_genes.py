"""The gene subsample of the NT-Xent term (``contrastive_genes``)."""

from __future__ import annotations

import pytest
import torch

from dkan._config import PRESETS, DKANConfig
from dkan.nn.losses import DKANLoss, nt_xent_dense


def _outputs(b: int = 4, g: int = 10, d: int = 8) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {
        "pred": torch.randn(b, g, generator=gen),
        "z_img": torch.randn(b, g, d, generator=gen),
        "z_exp": torch.randn(b, g, d, generator=gen),
    }
    return out, torch.randn(b, g, generator=gen)


def test_all_genes_is_the_reference_loss():
    out, y = _outputs()
    got = DKANLoss(contrastive_genes=None, use_distill=False)(out, y)["con"]
    want = nt_xent_dense(out["z_img"], out["z_exp"], temperature=0.1)
    torch.testing.assert_close(got, want)
    # k >= G changes nothing
    torch.testing.assert_close(DKANLoss(contrastive_genes=10, use_distill=False)(out, y)["con"], want)


def test_subsample_uses_the_same_random_genes_for_every_spot():
    out, y = _outputs()
    torch.manual_seed(3)
    got = DKANLoss(contrastive_genes=4, use_distill=False)(out, y)["con"]
    torch.manual_seed(3)
    idx = torch.randperm(10)[:4]
    want = nt_xent_dense(out["z_img"][:, idx], out["z_exp"][:, idx], temperature=0.1)
    torch.testing.assert_close(got, want)
    full = nt_xent_dense(out["z_img"], out["z_exp"], temperature=0.1)
    assert not torch.isclose(got, full)  # fewer negatives: a different value


def test_config_field():
    assert PRESETS["small"].contrastive_genes == 32
    for name in ("her2st", "stnet", "cscc"):  # the reference presets keep all genes
        assert PRESETS[name].contrastive_genes is None
    assert DKANLoss.from_config(PRESETS["small"]).contrastive_genes == 32
    with pytest.raises(ValueError, match="contrastive_genes"):
        DKANConfig(contrastive_genes=0)


def test_model_runs_the_expression_path_for_the_drawn_genes_only():
    """The gene queries do not interact in the cross encoder: a subset gives those genes' rows of the full output."""
    from test_nn_model import CFG, G, TinyConv, make_batch

    from dkan.nn.network import DKAN

    torch.manual_seed(0)
    model = DKAN(CFG.replace(contrastive_genes=3), G, 12, 10, TinyConv()).eval()
    batch = make_batch()
    full = model(batch, with_expression=True)  # eval mode: no draw, all genes
    assert full["z_exp"].shape[1] == G and "genes_subset" not in full
    idx = torch.tensor([4, 0, 2])
    sub = model(batch, with_expression=True, genes_subset=idx)
    torch.testing.assert_close(sub["z_exp"], full["z_exp"][:, idx])
    torch.testing.assert_close(sub["pred"], full["pred"])
    model.train()
    out = model(batch)  # training: a fresh draw of 3 genes; the loss pairs them with the same genes of z_img
    assert out["z_exp"].shape[1] == 3 and len(set(out["genes_subset"].tolist())) == 3
    loss = DKANLoss(contrastive_genes=3, use_distill=False)(out, batch["target"])
    want = nt_xent_dense(out["z_img"][:, out["genes_subset"]], out["z_exp"], temperature=0.1)
    torch.testing.assert_close(loss["con"], want)
