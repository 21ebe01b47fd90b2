"""A small NCBI E-utilities client for human gene records (standard library only).

``esearch`` finds the Gene ids of a symbol, ``esummary`` returns the record (summary, full name, map location).
Requests are rate limited (3/s, 10/s with an API key), retried with exponential backoff on 429, 5xx and
timeouts, and every answer is cached on disk so that a second run makes no request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("dkan")

DEFAULT_NCBI_URL = "https://eutils.ncbi.nlm.nih.gov/entrez/eutils/"
_RETRY_CODES = {429, 500, 502, 503, 504}
_ESUMMARY_BATCH = 100
_SEARCH_BATCH = 50  #: symbols per esearch call (one OR query; about 1 kB of URL)
_HITS_PER_SYMBOL = 20  #: esearch retmax per symbol of a batch (aliases can match several genes)
_PLAIN_SYMBOL = re.compile(r"[\w.\-@/:]+")  #: symbols safe inside an OR query; others are searched alone


class ServiceError(RuntimeError):
    """A web service (NCBI, LLM endpoint) failed after all retries."""


def default_cache_dir() -> Path:
    """Return the dkan cache folder: ``$DKAN_CACHE_DIR`` or ``~/.cache/dkan``."""
    env = os.environ.get("DKAN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dkan"


def cache_file(folder: Path, key: str) -> Path:
    """Return a file name for ``key`` that is safe on every file system (readable prefix + hash)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[:60]
    return folder / f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.json"


def read_cache(path: Path) -> Any:
    """Return the cached JSON value, or ``None`` when absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_cache(path: Path, value: Any) -> None:
    """Write ``value`` atomically (tmp file + rename) so an interrupted run leaves no broken entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


class HttpJson:
    """JSON over HTTP with a minimum interval between requests and retries with backoff."""

    def __init__(self, *, rate: float, timeout: float, max_retries: int, backoff: float, service: str) -> None:
        if rate <= 0:
            raise ValueError(f"`rate` must be positive (requests per second), found {rate}.")
        _check_timeout(timeout)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"`max_retries` must be an int >= 0, found {max_retries!r}.")
        self.min_interval = 1.0 / rate
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.service = service
        self.n_requests = 0
        self._last = 0.0

    def _wait_turn(self) -> None:
        delay = self._last + self.min_interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._last = time.monotonic()

    def request(self, url: str, *, data: dict | None = None, headers: dict | None = None) -> Any:
        """GET ``url`` (or POST ``data`` as JSON) and return the decoded JSON answer."""
        body = None if data is None else json.dumps(data).encode()
        hdrs = {"Accept": "application/json", "User-Agent": "dkan"} | (headers or {})
        if body is not None:
            hdrs["Content-Type"] = "application/json"
        last_error, retry_after = "", None
        secrets = _secrets(url, hdrs)
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                time.sleep(max(delay, min(retry_after, 60.0)) if retry_after is not None else delay)
            self._wait_turn()
            self.n_requests += 1
            retry_after = None
            try:
                req = urllib.request.Request(url, data=body, headers=hdrs)
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as err:
                detail = redact(err.read().decode("utf-8", "replace"), secrets)[:200]
                if err.code not in _RETRY_CODES:
                    raise ServiceError(f"{self.service} answered HTTP {err.code} for {_redact(url)}: {detail}") from err
                last_error, retry_after = f"HTTP {err.code}", _retry_after(err)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last_error = redact(f"{type(err).__name__}: {err}", secrets)
            except ValueError as err:  # the answer is not JSON
                last_error = f"invalid JSON ({err})"
            logger.debug(
                "%s request failed (%s), attempt %d of %d", self.service, last_error, attempt + 1, self.max_retries + 1
            )
        raise ServiceError(
            f"{self.service} request to {_redact(url)} failed after {self.max_retries + 1} attempts "
            f"(last error: {last_error}). Check the connection and the base URL, or retry later."
        )


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    """Seconds from a ``Retry-After`` header, if any."""
    try:
        return float(err.headers.get("Retry-After"))
    except (TypeError, ValueError, AttributeError):
        return None


def _check_timeout(timeout: Any) -> None:
    """Refuse a timeout that is not a finite number of seconds > 0 (``None`` would wait forever)."""
    ok = isinstance(timeout, int | float) and not isinstance(timeout, bool) and 0 < timeout < float("inf")
    if not ok:
        raise ValueError(
            f"`timeout` must be a finite number of seconds > 0 (per request), found {timeout!r}; e.g. `timeout=30`. "
            "`None` (wait forever) is not allowed: a stalled server would hang the run."
        )


