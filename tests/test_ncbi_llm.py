"""NCBI E-utilities client against a loopback HTTP server that answers in NCBI's formats; the LLM client with a fake
``openai`` client (and, when the `llm` extra is installed, the real one against the loopback server)."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from dkan._genetext.describe import describe_genes
from dkan._genetext.llm import LLMClient, _content, parse_reply
from dkan._genetext.ncbi import NCBIClient, ServiceError

# esummary records in NCBI's JSON layout (fields trimmed to those a client reads, plus a few others)
GENES = {
    "ERBB2": {
        "uid": "2064",
        "name": "ERBB2",
        "description": "erb-b2 receptor tyrosine kinase 2",
        "status": "",
        "currentid": "",
        "chromosome": "17",
        "maplocation": "17q12",
        "otheraliases": "CD340, HER-2, HER2, NEU",
        "summary": "This gene encodes a member of the epidermal growth factor receptor family of tyrosine kinases.",
        "organism": {"scientificname": "Homo sapiens", "commonname": "human", "taxid": 9606},
    },
    "KRT5": {
        "uid": "3852",
        "name": "KRT5",
        "description": "keratin 5",
        "status": "",
        "currentid": "",
        "maplocation": "12q13.13",
        "summary": "This gene encodes a type II keratin expressed in the basal layer of the epidermis.",
    },
    "LINC00115": {
        "uid": "79854",
        "name": "LINC00115",
        "description": "long intergenic non-protein coding RNA 115",
        "status": "",
        "currentid": "",
        "maplocation": "1p36.33",
        "summary": "",
    },
}
BY_UID = {g["uid"]: g for g in GENES.values()}

GOOD = {"functionality": "receptor tyrosine kinase, EGF signalling", "phenotype": "HER2-positive breast cancer"}
LLM_REPLIES = {
    "ERBB2": json.dumps(GOOD),
    "KRT5": '```json\n{"Functionality": "intermediate filament, epidermis", "Phenotype": "epidermolysis bullosa"}\n```',
    "LINC00115": "Sorry, I know nothing about this gene.",
    "LONG": json.dumps({"functionality": " ".join(["word"] * 80), "phenotype": " ".join(["word"] * 20)}),
    "NOKEY": json.dumps({"functionality": "something"}),
}


class FakeService:
    """State of the loopback server: recorded requests and a queue of failures to serve first."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.failures: list[tuple[str, float]] = []  # ("status", code) or ("sleep", seconds)
        self.fail_after: int | None = None  # answer 500 to every request after this many
        self.url = ""

    def count(self, endpoint: str) -> int:
        return sum(endpoint in path for path, _ in self.requests)


def _handler(service: FakeService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _send(self, code: int, payload: dict, headers: dict | None = None) -> None:
            body = json.dumps(payload).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

        def _fail_first(self) -> bool:
            if service.fail_after is not None and len(service.requests) > service.fail_after:
                self._send(500, {"error": "down"})
                return True
            if not service.failures:
                return False
            kind, value = service.failures.pop(0)
            if kind == "sleep":
                time.sleep(value)
                return False
            if value == 429:
                self._send(429, {"error": "API rate limit exceeded", "count": "4"}, {"Retry-After": "0"})
            else:
                self._send(int(value), {"error": "internal server error"})
            return True

        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(parts.query))
            service.requests.append((parts.path, query))
            if self._fail_first():
                return
            if parts.path.endswith("esearch.fcgi"):
                symbols = re.findall(r"([^\s()]+)\[sym\]", query["term"])  # one symbol, or a batch OR-ed together
                ids = [GENES[s]["uid"] for s in symbols if s in GENES]
                result = {"count": str(len(ids)), "retmax": str(len(ids)), "retstart": "0", "idlist": ids}
                self._send(200, {"header": {"type": "esearch", "version": "0.3"}, "esearchresult": result})
            elif parts.path.endswith("esummary.fcgi"):
                uids = [u for u in query["id"].split(",") if u in BY_UID]
                result = {"uids": uids} | {u: BY_UID[u] for u in uids}
                self._send(200, {"header": {"type": "esummary", "version": "0.3"}, "result": result})
            else:
                self._send(404, {"error": "unknown endpoint"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            service.requests.append((self.path, body | {"authorization": self.headers.get("Authorization")}))
            if self._fail_first():
                return
            if not self.path.endswith("/chat/completions"):
                self._send(404, {"error": "unknown endpoint"})
                return
            user = body["messages"][-1]["content"]
            symbol = user.split("Describe the human gene ", 1)[1].split(":", 1)[0]
            content = LLM_REPLIES.get(symbol, json.dumps(GOOD))
            message = {"role": "assistant", "content": content}
            self._send(
                200,
                {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 30, "total_tokens": 130},
                },
            )

    return Handler


@pytest.fixture
def server():
    service = FakeService()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(service))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    service.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield service
    httpd.shutdown()
    httpd.server_close()


