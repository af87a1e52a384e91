"""Request and response bodies of the HTTP API, as msgspec Structs, and the validation rules.

Bodies are decoded strictly (`msgspec.json.decode(..., strict=True)`): a string is never coerced
to a number, a float never to an int, a bool never to either. Litestar's own `data:` parameter
converts with `strict=False`, which would accept `"max_tokens": "10"`; that is why the handlers
decode the raw body here. Rules that msgspec cannot express (a uint64 upper bound, limits that
depend on the model or on server flags, tokens per stop string) are checked in `validate_execute`.
Every failure is a `RequestError` with the HTTP status, a stable code and the offending field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
from msgspec import Meta
from orcd_core.generation import MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, SamplingParams  # one home for each limit

MAX_PROMPT_CHARS = 32_768
MAX_TOKENS_LIMIT = 2048
MAX_JOB_ID_CHARS = 256
MAX_STOP_TOKENS = 32
MAX_MESSAGES = 512
UINT64_MAX = 2**64 - 1
MAX_ERROR_MESSAGE_CHARS = 1000  # an error body never grows with what the request (or a template) put in it
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

# one set of sampling defaults for the HTTP API and the command line (`generate`)
_DEFAULTS = SamplingParams()

JobId = Annotated[str, Meta(min_length=1, max_length=MAX_JOB_ID_CHARS)]


class Message(msgspec.Struct, forbid_unknown_fields=True):
    """One turn of a conversation (`messages`)."""

    role: str
    content: Annotated[str, Meta(max_length=MAX_PROMPT_CHARS)]


class ExecuteRequest(msgspec.Struct, forbid_unknown_fields=True):
    """POST /execute. Exactly one of `prompt` and `messages`. `max_tokens` None means the server's
    `--max-tokens-out`; `seed` None means a fresh random uint64, reported in `started`."""

    job_id: JobId
    prompt: Annotated[str, Meta(min_length=1, max_length=MAX_PROMPT_CHARS)] | None = None
    messages: Annotated[list[Message], Meta(min_length=1, max_length=MAX_MESSAGES)] | None = None
    chat: bool = False
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = _DEFAULTS.temperature
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] = _DEFAULTS.top_p
    top_k: Annotated[int, Meta(ge=0)] = _DEFAULTS.top_k
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = _DEFAULTS.min_p
    # > 0: llama.cpp divides positive logits by it, so 0 would make them infinite (vLLM refuses 0 too)
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=2.0)] = _DEFAULTS.repetition_penalty
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = _DEFAULTS.presence_penalty
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = _DEFAULTS.frequency_penalty
    stop: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=MAX_STOP_STRINGS)] = []
    seed: Annotated[int, Meta(ge=0)] | None = None
    # k: each `token` event carries the token's log-probability and the k likeliest ids' (see http_api.md)
    logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


class CancelRequest(msgspec.Struct, forbid_unknown_fields=True):
    """POST /cancel."""

    job_id: JobId


# -- errors ------------------------------------------------------------------------------------------


class RequestError(Exception):
    """A request refused before any work: rendered as `{"error": {"code", "message", ...}}`."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None, **extra: Any):
        if len(message) > MAX_ERROR_MESSAGE_CHARS:
            message = message[: MAX_ERROR_MESSAGE_CHARS - 1] + "…"
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def invalid(field: str | None, message: str) -> RequestError:
    return RequestError(400, "INVALID_REQUEST", message, field=field)


_AT_RE = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_NAMED_RE = re.compile(r"(?:missing required field|unknown field) `(?P<name>[^`]+)`")


def field_of(error: msgspec.ValidationError) -> str | None:
    """The dotted path of the field a msgspec error names ("max_tokens", "messages[0].role")."""
    text = str(error)
    path = ""
    at = _AT_RE.search(text)
    if at:
        path = at.group("path").lstrip(".")
    named = _NAMED_RE.search(text)
    if named:
        path = f"{path}.{named.group('name')}" if path else named.group("name")
    return path or None


def decode(body: bytes, type_: type) -> Any:
    """Decode and type-check a JSON body strictly; any problem -> 400 INVALID_REQUEST."""
    if not body.strip():
        raise invalid(None, "empty request body: expected a JSON object")
    try:
        return msgspec.json.decode(body, type=type_, strict=True)
    except msgspec.ValidationError as exc:
        return _raise_validation(exc)
    except msgspec.DecodeError as exc:
        raise invalid(None, f"malformed JSON: {exc}") from None
    except UnicodeDecodeError as exc:  # a string holding bytes that are not UTF-8
        raise invalid(None, f"the request body is not valid UTF-8 (byte {exc.start})") from None


def _raise_validation(exc: msgspec.ValidationError):
    message = _AT_RE.sub("", str(exc))
    raise invalid(field_of(exc), message) from None


def validate_execute(
    req: ExecuteRequest, *, vocab_size: int, max_tokens_out: int, count_tokens
) -> None:
    """The rules that depend on more than one field, on the model, or on server flags.
    `count_tokens(text) -> int` counts a stop string's tokens (no special tokens)."""
    if req.seed is not None and req.seed > UINT64_MAX:
        raise invalid("seed", f"seed must be an unsigned 64-bit integer (0..{UINT64_MAX}), got {req.seed}")
    if req.prompt is None and req.messages is None:
        raise invalid("prompt", "one of `prompt` (a non-empty string) or `messages` is required")
    if req.prompt is not None and req.messages is not None:
        raise invalid("messages", "give either `prompt` or `messages`, not both")
    if req.messages is not None:
        total = 0
        for n, message in enumerate(req.messages):
            if message.role not in CHAT_ROLES:
                raise invalid(
                    f"messages[{n}].role", f"role must be one of {', '.join(CHAT_ROLES)}; got {message.role!r}"
                )
            total += len(message.content)
        if total > MAX_PROMPT_CHARS:
            raise invalid("messages", f"messages hold {total} characters in all; at most {MAX_PROMPT_CHARS}")
        if all(not m.content for m in req.messages):
            raise invalid("messages", "every message is empty")
    if req.max_tokens is not None and req.max_tokens > max_tokens_out:
        raise invalid("max_tokens", f"max_tokens must be <= {max_tokens_out} (--max-tokens-out); got {req.max_tokens}")
    if req.top_k > vocab_size:
        raise invalid("top_k", f"top_k must be between 0 and the vocabulary size {vocab_size}; got {req.top_k}")
    for n, text in enumerate(req.stop):
        if len(text) > MAX_STOP_TOKENS * 64:  # no need to tokenize something this long
            raise invalid(f"stop[{n}]", f"stop string {n} is longer than {MAX_STOP_TOKENS} tokens")
        n_tokens = count_tokens(text)
        if n_tokens > MAX_STOP_TOKENS:
            raise invalid(f"stop[{n}]", f"stop string {n} is {n_tokens} tokens long; at most {MAX_STOP_TOKENS}")
