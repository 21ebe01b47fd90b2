"""describe_genes: mapping and file sources, synonym resolution, fallbacks, bad input."""

from __future__ import annotations

import gzip
import logging

import pytest
from conftest import data_path

from dkan._genetext.describe import describe_genes, read_gene_info, read_text_table

GENE_INFO_HEADER = (
    "#tax_id\tGeneID\tSymbol\tLocusTag\tSynonyms\tdbXrefs\tchromosome\tmap_location\tdescription\ttype_of_gene\t"
    "Symbol_from_nomenclature_authority\tFull_name_from_nomenclature_authority\tNomenclature_status\t"
    "Other_designations\tModification_date\tFeature_type"
)
GENE_INFO_ROWS = [
    (
        "2064",
        "ERBB2",
        "HER2|NEU|CD340",
        "MIM:164870|HGNC:HGNC:3430|Ensembl:ENSG00000141736",
        "17q12",
        "erb-b2 receptor tyrosine kinase 2",
    ),
    ("3852", "KRT5", "EBS2|KRT5A", "Ensembl:ENSG00000186081", "12q13.13", "keratin 5"),
    ("3514", "IGKC", "HCAK1|IGKCD", "-", "2p11.2", "immunoglobulin kappa constant"),
    ("151176", "ERFE", "FAM132B|myonectin", "-", "2q37.3", "erythroferrone"),
    ("10001", "AMB1", "SHARED", "-", "1p1", "ambiguous one"),
    ("10002", "AMB2", "SHARED", "-", "1p2", "-"),
    ("284161", "HID1", "DMC1|C17orf28", "-", "17q25.1", "HID1 domain containing"),
    ("11144", "DMC1", "DMC1H|LIM15", "-", "22q13.1", "DNA meiotic recombinase 1"),
]


def _write_gene_info(path, rows=GENE_INFO_ROWS, header=GENE_INFO_HEADER):
    lines = [header]
    for gid, sym, syn, xrefs, loc, name in rows:
        lines.append(
            f"9606\t{gid}\t{sym}\t-\t{syn}\t{xrefs}\t1\t{loc}\t{name}\tprotein-coding\t{sym}\t{name}\tO\t-\t0\t-"
        )
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


@pytest.fixture
def gene_info(tmp_path):
    return _write_gene_info(tmp_path / "gene_info.gz")


@pytest.fixture
def summaries(tmp_path):
    p = tmp_path / "summaries.tsv"
    p.write_text(
        "symbol\tGene_ID\tReview_status\tGene_summary\n"
        "ERBB2\t2064\tREVIEWED\tThis gene encodes a receptor tyrosine kinase.\n"
        "FAM132B\t151176\tVALIDATED\tOld-symbol row: a hormone regulating iron.\n"
        'KRT5\t3852\tREVIEWED\tType II keratin with a "quoted" word.\n'
        "EMPTY\t1\tREVIEWED\t\n"
        "DMC1\t11144\tREVIEWED\tMeiotic recombination protein.\n"
    )
    return p


def test_mapping_source_and_order():
    df = describe_genes(["B", "A"], source={"A": "text a", "B": "text b", "C": "unused"})
    assert df.index.tolist() == ["B", "A"] and df.index.name == "gene"
    assert df.columns.tolist() == ["text", "source", "resolved_symbol"]
    assert df["text"].tolist() == ["text b", "text a"]
    assert set(df["source"]) == {"summary"}


def test_symbol_fallback_counted_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="dkan"):
        df = describe_genes(["A", "ZZZ", "YYY"], source={"A": "text a", "ZZZ": "  "})
    assert df["source"].tolist() == ["summary", "symbol", "symbol"]
    assert df.loc["ZZZ", "text"] == "ZZZ" and df.loc["ZZZ", "resolved_symbol"] == ""
    assert "2 of 3 genes have no description" in caplog.text and "ZZZ, YYY" in caplog.text


def test_symbol_source_default():
    df = describe_genes(["ERBB2", "KRT5"])
    assert df["text"].tolist() == ["ERBB2", "KRT5"] and set(df["source"]) == {"symbol"}


def test_tsv_file_autodetect(summaries):
    df = describe_genes(["KRT5", "ERBB2", "EMPTY"], source=summaries)
    assert df.loc["ERBB2", "text"] == "This gene encodes a receptor tyrosine kinase."
    assert df.loc["KRT5", "text"] == 'Type II keratin with a "quoted" word.'
    assert df.loc["EMPTY", "source"] == "symbol"  # empty summary is no summary


