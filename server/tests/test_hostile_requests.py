"""Bad and hostile requests on every endpoint (issue 16), as one table: (name, method, path, headers,
body, expected status, expected error code). Each must get that 4xx with that stable code, never a
5xx; afterwards /health is OK and a good request works. The table runs twice: against the fake
engine (server/tests/fake_engine.py, a 1 s body deadline) and against `orcd-worker serve` on the
reference backend with a tiny synthetic model (the default 10 s body deadline).

To add rows (e.g. for /v1/*), append `Row(...)`s to `ROWS` or extend `rows()`; `Raw(...)` bodies are
sent over a plain socket (declared lengths that are never sent, trickled bodies, no Host).
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field

import httpx
import pytest
from bad_requests import bad_requests
from fake_engine import FakeEngine
from orcd_server.app import ServerSettings, create_app
from orcd_server.guard import BODY_TIMEOUT_S, MAX_BODY_BYTES
from serve_helpers import ProcessServer, ThreadServer, collect, metric_value, tiny_model

JSON = {"content-type": "application/json"}
GOOD = {"job_id": "good", "prompt": "Hello", "max_tokens": 3, "seed": 1}
FOREIGN_ORIGIN = {"origin": "http://evil.example"}
FOREIGN_HOST = {"host": "evil.example"}
FAKE_BODY_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Raw:
    """Bytes sent over a plain socket: `head` (request line + headers), then `body`, `trickle` bytes
    at a time every `every_s` seconds (0: all at once)."""

    head: bytes
    body: bytes = b""
    trickle: int = 0
    every_s: float = 0.0


@dataclass(frozen=True)
class Row:
    name: str
    method: str
    path: str
    headers: dict = field(default_factory=dict)
    body: object = None  # dict/list -> JSON; bytes as they are; Raw; None: no body
    status: int = 400
    code: str = "INVALID_REQUEST"


def _raw_post(path: str, length: int, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def rows(vocab_size: int, n_ctx: int, max_tokens_out: int) -> list[Row]:
    out: list[Row] = []
    # the body rules of POST /execute (shared with the e2e suite)
    for name, raw, code, _field in bad_requests(vocab_size, n_ctx, max_tokens_out):
        out.append(Row(f"execute: {name}", "POST", "/execute", JSON, raw, 400, code))
    ex = lambda name, body, status=400, code="INVALID_REQUEST", headers=JSON: Row(  # noqa: E731
        f"execute: {name}", "POST", "/execute", headers, body, status, code)
    big = b'{"job_id":"big","prompt":"' + b"a" * 10_000_000 + b'"}'
    out += [
        # numbers
        ex("Infinity temperature", b'{"job_id":"a","prompt":"x","temperature":Infinity}'),
        ex("-Infinity top_p", b'{"job_id":"a","prompt":"x","top_p":-Infinity}'),
        ex("NaN top_p", b'{"job_id":"a","prompt":"x","top_p":NaN}'),
        ex("top_p 1e400", b'{"job_id":"a","prompt":"x","top_p":1e400}'),
        ex("max_tokens 10**30", b'{"job_id":"a","prompt":"x","max_tokens":1000000000000000000000000000000}'),
        ex("max_tokens 2**64", {"job_id": "a", "prompt": "x", "max_tokens": 2**64}),
        ex("max_tokens 1e10", {"job_id": "a", "prompt": "x", "max_tokens": 1e10}),
        ex("max_tokens -2**63", {"job_id": "a", "prompt": "x", "max_tokens": -(2**63)}),
        ex("seed 2**70", {"job_id": "a", "prompt": "x", "seed": 2**70}),
        ex("top_k 2**63", {"job_id": "a", "prompt": "x", "top_k": 2**63}),
        ex("top_k -1.0", b'{"job_id":"a","prompt":"x","top_k":-1.0}'),
        # bytes and encodings
        ex("non-UTF-8 in prompt", b'{"job_id":"a","prompt":"\xff\xfe\xfd"}'),
        ex("non-UTF-8 in job_id", b'{"job_id":"\xc3\x28","prompt":"x"}'),
        ex("overlong UTF-8", b'{"job_id":"a","prompt":"\xc0\xaf"}'),
        ex("UTF-16 body", json.dumps(GOOD).encode("utf-16")),
        ex("raw NUL in string", b'{"job_id":"a","prompt":"a\x00b"}'),
        ex("NUL before body", b'\x00{"job_id":"a","prompt":"x"}'),
        ex("lone surrogate escape", b'{"job_id":"a","prompt":"\\ud800"}'),
        ex("BOM", b"\xef\xbb\xbf" + json.dumps(GOOD).encode()),
        # structure
        ex("nested arrays 100k deep", b"[" * 100_000 + b"]" * 100_000),
        ex("nested objects in a field", b'{"job_id":"a","prompt":"x","stop":' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"}"),
        ex("nested arrays in prompt", b'{"job_id":"a","prompt":' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        ex("duplicate keys, last wrong", b'{"job_id":"a","prompt":"x","max_tokens":4,"max_tokens":"4"}'),
        ex("513 messages", {"job_id": "a", "messages": [{"role": "user", "content": "x"}] * 513}),
        ex("stop of 2000 chars", {"job_id": "a", "prompt": "x", "stop": ["z" * 2100]}),
        ex("job_id 100k chars", {"job_id": "j" * 100_000, "prompt": "x"}),
        ex("prompt 1M chars", {"job_id": "a", "prompt": "a" * 1_000_000}, 400),
        # sizes
        ex("10 MB body", big, 413, "BODY_TOO_LARGE"),
        ex("1 MiB + 1 body", b" " * (MAX_BODY_BYTES + 1), 413, "BODY_TOO_LARGE"),
        ex("100 MB declared, 1 KB sent", Raw(_raw_post("/execute", 100_000_000), b"{" + b" " * 1000), 413, "BODY_TOO_LARGE"),
        ex("10 MB chunked", Raw(b"POST /execute HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n",
                                b"".join(b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20)) for _ in range(10)) + b"0\r\n\r\n"),
           413, "BODY_TOO_LARGE"),
        # content types
        ex("text/plain", json.dumps(GOOD).encode(), 415, "UNSUPPORTED_MEDIA_TYPE", {"content-type": "text/plain"}),
        ex("form", b"job_id=a&prompt=x", 415, "UNSUPPORTED_MEDIA_TYPE",
           {"content-type": "application/x-www-form-urlencoded"}),
        ex("multipart", b"--b\r\n\r\nx\r\n--b--", 415, "UNSUPPORTED_MEDIA_TYPE",
           {"content-type": "multipart/form-data; boundary=b"}),
        ex("no content type", json.dumps(GOOD).encode(), 415, "UNSUPPORTED_MEDIA_TYPE", {"content-type": ""}),
        ex("json in latin-1", json.dumps(GOOD).encode(), 415, "UNSUPPORTED_MEDIA_TYPE",
           {"content-type": "application/json; charset=latin-1"}),
        ex("application/jsonx", json.dumps(GOOD).encode(), 415, "UNSUPPORTED_MEDIA_TYPE",
           {"content-type": "application/jsonx"}),
        # where it comes from
        ex("foreign Origin", GOOD, 403, "ORIGIN_NOT_ALLOWED", {**JSON, **FOREIGN_ORIGIN}),
        ex("null Origin", GOOD, 403, "ORIGIN_NOT_ALLOWED", {**JSON, "origin": "null"}),
        ex("localhost Origin of another port", GOOD, 403, "ORIGIN_NOT_ALLOWED", {**JSON, "origin": "http://localhost:3000"}),
        ex("foreign Host (DNS rebinding)", GOOD, 400, "HOST_NOT_ALLOWED", {**JSON, **FOREIGN_HOST}),
        ex("browser text/plain cross-origin", json.dumps(GOOD).encode(), 403, "ORIGIN_NOT_ALLOWED",
           {"content-type": "text/plain", **FOREIGN_ORIGIN}),
        # slow body: 1 byte per 0.3 s of a declared 200
        ex("slow body", Raw(_raw_post("/execute", 200), b"{" + b" " * 199, trickle=1, every_s=0.3), 408, "REQUEST_TIMEOUT"),
    ]
    ca = lambda name, body, status=400, code="INVALID_REQUEST", headers=JSON: Row(  # noqa: E731
        f"cancel: {name}", "POST", "/cancel", headers, body, status, code)
    out += [
        ca("empty body", b""),
        ca("truncated json", b'{"job_id":'),
        ca("non-UTF-8 job_id", b'{"job_id":"\xff"}'),
        ca("job_id not a string", {"job_id": 5}),
        ca("empty job_id", {"job_id": ""}),
        ca("unknown field", {"job_id": "a", "force": True}),
        ca("array", [{"job_id": "a"}]),
        ca("NaN", b'{"job_id":NaN}'),
        ca("nested", b"[" * 100_000),
        ca("text/plain", b'{"job_id":"a"}', 415, "UNSUPPORTED_MEDIA_TYPE", {"content-type": "text/plain"}),
        ca("foreign Origin", {"job_id": "a"}, 403, "ORIGIN_NOT_ALLOWED", {**JSON, **FOREIGN_ORIGIN}),
        ca("foreign Host", {"job_id": "a"}, 400, "HOST_NOT_ALLOWED", {**JSON, **FOREIGN_HOST}),
        ca("10 MB body", b'{"job_id":"' + b"a" * 10_000_000 + b'"}', 413, "BODY_TOO_LARGE"),
        Row("shutdown: foreign Origin", "POST", "/shutdown", FOREIGN_ORIGIN, None, 403, "ORIGIN_NOT_ALLOWED"),
        Row("shutdown: browser text/plain", "POST", "/shutdown", {"content-type": "text/plain", **FOREIGN_ORIGIN},
            b"x", 403, "ORIGIN_NOT_ALLOWED"),
        Row("shutdown: text/plain, same origin", "POST", "/shutdown", {"content-type": "text/plain"}, b"x",
            415, "UNSUPPORTED_MEDIA_TYPE"),
        Row("shutdown: form", "POST", "/shutdown", {"content-type": "application/x-www-form-urlencoded"}, b"a=1",
            415, "UNSUPPORTED_MEDIA_TYPE"),
        Row("shutdown: foreign Host", "POST", "/shutdown", FOREIGN_HOST, None, 400, "HOST_NOT_ALLOWED"),
        Row("shutdown: rebinding Host with port", "POST", "/shutdown", {"host": "attacker.test:8080"}, None,
            400, "HOST_NOT_ALLOWED"),
        Row("shutdown: GET", "GET", "/shutdown", {}, None, 405, "METHOD_NOT_ALLOWED"),
        Row("health: foreign Host", "GET", "/health", FOREIGN_HOST, None, 400, "HOST_NOT_ALLOWED"),
        Row("health: foreign Origin", "GET", "/health", FOREIGN_ORIGIN, None, 403, "ORIGIN_NOT_ALLOWED"),
        Row("health: POST", "POST", "/health", JSON, {}, 405, "METHOD_NOT_ALLOWED"),
        Row("health: DELETE", "DELETE", "/health", {}, None, 405, "METHOD_NOT_ALLOWED"),
        Row("health: no Host (HTTP/1.0)", "GET", "/health", {}, Raw(b"GET /health HTTP/1.0\r\n\r\n"), 400, "HOST_NOT_ALLOWED"),
        Row("metrics: foreign Host", "GET", "/metrics", FOREIGN_HOST, None, 400, "HOST_NOT_ALLOWED"),
        Row("metrics: foreign Origin", "GET", "/metrics", FOREIGN_ORIGIN, None, 403, "ORIGIN_NOT_ALLOWED"),
        Row("metrics: PUT", "PUT", "/metrics", JSON, {}, 405, "METHOD_NOT_ALLOWED"),
        Row("execute: GET", "GET", "/execute", {}, None, 405, "METHOD_NOT_ALLOWED"),
        Row("execute: PUT", "PUT", "/execute", JSON, GOOD, 405, "METHOD_NOT_ALLOWED"),
        Row("execute: PATCH", "PATCH", "/execute", JSON, GOOD, 405, "METHOD_NOT_ALLOWED"),
        Row("execute: TRACE", "TRACE", "/execute", {}, None, 405, "METHOD_NOT_ALLOWED"),
        Row("execute: preflight from a foreign origin", "OPTIONS", "/execute",
            {**FOREIGN_ORIGIN, "access-control-request-method": "POST"}, None, 403, "ORIGIN_NOT_ALLOWED"),
        Row("cancel: GET", "GET", "/cancel", {}, None, 405, "METHOD_NOT_ALLOWED"),
        Row("unknown path", "GET", "/nowhere", {}, None, 404, "NOT_FOUND"),
        Row("unknown path POST", "POST", "/admin", JSON, {}, 404, "NOT_FOUND"),
        Row("path traversal", "GET", "/../../etc/passwd", {}, None, 404, "NOT_FOUND"),
        Row("trailing path", "POST", "/execute/x", JSON, GOOD, 404, "NOT_FOUND"),
        Row("long path", "GET", "/" + "a" * 4000, {}, None, 404, "NOT_FOUND"),
    ]
    return out


def send(url: str, row: Row, timeout: float) -> tuple[int, dict]:
    """One request of the table; returns (status, parsed JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    if isinstance(row.body, Raw):
        return _send_raw(host, int(port), row.body, timeout)
    headers = dict(row.headers)
    content = None
    if isinstance(row.body, bytes):
        content = row.body
    elif row.body is not None:
        content = json.dumps(row.body).encode()
    with httpx.Client(base_url=url, timeout=timeout) as client:
        request = client.build_request(row.method, row.path, content=content, headers=headers)
        if headers.get("content-type") == "":
            del request.headers["content-type"]
        if "host" in headers:
            request.headers["host"] = headers["host"]
        response = client.send(request)
    return response.status_code, response.json()


def _send_raw(host: str, port: int, raw: Raw, timeout: float) -> tuple[int, dict]:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(raw.head)
        data = b""
        try:
            if raw.trickle:
                sock.settimeout(raw.every_s)
                for i in range(0, len(raw.body), raw.trickle):
                    sock.sendall(raw.body[i : i + raw.trickle])
                    try:
                        data = sock.recv(65536)
                        if data:
                            break
                    except TimeoutError:
                        pass
                sock.settimeout(timeout)
            else:
                sock.sendall(raw.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the whole body was sent
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(rest)


# -- the two servers -------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _fresh_structlog():
    import structlog

    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def fake_server():
    loader = FakeEngine.loader()
    settings = ServerSettings(worker_id="00000000-0000-4000-8000-000000000000", model_ref="fake",
                              backend="reference", body_timeout_s=FAKE_BODY_TIMEOUT_S)
    with ThreadServer(create_app(settings, loader)) as srv:
        _wait_healthy(srv.url)
        yield srv.url, FAKE_BODY_TIMEOUT_S, 2048


@pytest.fixture(scope="module")
def reference_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    srv = ProcessServer(["--backend", "reference", "--model", str(tiny_model(work)), "--max-context", "256",
                         "--max-tokens-out", "64", "--log-format", "json"], work).start()
    try:
        srv.wait_ready(120)
        yield srv.url, BODY_TIMEOUT_S, 64
    finally:
        assert srv.stop() == 0, srv.stderr()


@pytest.fixture(scope="module", params=["fake", "reference"])
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


def _wait_healthy(url: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(url + "/health", timeout=5)
        if r.status_code == 200:
            return r.json()
        time.sleep(0.01)
    raise TimeoutError("not healthy")


def test_the_table_is_big_enough():
    table = rows(1000, 4096, 2048)
    assert len(table) >= 80
    assert len({r.name for r in table}) == len(table)
    assert {"/execute", "/cancel", "/health", "/metrics", "/shutdown"} <= {r.path for r in table}


def test_every_hostile_request_gets_its_4xx_and_code(server):
    url, body_timeout, max_tokens_out = server
    health = _wait_healthy(url)
    table = rows(health["vocab_size"], health["n_ctx"], max_tokens_out)
    with httpx.Client(base_url=url, timeout=30) as c:
        invalid_before = metric_value(c.get("/metrics").text, "orcd_requests_total", 'outcome="invalid"')
    wrong = []
    t_slow = None
    for row in table:
        t0 = time.perf_counter()
        status, body = send(url, row, timeout=body_timeout + 20)
        if row.name == "execute: slow body":
            t_slow = time.perf_counter() - t0
        code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        assert status < 500, f"{row.name}: {status} {body}"
        if (status, code) != (row.status, row.code):
            wrong.append(f"{row.name}: got {status} {code}, expected {row.status} {row.code}: {body}")
        assert len(json.dumps(body)) < 2000, f"{row.name}: an error body of {len(json.dumps(body))} bytes"
    assert not wrong, "\n".join(wrong)
    # a trickled body is cut at the deadline, not after it has all arrived (200 bytes x 0.3 s = 60 s)
    assert body_timeout <= t_slow < body_timeout + 2.0
    health = _wait_healthy(url)
    assert health["jobs_running"] == 0 and health["jobs_queued"] == 0
    with httpx.Client(base_url=url, timeout=60) as c:
        events = collect(c, GOOD)
        assert [n for n, _ in events][0] == "started" and events[-1][0] == "end"
        invalid_after = metric_value(c.get("/metrics").text, "orcd_requests_total", 'outcome="invalid"')
    n_execute_refusals = sum(1 for r in table if r.path == "/execute" and r.method == "POST")
    assert invalid_after - invalid_before == n_execute_refusals  # every refused /execute is counted


def test_duplicate_job_id_while_running(server):
    url, _, _ = server
    with httpx.Client(base_url=url, timeout=60) as c:
        first = {"job_id": "dup", "prompt": "Hello", "max_tokens": 60, "seed": 3}
        with c.stream("POST", "/execute", json=first) as stream:
            lines = stream.iter_lines()
            for line in lines:
                if line.startswith("event: token"):
                    break
            r = c.post("/execute", json=first)
            assert r.status_code == 400
            assert r.json()["error"]["code"] == "INVALID_REQUEST" and r.json()["error"]["field"] == "job_id"
            assert c.post("/cancel", json={"job_id": "dup"}).status_code == 202
            terminal = [line for line in lines if line.startswith("event: ") and line[7:] in ("end", "error")]
        assert terminal == ["event: error"]
        assert collect(c, {**GOOD, "job_id": "dup"})[-1][0] == "end"  # the id is free again
