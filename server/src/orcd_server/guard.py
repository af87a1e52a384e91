"""The request guard: checks every HTTP request must pass before a handler sees it, as one ASGI
middleware in front of every route (native and OpenAI-style alike).

In order, each refusal a JSON error body `{"error": {"code", "message"}}` with a stable code:
- `Host` must name this worker (DNS rebinding): the bound host, `localhost`, `127.0.0.1`, `[::1]`,
  and each `--allowed-host` (`*` turns the check off). Bound to a wildcard address (`0.0.0.0`,
  `::`), any IP-literal `Host` is accepted too (a rebinding page's `Host` is its own domain name).
  -> 400 `HOST_NOT_ALLOWED`.
- `Origin`, when a browser sends one, must be the worker's own (`http://` + the `Host`) or one of
  `allowed_origins` (`*` allows any). A foreign page cannot start jobs, cancel them or stop the
  worker. -> 403 `ORIGIN_NOT_ALLOWED`.
- a request with a body must say `Content-Type: application/json` (or `…+json`), charset UTF-8 if
  one is named; a form or `text/plain` post (what a browser may send cross-origin without asking)
  never runs. -> 415 `UNSUPPORTED_MEDIA_TYPE`.
- the body is read here, whole, within `body_timeout_s` from the first byte the handler would wait
  for (a body trickled byte by byte holds no connection longer) -> 408 `REQUEST_TIMEOUT`, and
  at most `max_body_bytes` (checked against `Content-Length` before reading, and while reading a
  chunked body) -> 413 `BODY_TOO_LARGE`.
- the body must be UTF-8 (RFC 8259 §8.1: JSON exchanged between systems is UTF-8) -> 400
  `INVALID_REQUEST`.
The handler then receives the body as one message; later `receive` calls (an SSE stream waiting
for the client to disconnect) go to the server as before.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from typing import Any

import msgspec

MAX_BODY_BYTES = 1 << 20  # 1 MiB: the largest valid /execute body is about 0.2 MiB (32,768 characters, escaped)
BODY_TIMEOUT_S = 10.0  # the whole body must arrive within this many seconds
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# Litestar's own refusals (routing, its own body limit), each with a stable code
HTTP_STATUS_CODES = {
    400: "INVALID_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    413: "BODY_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


def error_body(code: str, message: str) -> bytes:
    return msgspec.json.encode({"error": {"code": code, "message": message}})


def _host_name(value: str) -> str:
    """`Host` header value -> lower-case host name without port ("[::1]:8080" -> "::1")."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value  # no port, or a bare IPv6 literal


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class GuardPolicy:
    """What the guard accepts; built once from the server settings."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
        max_body_bytes: int = MAX_BODY_BYTES,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        extra = [_host_name(h) if h != "*" else "*" for h in allowed_hosts]
        self.any_host = "*" in extra
        bound = _host_name(host)
        self.wildcard = bound in WILDCARD_HOSTS
        self.hosts = frozenset({*DEFAULT_ALLOWED_HOSTS, *extra, *([] if self.wildcard else [bound])})
        origins = [o.strip().rstrip("/").lower() for o in allowed_origins]
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)
        self.max_body_bytes = int(max_body_bytes)
        self.body_timeout_s = float(body_timeout_s)

    def host_ok(self, host_header: str | None) -> bool:
        if self.any_host:
            return True
        if not host_header:
            return False  # HTTP/1.1 requires Host; uvicorn fills nothing in
        name = _host_name(host_header)
        return name in self.hosts or (self.wildcard and _is_ip(name))

    def origin_ok(self, origin: str, host_header: str | None) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if self.any_origin or origin in self.origins:
            return True
        return bool(host_header) and origin in (f"http://{host_header.strip().lower()}",
                                                f"https://{host_header.strip().lower()}")


def json_media_type_ok(content_type: str) -> bool:
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        return False
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class RequestGuard:
    """ASGI middleware (Litestar `middleware=[...]`); `on_refusal(scope, status, code)` is told of
    each refusal (metrics)."""

    def __init__(self, app, policy: GuardPolicy, on_refusal=None) -> None:
        self.app = app
        self.policy = policy
        self.on_refusal = on_refusal

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.policy
        headers = _headers(scope)
        try:
            self._check_headers(policy, scope, headers)
            if scope["method"] in BODY_METHODS:
                body = await self._read_body(policy, headers, receive)
                receive = _replay(body, receive)
        except _Refusal as refusal:
            if self.on_refusal is not None:
                self.on_refusal(scope, refusal.status, refusal.code)
            await _send_error(send, refusal)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _check_headers(policy: GuardPolicy, scope, headers: dict[str, str]) -> None:
        host = headers.get("host")
        if not policy.host_ok(host):
            raise _Refusal(400, "HOST_NOT_ALLOWED",
                           f"Host {host!r} does not name this worker; allow it with --allowed-host")
        origin = headers.get("origin")
        if origin is not None and not policy.origin_ok(origin, host):
            raise _Refusal(403, "ORIGIN_NOT_ALLOWED", f"requests from origin {origin[:200]!r} are not allowed")
        if scope["method"] not in BODY_METHODS:
            return
        content_type = headers.get("content-type")
        has_body = headers.get("content-length", "0").strip() not in ("0", "") or "transfer-encoding" in headers
        if content_type is None:
            if has_body:
                raise _Refusal(415, "UNSUPPORTED_MEDIA_TYPE", "a request body needs Content-Type: application/json")
        elif not json_media_type_ok(content_type):
            raise _Refusal(415, "UNSUPPORTED_MEDIA_TYPE",
                           f"Content-Type {content_type[:100]!r} is not accepted; send application/json (UTF-8)")
        length = headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise _Refusal(400, "INVALID_REQUEST", "Content-Length is not a number") from None
            if n > policy.max_body_bytes:
                raise _Refusal(413, "BODY_TOO_LARGE",
                               f"request body of {n} bytes is over the limit of {policy.max_body_bytes} bytes")

    @staticmethod
    async def _read_body(policy: GuardPolicy, headers: dict[str, str], receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(policy.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _Refusal(400, "INVALID_REQUEST", "the client went away before its body was complete")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > policy.max_body_bytes:
                        raise _Refusal(413, "BODY_TOO_LARGE",
                                       f"request body is over the limit of {policy.max_body_bytes} bytes")
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise _Refusal(408, "REQUEST_TIMEOUT",
                           f"the request body did not arrive within {policy.body_timeout_s:g} s") from None
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Refusal(400, "INVALID_REQUEST", f"the request body is not valid UTF-8 (byte {exc.start})") from None
        return body


def _headers(scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in scope.get("headers", ()):
        out.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
    return out


def _replay(body: bytes, receive):
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _send_error(send, refusal: _Refusal) -> None:
    body = error_body(refusal.code, refusal.message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if refusal.status in (408, 413):  # the rest of the body is not read: the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
