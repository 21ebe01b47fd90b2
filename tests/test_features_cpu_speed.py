"""The features path on CPU: channels-last layout (oneDNN's fast convolutions) and the shared-tile gather."""

from __future__ import annotations

import numpy as np
import torch
from conftest import results

from dkan._features.encoding import Preprocess
from dkan._features.shared_tiles import gather
from dkan.nn.image_encoders import create_image_encoder


def test_preprocess_gives_channels_last_on_cpu_and_the_same_values():
    enc = create_image_encoder("dummy")
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    out = Preprocess(enc, torch.device("cpu"))(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(enc.mean).view(1, 3, 1, 1)
    std = torch.tensor(enc.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out.contiguous(), (x.float() / 255 - mean) / std)


def test_gather_and_batch_gather_equal_the_dense_assignment():
    from dkan.train.data import SampleInputs, region_rows

    rng = np.random.default_rng(0)
    n, g2, d, n_tiles = 50, 25, 3, 40
    valid = rng.random((n, g2)) > 0.3
    feats = rng.normal(size=(n_tiles, d)).astype(np.float32)
    index = np.full((n, g2), -1, np.int32)
    index[valid] = rng.integers(0, n_tiles, int(valid.sum()))
    want = np.zeros((n, g2, d), np.float32)
    want[valid] = feats[index[valid]]
    np.testing.assert_array_equal(gather(feats, index), want)
    rows = torch.as_tensor(rng.permutation(n)[:17])
    t = torch.as_tensor
    sample = SampleInputs("s", t(feats[:n, 0] * 0), t(feats), t(valid), t(np.zeros((n, 2), np.int64)),
                          region_index=t(index.astype(np.int64)))  # fmt: skip
    got = region_rows(sample, rows)
    assert torch.equal(got, t(want)[rows]) and not torch.signbit(got[~t(valid)[rows]]).any()  # +0.0, not -0.0


def test_model_inputs_share_the_whole_slide_features_instead_of_copying_them():
    import dkan
    from dkan import _keys as K
    from dkan._config import DKANConfig
    from dkan._data.inputs import _take_rows, build_inputs

    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    assert np.shares_memory(_take_rows(x, np.arange(6), np.float32), x)
    np.testing.assert_array_equal(_take_rows(x, np.array([4, 1]), np.float32), x[[4, 1]])
    sdata = dkan.datasets.toy(n_samples=1, grid_size=4, seed=0)
    dkan.tl.extract_features(sdata, "dummy", progress=False)
    adata = sdata.tables[K.TABLE]
    (inputs,), _ = build_inputs([sdata], list(adata.var_names[:5]), DKANConfig(), table_key=None, with_target=False)
    assert np.shares_memory(inputs.region.numpy(), results(sdata).obsm[K.REGION_FEATURES])  # (n, 25, D) held once