#: Credentials as they may appear in text: ``api_key=...`` / ``"api_key": "..."`` and ``Bearer <token>``
_SECRET_PATTERNS = (
    re.compile(r"""(api[_-]?key["']?\s*[=:]\s*["']?)[^\s&"',;}]+""", re.IGNORECASE),
    re.compile(r"(Bearer\s+)[^\s\"',;}]+", re.IGNORECASE),
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Replace the given ``secrets`` and anything that looks like an API key or bearer token by ``***``.

    Parameters
    ----------
    text
        Text that may quote credentials, e.g. a server's error body.
    secrets
        Exact strings to hide wherever they appear (the keys the client sent).

    Returns
    -------
    The text with every credential replaced.
    """
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


def _secrets(url: str, headers: dict[str, str]) -> list[str]:
    """Credentials sent with a request: ``api_key`` of the query and the token of an ``Authorization`` header."""
    query = urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)
    found = [v for k, v in query if k.lower() in {"api_key", "apikey", "key", "token"}]
    for name, value in headers.items():
        if name.lower() in {"authorization", "x-api-key", "api-key"}:
            found += [value, value.split(None, 1)[-1]]
    return found


def _redact(url: str) -> str:
    """Hide an API key in URLs that appear in messages."""
    parts = urllib.parse.urlsplit(url)
    query = [(k, "***" if k == "api_key" else v) for k, v in urllib.parse.parse_qsl(parts.query)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


class NCBIClient:
    """Fetch human gene records from NCBI E-utilities, with a polite rate limit, retries and a disk cache.

    Parameters
    ----------
    base_url
        E-utilities root; default ``$DKAN_NCBI_URL`` or the public NCBI service.
    api_key
        NCBI API key (raises the rate limit to 10 requests/s); default ``$NCBI_API_KEY``.
    email
        Contact address NCBI asks clients to send; default ``$NCBI_EMAIL``.
    organism
        Organism term of the search, e.g. ``"human"`` or ``"mouse"``.
    cache_dir
        Cache folder; default :func:`default_cache_dir`. Records go to ``{cache_dir}/ncbi/{organism}/``.
    rate
        Requests per second; default 3 (10 with an API key).
    timeout
        Seconds to wait for one answer.
    max_retries
        Retries after a 429, a 5xx or a timeout.
    backoff
        Seconds before the first retry; doubled at each further retry.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        email: str | None = None,
        organism: str = "human",
        cache_dir: str | os.PathLike | None = None,
        rate: float | None = None,
        timeout: float = 30.0,
        max_retries: int = 4,
        backoff: float = 1.0,
    ) -> None:
        self.base_url = (base_url or os.environ.get("DKAN_NCBI_URL") or DEFAULT_NCBI_URL).rstrip("/") + "/"
        self.api_key = api_key or os.environ.get("NCBI_API_KEY")
        self.email = email or os.environ.get("NCBI_EMAIL")
        self.organism = organism
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.cache = root / "ncbi" / organism
        rate = rate if rate is not None else (10.0 if self.api_key else 3.0)
        self.http = HttpJson(rate=rate, timeout=timeout, max_retries=max_retries, backoff=backoff, service="NCBI")

    @property
    def n_requests(self) -> int:
        """Number of HTTP requests made so far (retries included)."""
        return self.http.n_requests

    def _url(self, tool: str, **params: str) -> str:
        params = {"db": "gene", "retmode": "json", "tool": "dkan"} | params
        if self.api_key:
            params["api_key"] = self.api_key
        if self.email:
            params["email"] = self.email
        return f"{self.base_url}{tool}.fcgi?{urllib.parse.urlencode(params)}"

    def search(self, symbol: str, *, retmax: int = 5) -> list[str]:
        """Gene ids whose official symbol is ``symbol`` in the organism (esearch), best first."""
        term = f"{symbol}[sym] AND {self.organism}[orgn]"
        answer = self.http.request(self._url("esearch", term=term, retmax=str(retmax)))
        result = answer.get("esearchresult") if isinstance(answer, dict) else None
        if not isinstance(result, dict) or "ERROR" in result:
            shown = redact(str(answer), [self.api_key or ""])[:200]
            raise ServiceError(f"NCBI esearch gave an unexpected answer for {symbol!r}: {shown}")
        return [str(i) for i in result.get("idlist", [])]

    def search_many(self, symbols: Sequence[str]) -> list[str]:
        """Gene ids whose symbol or alias is any of ``symbols`` (one esearch with an OR query), best first.

        Which symbol an id belongs to is read from its record (:func:`_candidates`); :meth:`gene_records` uses this
        to look up ``_SEARCH_BATCH`` symbols per request instead of one request per symbol.
        """
        terms = " OR ".join(f"{s}[sym]" for s in symbols)
        term = f"({terms}) AND {self.organism}[orgn]"
        retmax = min(10_000, _HITS_PER_SYMBOL * len(symbols))
        answer = self.http.request(self._url("esearch", term=term, retmax=str(retmax)))
        result = answer.get("esearchresult") if isinstance(answer, dict) else None
        if not isinstance(result, dict) or "ERROR" in result:
            shown = redact(str(answer), [self.api_key or ""])[:200]
            raise ServiceError(f"NCBI esearch gave an unexpected answer for {len(symbols)} symbols: {shown}")
        ids = [str(i) for i in result.get("idlist", [])]
        if int(result.get("count", len(ids))) > len(ids):
            logger.warning("NCBI esearch matched %s genes for %d symbols; kept the first %d.", result.get("count"),
                           len(symbols), len(ids))  # fmt: skip
        return ids

    def summaries(self, ids: Sequence[str]) -> dict[str, dict]:
        """Gene records by id (esummary), in batches."""
        out: dict[str, dict] = {}
        for start in range(0, len(ids), _ESUMMARY_BATCH):
            batch = list(ids[start : start + _ESUMMARY_BATCH])
            answer = self.http.request(self._url("esummary", id=",".join(batch)))
            result = answer.get("result") if isinstance(answer, dict) else None
            if not isinstance(result, dict):
                shown = redact(str(answer), [self.api_key or ""])[:200]
                raise ServiceError(f"NCBI esummary gave an unexpected answer: {shown}")
            out.update({uid: result[uid] for uid in result.get("uids", []) if isinstance(result.get(uid), dict)})
        return out

    def gene_records(self, symbols: Iterable[str], *, progress: bool = True) -> dict[str, dict | None]:
        """Return records ``{symbol: {gene_id, symbol, full_name, summary, map_location} | None}``, cached on disk.

        ``None`` means NCBI knows no gene of that symbol in the organism; that answer is cached too.
        """
        symbols = list(symbols)
        out: dict[str, dict | None] = {}
        todo = []
        for s in symbols:
            cached = read_cache(cache_file(self.cache, s))
            if isinstance(cached, dict) and "record" in cached:
                out[s] = cached["record"]
            else:
                todo.append(s)
        if not todo:
            return out
        logger.info("Querying NCBI Gene for %d symbols (%d cached).", len(todo), len(symbols) - len(todo))
        bar = _progress(len(todo), progress)
        for start in range(0, len(todo), _SEARCH_BATCH):  # cache as we go: an interrupted run resumes
            chunk = todo[start : start + _SEARCH_BATCH]
            plain = [s for s in chunk if _PLAIN_SYMBOL.fullmatch(s)]
            ids = self.search_many(plain) if plain else []
            alone = {s: self.search(s) for s in chunk if s not in plain}  # odd characters: one query each
            records = self.summaries(list(dict.fromkeys([*ids, *(i for hit in alone.values() for i in hit)])))
            for s in chunk:
                candidates = (
                    [records[i] for i in alone[s] if i in records] if s in alone else _candidates(s, ids, records)
                )
                out[s] = _pick(s, candidates)
                write_cache(cache_file(self.cache, s), {"symbol": s, "record": out[s]})
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return out


