from __future__ import annotations

import re
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from conftest import results
from matplotlib.collections import EllipseCollection
from matplotlib.colors import Normalize

from dkan import _keys as K
from dkan.pl._spatial import spatial_pred

GENE = "FN1"
RES = f"{K.TABLE}{K.RESULTS_SUFFIX}"  # dkan's results table of the toy table


@pytest.fixture
def pred_toy(toy):
    """The toy slides with a normalised target and a fake prediction (target + noise) in the results table."""
    from dkan._results import ensure_genes, results_table

    counts = toy.tables[K.TABLE]
    x = counts.X.toarray() if hasattr(counts.X, "toarray") else np.asarray(counts.X)
    rkey, _ = results_table(toy, create=True)
    adata = ensure_genes(toy, rkey, list(counts.var_names))
    target = np.log1p(x).astype(np.float32)
    rng = np.random.default_rng(1)
    adata.layers[K.TARGET] = target
    adata.layers[K.PRED] = (target + rng.normal(scale=0.8, size=target.shape)).astype(np.float32)
    yield toy
    plt.close("all")


def _panels(fig):
    return [a for a in fig.axes if a.images]


def _spots(ax) -> EllipseCollection:
    (coll,) = [c for c in ax.collections if isinstance(c, EllipseCollection)]
    return coll


def _rows(sdata, sample: str) -> np.ndarray:
    return np.flatnonzero(results(sdata).obs[K.SAMPLE].astype(str).to_numpy() == sample)


def _values(sdata, layer: str, sample: str) -> np.ndarray:
    adata = results(sdata)
    return np.asarray(adata.layers[layer][_rows(sdata, sample), adata.var_names.get_loc(GENE)], dtype=float)