def test_csv_explicit_columns_and_headerless(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text('id,blurb\nKRT5,"keratin, type II"\n')
    assert describe_genes(["KRT5"], source=csv, symbol_column="id", text_column="blurb")["text"].iloc[0] == (
        "keratin, type II"
    )
    txt = tmp_path / "paper_style.txt"
    txt.write_text("ERBB2\tgene symbol: ERBB2. Functionality: kinase.\nKRT5\tgene symbol: KRT5.\n")
    assert read_text_table(txt) == {"ERBB2": "gene symbol: ERBB2. Functionality: kinase.", "KRT5": "gene symbol: KRT5."}


def test_synonym_and_old_symbol_resolution(summaries, gene_info):
    genes = ["HER2", "ERFE", "ENSG00000186081", "IGKC", "HID1", "SHARED", "NOPE"]
    df = describe_genes(genes, source=summaries, gene_info=gene_info)
    # synonym -> official symbol present in the table
    assert df.loc["HER2", ["source", "resolved_symbol"]].tolist() == ["summary", "ERBB2"]
    assert df.loc["HER2", "text"].startswith("This gene encodes a receptor")
    # official symbol whose summary the table keeps under an older symbol
    assert df.loc["ERFE", ["source", "resolved_symbol"]].tolist() == ["summary", "FAM132B"]
    # Ensembl id through dbXrefs
    assert df.loc["ENSG00000186081", "resolved_symbol"] == "KRT5"
    # no summary -> full name
    assert df.loc["IGKC", ["text", "source"]].tolist() == ["IGKC: immunoglobulin kappa constant", "full_name"]
    # a synonym that is another gene's official symbol is not used: full name instead of DMC1's summary
    assert df.loc["HID1", ["text", "source"]].tolist() == ["HID1: HID1 domain containing", "full_name"]
    # ambiguous synonym and unknown symbol -> symbol only
    assert df.loc["SHARED", "source"] == "symbol" and df.loc["NOPE", "source"] == "symbol"


def test_gene_info_alone_gives_full_names(gene_info):
    df = describe_genes(["KRT5", "NEU"], gene_info=gene_info)
    assert df["text"].tolist() == ["KRT5: keratin 5", "NEU: erb-b2 receptor tyrosine kinase 2"]
    assert df["resolved_symbol"].tolist() == ["KRT5", "ERBB2"]


def test_read_gene_info_fields(gene_info):
    info = read_gene_info(gene_info)
    assert info.official["ERBB2"]["map_location"] == "17q12"
    assert info.resolve("NEU") == ["ERBB2"] and sorted(info.resolve("SHARED")) == ["AMB1", "AMB2"]
    assert info.official["AMB2"]["full_name"] == ""


@pytest.mark.parametrize("genes", [[], ()])
def test_empty_genes(genes):
    with pytest.raises(ValueError, match="`genes` is empty"):
        describe_genes(genes)


def test_duplicate_genes():
    with pytest.raises(ValueError, match=r"duplicated symbols \['A'\]"):
        describe_genes(["A", "B", "A"])
    with pytest.raises(TypeError, match="single string"):
        describe_genes("KRT5")


def test_malformed_table_file(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("symbol\tfoo\tbar\nKRT5\t1\t2\n")
    with pytest.raises(ValueError, match=r"bad\.tsv lacks a text column"):
        describe_genes(["KRT5"], source=bad)
    with pytest.raises(ValueError, match=r"lacks text column 'nope'"):
        describe_genes(["KRT5"], source=bad, text_column="nope")
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.tsv"):
        describe_genes(["KRT5"], source=empty)
    with pytest.raises(ValueError, match="neither 'symbol', 'ncbi' nor an existing file"):
        describe_genes(["KRT5"], source=tmp_path / "missing.tsv")
    with pytest.raises(TypeError, match="`source` must be"):
        describe_genes(["KRT5"], source=3)


def test_malformed_gene_info(tmp_path):
    p = _write_gene_info(tmp_path / "gi.gz", header=GENE_INFO_HEADER.replace("Synonyms", "Aliases"))
    with pytest.raises(ValueError, match=r"gi\.gz lacks columns \['Synonyms'\]"):
        describe_genes(["KRT5"], gene_info=p)
    with pytest.raises(ValueError, match="does not exist"):
        describe_genes(["KRT5"], gene_info=tmp_path / "none.gz")


def test_real_refseq_table():
    table = data_path("gene_text", "human_refseq_summaries_by_symbol.tsv.gz")
    info = data_path("gene_text", "Homo_sapiens.gene_info.gz")
    df = describe_genes(["KRT5", "ERBB2", "IGKC", "FAM132A", "NOT_A_GENE_X"], source=table, gene_info=info)
    assert df.loc["KRT5", "source"] == "summary" and "keratin" in df.loc["KRT5", "text"].lower()
    assert "epidermal growth factor" in df.loc["ERBB2", "text"].lower()
    assert df.loc["IGKC", "source"] in {"summary", "full_name"} and "immunoglobulin" in df.loc["IGKC", "text"].lower()
    assert df.loc["FAM132A", "resolved_symbol"] != "FAM132A"  # old symbol resolved through gene_info
    assert df.loc["NOT_A_GENE_X", "source"] == "symbol"