def _candidates(symbol: str, ids: Sequence[str], records: dict[str, dict]) -> list[dict]:
    """Records among ``ids`` (in that order) whose symbol, nomenclature symbol or an alias is ``symbol``."""
    key = symbol.upper()
    out = []
    for i in ids:
        rec = records.get(i)
        if rec is None:
            continue
        names = {str(rec.get("name", "")).upper(), str(rec.get("nomenclaturesymbol", "")).upper()}
        aliases = {a.strip().upper() for a in str(rec.get("otheraliases") or "").split(",")}
        if key in names or key in aliases:
            out.append(rec)
    return out


def _pick(symbol: str, candidates: list[dict]) -> dict | None:
    """Return the live record whose name is ``symbol``, else the first live one, as a flat dict."""
    live = [c for c in candidates if not c.get("status")] or candidates
    if not live:
        return None
    best = next((c for c in live if str(c.get("name", "")).upper() == symbol.upper()), live[0])
    return {
        "gene_id": str(best.get("uid", "")),
        "symbol": str(best.get("name", symbol)),
        "full_name": str(best.get("description") or best.get("nomenclaturename") or ""),
        "summary": str(best.get("summary") or ""),
        "map_location": str(best.get("maplocation") or ""),
    }


def _progress(total: int, show: bool) -> Any:
    if not show or total < 20:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="NCBI Gene")
