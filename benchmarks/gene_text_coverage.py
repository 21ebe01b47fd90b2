"""Coverage of the her2st 250-gene panel by offline gene descriptions (RefSeq summaries + NCBI gene_info).

Panel: genes detected in >= 10% of the spots of sections C2-C6 (pooled), ranked by total counts, top 250.
Prints how many panel genes get a RefSeq summary, a full name only, or the symbol only, with and without
synonym resolution through gene_info.

Usage: python benchmarks/gene_text_coverage.py [--data DIR]   (default: $DKAN_DATA_DIR or ../shared/data)
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import pandas as pd

from dkan._genetext.describe import SOURCES, describe_genes

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]


def her2st_panel(data: Path, n_genes: int = 250, min_frac: float = 0.1) -> list[str]:
    counts = [pd.read_csv(data / "her2st" / "ST-cnts" / f"{s}.tsv.gz", sep="\t", index_col=0) for s in SECTIONS]
    pooled = pd.concat(counts, axis=0, join="outer").fillna(0)
    pooled = pooled.T.groupby(level=0).sum().T  # merge duplicated gene columns, if any
    detected = (pooled > 0).mean(axis=0) >= min_frac
    total = pooled.loc[:, detected].sum(axis=0).sort_values(ascending=False, kind="stable")
    return total.index[:n_genes].astype(str).tolist()


def main() -> None:
    default = Path(os.environ.get("DKAN_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    panel = her2st_panel(args.data)
    text = args.data / "gene_text"
    table, info = text / "human_refseq_summaries_by_symbol.tsv.gz", text / "Homo_sapiens.gene_info.gz"
    rows = []
    for label, kwargs in [("RefSeq table only", {}), ("RefSeq table + gene_info", {"gene_info": info})]:
        t0 = time.perf_counter()
        df = describe_genes(panel, source=table, **kwargs)
        counts = df["source"].value_counts()
        rows.append({"setting": label} | {s: int(counts.get(s, 0)) for s in SOURCES if s != "llm"})
        rows[-1]["seconds"] = round(time.perf_counter() - t0, 2)
        resolved = df[(df["resolved_symbol"] != df.index) & (df["resolved_symbol"] != "")]
        symbol_only = df.index[df["source"] == "symbol"].tolist()
    print(f"her2st panel: {len(panel)} genes (>= 10% of spots in {', '.join(SECTIONS)}, top by total counts)\n")
    print(pd.DataFrame(rows).to_string(index=False))
    renamed = dict(zip(resolved.index, resolved["resolved_symbol"], strict=True))
    print(f"\ntexts found under another symbol through gene_info: {renamed}")
    print(f"symbol only: {symbol_only}")
    full = df.index[df["source"] == "full_name"].tolist()
    print(f"full name only: {full}")


if __name__ == "__main__":
    main()