def test_observed_and_predicted_side_by_side(pred_toy, tmp_path):
    out = tmp_path / "fn1.png"
    fig = spatial_pred(pred_toy, GENE, return_fig=True, save=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = _panels(fig)
    assert len(panels) == 2
    assert len(fig.axes) == 3  # two panels + one shared colour bar
    observed, predicted = panels
    assert "observed" in observed.get_title() and GENE in observed.get_title()
    assert "predicted" in predicted.get_title() and "PCC" in predicted.get_title()
    assert "s0" in predicted.get_title()  # the first sample by default

    obs_vals, pred_vals = _values(pred_toy, K.TARGET, "s0"), _values(pred_toy, K.PRED, "s0")
    np.testing.assert_allclose(_spots(observed).get_array(), obs_vals, rtol=1e-6)
    np.testing.assert_allclose(_spots(predicted).get_array(), pred_vals, rtol=1e-6)
    shown = float(re.search(r"PCC = (-?\d\.\d+)", predicted.get_title()).group(1))
    assert shown == pytest.approx(np.corrcoef(obs_vals, pred_vals)[0, 1], abs=5e-4)


def test_colour_scale_is_shared(pred_toy):
    fig = spatial_pred(pred_toy, GENE, return_fig=True)
    observed, predicted = (_spots(a) for a in _panels(fig))
    both = np.r_[_values(pred_toy, K.TARGET, "s0"), _values(pred_toy, K.PRED, "s0")]
    for coll in (observed, predicted):
        assert coll.norm.vmin == pytest.approx(both.min())
        assert coll.norm.vmax == pytest.approx(both.max())
    assert observed.norm is predicted.norm
    cbar_ax = next(a for a in fig.axes if not a.images)
    lo, hi = sorted(cbar_ax.get_ylim())
    assert (lo, hi) == (pytest.approx(both.min()), pytest.approx(both.max()))


def test_spots_sit_on_their_shapes(pred_toy):
    fig = spatial_pred(pred_toy, GENE, sample="s1", return_fig=True)
    coll = _spots(_panels(fig)[1])
    shapes = pred_toy.shapes["s1_spots"]
    ids = results(pred_toy).obs[K.INSTANCE].to_numpy()[_rows(pred_toy, "s1")]
    centres = np.c_[shapes.geometry.x, shapes.geometry.y][shapes.index.get_indexer(ids)]
    np.testing.assert_allclose(coll.get_offsets(), centres)  # toy: Identity transformations
    np.testing.assert_allclose(coll.get_widths(), 2 * shapes["radius"].to_numpy()[shapes.index.get_indexer(ids)])


def test_predicted_only_without_target(pred_toy):
    del results(pred_toy).layers[K.TARGET]
    fig = spatial_pred(pred_toy, GENE, return_fig=True)
    panels = _panels(fig)
    assert len(panels) == 1
    assert "predicted" in panels[0].get_title() and "PCC" not in panels[0].get_title()


def test_predicted_only_when_target_all_nan(pred_toy):
    results(pred_toy).layers[K.TARGET][:] = np.nan
    fig = spatial_pred(pred_toy, GENE, return_fig=True)
    assert len(_panels(fig)) == 1


def test_several_samples_make_rows(pred_toy):
    fig = spatial_pred(pred_toy, GENE, sample=["s0", "s2"], return_fig=True)
    fig.canvas.draw()
    panels = _panels(fig)
    assert len(panels) == 4
    assert [a.get_title().split(":")[0] for a in panels] == ["s0", "s0", "s2", "s2"]
    y_first, y_second = panels[0].get_position().y0, panels[2].get_position().y0
    assert y_first > y_second  # s2 is the row below s0
    assert panels[0].get_position().x0 < panels[1].get_position().x0
    for a in panels[1::2]:
        assert "PCC" in a.get_title()
    norms = {id(_spots(a).norm) for a in panels}
    assert len(norms) == 1


def test_user_axes_and_vmax(pred_toy):
    _, axes = plt.subplots(1, 2)
    assert spatial_pred(pred_toy, GENE, ax=axes, vmin=0.0, vmax=2.0) is None
    assert _spots(axes[0]).norm.vmax == 2.0 and _spots(axes[1]).norm.vmin == 0.0
    with pytest.raises(ValueError, match="`ax` must hold 2 axes"):
        spatial_pred(pred_toy, GENE, ax=axes[0])


def test_errors(pred_toy):
    with pytest.raises(KeyError, match="FN1"):
        spatial_pred(pred_toy, "FN2")
    with pytest.raises(KeyError, match="sample"):
        spatial_pred(pred_toy, GENE, sample="nope")
    with pytest.raises(KeyError, match=r"dkan\.tl\.predict"):
        spatial_pred(pred_toy, GENE, pred_layer="other")
    results(pred_toy).layers[K.PRED][:, 0] = np.nan
    with pytest.raises(ValueError, match="outside the model's panel"):
        spatial_pred(pred_toy, str(results(pred_toy).var_names[0]))


def test_spatialdata_plot_renders_the_pred_layer(pred_toy):
    pytest.importorskip("spatialdata_plot", reason="spatialdata-plot is the optional extra `dkan[plot]`")

    _, ax = plt.subplots()
    pred_toy.pl.render_images("s0_image").pl.render_shapes(
        "s0_spots", color=GENE, table_name=RES, table_layer=K.PRED
    ).pl.show(coordinate_systems="s0", ax=ax)
    assert ax.images
    (coll,) = ax.collections
    # spatialdata-plot colours the shapes (in shapes order) by the layer's values on a min-max scale
    values = _values(pred_toy, K.PRED, "s0")
    ids = results(pred_toy).obs[K.INSTANCE].to_numpy()[_rows(pred_toy, "s0")]
    values = values[pd.Index(ids).get_indexer(pred_toy.shapes["s0_spots"].index)]
    expected = plt.get_cmap("viridis")(Normalize(values.min(), values.max())(values))
    np.testing.assert_allclose(coll.get_facecolors(), expected, atol=1e-6)


def test_squidpy_spatial_scatter_on_legacy_anndata(pred_toy, tmp_path):
    sq = pytest.importorskip("squidpy", reason="squidpy is the optional extra `dkan[svg]`")
    pytest.importorskip("spatialdata_io", reason="spatialdata-io is the optional extra `dkan[io]`")
    from spatialdata_io.experimental import to_legacy_anndata

    legacy = to_legacy_anndata(pred_toy, coordinate_system="s0", table_name=RES, include_images=True)
    assert K.PRED in legacy.layers
    library_id = next(iter(legacy.uns["spatial"]))
    sq.pl.spatial_scatter(legacy, color=GENE, layer=K.PRED, library_id=library_id, save=None)
    fig = plt.gcf()
    ax = next(a for a in fig.axes if a.images)
    (coll,) = [c for c in ax.collections if c.get_array() is not None]
    expected = np.asarray(legacy.layers[K.PRED][:, legacy.var_names.get_loc(GENE)], dtype=float)
    assert np.sort(np.asarray(coll.get_array(), dtype=float)) == pytest.approx(np.sort(expected), rel=1e-5)
    assert np.sort(expected) == pytest.approx(np.sort(_values(pred_toy, K.PRED, "s0")), rel=1e-6)
    fig.savefig(tmp_path / "sq.png")
    assert (tmp_path / "sq.png").stat().st_size > 0


def test_colour_scale_per_panel(pred_toy):
    """Issue 16: ``scale="panel"`` gives each panel the range of its own values and its own colour bar."""
    adata = results(pred_toy)
    adata.layers[K.PRED] = (0.1 * adata.layers[K.PRED]).astype(np.float32)  # a weak prediction: narrow range
    fig = spatial_pred(pred_toy, GENE, scale="panel", return_fig=True)
    observed, predicted = (_spots(a) for a in _panels(fig))
    for coll, layer in ((observed, K.TARGET), (predicted, K.PRED)):
        vals = _values(pred_toy, layer, "s0")
        assert (coll.norm.vmin, coll.norm.vmax) == (pytest.approx(vals.min()), pytest.approx(vals.max()))
    assert observed.norm is not predicted.norm
    assert len(fig.axes) == 4  # two panels, two colour bars
    shared = spatial_pred(pred_toy, GENE, return_fig=True)  # the default stays one shared scale
    assert len(shared.axes) == 3
    with pytest.raises(ValueError, match="`scale='row'`"):
        spatial_pred(pred_toy, GENE, scale="row")


def test_same_colours_as_spatialdata_plot(pred_toy):
    """Issue 15: dkan's panels colour each spot as spatialdata-plot does with the same layer, cmap and norm."""
    pytest.importorskip("spatialdata_plot", reason="spatialdata-plot is the optional extra `dkan[plot]`")
    fig = spatial_pred(pred_toy, GENE, return_fig=True)
    fig.canvas.draw()
    ids = results(pred_toy).obs[K.INSTANCE].to_numpy()[_rows(pred_toy, "s0")]
    to_table_order = pd.Index(pred_toy.shapes["s0_spots"].index).get_indexer(ids)
    for panel, layer in zip(_panels(fig), (K.TARGET, K.PRED), strict=True):
        ours = _spots(panel)
        _, ax = plt.subplots()
        pred_toy.pl.render_images("s0_image").pl.render_shapes(
            "s0_spots", color=GENE, table_name=RES, table_layer=layer, cmap="viridis", norm=ours.norm
        ).pl.show(coordinate_systems="s0", ax=ax, colorbar=False)
        (theirs,) = ax.collections
        assert (theirs.norm.vmin, theirs.norm.vmax) == (ours.norm.vmin, ours.norm.vmax)
        np.testing.assert_allclose(theirs.get_facecolors()[to_table_order], ours.get_facecolors(), atol=1e-6)


def test_drawn_without_spatialdata_plot(pred_toy, monkeypatch):
    """Issue 15: ``spatial_pred`` draws with matplotlib alone; the optional extra `dkan[plot]` is not needed."""
    monkeypatch.setitem(sys.modules, "spatialdata_plot", None)  # any import of it now raises ImportError
    fig = spatial_pred(pred_toy, GENE, sample=["s0", "s1"], show_std=False, return_fig=True)
    assert [a.get_title().split("\n")[0] for a in _panels(fig)] == [
        f"{s}: {GENE} {kind}" for s in ("s0", "s1") for kind in ("observed", "predicted")
    ]
    both = np.r_[[_values(pred_toy, layer, s) for s in ("s0", "s1") for layer in (K.TARGET, K.PRED)]]
    for a in _panels(fig):
        assert (_spots(a).norm.vmin, _spots(a).norm.vmax) == (pytest.approx(both.min()), pytest.approx(both.max()))
