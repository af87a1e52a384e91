"""API keys (`--api-key`, `--api-key-file`, `ORCD_API_KEY`): an ASGI middleware in front of every
route but GET /health (and CORS preflights, which carry no credentials by the browser's rules).

A request must carry `Authorization: Bearer KEY` or `X-Api-Key: KEY`; anything else is answered
401 with `{"error": {"message", "type": "authentication_error", "param": null, "code": "invalid_api_key"}}`
(OpenAI's shape, whose `code` and `message` also fit the native API's error body). Keys are compared
with `hmac.compare_digest` against every configured key (no early exit on the first match, so the
time taken does not say which key or how much of it matched). A key is never logged.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from pathlib import Path

import msgspec

from orcd_core.errors import OrcdError

API_KEY_ENV = "ORCD_API_KEY"
OPEN_PATHS = frozenset({"/health"})  # reachable without a key (load balancers, orchestrators)


class ApiKeyError(OrcdError):
    """An --api-key-file cannot be read or holds no key, or a key is empty."""


def collect_keys(keys: Iterable[str] = (), key_files: Iterable[str] = (), environ=None) -> tuple[str, ...]:
    """--api-key values, the non-empty lines of each --api-key-file (`#` starts a comment line), and
    ORCD_API_KEY; duplicates dropped, order kept. An empty tuple means no authentication."""
    env = os.environ if environ is None else environ
    found: list[str] = []
    for key in keys:
        if not key.strip():
            raise ApiKeyError("--api-key must not be empty")
        found.append(key.strip())
    for name in key_files:
        try:
            lines = Path(name).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiKeyError(f"--api-key-file {name}: cannot be read ({exc.__class__.__name__})") from None
        file_keys = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not file_keys:
            raise ApiKeyError(f"--api-key-file {name}: holds no key")
        found.extend(file_keys)
    if env.get(API_KEY_ENV, "").strip():
        found.append(env[API_KEY_ENV].strip())
    return tuple(dict.fromkeys(found))


def _presented(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        lower = name.lower()
        if lower == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif lower == b"x-api-key" and value.strip():
            return value.strip()
    return None


def key_matches(presented: bytes | None, keys: tuple[bytes, ...]) -> bool:
    if presented is None:
        return False
    ok = False
    for key in keys:  # every key is compared, whatever matched before
        ok |= hmac.compare_digest(presented, key)
    return ok


_UNAUTHORIZED = msgspec.json.encode({
    "error": {
        "message": "a valid API key is required: send `Authorization: Bearer KEY` or `X-Api-Key: KEY`",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }
})


class ApiKeyMiddleware:
    """Litestar middleware (through `DefineMiddleware(ApiKeyMiddleware, keys=...)`)."""

    def __init__(self, app, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = tuple(k.encode("utf-8") for k in keys)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if key_matches(_presented(scope.get("headers") or []), self.keys):
            await self.app(scope, receive, send)
            return
        await send({
            "type": "http.response.start",
            "status": 401,
            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                        (b"content-length", str(len(_UNAUTHORIZED)).encode())],
        })
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})
