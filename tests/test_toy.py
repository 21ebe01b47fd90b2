import numpy as np
import pytest

import dkan
from dkan import _keys as K
from dkan._utils import iter_samples, spot_pixels


def test_toy_is_deterministic_and_shaped(toy_master):
    other = dkan.datasets.toy(seed=0)
    a, b = toy_master.tables[K.TABLE], other.tables[K.TABLE]
    assert a.shape == (3 * 144, 40)
    assert (a.X != b.X).nnz == 0
    img_a = toy_master.images["s1_image"]["scale0"]["image"].values
    img_b = other.images["s1_image"]["scale0"]["image"].values
    np.testing.assert_array_equal(img_a, img_b)
    assert img_a.dtype == np.uint8 and img_a.shape[0] == 3
    assert set(a.obs[K.SAMPLE]) == {"s0", "s1", "s2"}
    assert a.obs[K.PATIENT].nunique() == 2
    assert (a.X != dkan.datasets.toy(seed=1).tables[K.TABLE].X).nnz > 0


def test_toy_spots_map_to_their_image(toy_master):
    samples = iter_samples(toy_master)
    assert [s.image_key for s in samples] == ["s0_image", "s1_image", "s2_image"]
    xy, r = spot_pixels(toy_master, samples[0])
    np.testing.assert_allclose(xy, toy_master.tables[K.TABLE].obsm["spatial"][samples[0].obs_idx])
    assert np.all(r > 0)


def test_toy_expression_follows_the_image(toy_master):
    """Darker (tumour-rich) spots differ in expression: the mean intensity under a spot correlates with genes."""
    adata = toy_master.tables[K.TABLE]
    s = iter_samples(toy_master)[0]
    xy, _ = spot_pixels(toy_master, s)
    img = toy_master.images[s.image_key]["scale0"]["image"].values.astype(float)
    feats = np.array([img[:, int(y) - 12 : int(y) + 12, int(x) - 12 : int(x) + 12].mean((1, 2)) for x, y in xy])
    y = np.log1p(adata.X[s.obs_idx].toarray())
    r = [abs(np.corrcoef(feats[:, c], y[:, g])[0, 1]) for c in range(3) for g in range(y.shape[1])]
    assert np.nanmax(r) > 0.5


@pytest.mark.parametrize("kwargs", [{"n_genes": 0}, {"n_types": 9}, {"grid_size": 1}])
def test_toy_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="`"):
        dkan.datasets.toy(**kwargs)


def test_toy_gene_descriptions_cover_every_toy_gene_without_warnings(caplog):
    import logging

    from dkan._genetext.embed import gene_texts
    from dkan.datasets._toy import TOY_GENES

    texts = dkan.datasets.toy_gene_descriptions()
    assert set(texts) == set(TOY_GENES)
    assert all(len(t.split()) >= 8 and t.endswith(".") for t in texts.values())
    with caplog.at_level(logging.WARNING, logger="dkan"):
        out = gene_texts(list(TOY_GENES), texts, describe_kwargs={})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (out["source"] != "symbol").all()
    assert out.loc["ERBB2", "text"] == texts["ERBB2"]