def _ncbi(server: FakeService, tmp_path, **kw) -> NCBIClient:
    opts = {"base_url": server.url + "/eutils", "cache_dir": tmp_path, "rate": 100.0, "backoff": 0.01} | kw
    return NCBIClient(**opts)


def test_ncbi_records_and_query(server, tmp_path, monkeypatch):
    monkeypatch.setenv("NCBI_EMAIL", "me@example.org")
    monkeypatch.delenv("NCBI_API_KEY", raising=False)
    client = _ncbi(server, tmp_path)
    rec = client.gene_records(["ERBB2", "LINC00115", "NOPE"])
    assert rec["ERBB2"]["summary"].startswith("This gene encodes a member of the epidermal")
    assert rec["ERBB2"]["full_name"] == "erb-b2 receptor tyrosine kinase 2"
    assert rec["ERBB2"]["map_location"] == "17q12"
    assert rec["ERBB2"]["gene_id"] == "2064"
    assert rec["LINC00115"]["summary"] == "" and rec["LINC00115"]["full_name"].startswith("long intergenic")
    assert rec["NOPE"] is None
    # 1 batched esearch + 1 batched esummary
    assert server.count("esearch") == 1 and server.count("esummary") == 1
    _, q = server.requests[0]
    assert q["term"] == "(ERBB2[sym] OR LINC00115[sym] OR NOPE[sym]) AND human[orgn]"
    assert q["db"] == "gene" and q["retmode"] == "json"
    assert q["email"] == "me@example.org" and "api_key" not in q
    assert client.http.min_interval == pytest.approx(1 / 100)


