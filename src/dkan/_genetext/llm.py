"""Optional condensation of gene descriptions by a large language model (any OpenAI-compatible endpoint).

The prompt follows the structure of the DKAN paper (a molecular-biology expert role; the task of describing the
gene's functionality and phenotype; a disease context; a JSON answer of under 90 words), worded anew here.
Requests go through the ``openai`` client (the optional extra ``dkan[llm]``), which owns the HTTP transport,
authentication, retries with backoff and the decoding of the answer; dkan owns the prompt, the validation of the
reply text, the on-disk cache and the pacing of requests. Malformed replies are replaced by the un-condensed text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from dkan._genetext.ncbi import (
    ServiceError,
    _check_timeout,
    cache_file,
    default_cache_dir,
    read_cache,
    redact,
    write_cache,
)

logger = logging.getLogger("dkan")

DEFAULT_LLM_URL = "https://api.openai.com/v1"
DEFAULT_LLM_MODEL = "gpt-4o"
KEYS = ("functionality", "phenotype")

_SYSTEM = (
    "You are an expert in molecular biology who writes short, factual annotations of human genes for a "
    "machine-learning model. You answer with JSON only."
)
_TASK = """Describe the human gene {symbol}: what it does in the cell (its functionality) and which traits, \
diseases or tissue states it is linked to (its phenotype), with attention to its role {context}.

What is known about it:
{facts}

Answer rules:
- Return exactly one JSON object with two string fields and no other text: \
{{"functionality": "...", "phenotype": "..."}}
- Write comma-separated keywords and short phrases, not full sentences; leave out adjectives.
- Use fewer than {max_words} words in total.
- Where the facts above are thin, add what is well established about the gene."""


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


class LLMClient:
    """Condense gene descriptions with an OpenAI-compatible chat-completions endpoint, through the ``openai`` client.

    Parameters
    ----------
    base_url
        API root (the part before ``/chat/completions``); default ``$DKAN_LLM_BASE_URL``, ``$OPENAI_BASE_URL``
        or the OpenAI service.
    model
        Model name; default ``$DKAN_LLM_MODEL``, ``$OPENAI_MODEL`` or ``"gpt-4o"`` (the paper's model).
    api_key
        Bearer token; default ``$DKAN_LLM_API_KEY`` or ``$OPENAI_API_KEY``. A local server may need none.
    disease
        Disease context of the prompt, e.g. ``"HER2-positive breast cancer"``; ``None`` for human biology in
        general.
    max_words
        Word limit of the answer (functionality and phenotype together); longer answers count as malformed.
    temperature, max_tokens
        Sampling settings sent with each request (temperature 0 for reproducible answers).
    cache_dir
        Cache folder; default :func:`~dkan._genetext.ncbi.default_cache_dir`. Answers go to ``{cache_dir}/llm/``.
    timeout, max_retries
        Seconds per answer, and retries after 408/409/429/5xx answers and connection errors (done by the
        ``openai`` client, with its exponential backoff).
    rate
        Requests per second at most (dkan paces the requests; the client does not).
    client
        An ``openai.OpenAI`` instance, or any object with ``chat.completions.create``, used instead of one built
        from ``base_url``, ``api_key``, ``timeout`` and ``max_retries``; then ``openai`` need not be installed.

    Raises
    ------
    ImportError
        When ``client`` is not given and ``openai`` is not installed (``pip install 'dkan[llm]'``).
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        disease: str | None = None,
        max_words: int = 90,
        temperature: float = 0.0,
        max_tokens: int = 500,
        cache_dir: str | os.PathLike | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        rate: float = 5.0,
        client: Any = None,
    ) -> None:
        self.base_url = (base_url or _env("DKAN_LLM_BASE_URL", "OPENAI_BASE_URL") or DEFAULT_LLM_URL).rstrip("/")
        self.model = model or _env("DKAN_LLM_MODEL", "OPENAI_MODEL") or DEFAULT_LLM_MODEL
        self.api_key = api_key or _env("DKAN_LLM_API_KEY", "OPENAI_API_KEY")
        if client is None and self.base_url == DEFAULT_LLM_URL and not self.api_key:
            raise ValueError(
                "The LLM step needs an API key for the default OpenAI endpoint: set `DKAN_LLM_API_KEY` (or "
                "`OPENAI_API_KEY`), pass `llm={'api_key': ...}`, or point `llm={'base_url': ...}` at a local "
                "OpenAI-compatible server."
            )
        _check_timeout(timeout)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"`max_retries` must be an int >= 0, found {max_retries!r}.")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
            raise ValueError(f"`rate` must be a positive number (requests per second), found {rate!r}.")
        self.disease = disease
        self.max_words = max_words
        self.temperature = temperature
        self.max_tokens = max_tokens
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.cache = root / "llm"
        if client is None:
            client = _openai_client(self.base_url, self.api_key, timeout=timeout, max_retries=max_retries)
        self.client = client
        self.min_interval = 1.0 / rate
        self.n_requests = 0  # calls of `chat.completions.create`; the client's own retries are not counted
        self.n_malformed = 0
        self._last = 0.0

    def messages(self, symbol: str, *, summary: str = "", full_name: str = "", map_location: str = "") -> list[dict]:
        """Build the chat messages sent for one gene."""
        facts = [f"- gene symbol: {symbol}"]
        facts += [f"- full name: {full_name}"] if full_name else []
        facts += [f"- chromosomal location: {map_location}"] if map_location else []
        facts += [f"- NCBI summary: {summary}"] if summary else ["- NCBI summary: not available"]
        context = f"in {self.disease}" if self.disease else "in human biology"
        task = _TASK.format(symbol=symbol, context=context, facts="\n".join(facts), max_words=self.max_words)
        return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": task}]

    def condense(self, symbol: str, **facts: str) -> dict[str, str] | None:
        """Return validated ``{"functionality", "phenotype"}`` for one gene, or ``None`` when the reply is malformed.

        A failed request raises :class:`~dkan._genetext.ncbi.ServiceError` (credentials redacted).
        """
        payload = {
            "model": self.model,
            "messages": self.messages(symbol, **facts),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        key = hashlib.sha1(json.dumps([self.base_url, payload], sort_keys=True).encode()).hexdigest()
        path = cache_file(self.cache, f"{symbol}-{key}")
        cached = read_cache(path)
        if isinstance(cached, dict) and all(isinstance(cached.get(k), str) for k in KEYS):
            return {k: cached[k] for k in KEYS}
        parsed, problem = parse_reply(_content(self._create(payload)), max_words=self.max_words)
        if parsed is None:
            self.n_malformed += 1
            logger.debug("LLM reply for %s rejected: %s", symbol, problem)
            return None
        write_cache(path, parsed)
        return parsed

    def _create(self, payload: dict) -> Any:
        """One ``chat.completions.create`` call, paced to ``rate``; the client's errors become ServiceError."""
        delay = self._last + self.min_interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._last = time.monotonic()
        self.n_requests += 1
        try:
            return self.client.chat.completions.create(**payload)
        except Exception as err:  # noqa: BLE001 (re-raised below: openai.APIError and kin, or a custom client's)
            detail = redact(f"{type(err).__name__}: {err}", [self.api_key or ""])[:300]
            raise ServiceError(
                f"LLM request to {self.base_url} failed ({detail}). Check the connection, the base URL, the model "
                "name and the API key, or retry later."
            ) from None  # the original error may quote the key


def _openai_client(base_url: str, api_key: str | None, *, timeout: float, max_retries: int) -> Any:
    try:
        import openai
    except ImportError as err:
        raise ImportError(
            "LLM condensation of gene descriptions (`llm=`) talks to the server through the `openai` client: "
            "install it with `pip install 'dkan[llm]'`, or pass `llm={'client': ...}` (an object with "
            "`chat.completions.create`)."
        ) from err
    # a local OpenAI-compatible server may take no key, but the client insists on one: send a placeholder
    return openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=max_retries)


