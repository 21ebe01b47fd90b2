"""embed_genes: the varm / uns contract, idempotence, refusal to overwrite, bad input, real-data semantics."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import data_path, results
from test_text_encoders import _tiny_bert

import dkan
from dkan import _keys as K
from dkan._genetext import embed as _embed_genes
from dkan._genetext.describe import describe_genes
from dkan._genetext.embed import embed_genes
from dkan._utils import uns_get

GENES = ["KRT5", "ERBB2", "IGKC", "XYZ1"]
DESCRIPTIONS = {"KRT5": "keratin filament .", "ERBB2": "receptor tyrosine kinase .", "IGKC": "immunoglobulin ."}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(_tiny_bert(tmp_path_factory.mktemp("tiny_a")))


@pytest.fixture(scope="module")
def tiny_other(tmp_path_factory):
    return str(_tiny_bert(tmp_path_factory.mktemp("tiny_b"), seed=1))


def _adata(genes=GENES) -> ad.AnnData:
    return ad.AnnData(np.ones((3, len(genes)), dtype=np.float32), var=pd.DataFrame(index=genes))


def _no_encoder(*args, **kwargs):
    raise AssertionError("the encoder should not be built again")


def test_varm_and_uns_contract(tiny):
    adata = _adata()
    embed_genes(adata, descriptions=DESCRIPTIONS, text_encoder=tiny, pooling="sep", device="cpu")
    emb = adata.varm[K.GENE_EMBEDDING]
    assert emb.shape == (4, 16) and emb.dtype == np.float32 and np.isfinite(emb).all()
    meta = uns_get(adata, K.UNS_GENE_EMBEDDING)
    assert meta["encoder"] == tiny and meta["pooling"] == "sep" and meta["dim"] == 16
    assert len(meta["weights_hash"]) == 16 and meta["key_added"] == K.GENE_EMBEDDING
    assert meta["source"] == ["summary", "summary", "summary", "symbol"]
    assert meta["source_counts"] == {"summary": 3, "symbol": 1}
    assert len(meta["text_sha1"]) == 4 and len(set(meta["text_sha1"])) == 4
    # rows follow var_names: the row of a gene equals the encoding of its own text
    from dkan.nn.text_encoders import create_text_encoder

    enc = create_text_encoder(tiny, pooling="sep", device="cpu")
    np.testing.assert_allclose(emb[1], enc.encode([DESCRIPTIONS["ERBB2"]])[0], atol=1e-5)
    np.testing.assert_allclose(emb[3], enc.encode(["XYZ1"])[0], atol=1e-5)


def test_idempotent_no_recompute(tiny, monkeypatch, caplog, tmp_path):
    adata = _adata()
    embed_genes(adata, descriptions=DESCRIPTIONS, text_encoder=tiny, device="cpu")
    before = adata.varm[K.GENE_EMBEDDING].copy()
    monkeypatch.setattr(_embed_genes, "_create", _no_encoder)
    with caplog.at_level(logging.INFO, logger="dkan"):
        embed_genes(adata, descriptions=DESCRIPTIONS, text_encoder=tiny, device="cpu")
    assert "up to date" in caplog.text
    np.testing.assert_array_equal(adata.varm[K.GENE_EMBEDDING], before)
    # provenance survives a round trip through h5ad, and the check still holds
    adata.write_h5ad(tmp_path / "t.h5ad")
    back = ad.read_h5ad(tmp_path / "t.h5ad")
    embed_genes(back, descriptions=DESCRIPTIONS, text_encoder=tiny, device="cpu")
    # changed texts -> recompute
    monkeypatch.undo()
    embed_genes(adata, descriptions=DESCRIPTIONS | {"IGKC": "antibody light chain ."}, text_encoder=tiny, device="cpu")
    after = adata.varm[K.GENE_EMBEDDING]
    assert not np.allclose(after[2], before[2]) and np.allclose(after[0], before[0], atol=1e-5)


def test_refuses_other_encoder_unless_overwrite(tiny, tiny_other):
    adata = _adata()
    embed_genes(adata, descriptions=DESCRIPTIONS, text_encoder=tiny, device="cpu")
    with pytest.raises(ValueError, match=r"another text encoder.*overwrite=True"):
        embed_genes(adata, descriptions=DESCRIPTIONS, text_encoder=tiny_other, device="cpu")
    with pytest.raises(ValueError, match="pooling 'mean' vs 'cls'"):
        embed_genes(adata, descriptions=DESCRIPTIONS, text_encoder=tiny, pooling="cls", device="cpu")
    embed_genes(adata, descriptions=DESCRIPTIONS, text_encoder=tiny_other, overwrite=True, device="cpu")
    assert uns_get(adata, K.UNS_GENE_EMBEDDING)["encoder"] == tiny_other
    # a second key keeps both
    embed_genes(adata, descriptions=DESCRIPTIONS, text_encoder=tiny, key_added="alt", device="cpu")
    assert {"alt", K.GENE_EMBEDDING} <= set(adata.varm)
    assert uns_get(adata, f"{K.UNS_GENE_EMBEDDING}_alt")["encoder"] == tiny


def test_same_name_other_weights_detected(tmp_path):
    folder = _tiny_bert(tmp_path / "m", seed=0)
    adata = _adata()
    embed_genes(adata, descriptions=DESCRIPTIONS, text_encoder=str(folder), device="cpu")
    _tiny_bert(folder, seed=2)  # new weights under the same path
    with pytest.raises(ValueError, match="weights"):
        embed_genes(adata, descriptions=DESCRIPTIONS | {"KRT5": "new text ."}, text_encoder=str(folder), device="cpu")


def test_description_inputs(tiny, tmp_path, caplog):
    adata = _adata()
    with caplog.at_level(logging.WARNING, logger="dkan"):
        embed_genes(adata, text_encoder=tiny, device="cpu")
    assert "No gene descriptions given" in caplog.text and "descriptions=" in caplog.text
    assert uns_get(adata, K.UNS_GENE_EMBEDDING)["source"] == ["symbol"] * 4
    # a file, with gene_info options passed through
    path = tmp_path / "d.tsv"
    path.write_text("symbol\tsummary\n" + "".join(f"{k}\t{v}\n" for k, v in DESCRIPTIONS.items()))
    embed_genes(adata, descriptions=path, text_encoder=tiny, device="cpu")
    assert uns_get(adata, K.UNS_GENE_EMBEDDING)["source"] == ["summary"] * 3 + ["symbol"]
    # a describe_genes frame that misses a gene
    frame = describe_genes(["KRT5", "IGKC"], source=DESCRIPTIONS)
    embed_genes(adata, descriptions=frame, text_encoder=tiny, device="cpu")
    assert uns_get(adata, K.UNS_GENE_EMBEDDING)["source"] == ["summary", "symbol", "summary", "symbol"]


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_bad_input(tiny, tmp_path):
    with pytest.raises(KeyError, match="not a registered text encoder"):
        embed_genes(_adata(), text_encoder="no_such_encoder")
    with pytest.raises(ValueError, match="no genes"):
        embed_genes(_adata([]), text_encoder=tiny)
    dup = ad.AnnData(np.ones((2, 2), dtype=np.float32), var=pd.DataFrame(index=["A", "A"]))
    with pytest.raises(ValueError, match=r"duplicated gene names \['A'\].*var_names_make_unique"):
        embed_genes(dup, text_encoder=tiny)
    bad = tmp_path / "bad.csv"
    bad.write_text("gene_id,value\nKRT5,3\n")
    with pytest.raises(ValueError, match=r"bad\.csv lacks"):
        embed_genes(_adata(), descriptions=bad, text_encoder=tiny)
    with pytest.raises(ValueError, match="'text' column"):
        embed_genes(_adata(), descriptions=pd.DataFrame({"x": [1]}, index=["KRT5"]), text_encoder=tiny)
    with pytest.raises(TypeError, match="`descriptions` must be"):
        embed_genes(_adata(), descriptions=42, text_encoder=tiny)
    with pytest.raises(TypeError, match="`sdata` must be"):
        embed_genes(np.zeros(3), text_encoder=tiny)


def test_spatialdata_input(tiny):
    sdata = dkan.datasets.toy(n_samples=1, grid_size=2, n_genes=6, seed=0)
    embed_genes(sdata, descriptions=DESCRIPTIONS, text_encoder=tiny, device="cpu")
    table = results(sdata)  # the results table; without a panel, every gene
    assert K.GENE_EMBEDDING not in sdata.tables[K.TABLE].varm
    assert table.varm[K.GENE_EMBEDDING].shape == (6, 16)
    assert uns_get(table, K.UNS_GENE_EMBEDDING)["source"].count("summary") == len(
        set(table.var_names) & set(DESCRIPTIONS)
    )


def test_spatialdata_input_embeds_the_panel_by_default(tiny):
    sdata = dkan.datasets.toy(n_samples=1, grid_size=4, n_genes=12, seed=0)
    dkan.pp.select_genes(sdata, n_genes=3)
    embed_genes(sdata, descriptions=DESCRIPTIONS, text_encoder=tiny, device="cpu")
    res = results(sdata)
    panel = list(sdata.tables[K.TABLE].uns[K.UNS][K.UNS_PANEL]["genes"])
    assert list(res.var_names) == panel and res.varm[K.GENE_EMBEDDING].shape == (3, 16)
    assert np.isfinite(res.varm[K.GENE_EMBEDDING]).all()


def test_real_refseq_keratins_cluster():
    table = data_path("gene_text", "human_refseq_summaries_by_symbol.tsv.gz")
    info = data_path("gene_text", "Homo_sapiens.gene_info.gz")
    genes = ["KRT5", "KRT14", "KRT17", "IGKC", "IGHG1"]
    adata = _adata(genes)
    embed_genes(adata, descriptions=table, describe_kwargs={"gene_info": info}, device="cpu")
    meta = uns_get(adata, K.UNS_GENE_EMBEDDING)
    assert meta["encoder"] == "minilm" and meta["dim"] == 384 and meta["source"][:3] == ["summary"] * 3
    e = adata.varm[K.GENE_EMBEDDING]
    cos = e @ e.T  # MiniLM vectors are unit length
    keratin = [cos[i, j] for i in range(3) for j in range(3) if i < j]
    cross = [cos[i, j] for i in range(3) for j in (3, 4)]
    assert min(keratin) > max(cross) + 0.1, (keratin, cross)


def test_subset_of_genes_leaves_nan_rows_and_reruns_on_change(tiny):
    adata = _adata()
    embed_genes(adata, descriptions=DESCRIPTIONS, text_encoder=tiny, device="cpu", genes=["ERBB2", "KRT5"])
    emb = adata.varm[K.GENE_EMBEDDING]
    assert np.isfinite(emb[[0, 1]]).all() and np.isnan(emb[[2, 3]]).all()
    meta = uns_get(adata, K.UNS_GENE_EMBEDDING)
    assert meta["genes"] == ["ERBB2", "KRT5"] and meta["source"] == ["summary", "summary"]
    full = _adata()
    embed_genes(full, descriptions=DESCRIPTIONS, text_encoder=tiny, device="cpu")
    np.testing.assert_allclose(emb[[0, 1]], full.varm[K.GENE_EMBEDDING][[0, 1]], atol=1e-5)
    # another subset is not "up to date": the new genes get their rows
    embed_genes(adata, descriptions=DESCRIPTIONS, text_encoder=tiny, device="cpu", genes=["IGKC"])
    assert np.isfinite(adata.varm[K.GENE_EMBEDDING][2]).all()
    with pytest.raises(KeyError, match="not in `var_names`"):
        embed_genes(adata, descriptions=DESCRIPTIONS, text_encoder=tiny, device="cpu", genes=["NOPE"])
