"""Gene descriptions: text per symbol from a mapping, a table file, NCBI or the symbol; optional LLM condensation."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

logger = logging.getLogger("dkan")

SOURCES = ("summary", "full_name", "llm", "symbol")  #: values of the ``source`` column, best first
_SYMBOL_COLUMNS = ("symbol", "gene_symbol", "gene", "gene_name", "hgnc_symbol", "name")
_TEXT_COLUMNS = ("gene_summary", "summary", "description", "text", "definition", "function")
_GENE_INFO_COLUMNS = ("GeneID", "Symbol", "Synonyms", "description")


def describe_genes(
    genes: Sequence[str],
    *,
    source: str | os.PathLike | Mapping[str, str] = "symbol",
    gene_info: str | os.PathLike | None = None,
    symbol_column: str | None = None,
    text_column: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    ncbi: Mapping[str, Any] | None = None,
    llm: bool | Mapping[str, Any] = False,
) -> pd.DataFrame:
    """Find a text description for each gene symbol.

    Each gene gets the best text available: a summary from ``source``; else, with ``gene_info``, the gene's full
    name (``"SYMBOL: full name"``); else the symbol itself (the paper's "w/o summary" ablation), which is counted
    and logged. Symbols missing from ``source`` are looked up again under their official symbol when
    ``gene_info`` lists them as a synonym or an old symbol (or an Ensembl id).

    Parameters
    ----------
    genes
        Gene symbols, unique.
    source
        Where summaries come from: a mapping ``{symbol: text}``; a path to a TSV/CSV table (optionally gzipped)
        with a symbol and a text column, such as NCBI RefSeq summaries; ``"ncbi"`` to query NCBI Gene online
        (cached, see :class:`~dkan._genetext.ncbi.NCBIClient`); or ``"symbol"`` for no summaries.
    gene_info
        NCBI ``gene_info`` file (e.g. ``Homo_sapiens.gene_info.gz``) for synonym resolution and full names.
    symbol_column, text_column
        Columns of the table file; detected from common names (``symbol``, ``Gene_summary``, ...) by default.
    cache_dir
        Cache folder of the NCBI and LLM answers; default ``$DKAN_CACHE_DIR`` or ``~/.cache/dkan``.
    ncbi
        Options of :class:`~dkan._genetext.ncbi.NCBIClient` (``base_url``, ``api_key``, ``email``, ``organism``, ...).
    llm
        ``True`` or options of :class:`~dkan._genetext.llm.LLMClient` (``base_url``, ``model``, ``api_key``,
        ``disease``, ``client``, ...) to condense every description into functionality and phenotype keywords, as
        in the paper, through the ``openai`` client (``pip install 'dkan[llm]'``; any OpenAI-compatible server).
        Genes whose reply is malformed keep their un-condensed text (counted and logged).

    Returns
    -------
    One row per gene, in the order given, with columns ``text`` (the text to encode), ``source`` (one of
    ``"summary"``, ``"full_name"``, ``"llm"``, ``"symbol"``) and ``resolved_symbol`` (the symbol the text was
    found under).
    """
    genes = _check_genes(genes)
    info = read_gene_info(gene_info) if gene_info is not None else None
    facts = {g: _Facts(symbol=g) for g in genes}
    if isinstance(source, Mapping):
        _fill_from_table(facts, {str(k): str(v) for k, v in source.items() if _is_text(v)}, info)
    elif isinstance(source, str) and source == "ncbi":
        _fill_from_ncbi(facts, info, cache_dir=cache_dir, options=ncbi or {})
    elif isinstance(source, str | os.PathLike) and str(source) != "symbol":
        path = Path(source)
        if not path.is_file():
            raise ValueError(
                f"`source={str(source)!r}` is neither 'symbol', 'ncbi' nor an existing file; pass a mapping "
                "{symbol: text}, a TSV/CSV path, 'ncbi' or 'symbol'."
            )
        _fill_from_table(facts, read_text_table(path, symbol_column=symbol_column, text_column=text_column), info)
    elif not isinstance(source, str | os.PathLike):
        raise TypeError(f"`source` must be a mapping, a path, 'ncbi' or 'symbol'; found {type(source).__name__}.")
    if info is not None:
        _fill_full_names(facts, info)
    out = pd.DataFrame(
        {
            "text": [f.text() for f in facts.values()],
            "source": [f.source() for f in facts.values()],
            "resolved_symbol": [f.resolved for f in facts.values()],
        },
        index=pd.Index(genes, name="gene"),
    )
    if llm:
        _condense(out, facts, options=dict(llm) if isinstance(llm, Mapping) else {}, cache_dir=cache_dir)
    _log_counts(out)
    return out


@dataclass
class _Facts:
    symbol: str
    resolved: str = ""
    summary: str = ""
    full_name: str = ""
    map_location: str = ""

    def text(self) -> str:
        if self.summary:
            return self.summary
        if self.full_name:
            return f"{self.symbol}: {self.full_name}"
        return self.symbol

    def source(self) -> str:
        return "summary" if self.summary else "full_name" if self.full_name else "symbol"


def _check_genes(genes: Sequence[str]) -> list[str]:
    if isinstance(genes, str):
        raise TypeError(f"`genes` must be a sequence of symbols, found the single string {genes!r}; wrap it in a list.")
    genes = [str(g) for g in genes]
    if not genes:
        raise ValueError("`genes` is empty; pass at least one gene symbol.")
    dup = pd.Index(genes)
    dup = dup[dup.duplicated()].unique().tolist()
    if dup:
        raise ValueError(
            f"`genes` has duplicated symbols {dup[:10]}; make them unique first (e.g. `adata.var_names_make_unique()`)."
        )
    return genes


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip()) and v.strip().lower() not in {"nan", "na", "-"}


def read_text_table(
    path: str | os.PathLike, *, symbol_column: str | None = None, text_column: str | None = None
) -> dict[str, str]:
    """Read ``{symbol: text}`` from a TSV/CSV file (a header with recognisable names, or two unnamed columns)."""
    path = Path(path)
    sep = "," if ".csv" in path.suffixes else "\t"
    try:
        raw = pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False, quoting=3 if sep == "\t" else 0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise ValueError(f"Cannot read gene descriptions from {path}: {err}") from err
    if raw.empty:
        raise ValueError(f"Gene description file {path} is empty; it needs a symbol column and a text column.")
    header = [str(h).strip() for h in raw.iloc[0]]
    sym = _find_column(header, symbol_column, _SYMBOL_COLUMNS)
    txt = _find_column(header, text_column, _TEXT_COLUMNS)
    if sym is not None and txt is not None:
        table = raw.iloc[1:]
    elif symbol_column is None and text_column is None and raw.shape[1] == 2 and " " in raw.iloc[0, 1].strip():
        sym, txt, table = 0, 1, raw  # headerless "SYMBOL<TAB>a text" lines, as the paper's files
    else:
        missing = []
        for what, col, given, guesses in (
            ("symbol", sym, symbol_column, _SYMBOL_COLUMNS),
            ("text", txt, text_column, _TEXT_COLUMNS),
        ):
            if col is None:
                missing.append(f"{what} column {given!r}" if given else f"a {what} column (one of {list(guesses)})")
        raise ValueError(
            f"Gene description file {path} lacks {' and '.join(missing)}; found columns {header[:12]}. "
            "Pass `symbol_column=` and `text_column=`, or use two unnamed columns: symbol, then text."
        )
    symbols, texts = table.iloc[:, sym].str.strip(), table.iloc[:, txt].str.strip()
    keep = texts.map(_is_text) & (symbols != "")
    if not keep.any():
        raise ValueError(f"Gene description file {path} has no non-empty text in column {header[txt]!r}.")
    return dict(zip(symbols[keep], texts[keep], strict=True))


def _find_column(header: list[str], given: str | None, guesses: tuple[str, ...]) -> int | None:
    if given is not None:
        return header.index(given) if given in header else None
    lowered = [h.lower() for h in header]
    return next((lowered.index(g) for g in guesses if g in lowered), None)


@dataclass
class GeneInfo:
    """Lookups from an NCBI gene_info file."""

    official: dict[str, dict]  #: symbol -> {"gene_id", "full_name", "map_location"}
    aliases: dict[str, list[str]]  #: synonym / Ensembl id -> official symbols
    synonyms: dict[str, list[str]]  #: official symbol -> its synonyms

    def resolve(self, name: str) -> list[str]:
        """Official symbols ``name`` may stand for: itself when official, else the symbols listing it as alias."""
        return [name] if name in self.official else self.aliases.get(name, [])


def read_gene_info(path: str | os.PathLike) -> GeneInfo:
    """Parse an NCBI ``gene_info`` file (tab-separated, header starting with ``#tax_id``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"`gene_info` file {path} does not exist; pass an NCBI gene_info file such as "
            "Homo_sapiens.gene_info.gz (https://ftp.ncbi.nlm.nih.gov/gene/DATA/GENE_INFO/)."
        )
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise ValueError(f"Cannot read gene_info file {path}: {err}") from err
    missing = [c for c in _GENE_INFO_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"gene_info file {path} lacks columns {missing}; found {list(df.columns)[:12]}. "
            "Expected NCBI's gene_info layout (#tax_id, GeneID, Symbol, Synonyms, ..., description, ...)."
        )
    full = df.get("Full_name_from_nomenclature_authority", pd.Series("-", index=df.index))
    full = full.where(full.map(_is_text), df["description"])
    maploc = df.get("map_location", pd.Series("", index=df.index))
    official, aliases, synonyms = {}, {}, {}
    for gid, sym, syn, name, loc, xrefs in zip(
        df["GeneID"], df["Symbol"], df["Synonyms"], full, maploc, df.get("dbXrefs", [""] * len(df)), strict=True
    ):
        official[sym] = {"gene_id": gid, "full_name": name if _is_text(name) else "", "map_location": loc}
        alts = [s for s in syn.split("|") if _is_text(s)]
        alts += [x.split(":", 1)[1] for x in xrefs.split("|") if x.startswith("Ensembl:")]
        synonyms[sym] = alts
        for a in alts:
            aliases.setdefault(a, []).append(sym)
    return GeneInfo(official=official, aliases=aliases, synonyms=synonyms)


def _fill_from_table(facts: dict[str, _Facts], table: Mapping[str, str], info: GeneInfo | None) -> None:
    """Summaries from ``table``: under the symbol itself, else under its official symbol or that symbol's aliases."""
    n_resolved = 0
    for g, f in facts.items():
        if g in table:
            f.summary, f.resolved = table[g], g
            continue
        if info is None:
            continue
        candidates = [s for s in info.resolve(g) if s in table]
        if not candidates:  # the table may use an older name of the official symbol
            official = info.resolve(g)
            candidates = [  # ... but never the name of another gene
                a for s in official for a in info.synonyms.get(s, []) if a in table and a not in info.official
            ]
        if len(set(candidates)) == 1:
            f.summary, f.resolved = table[candidates[0]], candidates[0]
            n_resolved += 1
    if n_resolved:
        logger.info("Found %d descriptions through synonyms or older symbols in gene_info.", n_resolved)


def _fill_full_names(facts: dict[str, _Facts], info: GeneInfo) -> None:
    for g, f in facts.items():
        official = [f.resolved] if f.resolved in info.official else info.resolve(g)
        if len(official) != 1:
            continue
        rec = info.official[official[0]]
        f.map_location = f.map_location or rec["map_location"]
        if not f.summary and not f.full_name and rec["full_name"]:
            f.full_name, f.resolved = rec["full_name"], official[0]


def _fill_from_ncbi(
    facts: dict[str, _Facts], info: GeneInfo | None, *, cache_dir: Any, options: Mapping[str, Any]
) -> None:
    from dkan._genetext.ncbi import NCBIClient

    client = NCBIClient(cache_dir=cache_dir, **options)
    query = {g: (info.resolve(g) if info is not None else [])[:1] or [g] for g in facts}
    records = client.gene_records(sorted({q[0] for q in query.values()}))
    for g, f in facts.items():
        rec = records.get(query[g][0])
        if rec is None:
            continue
        f.resolved = rec["symbol"] or query[g][0]
        f.summary, f.full_name, f.map_location = rec["summary"], rec["full_name"], rec["map_location"]
    logger.info("NCBI: %d requests made for %d genes.", client.n_requests, len(facts))


def _condense(out: pd.DataFrame, facts: dict[str, _Facts], *, options: dict, cache_dir: Any) -> None:
    from tqdm.auto import tqdm

    from dkan._genetext.llm import LLMClient, format_condensed

    client = LLMClient(cache_dir=options.pop("cache_dir", cache_dir), **options)
    kept = []
    for g, f in tqdm(facts.items(), desc="LLM", disable=len(facts) < 20):
        fields = client.condense(g, summary=f.summary, full_name=f.full_name, map_location=f.map_location)
        if fields is None:
            kept.append(g)
            continue
        out.loc[g, ["text", "source"]] = [format_condensed(g, fields), "llm"]
    if kept:
        logger.warning(
            "LLM replies for %d of %d genes were malformed (not JSON with 'functionality' and 'phenotype' within "
            "%d words); these genes keep their un-condensed text: %s",
            len(kept),
            len(facts),
            client.max_words,
            _preview(kept),
        )


def _log_counts(out: pd.DataFrame) -> None:
    counts = out["source"].value_counts()
    logger.info("Gene descriptions by source: %s", {s: int(counts.get(s, 0)) for s in SOURCES})
    only = out.index[out["source"] == "symbol"].tolist()
    if only:
        logger.warning(
            "%d of %d genes have no description and use their symbol as text: %s. Pass richer descriptions (a "
            "RefSeq summary table, or 'ncbi': `descriptions=` of `train`/`embed_genes`, `source=` here, "
            "`--descriptions` of `dkan train`) and/or an NCBI gene_info file to resolve synonyms and full names "
            "(`gene_info=` of `train` and here, `--gene-info` of `dkan train`).",
            len(only),
            len(out),
            _preview(only),
        )


def _preview(names: list[str], n: int = 10) -> str:
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n})" if len(names) > n else "")