def _content(reply: Any) -> Any:
    """Text of the first choice of a chat-completions answer, or ``None``."""
    try:
        return reply.choices[0].message.content
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def parse_reply(content: Any, *, max_words: int = 90) -> tuple[dict[str, str] | None, str]:
    """Validate the text of a reply (JSON object in it): ``(fields, "")`` or ``(None, what is wrong)``."""
    if not isinstance(content, str):
        return None, "no message text in the answer"
    match = re.search(r"\{.*\}", content, flags=re.DOTALL)  # tolerate ```json fences and stray prose
    if match is None:
        return None, "no JSON object in the reply"
    try:
        obj = json.loads(match.group(0))
    except ValueError as err:
        return None, f"invalid JSON ({err})"
    if not isinstance(obj, dict):
        return None, "the JSON is not an object"
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    fields = {}
    for k in KEYS:
        v = lowered.get(k)
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            v = ", ".join(v)
        if not isinstance(v, str) or not v.strip():
            return None, f"missing or empty key {k!r}"
        fields[k] = " ".join(v.split()).rstrip(".")
    n_words = sum(len(v.split()) for v in fields.values())
    if n_words > max_words:
        return None, f"{n_words} words, over the limit of {max_words}"
    return fields, ""


def format_condensed(symbol: str, fields: dict[str, str]) -> str:
    """Format the text encoded for a condensed gene, in the paper's layout."""
    return f"gene symbol: {symbol}. Functionality: {fields['functionality']}. Phenotype: {fields['phenotype']}."
