"""The gene subsample of the NT-Xent term (``contrastive_genes``)."""

from __future__ import annotations

import pytest
import torch

from dkan.nn.losses import DKANLoss, nt_xent_dense
from dkan.train.config import PRESETS, DKANConfig


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
