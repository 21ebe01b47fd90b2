"""Issue 16: options the log recommends exist (gene_info=, gene_symbols=), --set keys get a "did you mean" before
the store is read, and progress=False hides the weight-loading and text-encoding bars."""

import gzip

import anndata as ad
import pandas as pd
import pytest
from conftest import results

import dkan
from dkan import _keys as K
from dkan.cli import main
from dkan.datasets import copy_sdata

HEADER = "#tax_id\tGeneID\tSymbol\tLocusTag\tSynonyms\tdbXrefs\tchromosome\tmap_location\tdescription\ttype_of_gene"


def _gene_info(path, genes):
    rows = [f"9606\t{i}\t{g}\t-\t-\t-\t1\t1p1\t{g.lower()} full name\tprotein-coding" for i, g in enumerate(genes)]
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join([HEADER, *rows]) + "\n")
    return path


def _with_ensembl_names(sdata):
    table = sdata.tables[K.TABLE]
    table.var["gene_symbols"] = list(table.var_names)
    table.var_names = [f"ENSG{i:011d}" for i in range(table.n_vars)]
    return sdata


def test_unknown_set_key_gets_did_you_mean_before_the_store_is_read(tmp_path, capsys):
    missing_store = tmp_path / "absent.zarr"  # not read: the key is checked first
    code = main(["train", str(missing_store), "--out", str(tmp_path / "m"), "--set", "max_epoch=3"])
    err = capsys.readouterr().err
    assert code == 1
    assert "max_epoch" in err and "did you mean `max_epochs`" in err and "does not exist" not in err


def test_cli_train_accepts_gene_info_and_gene_symbols():
    from dkan.cli import build_parser

    args = build_parser().parse_args(
        ["train", "s.zarr", "--out", "m", "--gene-info", "gi.gz", "--gene-symbols", "gene_symbols"]
    )
    assert str(args.gene_info) == "gi.gz" and args.gene_symbols == "gene_symbols"
    args = build_parser().parse_args(["predict", "s.zarr", "--model", "m", "--out", "o", "--gene-symbols", "sym"])
    assert args.gene_symbols == "sym"


def test_select_genes_with_a_symbol_column(toy):
    sdata = _with_ensembl_names(toy)
    table = sdata.tables[K.TABLE]
    ids = list(table.var_names)
    dkan.pp.select_genes(sdata, n_genes=8, gene_symbols="gene_symbols")
    assert list(table.var_names) == ids
    panel = table.uns[K.UNS][K.UNS_PANEL]["genes"]
    assert len(panel) == 8 and set(panel) <= set(table.var["gene_symbols"])
    assert set(table.var.loc[table.var[K.PANEL], "gene_symbols"]) == set(panel)


def test_train_with_gene_info_and_gene_symbols_quietly(toy_master, tmp_path, capsys, caplog):
    sdata = _with_ensembl_names(copy_sdata(toy_master))
    table = sdata.tables[K.TABLE]
    ids = list(table.var_names)
    info = _gene_info(tmp_path / "gene_info.gz", list(table.var["gene_symbols"]))
    capsys.readouterr()
    model = dkan.tl.train(
        sdata,
        config="small",
        gene_info=info,
        gene_symbols="gene_symbols",
        progress=False,
        max_epochs=1,
        feature_encoder="dummy",
    )
    err = capsys.readouterr().err
    assert list(table.var_names) == ids  # the user's names come back
    assert set(model.genes) <= set(table.var["gene_symbols"])  # the model speaks symbols
    sources = results(sdata).uns[K.UNS][K.UNS_GENE_EMBEDDING]["source_counts"]
    assert sources.get("full_name", 0) > 0, sources  # gene_info reached describe_genes
    assert "Loading weights" not in err and "Encoding texts" not in err, err[-500:]


def test_gene_embeddings_pass_progress_to_the_encoder(capsys):
    from dkan._data.prepare import gene_embeddings

    sdata = dkan.datasets.toy(n_samples=1, grid_size=2, seed=0)
    genes = list(sdata.tables[K.TABLE].var_names)
    capsys.readouterr()
    gene_embeddings(sdata, genes, table_key=None, text_encoder="minilm", descriptions=None, progress=False)
    err = capsys.readouterr().err
    assert "Encoding texts" not in err and "Loading weights" not in err, err[-500:]


def test_train_warns_on_ensembl_names(caplog):
    from dkan._data.training import _warn_ensembl

    table = ad.AnnData(var=pd.DataFrame(index=["ENSG00000141510", "ENSMUSG00000059552", "ENSG00000146648.3"]))
    with caplog.at_level("WARNING", logger="dkan"):
        _warn_ensembl(table)
    assert "Ensembl ids" in caplog.text and "gene_symbols=" in caplog.text


@pytest.mark.parametrize("bad", [3, ["a"]])
def test_gene_symbols_must_name_a_column(toy, bad):
    with pytest.raises((TypeError, KeyError), match="gene_symbols"):
        dkan.pp.select_genes(toy, n_genes=4, gene_symbols=bad)


def test_description_warning_names_options_that_exist(caplog):
    import inspect

    from dkan.cli import build_parser

    with caplog.at_level("WARNING", logger="dkan"):
        dkan.tl.describe_genes(["NOTAGENE1"])
    text = caplog.text
    assert "`gene_info=` of `train`" in text and "`--gene-info` of `dkan train`" in text
    assert "gene_info" in inspect.signature(dkan.tl.train).parameters
    assert "gene_info" in inspect.signature(dkan.tl.describe_genes).parameters
    args = build_parser().parse_args(["train", "s.zarr", "--out", "m", "--descriptions", "d.tsv", "--gene-info", "g"])
    assert args.descriptions == "d.tsv" and str(args.gene_info) == "g"


def test_missing_description_warning_says_gene_info_full_names_are_used(tmp_path, caplog):
    from dkan._genetext.embed import gene_texts

    info = _gene_info(tmp_path / "gene_info.gz", ["KRT5"])
    with caplog.at_level("WARNING", logger="dkan"):
        texts = gene_texts(["KRT5"], None, describe_kwargs={"gene_info": info})
    assert texts.loc["KRT5", "source"] == "full_name"
    assert "each gene's text is its full name from `gene_info`" in caplog.text
