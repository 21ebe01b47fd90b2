"""Shared tiles on a finer grid (``shared_tiles=n``): region tiles within 1/(2n) tile of exact, passes counted."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import results
from test_shared_tiles import G, P, _sdata

import dkan
from dkan import _keys as K
from dkan._features.shared_tiles import gather, grid_step, snapped_tiles, tile_origins
from dkan._features.tile import window_origins


@pytest.mark.parametrize("n", [1, 2, 4])
def test_subdivided_grid_keeps_every_region_tile_within_half_a_step(n):
    rng = np.random.default_rng(n)
    spots = rng.uniform(100, 900, (300, 2))
    step = grid_step(P, n)
    idx = snapped_tiles(spots, tile_side=P, region_side=G * P, grid=G, step=step)
    origins = tile_origins(idx, step).reshape(len(spots), G, G, 2)  # (y0, x0)
    exact = window_origins(spots, G * P)[:, None, None, ::-1] + P * np.stack(
        np.meshgrid(np.arange(G), np.arange(G), indexing="ij"), axis=-1
    )
    off = np.abs(origins - exact)
    assert off.max() <= step / 2  # P divisible by n: integer steps, so no extra rounding
    assert off.max() > step / 2 - 1  # and the bound is reached: it is not trivially zero
    if n > 1:  # the coarser grid's worst case is larger
        coarse = tile_origins(snapped_tiles(spots, tile_side=P, region_side=G * P, grid=G), P).reshape(off.shape)
        assert np.abs(coarse - exact).max() > off.max()


def test_subdivide_is_checked():
    with pytest.raises(ValueError, match="subdivide"):
        grid_step(P, 0)
    sdata = _sdata()
    with pytest.raises(ValueError, match="shared_tiles"):
        dkan.tl.extract_features(sdata, "dummy", shared_tiles=1.5, device="cpu", progress=False)


def _count_passes(monkeypatch) -> list[int]:
    """Patch the encoder call of feature extraction to record how many images each call sees."""
    from dkan._features import encoding, extract

    seen: list[int] = []
    real = encoding.encode

    def counting(enc, x, *, amp, chunk):
        seen.append(len(x))
        return real(enc, x, amp=amp, chunk=chunk)

    monkeypatch.setattr(extract, "encode", counting)  # spot patches (imported at module level)
    monkeypatch.setattr(encoding, "encode", counting)  # shared grid tiles (imported when they are encoded)
    return seen


def test_finer_grid_matches_spot_by_spot_when_its_step_divides_the_spot_offsets(monkeypatch):
    sdata = _sdata(shift=P // 2)  # odd columns half a tile off the tile grid, on the half-tile grid
    dkan.tl.extract_features(sdata, "dummy", key_added="exact", device="cpu", progress=False)
    seen = _count_passes(monkeypatch)
    dkan.tl.extract_features(sdata, "dummy", key_added="half", shared_tiles=2, device="cpu", progress=False)
    dkan.tl.extract_features(sdata, "dummy", key_added="one", shared_tiles=True, device="cpu", progress=False)
    t = results(sdata)
    exact = t.obsm["exact_region"]
    half = gather(t.uns["half_region_tiles"], t.obsm["half_region_index"])
    one = gather(t.uns["one_region_tiles"], t.obsm["one_region_index"])
    np.testing.assert_allclose(half, exact, rtol=1e-5, atol=1e-5)  # every spot, shifted or not
    shifted = t.obs[K.ARRAY_COL].to_numpy() % 2 == 1
    assert not np.allclose(one[shifted], exact[shifted])  # the tile grid alone cannot serve them
    info = t.uns[K.UNS]["half"]
    assert info["subdivide"] == 2 and t.uns[K.UNS]["one"]["subdivide"] == 1
    idx = snapped_tiles(np.asarray(t.obsm[K.SPOT_PX]), tile_side=P, region_side=G * P, grid=G, step=P / 2)
    distinct = len(np.unique(idx[t.obsm["half_region_mask"]], axis=0))
    assert info["region_tiles_encoded"] == distinct == len(t.uns["half_region_tiles"])
    n_half = t.n_obs + distinct
    assert sum(seen) == n_half + t.n_obs + t.uns[K.UNS]["one"]["region_tiles_encoded"]  # passes: spots + tiles
    assert n_half < t.n_obs + int(t.obsm["exact_region_mask"].sum())  # fewer than spot by spot


def test_another_subdivision_recomputes_and_none_keeps_it():
    sdata = _sdata()
    dkan.tl.extract_features(sdata, "dummy", shared_tiles=2, device="cpu", progress=False)
    t = results(sdata)
    first = t.uns[K.REGION_TILES]
    dkan.tl.extract_features(sdata, "dummy", device="cpu", progress=False)  # None: keep what is stored
    dkan.tl.extract_features(sdata, "dummy", shared_tiles=2, device="cpu", progress=False)  # same: up to date
    assert t.uns[K.REGION_TILES] is first
    dkan.tl.extract_features(sdata, "dummy", shared_tiles=True, device="cpu", progress=False)
    assert t.uns[K.UNS][K.UNS_FEATURES]["subdivide"] == 1 and len(t.uns[K.REGION_TILES]) < len(first)