def test_ncbi_env_url_key_and_rate(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DKAN_NCBI_URL", server.url + "/eutils")
    monkeypatch.setenv("NCBI_API_KEY", "secret")
    client = NCBIClient(cache_dir=tmp_path)
    assert client.http.min_interval == pytest.approx(0.1)  # 10 requests/s with a key
    monkeypatch.delenv("NCBI_API_KEY")
    assert NCBIClient(cache_dir=tmp_path).http.min_interval == pytest.approx(1 / 3)
    client.search("KRT5")
    assert server.requests[-1][1]["api_key"] == "secret"


def test_ncbi_rate_limit_spaces_requests(server, tmp_path):
    client = _ncbi(server, tmp_path, rate=20.0)
    t0 = time.monotonic()
    for s in ["ERBB2", "KRT5", "LINC00115", "NOPE", "ERBB2"]:
        client.search(s)
    assert time.monotonic() - t0 >= 4 / 20 - 0.01


def test_ncbi_cache_second_run_makes_no_request(server, tmp_path):
    _ncbi(server, tmp_path).gene_records(["ERBB2", "KRT5", "NOPE"])
    n = len(server.requests)
    again = _ncbi(server, tmp_path)
    rec = again.gene_records(["ERBB2", "KRT5", "NOPE"])
    assert len(server.requests) == n and again.n_requests == 0
    assert rec["KRT5"]["full_name"] == "keratin 5" and rec["NOPE"] is None


def test_ncbi_interrupted_run_resumes_from_cache(server, tmp_path):
    symbols = [f"UNKNOWN{i}" for i in range(55)] + ["ERBB2"]
    server.fail_after = 1  # one esearch (no hits, so no esummary): the first chunk of 50 symbols completes
    with pytest.raises(ServiceError):
        _ncbi(server, tmp_path, max_retries=0).gene_records(symbols)
    server.fail_after = None
    client = _ncbi(server, tmp_path)
    rec = client.gene_records(symbols)
    assert client.n_requests == 1 + 1  # one esearch for the 6 symbols of the unfinished chunk, one esummary
    assert rec["ERBB2"]["symbol"] == "ERBB2" and rec["UNKNOWN0"] is None


def test_ncbi_retries_429_then_succeeds(server, tmp_path):
    server.failures = [("status", 429), ("status", 503)]
    client = _ncbi(server, tmp_path)
    assert client.search("ERBB2") == ["2064"]
    assert client.n_requests == 3


def test_ncbi_persistent_500_raises(server, tmp_path):
    server.failures = [("status", 500)] * 10
    client = _ncbi(server, tmp_path, max_retries=2)
    with pytest.raises(ServiceError, match=r"failed after 3 attempts.*HTTP 500"):
        client.search("ERBB2")
    assert client.n_requests == 3


def test_ncbi_timeout_then_retry(server, tmp_path):
    server.failures = [("sleep", 1.0)]
    client = _ncbi(server, tmp_path, timeout=0.2)
    assert client.search("KRT5") == ["3852"]
    assert client.n_requests == 2
    server.failures = [("sleep", 1.0)] * 2
    with pytest.raises(ServiceError, match=r"Timeout|timed out"):
        _ncbi(server, tmp_path, timeout=0.2, max_retries=1).search("KRT5")


def test_ncbi_client_error_is_not_retried(server, tmp_path):
    server.failures = [("status", 400)]
    client = _ncbi(server, tmp_path)
    with pytest.raises(ServiceError, match="HTTP 400"):
        client.search("ERBB2")
    assert client.n_requests == 1


def test_describe_genes_ncbi_source(server, tmp_path, caplog):
    opts = {"base_url": server.url + "/eutils", "rate": 100.0}
    with caplog.at_level(logging.WARNING, logger="dkan"):
        df = describe_genes(["KRT5", "LINC00115", "NOPE"], source="ncbi", cache_dir=tmp_path, ncbi=opts)
    assert df["source"].tolist() == ["summary", "full_name", "symbol"]
    assert df.loc["KRT5", "text"].startswith("This gene encodes a type II keratin")
    assert df.loc["LINC00115", "text"] == "LINC00115: long intergenic non-protein coding RNA 115"
    assert df.loc["NOPE", "text"] == "NOPE" and "1 of 3 genes" in caplog.text
    n = len(server.requests)
    again = describe_genes(["KRT5", "LINC00115", "NOPE"], source="ncbi", cache_dir=tmp_path, ncbi=opts)
    assert len(server.requests) == n
    assert again.equals(df)


# ---------------------------------------------------------------------------------------------- LLM


class FakeChat:
    """Stands in for ``openai.OpenAI``: ``chat.completions.create(**kw)`` records ``kw`` and answers like the API."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[dict] = []
        self.error = error
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def _create(self, **kw):
        self.calls.append(kw)
        if self.error is not None:
            raise self.error
        symbol = kw["messages"][-1]["content"].split("Describe the human gene ", 1)[1].split(":", 1)[0]
        message = SimpleNamespace(role="assistant", content=LLM_REPLIES.get(symbol, json.dumps(GOOD)))
        return SimpleNamespace(choices=[SimpleNamespace(index=0, message=message, finish_reason="stop")])


def _llm(tmp_path, **kw) -> LLMClient:
    opts = {"base_url": "http://127.0.0.1:9/v1", "model": "test-model", "cache_dir": tmp_path, "client": FakeChat()}
    return LLMClient(**(opts | kw))


def test_llm_prompt_structure(tmp_path):
    client = _llm(tmp_path, model="m", disease="breast cancer")
    system, user = client.messages("ERBB2", summary="Encodes a receptor.", full_name="erb-b2", map_location="17q12")
    assert system["role"] == "system" and "molecular biology" in system["content"]
    text = user["content"]
    for needle in ("ERBB2", "breast cancer", "Encodes a receptor.", "17q12", "erb-b2", '"functionality"', "90 words"):
        assert needle in text
    assert "in human biology" in _llm(tmp_path).messages("A")[1]["content"]


def test_llm_condense_valid_fenced_and_cached(tmp_path):
    client = _llm(tmp_path)
    assert client.condense("ERBB2", summary="x") == GOOD
    fenced = client.condense("KRT5", summary="y")
    assert fenced == {"functionality": "intermediate filament, epidermis", "phenotype": "epidermolysis bullosa"}
    call = client.client.calls[0]
    assert call["model"] == "test-model" and call["temperature"] == 0.0 and call["max_tokens"] == 500
    assert [m["role"] for m in call["messages"]] == ["system", "user"] and "x" in call["messages"][1]["content"]
    again = _llm(tmp_path)
    assert again.condense("ERBB2", summary="x") == GOOD and again.n_requests == 0 and again.client.calls == []
    other = _llm(tmp_path, model="other-model")  # another model or prompt is another cache entry
    assert other.condense("ERBB2", summary="x") == GOOD and other.n_requests == 1


@pytest.mark.parametrize("symbol", ["LINC00115", "LONG", "NOKEY"])
def test_llm_malformed_reply_is_rejected(tmp_path, symbol):
    client = _llm(tmp_path)
    assert client.condense(symbol) is None
    assert client.n_malformed == 1
    client.condense(symbol)  # malformed answers are not cached
    assert client.n_requests == 2


def test_parse_reply_rules():
    ok = '{"functionality": "a, b.", "phenotype": ["c", "d"]}'
    assert parse_reply(ok) == ({"functionality": "a, b", "phenotype": "c, d"}, "")
    assert parse_reply(None)[0] is None
    assert "words" in parse_reply(ok, max_words=3)[1]
    assert _content(SimpleNamespace(choices=[])) is None  # an answer without choices is malformed, not a crash
    assert LLMClient(client=FakeChat(), base_url="http://x/v1").condense("A") == GOOD


def test_llm_needs_key_for_default_endpoint(tmp_path, monkeypatch):
    for var in ("DKAN_LLM_BASE_URL", "OPENAI_BASE_URL", "DKAN_LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="DKAN_LLM_API_KEY"):
        LLMClient(cache_dir=tmp_path)


def _fake_openai_module(monkeypatch) -> list[dict]:
    built: list[dict] = []

    def constructor(**kw):
        built.append(kw)
        return FakeChat()

    monkeypatch.setitem(sys.modules, "openai", SimpleNamespace(OpenAI=constructor))
    return built


def test_llm_builds_the_openai_client_from_settings(tmp_path, monkeypatch):
    for var in ("DKAN_LLM_BASE_URL", "DKAN_LLM_MODEL", "DKAN_LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("OPENAI_MODEL", "env-model")
    built = _fake_openai_module(monkeypatch)
    client = LLMClient(cache_dir=tmp_path, timeout=7.0, max_retries=2)
    assert client.base_url == "http://127.0.0.1:9/v1" and client.model == "env-model"
    # a keyless local server: the client still needs a key string, so dkan sends a placeholder
    assert built == [{"base_url": "http://127.0.0.1:9/v1", "api_key": "none", "timeout": 7.0, "max_retries": 2}]
    LLMClient(cache_dir=tmp_path, api_key="k-123")
    assert built[-1]["api_key"] == "k-123"
    assert client.condense("ERBB2") == GOOD and client.client.calls[0]["model"] == "env-model"


def test_llm_without_openai_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` fails as when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'dkan\[llm\]'"):
        LLMClient(base_url="http://127.0.0.1:9/v1", cache_dir=tmp_path)
    with pytest.raises(ImportError, match=r"dkan\[llm\]"):
        describe_genes(["ERBB2"], source={"ERBB2": "x"}, llm={"base_url": "http://x/v1"}, cache_dir=tmp_path)
    # no LLM asked for: no openai needed
    assert describe_genes(["ERBB2"], source={"ERBB2": "x"}, cache_dir=tmp_path)["source"].tolist() == ["summary"]


def test_llm_client_error_becomes_service_error_without_the_key(tmp_path):
    key = "sk-SECRET0123456789abcdef"
    failing = FakeChat(error=RuntimeError(f"Error code: 401 - {{'error': 'invalid key {key}'}}"))
    client = _llm(tmp_path, api_key=key, client=failing)
    with pytest.raises(ServiceError, match=re.escape("LLM request to http://127.0.0.1:9/v1 failed")) as info:
        client.condense("ERBB2")
    assert key not in str(info.value) and "***" in str(info.value) and "401" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_llm_rate_paces_requests(tmp_path):
    client = _llm(tmp_path, rate=20.0)
    t0 = time.monotonic()
    for symbol in ("A", "B", "C"):
        client.condense(symbol)
    assert time.monotonic() - t0 >= 2 * 0.05 * 0.9


@pytest.mark.parametrize("bad", [0, -1.0, True, "5"])
def test_llm_rate_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="`rate` must be a positive number"):
        _llm(tmp_path, rate=bad)


def test_llm_real_openai_client_against_loopback_server(server, tmp_path):
    """End to end through the real ``openai`` client (skipped without the `llm` extra)."""
    pytest.importorskip("openai", reason="the `openai` client is the optional extra `dkan[llm]`")
    client = LLMClient(base_url=server.url + "/v1", model="m", api_key="k-123", cache_dir=tmp_path, max_retries=2)
    server.failures = [("status", 429)]  # retried by the client
    assert client.condense("ERBB2", summary="x") == GOOD and client.n_requests == 1
    path, body = server.requests[-1]
    assert len(server.requests) == 2 and path == "/v1/chat/completions"
    assert body["model"] == "m" and body["temperature"] == 0.0 and body["authorization"] == "Bearer k-123"
    assert client.condense("NOKEY") is None and client.n_malformed == 1


def test_describe_genes_with_llm_and_fallback(tmp_path, caplog):
    table = {"ERBB2": "Receptor tyrosine kinase.", "KRT5": "Type II keratin.", "LINC00115": "A lncRNA."}
    fake = FakeChat()
    llm = {"base_url": "http://127.0.0.1:9/v1", "model": "m", "disease": "breast cancer", "client": fake}
    with caplog.at_level(logging.WARNING, logger="dkan"):
        df = describe_genes(list(table), source=table, llm=llm, cache_dir=tmp_path)
    assert df["source"].tolist() == ["llm", "llm", "summary"]
    assert df.loc["ERBB2", "text"] == (
        "gene symbol: ERBB2. Functionality: receptor tyrosine kinase, EGF signalling. "
        "Phenotype: HER2-positive breast cancer."
    )
    assert df.loc["LINC00115", "text"] == "A lncRNA."  # malformed reply -> un-condensed text
    assert "1 of 3 genes were malformed" in caplog.text
    prompt = fake.calls[0]["messages"][-1]["content"]
    assert "Receptor tyrosine kinase." in prompt and "breast cancer" in prompt
