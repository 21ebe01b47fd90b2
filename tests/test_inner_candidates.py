"""benchmarks/inner_candidates.py: blend arithmetic, the table, the report on toy data (no her2st, no training)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import benchmark_modules


@pytest.fixture(scope="module")
def ic():
    with benchmark_modules("inner_candidates") as (module,):
        yield module


def _noise(rng: np.random.Generator, like: np.ndarray) -> np.ndarray:
    return rng.normal(size=like.shape)


def test_only_trainable_candidates_are_offered(ic):
    assert set(ic.CANDIDATES) == {"default", "default_seed1", *ic.SHAPES}
    from dkan._config import DKANConfig

    for overrides in ic.CANDIDATES.values():  # every override is a real configuration field
        DKANConfig().replace(**overrides)
    with pytest.raises(SystemExit):
        ic.parse_args(["--cache", "c.h5ad", "--out", "o", "--train", "residual"])
    assert "d78595f" in ic.__doc__


def test_per_gene_pcc_matches_the_library_mean(ic):
    rng = np.random.default_rng(0)
    y = rng.normal(size=(40, 5))
    p = y + rng.normal(size=y.shape)
    p[:, 2] = 1.0  # constant prediction: NaN r, left out of the mean
    r = ic.per_gene_pcc(p, y)
    assert np.isnan(r[2]) and np.isfinite(np.delete(r, 2)).all()
    assert ic.mean_pcc(p, y) == pytest.approx(np.nanmean(r))


def test_seed_blends_are_the_stated_means(ic):
    rng = np.random.default_rng(1)
    y = rng.normal(size=(60, 4))
    rc, kn, d0, d1 = (y + s * _noise(rng, y) for s in (1.0, 1.5, 2.0, 3.0))
    probes = {"ridge_ctx": rc, "knn": kn}
    assert ic.seed_blends([], probes, y) == {"probes_mean": pytest.approx(ic.mean_pcc((rc + kn) / 2, y))}
    one = ic.seed_blends([d0], probes, y)
    assert one["blend3"] == pytest.approx(ic.mean_pcc((d0 + rc + kn) / 3, y))
    assert one["dkan0.25+probes"] == pytest.approx(ic.mean_pcc(0.25 * d0 + 0.375 * rc + 0.375 * kn, y))
    assert {f"dkan{w:.2f}+probes" for w in ic.SENSITIVITY} <= set(one)
    assert "ens2" not in one
    two = ic.seed_blends([d0, d1], probes, y)
    assert two["ens2"] == pytest.approx(ic.mean_pcc(d0 / 2 + d1 / 2, y))
    assert two["blend3_seed1"] == pytest.approx(ic.mean_pcc((d1 + rc + kn) / 3, y))
    assert two["blend3_ens2"] == pytest.approx(ic.mean_pcc(d0 / 6 + d1 / 6 + rc / 3 + kn / 3, y))
    assert two["ens2_blend_half"] == pytest.approx(ic.mean_pcc(d0 / 4 + d1 / 4 + rc / 2, y))
    assert two["blend3"] == one["blend3"]  # the first seed is `default`


def _own(rng, yu, dkan_right, probes_right):
    """Predictions of the own validation section u: exact where told, independent noise elsewhere."""
    du, pv, kv = _noise(rng, yu), _noise(rng, yu), _noise(rng, yu)
    du[:, dkan_right] = yu[:, dkan_right]
    for p in (pv, kv):
        p[:, probes_right] = yu[:, probes_right]
    return {"dkan": du, "ridge_ctx": pv, "knn": kv, "y": yu}


def test_default_blends_take_their_weights_from_the_own_section(ic):
    rng = np.random.default_rng(2)
    y, yu = rng.normal(size=(50, 4)), rng.normal(size=(70, 4))
    held, rc, kn = (y + s * _noise(rng, y) for s in (1.0, 0.7, 0.9))
    probes = {"ridge_ctx": rc, "knn": kn}
    assert ic.default_blends(held, probes, y, None) == {"blend_half": pytest.approx(ic.mean_pcc((held + rc) / 2, y))}

    # per gene: DKAN exact on genes 0-1 of u, the probes exact on genes 2-3 -> w = 1, 1, 0, 0
    row = ic.default_blends(held, probes, y, _own(rng, yu, [0, 1], [2, 3]))
    assert row["blend mean w"] == pytest.approx(0.5)
    picked = np.concatenate([held[:, :2], rc[:, 2:]], axis=1)
    assert row["blend"] == pytest.approx(ic.mean_pcc(picked, y))

    # DKAN exact on all of u: every global weight is 1 (DKAN alone)
    row = ic.default_blends(held, probes, y, _own(rng, yu, slice(None), []))
    assert row["blend_global w"] == row["blend_probes_global w"] == 1.0
    assert row["blend_global"] == row["blend_probes_global"] == pytest.approx(ic.mean_pcc(held, y))

    # the probes exact on all of u: weight 0 (the probe, or the probe ensemble)
    row = ic.default_blends(held, probes, y, _own(rng, yu, [], slice(None)))
    assert row["blend_global w"] == row["blend_probes_global w"] == row["blend mean w"] == 0.0
    assert row["blend_global"] == pytest.approx(ic.mean_pcc(rc, y))
    assert row["blend_probes_global"] == pytest.approx(ic.mean_pcc((rc + kn) / 2, y))


def test_table_counts_the_folds_above_the_best_probe(ic):
    rows = [
        {"fold (test)": "A", "v": "C", "ridge": 0.3, "ridge_ctx": 0.5, "knn": 0.4, "default": 0.6, "default s": 9.0,
         "blend_global": 0.45, "blend_global w": 0.3},
        {"fold (test)": "B", "v": "C", "ridge": 0.3, "ridge_ctx": 0.4, "knn": 0.5, "default": 0.45, "default s": 7.0,
         "blend_global": 0.55, "blend_global w": 0.7},
    ]  # fmt: skip
    lines = ic.table_text(rows).splitlines()
    assert "default: beats the best probe in 1/2 folds; mean 0.525 vs best-probe-per-fold mean 0.500" in lines
    assert "blend_global: beats the best probe in 1/2 folds; mean 0.500 vs best-probe-per-fold mean 0.500" in lines
    assert not [line for line in lines if line.startswith(("default s:", "blend_global w:", "ridge", "knn"))]
    mean_row = next(line for line in lines if line.lstrip().startswith("mean"))
    assert "0.525" in mean_row and "8.000" in mean_row


@pytest.fixture(scope="module")
def toy_env(ic):
    import dkan
    from dkan._config import DKANConfig

    sdata = dkan.datasets.toy(n_samples=5, grid_size=8, seed=0)
    cfg = DKANConfig.resolve("small", feature_encoder="dummy", n_genes=10)
    return ic.build_env(sdata, None, dkan.datasets.toy_gene_descriptions(), cfg)


def test_report_on_toy_never_reads_the_test_section(ic, toy_env, tmp_path, monkeypatch):
    inner = toy_env["inner"]
    names = [s.name for s in toy_env["samples"]]
    assert [f["test"] for f in inner] == [[n] for n in names]
    for f in inner:  # v and the inner-training sections: the fold's training sections, split
        assert sorted([f["held"], *f["train"]]) == [i for i, n in enumerate(names) if n not in f["test"]]

    rng = np.random.default_rng(3)
    for f in (0, 1):
        fs, _ = ic.fold_samples(toy_env, f)
        y = fs[inner[f]["held"]].target.numpy()
        own = ic.own_split(fs, inner[f]["train"], toy_env["cfg"])
        u = next(inner[f]["train"][k] for k, r in enumerate(own.val) if len(r))
        yu = fs[u].target.numpy()
        held = y if f == 0 else -y  # DKAN exact on v in fold 0, anti-correlated in fold 1
        np.savez(tmp_path / f"default_fold{f}.npz", held=held, seconds=5.0, own_val=yu, own_val_index=u)
    np.savez(tmp_path / "default_seed1_fold0.npz", held=_noise(rng, y), seconds=4.0)

    calls, current = [], {}
    samples, probe = ic.fold_samples, ic.probe_prediction

    def fold_samples(env, f):
        current["fold"] = f
        return samples(env, f)

    def recorded(name, fs, train, test):
        calls.append((current["fold"], {*train, test}))
        return probe(name, fs, train, test)

    import dkan._metrics

    heg_inputs, top_heg = [], dkan._metrics.top_heg

    def recorded_heg(labels, n):
        heg_inputs.append((current["fold"], labels))
        return top_heg(labels, n)

    monkeypatch.setattr(ic, "fold_samples", fold_samples)
    monkeypatch.setattr(ic, "probe_prediction", recorded)
    monkeypatch.setattr(dkan._metrics, "top_heg", recorded_heg)
    monkeypatch.setattr(ic, "N_HEG", 4)  # 4 of the toy panel's 10 genes
    args = ic.parse_args(["--cache", "unused", "--out", str(tmp_path), "--folds", "0,1"])
    text = ic.report(args, toy_env)

    assert [f for f, _ in calls] == [0] * 5 + [1] * 5  # three probes on v, ridge_ctx and knn on u
    assert all(names.index(inner[f]["test"][0]) not in seen for f, seen in calls)
    tables = json.loads((tmp_path / "inner_table.json").read_text())
    rows, heg_rows = tables["pcc_all"], tables["pcc_heg"]
    for f, labels in heg_inputs:  # HEG from the inner-training sections only: neither v nor the test section
        fs, _ = samples(toy_env, f)
        expected = [fs[i].target.numpy() for i in inner[f]["train"]]
        assert len(labels) == len(expected) and all(np.array_equal(a, b) for a, b in zip(labels, expected, strict=True))
    assert [f for f, _ in heg_inputs] == [0, 1]
    assert heg_rows[0]["default"] == pytest.approx(1.0) and heg_rows[1]["default"] == pytest.approx(-1.0)
    assert heg_rows[0]["ridge"] != rows[0]["ridge"]  # scored on a subset of the genes
    assert [r["fold (test)"] for r in rows] == names[:2]
    assert rows[0]["default"] == pytest.approx(1.0)
    assert rows[0]["blend_global w"] == 1.0  # DKAN exact on its own section too
    assert "ens2" in rows[0] and "ens2" not in rows[1]
    assert not [k for r in rows for k in r if "residual" in k]
    assert "default: beats the best probe in 1/2 folds" in text
    assert (tmp_path / "inner_table.txt").read_text() == text + "\n"


@pytest.fixture(scope="module")
def stain():
    with benchmark_modules("_candidate_inputs") as (module,):
        yield module


def test_od_jitter_is_the_identity_at_scale_one_and_darkens_with_a_larger_density(stain):
    image = np.random.default_rng(0).integers(0, 256, size=(3, 5, 4), dtype=np.uint8)
    same = stain.od_jitter(image, np.ones(3), np.zeros(3))
    np.testing.assert_allclose(same, image, atol=1e-3)
    darker = stain.od_jitter(image, np.full(3, 1.2), np.zeros(3))
    assert (darker <= same + 1e-3).all() and (darker[image < 250] < same[image < 250]).all()


def test_the_copy_of_the_held_out_section_neither_trains_nor_validates(stain):
    import dkan.train.data as data

    grids = [np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(-1, 2) for _ in range(3)]
    names = ["a", "b", "c"]
    function = data.make_validation_split
    own = function(names, grids, 0.3, strategy="sections", seed=0)
    with stain.split_with_copies(3):
        split = data.make_validation_split([*names, "a'", "b'", "c'"], grids * 2, 0.3, strategy="sections", seed=0)
    assert data.make_validation_split is function  # restored
    held = [k for k, v in enumerate(own.val) if len(v)]
    assert len(held) == 1
    for k in range(3):
        np.testing.assert_array_equal(split.train[k], own.train[k])
        np.testing.assert_array_equal(split.val[k], own.val[k])
        assert len(split.val[3 + k]) == 0
        assert len(split.train[3 + k]) == (0 if k in held else len(grids[k]))


def test_the_trainable_candidate_reads_the_patches_of_the_environment_s_samples(ic, toy_env):
    cfg = toy_env["cfg"].replace(**ic.CANDIDATES["trainable"])
    reader = ic.patch_reader(toy_env, cfg)
    a, b = reader(0, np.array([0, 1]), False), reader(1, np.array([0, 1]), False)
    assert a.shape == (2, 3, cfg.patch_size, cfg.patch_size)
    assert not np.allclose(a.numpy(), b.numpy())  # another section's spots
    np.testing.assert_array_equal(reader(0, np.array([1]), False).numpy(), a[1:].numpy())


def test_copies_train_on_their_originals_training_rows_under_a_block_split(stain):
    import dkan.train.data as data

    grids = [np.stack(np.meshgrid(np.arange(12), np.arange(12)), -1).reshape(-1, 2) for _ in range(2)]
    own = data.make_validation_split(["a", "b"], grids, 0.2, strategy="blocks", seed=0)
    with stain.split_with_copies(2):
        split = data.make_validation_split(["a", "b", "a'", "b'"], grids * 2, 0.2, strategy="blocks", seed=0)
    for k in range(2):
        assert len(own.val[k]) and len(own.train[k]) < len(grids[k])  # blocks held out of every section
        np.testing.assert_array_equal(split.train[2 + k], own.train[k])
        assert len(split.val[2 + k]) == 0


def test_candidate_val_moves_early_stopping_inside_the_inner_training_sections(ic, toy_env, tmp_path, monkeypatch):
    import dkan.train.fitting as fitting

    seen = []

    class Stop(Exception):
        pass

    def fit_inputs(samples, emb, cfg, dev, **kw):
        seen.append(([s.name for s in samples], cfg.val_split))
        raise Stop

    monkeypatch.setattr(fitting, "fit_inputs", fit_inputs)
    for extra, expected in (([], toy_env["cfg"].val_split), (["--candidate-val", "blocks"], "blocks")):
        args = ic.parse_args(["--cache", "x", "--out", str(tmp_path), "--train", "default", "--folds", "0", *extra])
        with pytest.raises(Stop):
            ic.train_candidate(args, toy_env)
        fold = toy_env["inner"][0]
        assert seen[-1] == ([toy_env["samples"][i].name for i in fold["train"]], expected)
