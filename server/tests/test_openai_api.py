"""The OpenAI-compatible API with the real `openai` client against `orcd-worker serve --backend
reference` (subprocess, loopback) on a tiny synthetic Phi-3 (one layer, llama.cpp's real Phi-3
vocabulary and chat template): every call streaming and not, chat and completion, the refusals as
the client's own exception types, API keys, CORS, the OpenAPI document, and that /v1 jobs share
the queue, cancellation and metrics with /execute."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest
from orcd_core import testmodels
from orcd_core.testing import synth
from serve_helpers import ProcessServer, collect, metric_value, tokens

KEY = "sk-test-5b1f0c77d2e94f4a"
OTHER_KEY = "sk-second-key-0001"
ORIGIN = "http://app.example.test"
N_CTX = 512
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("openai") / "phi3-tiny.gguf"
    vocab = testmodels.llama_cpp_models_dir() / "ggml-vocab-phi-3.gguf"
    synth.synthesize("phi3", path, size="tiny", layers=1, seed=5, vocab=vocab)
    return path


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    keyfile = tmp_path_factory.mktemp("keys") / "keys.txt"
    keyfile.write_text(f"# a comment\n{OTHER_KEY}\n")
    srv = ProcessServer(["--backend", "reference", "--model", str(model), "--alias", "tiny", "--max-context",
                         str(N_CTX), "--queue-size", "1", "--max-batch", "1",  # one running + one queued: full
                         "--log-format", "json", "--api-key", KEY,
                         "--api-key-file", str(keyfile), "--cors-origin", ORIGIN], tmp_path_factory.mktemp("srv"))
    srv.start()
    try:
        deadline = time.monotonic() + 120
        while "listening on" not in srv.stderr():
            assert srv.proc.poll() is None, srv.stderr()
            assert time.monotonic() < deadline, srv.stderr()
            time.sleep(0.05)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    return httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"})


def wait_idle(http, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = http.get("/health").json()
        if h["jobs_running"] == 0 and h["jobs_queued"] == 0:
            return
        time.sleep(0.01)
    raise TimeoutError("jobs never drained")


def test_listening_line_and_models(server, client):
    assert f"listening on {server.url}" in server.stderr()
    assert any(line.get("event") == "listening" and line["url"] == server.url for line in server.logs())
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].owned_by == "orcd-worker"
    meta = models[0].model_extra["meta"]
    assert meta["n_ctx"] == N_CTX and meta["n_vocab"] == 32064 and meta["architecture"] == "phi3"
    assert meta["n_params"] > 0 and meta["size"] > 0


def test_completion_matches_execute(client, http):
    """Greedy: /v1/completions, streamed and not, gives the tokens /execute gives."""
    native = collect(http, {"job_id": "native-1", "prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    expected = "".join(t for t, _i, _id in tokens(native))
    end = native[-1][1]
    out = client.completions.create(model="anything", prompt=PROMPT, max_tokens=6, temperature=0,
                                    extra_body={"unknown_field": 1})
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "length"
    assert out.model == "tiny" and out.object == "text_completion" and out.id.startswith("cmpl-")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        end["tokens_in"], 6, end["tokens_in"] + 6)
    assert out.model_extra["timings"]["predicted_n"] == 6
    chunks = list(client.completions.create(prompt=PROMPT, max_tokens=6, temperature=0, model="tiny", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_token_id_prompt_and_tokenize_roundtrip(client, http):
    ids = http.post("/tokenize", json={"content": PROMPT, "add_special": True}).json()["tokens"]
    assert ids[0] == 1  # BOS, with add_special
    assert http.post("/detokenize", json={"tokens": ids[1:]}).json()["content"] == PROMPT
    pieces = http.post("/tokenize", json={"content": "hello world", "with_pieces": True}).json()["tokens"]
    assert [p["piece"] for p in pieces] == ["hello", "world"]
    by_text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_chat_stream_and_not(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=5, temperature=0,
                                           seed=7)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert whole.object == "chat.completion" and whole.usage.completion_tokens == 5
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].object == "chat.completion.chunk"
    # content parts are joined; max_tokens left out: what the context leaves (the job ends by length)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    same = client.chat.completions.create(model="tiny", messages=parts, max_tokens=5, temperature=0)
    assert same.usage.prompt_tokens == client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=1).usage.prompt_tokens


def test_stop_string_cuts_the_text(client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    stop = full.strip()[len(full.strip()) // 2:][:3]
    assert stop
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stop=stop)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]


@pytest.mark.parametrize("kwargs, param", [
    (dict(n=2), "n"),
    (dict(top_logprobs=3), "top_logprobs"),  # without logprobs: true
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(max_tokens=5000), "max_tokens"),
    (dict(temperature=3.0), "temperature"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
])
def test_refusals_are_bad_request_errors(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], **kwargs)
    error = info.value.body
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]


def test_presence_and_frequency_penalties_change_what_repeats(client):
    """OpenAI's penalties reach the sampler (llama.cpp's semantics over the penalty window): greedy
    output with a strong frequency penalty differs from the plain one and repeats fewer ids."""
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
    pen = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                    frequency_penalty=2.0, presence_penalty=2.0)
    assert pen.choices[0].text != plain.choices[0].text
    assert pen.usage.completion_tokens >= 1


def test_completion_refusals(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=["one", "two"], max_tokens=2)
    assert info.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, logprobs=21)
    assert info.value.body["param"] == "logprobs"


def test_chat_logprobs_streaming_and_not_match_the_native_token_events(client, http):
    """logprobs: true + top_logprobs k: one entry per generated token, named by the bytes it adds to
    the text, with the values the native events carry (the engine's are checked against a full
    prefill in tests/test_logprobs.py); the same streamed and not."""
    messages = [{"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3)
    choice = whole.choices[0]
    content = choice.logprobs.content
    assert len(content) == whole.usage.completion_tokens == 6
    assert b"".join(bytes(e.bytes) for e in content) == choice.message.content.encode()
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].logprob == e.logprob and e.top_logprobs[0].token == e.token  # greedy
    native = collect(http, {"job_id": "native-lp", "messages": messages, "max_tokens": 6, "temperature": 0,
                            "logprobs": 3})
    events = [d for name, d in native if name == "token"]
    assert [e.logprob for e in content] == [d["logprob"] for d in events]
    assert [[t.logprob for t in e.top_logprobs] for e in content] == [
        [a["logprob"] for a in d["top_logprobs"]] for d in events]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs(client):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0.8, seed=3, logprobs=2)
    lp = out.choices[0].logprobs
    n = out.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert all(max(t.values()) >= v for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0.8, seed=3,
                                            logprobs=2, stream=True))
    assert [v for c in chunks if c.choices and c.choices[0].logprobs
            for v in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs


def test_context_overflow(client):
    long_prompt = "hello " * 600
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=long_prompt, max_tokens=4)
    body = info.value.body
    assert body["code"] == "context_length_exceeded" and body["n_ctx"] == N_CTX and body["n_prompt_tokens"] > N_CTX
    assert str(body["n_prompt_tokens"]) in body["message"]
    with pytest.raises(openai.BadRequestError) as info:  # no max_tokens: the prompt alone fills the context
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long_prompt}])
    assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "messages"


def test_api_keys(server, http):
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert info.value.body["type"] == "authentication_error"
    second = openai.OpenAI(base_url=server.url + "/v1", api_key=OTHER_KEY, max_retries=0)  # from --api-key-file
    assert second.models.list().data[0].id == "tiny"
    bare = httpx.Client(base_url=server.url, timeout=30)
    assert bare.get("/health").status_code == 200
    for method, path in (("GET", "/metrics"), ("POST", "/execute"), ("POST", "/cancel"), ("POST", "/shutdown"),
                         ("POST", "/tokenize"), ("GET", "/schema"), ("POST", "/v1/chat/completions")):
        r = bare.request(method, path, json={"job_id": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, r.text)
    assert bare.get("/metrics", headers={"X-Api-Key": KEY}).status_code == 200
    assert bare.get("/metrics", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
    assert KEY not in server.log_path.read_text() and KEY not in server.stderr()


def test_cors(server):
    bare = httpx.Client(base_url=server.url, timeout=30)
    pre = bare.options("/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert pre.status_code in (200, 204) and pre.headers["access-control-allow-origin"] == ORIGIN
    assert bare.get("/metrics", headers={"Origin": ORIGIN}).headers.get("access-control-allow-origin") == ORIGIN
    other = bare.get("/health", headers={"Origin": "http://evil.example.test"})
    assert "access-control-allow-origin" not in other.headers


def test_schema(http):
    doc = http.get("/schema").json()
    assert doc["openapi"].startswith("3.") and "/v1/chat/completions" in doc["paths"]
    schemas = doc["components"]["schemas"]
    assert set(schemas["ExecuteRequest"]["properties"]) >= {"job_id", "prompt", "messages", "max_tokens", "stop"}
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    assert http.get("/schema/openapi.json").json() == doc
    assert "swagger-ui" in http.get("/schema/swagger").text


def _long_execute(http, job_id, box):
    box[job_id] = collect(http, {"job_id": job_id, "prompt": PROMPT, "max_tokens": 480, "temperature": 0})


def test_queue_full_is_a_rate_limit_error(client, http):
    wait_idle(http)
    box: dict = {}
    threads = [threading.Thread(target=_long_execute, args=(http, f"long-{k}", box)) for k in range(2)]
    threads[0].start()
    _wait_health(http, running=1, queued=0)
    threads[1].start()
    _wait_health(http, running=1, queued=1)
    try:
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert info.value.body["code"] == "rate_limit_exceeded"
    finally:
        for k in (1, 0):
            http.post("/cancel", json={"job_id": f"long-{k}"})
        for t in threads:
            t.join(60)
    assert [box[f"long-{k}"][-1][1]["code"] for k in range(2)] == ["CANCELLED", "CANCELLED"]


def _wait_health(http, running, queued, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = http.get("/health").json()
        if (h["jobs_running"], h["jobs_queued"]) == (running, queued):
            return
        time.sleep(0.005)
    raise TimeoutError


def _cancelled(http) -> float:
    return metric_value(http.get("/metrics").text, "orcd_requests_total", 'outcome="cancelled"')


def _ends(server, prefix: str) -> list[dict]:
    return [line for line in server.logs() if line.get("event") == "execute_end" and line["job_id"].startswith(prefix)]


def _next_end(server, prefix: str, seen: int, timeout=60) -> dict:
    """The first `execute_end` log line of a /v1 job (ids `prefix`...) after the `seen` already logged.
    The job stops counting as running just before it is counted and logged: wait for the line, not
    for an idle /health, before reading /metrics."""
    deadline = time.monotonic() + timeout
    while len(ends := _ends(server, prefix)) <= seen:
        assert time.monotonic() < deadline, f"no execute_end for a {prefix} job"
        time.sleep(0.01)
    assert len(ends) == seen + 1, ends[seen:]
    return ends[seen]


def test_disconnect_cancels_streaming_and_whole_requests(client, http, server):
    """Greedy (temperature 0: no random seed, no early EOS) the tiny model runs all 480 tokens on PROMPT
    and on "hi" (seconds on the reference backend), so each client goes while its job runs, with most
    of its tokens still to come; a job that was not cancelled ends "completed" and fails this test."""
    wait_idle(http)
    before = _cancelled(http)
    seen_chat, seen_whole = len(_ends(server, "chatcmpl-")), len(_ends(server, "cmpl-"))
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=480, temperature=0, stream=True)
    for n, _chunk in enumerate(stream):
        if n == 2:
            break
    stream.close()
    end = _next_end(server, "chatcmpl-", seen_chat)
    assert (end["outcome"], end.get("message")) == ("cancelled", "job cancelled (disconnect)"), end
    wait_idle(http, timeout=30)
    # not streaming: the client hangs up while its job runs (before any answer), the job is cancelled
    # all the same. A raw connection, closed once /health shows the job running: no client timeout
    # racing the generation.
    body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 480, "temperature": 0}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        _wait_health(http, running=1, queued=0)
    end = _next_end(server, "cmpl-", seen_whole)
    assert (end["outcome"], end.get("message")) == ("cancelled", "job cancelled (disconnect)"), end
    wait_idle(http, timeout=30)
    assert _cancelled(http) == before + 2
    assert json.loads(http.get("/health").text)["status"] == "healthy"
