"""The Ensembl ids that `dkan.datasets.synthetic_visium` writes agree with NCBI's gene_info cross-references."""

from __future__ import annotations

import gzip
import re

from conftest import data_path

from dkan.datasets._toy import TOY_GENES
from dkan.datasets._visium import _ENSEMBL_IDS

# NCBI's gene_info gives no Ensembl cross-reference for immunoglobulin segments; these two were checked by hand
# against Ensembl (IGKC ENSG00000211592, IGHG1 ENSG00000211896).
_NOT_IN_GENE_INFO = {"IGKC", "IGHG1"}


def test_synthetic_visium_ensembl_ids_match_gene_info():
    by_symbol: dict[str, set[str]] = {}
    with gzip.open(data_path("gene_text", "Homo_sapiens.gene_info.gz"), "rt") as f:
        next(f)
        for line in f:
            cols = line.split("\t")
            if cols[2] in TOY_GENES:
                by_symbol.setdefault(cols[2], set()).update(re.findall(r"Ensembl:(ENSG\d+)", cols[5]))
    pairs = dict(zip(TOY_GENES, _ENSEMBL_IDS, strict=True))
    wrong = {
        g: (e, by_symbol.get(g))
        for g, e in pairs.items()
        if g not in _NOT_IN_GENE_INFO and e not in by_symbol.get(g, ())
    }
    assert not wrong
    assert all(not by_symbol.get(g) for g in _NOT_IN_GENE_INFO)  # still nothing to check them against
    assert len(set(_ENSEMBL_IDS)) == len(_ENSEMBL_IDS)
