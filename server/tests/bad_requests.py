"""Requests that POST /execute must refuse with 400 before any work, and the field each names.
Shared by the fake-engine tests and the end-to-end suite. `vocab_size` and `n_ctx` come from the
server's /health; the server runs with --max-tokens-out 64 (fake: the default 2048)."""

from __future__ import annotations

import json

OK = {"job_id": "bad", "prompt": "Hello", "max_tokens": 4}


def _with(**changes):
    body = dict(OK)
    for key, value in changes.items():
        if value is _DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return body


_DROP = object()


def bad_requests(vocab_size: int, n_ctx: int, max_tokens_out: int) -> list[tuple[str, bytes, str, str | None]]:
    """(name, raw body, expected code, expected field)."""
    cases: list[tuple[str, object, str, str | None]] = [
        ("empty body", b"", "INVALID_REQUEST", None),
        ("not json", b"job_id=1", "INVALID_REQUEST", None),
        ("truncated json", b'{"job_id": "a", "prompt": "x"', "INVALID_REQUEST", None),
        ("json array", [OK], "INVALID_REQUEST", None),
        ("json string", "hello", "INVALID_REQUEST", None),
        ("NaN temperature", b'{"job_id":"a","prompt":"x","temperature":NaN}', "INVALID_REQUEST", None),
        ("missing job_id", _with(job_id=_DROP), "INVALID_REQUEST", "job_id"),
        ("empty job_id", _with(job_id=""), "INVALID_REQUEST", "job_id"),
        ("job_id not a string", _with(job_id=7), "INVALID_REQUEST", "job_id"),
        ("job_id too long", _with(job_id="j" * 257), "INVALID_REQUEST", "job_id"),
        ("unknown field", _with(temprature=0.5), "INVALID_REQUEST", "temprature"),
        ("no prompt nor messages", _with(prompt=_DROP), "INVALID_REQUEST", "prompt"),
        ("empty prompt", _with(prompt=""), "INVALID_REQUEST", "prompt"),
        ("prompt too long", _with(prompt="a" * 32_769), "INVALID_REQUEST", "prompt"),
        ("prompt not a string", _with(prompt=["Hello"]), "INVALID_REQUEST", "prompt"),
        ("prompt null and no messages", _with(prompt=None), "INVALID_REQUEST", "prompt"),
        ("max_tokens 0", _with(max_tokens=0), "INVALID_REQUEST", "max_tokens"),
        ("max_tokens negative", _with(max_tokens=-1), "INVALID_REQUEST", "max_tokens"),
        ("max_tokens 2049", _with(max_tokens=2049), "INVALID_REQUEST", "max_tokens"),
        ("max_tokens float", _with(max_tokens=4.0), "INVALID_REQUEST", "max_tokens"),
        ("max_tokens string", _with(max_tokens="4"), "INVALID_REQUEST", "max_tokens"),
        ("max_tokens bool", _with(max_tokens=True), "INVALID_REQUEST", "max_tokens"),
        ("temperature negative", _with(temperature=-0.01), "INVALID_REQUEST", "temperature"),
        ("temperature above 2", _with(temperature=2.01), "INVALID_REQUEST", "temperature"),
        ("temperature string", _with(temperature="hot"), "INVALID_REQUEST", "temperature"),
        ("temperature overflow", b'{"job_id":"a","prompt":"x","temperature":1e999}', "INVALID_REQUEST", "temperature"),
        ("top_p negative", _with(top_p=-0.1), "INVALID_REQUEST", "top_p"),
        ("top_p above 1", _with(top_p=1.5), "INVALID_REQUEST", "top_p"),
        ("top_k negative", _with(top_k=-1), "INVALID_REQUEST", "top_k"),
        ("top_k above vocab", _with(top_k=vocab_size + 1), "INVALID_REQUEST", "top_k"),
        ("top_k float", _with(top_k=2.5), "INVALID_REQUEST", "top_k"),
        ("min_p negative", _with(min_p=-0.01), "INVALID_REQUEST", "min_p"),
        ("min_p above 1", _with(min_p=1.01), "INVALID_REQUEST", "min_p"),
        ("repetition_penalty negative", _with(repetition_penalty=-1.0), "INVALID_REQUEST", "repetition_penalty"),
        ("repetition_penalty zero", _with(repetition_penalty=0.0), "INVALID_REQUEST", "repetition_penalty"),
        ("repetition_penalty above 2", _with(repetition_penalty=2.5), "INVALID_REQUEST", "repetition_penalty"),
        ("stop not a list", _with(stop="###"), "INVALID_REQUEST", "stop"),
        ("stop five strings", _with(stop=["a", "b", "c", "d", "e"]), "INVALID_REQUEST", "stop"),
        ("stop empty string", _with(stop=["a", ""]), "INVALID_REQUEST", "stop[1]"),
        ("stop not strings", _with(stop=[1]), "INVALID_REQUEST", "stop[0]"),
        ("stop 33+ tokens", _with(stop=[" ".join(["zq"] * 40)]), "INVALID_REQUEST", "stop[0]"),
        ("seed negative", _with(seed=-1), "INVALID_REQUEST", "seed"),
        ("seed 2^64", _with(seed=2**64), "INVALID_REQUEST", "seed"),
        ("seed float", _with(seed=1.5), "INVALID_REQUEST", "seed"),
        ("seed string", _with(seed="42"), "INVALID_REQUEST", "seed"),
        ("chat not bool", _with(chat="yes"), "INVALID_REQUEST", "chat"),
        ("chat int", _with(chat=1), "INVALID_REQUEST", "chat"),
        ("prompt and messages", _with(messages=[{"role": "user", "content": "hi"}]), "INVALID_REQUEST", "messages"),
        ("messages empty", _with(prompt=_DROP, messages=[]), "INVALID_REQUEST", "messages"),
        ("messages not a list", _with(prompt=_DROP, messages={"role": "user"}), "INVALID_REQUEST", "messages"),
        ("message without content", _with(prompt=_DROP, messages=[{"role": "user"}]), "INVALID_REQUEST", "messages[0].content"),
        ("message bad role", _with(prompt=_DROP, messages=[{"role": "robot", "content": "hi"}]), "INVALID_REQUEST", "messages[0].role"),
        ("message content not string", _with(prompt=_DROP, messages=[{"role": "user", "content": 5}]), "INVALID_REQUEST", "messages[0].content"),
        ("message unknown key", _with(prompt=_DROP, messages=[{"role": "user", "content": "hi", "name": "x"}]), "INVALID_REQUEST", "messages[0].name"),
        ("messages too long in all", _with(prompt=_DROP, messages=[{"role": "user", "content": "a" * 20_000}] * 2), "INVALID_REQUEST", "messages"),
        ("max_tokens above --max-tokens-out", _with(max_tokens=max_tokens_out + 1), "INVALID_REQUEST", "max_tokens"),
        ("prompt + max_tokens beyond context", _with(prompt="a b " * n_ctx, max_tokens=1), "CONTEXT_LENGTH_EXCEEDED", None),
    ]
    out = []
    for name, body, code, field in cases:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        out.append((name, raw, code, field))
    return out
