"""The OpenAI-compatible API beside the native one: GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (streaming `data: {...}` chunks ending with `data: [DONE]`, or one JSON
body), and llama-server's POST /tokenize and /detokenize.

A /v1 request is translated into the native request (`schemas.ExecuteRequest`) and checked by the
same rules (`schemas.decode`, `schemas.validate_execute`: one home for every limit), then tokenized
and queued as a job through `app.submit_job`: it shares the queue (429 when full), cancellation
(a client that disconnects cancels its job, streaming or not; POST /cancel takes its `id`), and the
metrics with POST /execute. Differences from the native API, as OpenAI clients expect: unknown
fields are ignored; `stop` may be a string; `max_tokens` left out means as many as the context
leaves (at most `--max-tokens-out`); errors are `{"error": {"message", "type", "param", "code"}}`.

`logprobs` (completions: k alternatives; chat: `logprobs: true` with `top_logprobs` k) come from the
native token events (`logprob`, `top_logprobs`: the raw logits' log-softmax, as vLLM reports them)
and are given in OpenAI's shapes, streaming or not; tokens are named by the bytes they add to the text.

Refused with a 400 that says why, rather than silently ignored: `n` > 1, `response_format` other
than text, `tools`, `echo`, `suffix`, and a batch of several prompts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
import traceback
from pathlib import Path
from typing import Any

import anyio
import msgspec
from litestar import Request, get, post
from litestar.exceptions import HTTPException
from litestar.response import Response, ServerSentEvent
from litestar.response.sse import ServerSentEventMessage
from orcd_core.errors import OrcdError
from orcd_core.generation import MAX_TOP_LOGPROBS

from . import app as native
from . import schemas
from .schemas import RequestError, invalid

OWNED_BY = "orcd-worker"
FINISH_REASONS = {"stop": "stop", "stop_sequence": "stop", "length": "length"}
# a job's error event -> the HTTP status of a non-streaming answer
JOB_ERROR_STATUS = {"INFERENCE_TIMEOUT": 504, "VRAM_OOM": 503, "CANCELLED": 503, "INVALID_REQUEST": 400}


# -- request bodies (unknown fields are ignored, types are still checked) ----------------------------


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessageIn(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None


class ResponseFormat(msgspec.Struct):
    type: str = "text"


class _Sampling(msgspec.Struct, kw_only=True):
    model: str | None = None  # any value is accepted: this worker serves one model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling, kw_only=True):
    """POST /v1/completions. `prompt`: a string, a list of token ids, or a list holding one of them."""

    prompt: str | list[int | str | list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class ChatCompletionRequest(_Sampling, kw_only=True):
    """POST /v1/chat/completions. `messages` are rendered with the model's chat template."""

    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    add_generation_prompt: bool = True


class TokenizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    """POST /tokenize (llama-server's)."""

    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    """POST /detokenize (llama-server's)."""

    tokens: list[int]


# -- errors in OpenAI's shape ------------------------------------------------------------------------


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None, **extra) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


def _openai_error(exc: RequestError) -> Response:
    extra = dict(exc.extra)
    param = extra.pop("field", None)
    if exc.status == 429:
        body = error_body(exc.message, "rate_limit_error", None, "rate_limit_exceeded")
    elif exc.status == 401:
        body = error_body(exc.message, "authentication_error", None, "invalid_api_key")
    elif exc.status >= 500:
        body = error_body(exc.message, "server_error", None, exc.code.lower(), **extra)
    elif exc.code == "CONTEXT_LENGTH_EXCEEDED":
        body = error_body(exc.message, "invalid_request_error", param, "context_length_exceeded", **extra)
    else:
        body = error_body(exc.message, "invalid_request_error", param, None, **extra)
    return Response(content=body, status_code=exc.status, headers=exc.headers or None, media_type="application/json")


def _request_error_handler(_request: Request, exc: RequestError) -> Response:
    return _openai_error(exc)


def _other_error_handler(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        kind = "invalid_request_error" if 400 <= exc.status_code < 500 else "server_error"
        return Response(content=error_body(str(exc.detail), kind), status_code=exc.status_code,
                        headers=exc.headers, media_type="application/json")
    srv = getattr(request.app.state, "orcd", None)
    if srv is not None:
        srv.log.error("error", code="INTERNAL", path=request.url.path, message=repr(exc),
                      traceback="".join(traceback.format_exception(exc)))
    return Response(content=error_body(f"internal error: {type(exc).__name__}", "server_error", None, "internal"),
                    status_code=500, media_type="application/json")


EXCEPTION_HANDLERS = {RequestError: _request_error_handler, Exception: _other_error_handler}


def _unsupported(param: str, why: str) -> RequestError:
    return invalid(param, f"`{param}` is not supported: {why}")


# -- translation into the native request -------------------------------------------------------------


def model_id(settings) -> str:
    """The model's name in /v1: `--alias`, else the GGUF file's stem."""
    return settings.model_alias or Path(settings.model_ref).stem


def _check_common(req: _Sampling) -> None:
    if req.n is not None and req.n != 1:
        raise _unsupported("n", "this worker returns one choice per request (n = 1)")


def _native_fields(req: _Sampling, job_id: str, max_tokens: int | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"job_id": job_id}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed"):
        value = getattr(req, name)
        if value is not None:
            fields[name] = value
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    if req.stop is not None:
        fields["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    return fields


def _message_text(n: int, message: ChatMessageIn) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for k, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise invalid(f"messages[{n}].content[{k}].type",
                          f"only text content parts are supported, got {part.type!r}")
        parts.append(part.text)
    return "".join(parts)


def _completion_prompt(req: CompletionRequest) -> str | list[int]:
    prompt = req.prompt
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(x, int) for x in prompt):
        return list(prompt)
    if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        return prompt[0]
    raise invalid("prompt", "one prompt per request: a string or a list of token ids (batches are not supported)")


def _decode_native(fields: dict[str, Any]) -> schemas.ExecuteRequest:
    return schemas.decode(msgspec.json.encode(fields), schemas.ExecuteRequest)


@dataclasses.dataclass
class _Plan:
    native: schemas.ExecuteRequest
    prompt_ids: list[int] | None  # token ids given by the client, or rendered here
    render_without_generation_prompt: bool
    max_tokens: int | None  # None: what the context leaves, at most --max-tokens-out
    seed: int
    prompt_text: str


def _prepare(engine, plan: _Plan, max_tokens_out: int, n_ctx: int):
    """On a helper thread: tokenize once, size max_tokens, check the context (engine.prepare).
    A context overflow names the prompt's field (`param`)."""
    try:
        return _prepare_sized(engine, plan, max_tokens_out, n_ctx)
    except RequestError as exc:
        if exc.code == "CONTEXT_LENGTH_EXCEEDED":
            exc.extra["field"] = "messages" if plan.native.messages is not None else "prompt"
        raise


def _prepare_sized(engine, plan: _Plan, max_tokens_out: int, n_ctx: int):
    request = native._generation_request(plan.native, 0, plan.seed)
    ids = plan.prompt_ids
    if ids is None and plan.render_without_generation_prompt:
        from orcd_core.tokenizer import encode_chat

        messages = [{"role": m.role, "content": m.content} for m in plan.native.messages or []]
        try:
            ids = encode_chat(engine.tokenizer, messages, add_generation_prompt=False)
        except OrcdError as exc:
            raise invalid("messages", str(exc)) from None
    if ids is None:
        ids = native._prepare(engine, request, n_ctx).prompt_ids
    max_tokens = plan.max_tokens
    if max_tokens is None:
        max_tokens = min(max_tokens_out, n_ctx - len(ids))
        if max_tokens < 1:
            raise RequestError(
                400, "CONTEXT_LENGTH_EXCEEDED",
                f"the prompt has {len(ids)} tokens, which leaves no room to generate in the context of {n_ctx}",
                n_prompt_tokens=len(ids), n_ctx=n_ctx,
            )
    final = dataclasses.replace(request, prompt=None, messages=None, chat=False, prompt_ids=tuple(ids),
                                max_tokens=max_tokens)
    return native._prepare(engine, final, n_ctx)


async def _plan_and_submit(request: Request, srv, *, chat: bool):
    worker = srv.worker
    refusal = native._unavailable(worker)
    if refusal is not None:
        raise refusal
    req = schemas.decode(await request.body(), ChatCompletionRequest if chat else CompletionRequest)
    engine = worker.engine
    if engine is None:
        raise RequestError(503, "UNAVAILABLE", "the worker is shutting down; it takes no new work", retriable=True)
    _check_common(req)
    job_id = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
    prompt_ids: list[int] | None = None
    render_plain = False
    if chat:
        if req.top_logprobs is not None and not req.logprobs:
            raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise invalid("top_logprobs", f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {req.top_logprobs}")
        if req.response_format is not None and req.response_format.type != "text":
            raise _unsupported("response_format", f"type {req.response_format.type!r} needs constrained "
                               "decoding, which this worker does not have (only 'text')")
        if req.tools:
            raise _unsupported("tools", "this worker does not parse tool calls")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        fields = _native_fields(req, job_id, max_tokens)
        fields["messages"] = [{"role": m.role, "content": _message_text(n, m)} for n, m in enumerate(req.messages)]
        if req.logprobs:
            fields["logprobs"] = req.top_logprobs or 0
        render_plain = not req.add_generation_prompt
    else:
        if req.echo:
            raise _unsupported("echo", "only generated text is returned")
        if req.suffix:
            raise _unsupported("suffix", "fill-in-the-middle is not supported")
        max_tokens = req.max_tokens
        fields = _native_fields(req, job_id, max_tokens)
        if req.logprobs is not None:
            fields["logprobs"] = req.logprobs
        prompt = _completion_prompt(req)
        if isinstance(prompt, str):
            fields["prompt"] = prompt
        else:
            prompt_ids = prompt
            vocab = int(worker.info.get("vocab_size") or engine.tokenizer.vocab_size)
            bad = [i for i in prompt_ids if not 0 <= i < vocab]
            if bad or not prompt_ids:
                raise invalid("prompt", f"token ids must be in 0..{vocab - 1}; got {bad[:5] or 'none'}")
            # the native rules (length limit) and the logs see the text these ids stand for
            fields["prompt"] = engine.tokenizer.decode(prompt_ids) or msgspec.json.encode(prompt_ids).decode()
    native_req = _decode_native(fields)
    vocab_size = int(worker.info.get("vocab_size") or engine.tokenizer.vocab_size)
    schemas.validate_execute(native_req, vocab_size=vocab_size, max_tokens_out=srv.settings.max_tokens_out,
                             count_tokens=native._count_tokens(engine))
    seed = native_req.seed if native_req.seed is not None else secrets.randbits(64)
    plan = _Plan(native_req, prompt_ids, render_plain, native_req.max_tokens, seed, native._prompt_text(native_req))
    n_ctx = int(worker.n_ctx or 0)
    prepared = await anyio.to_thread.run_sync(_prepare, engine, plan, srv.settings.max_tokens_out, n_ctx)
    job = native.submit_job(srv, job_id, prepared, seed, plan.prompt_text)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return job, bool(req.stream), include_usage, native_req.logprobs is not None


# -- responses ---------------------------------------------------------------------------------------


def _usage(end: dict) -> dict:
    return {"prompt_tokens": end["tokens_in"], "completion_tokens": end["tokens_out"],
            "total_tokens": end["tokens_in"] + end["tokens_out"]}


def _stream_error(data: dict) -> dict:
    return error_body(data["message"], "server_error", None, data["code"].lower())


class _Shape:
    """What differs between a completion and a chat completion; with a `tokenizer`, the choices carry
    the token events' log-probabilities in the endpoint's shape."""

    def __init__(self, chat: bool, job_id: str, model: str, tokenizer=None) -> None:
        self.chat = chat
        self.tokenizer = tokenizer
        self.head = {"id": job_id, "object": "chat.completion" if chat else "text_completion",
                     "created": int(time.time()), "model": model, "system_fingerprint": None}

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def logprobs(self, tokens: list[dict], offset: int = 0) -> dict | None:
        """OpenAI's `logprobs` of these token events (`offset`: where the first one's text starts in
        the completion); None without a tokenizer (not asked for)."""
        if self.tokenizer is None:
            return None
        if self.chat:
            content = []
            for d in tokens:
                text, raw = self._token(d["id"])
                top = []
                for alt in d["top_logprobs"]:
                    alt_text, alt_raw = self._token(alt["id"])
                    top.append({"token": alt_text, "logprob": alt["logprob"], "bytes": alt_raw})
                content.append({"token": text, "logprob": d["logprob"], "bytes": raw, "top_logprobs": top})
            return {"content": content, "refusal": None}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for d in tokens:
            out["tokens"].append(self._token(d["id"])[0])
            out["token_logprobs"].append(d["logprob"])
            out["top_logprobs"].append({self._token(a["id"])[0]: a["logprob"] for a in d["top_logprobs"]})
            out["text_offset"].append(offset)
            offset += len(d["t"])
        return out

    def choice(self, text: str | None, finish: str | None, *, delta: bool, logprobs: dict | None = None) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        if delta:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": logprobs,
                    "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}

    def chunk(self, choices: list[dict], **more) -> str:
        head = dict(self.head, object="chat.completion.chunk" if self.chat else "text_completion")
        return msgspec.json.encode({**head, "choices": choices, **more}).decode()


async def _stream(srv, job, shape: _Shape, include_usage: bool):
    usage_none = {"usage": None} if include_usage else {}
    offset = 0  # characters of completion text sent so far
    async with contextlib.aclosing(native.job_events(srv, job)) as events:
        if shape.chat:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
            yield ServerSentEventMessage(data=shape.chunk([first], **usage_none))
        async for item in events:
            if item is None:
                yield ServerSentEventMessage(comment="ping", data=None)
                continue
            name, data = item
            if name == "token" and (data["t"] or shape.tokenizer is not None):
                lp = shape.logprobs([data], offset)
                offset += len(data["t"])
                yield ServerSentEventMessage(data=shape.chunk([shape.choice(data["t"], None, delta=True, logprobs=lp)],
                                                              **usage_none))
            elif name == "end":
                finish = FINISH_REASONS[data["finish_reason"]]
                yield ServerSentEventMessage(data=shape.chunk([shape.choice(None if shape.chat else "", finish,
                                                                            delta=True)],
                                                              timings=data["timings"], **usage_none))
                if include_usage:
                    yield ServerSentEventMessage(data=shape.chunk([], usage=_usage(data)))
            elif name == "error":
                yield ServerSentEventMessage(data=msgspec.json.encode(_stream_error(data)).decode())
    yield ServerSentEventMessage(data="[DONE]")


async def _collect(srv, job) -> tuple[list[dict], str, dict]:
    tokens: list[dict] = []
    async with contextlib.aclosing(native.job_events(srv, job)) as events:
        async for item in events:
            if item is None:
                continue
            name, data = item
            if name == "token":
                tokens.append(data)
            elif name in ("end", "error"):
                return tokens, name, data
    raise RuntimeError("the job's events ended without a terminal event")


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _whole(request: Request, srv, job, shape: _Shape) -> Response:
    """Wait for the job's terminal event; a client that goes away first cancels the job."""
    collector = asyncio.ensure_future(_collect(srv, job))
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not collector.done():
            collector.cancel()  # its `job_events` cancels the job
            with contextlib.suppress(asyncio.CancelledError):
                await collector
    if collector.cancelled():
        return Response(content=b"", status_code=499)  # nobody reads it
    tokens, name, data = collector.result()
    if name == "error":
        status = JOB_ERROR_STATUS.get(data["code"], 500)
        return Response(content=_stream_error(data), status_code=status, media_type="application/json")
    body = {**shape.head, "choices": [shape.choice("".join(d["t"] for d in tokens),
                                                   FINISH_REASONS[data["finish_reason"]], delta=False,
                                                   logprobs=shape.logprobs(tokens))],
            "usage": _usage(data), "timings": data["timings"]}
    return Response(content=body, status_code=200, media_type="application/json")


async def _completion(request: Request, *, chat: bool) -> Response | ServerSentEvent:
    srv = native._state(request)
    try:
        job, stream, include_usage, with_logprobs = await _plan_and_submit(request, srv, chat=chat)
    except RequestError as exc:
        native.count_refusal(srv, exc)
        raise
    tokenizer = srv.worker.engine.tokenizer if with_logprobs else None
    shape = _Shape(chat, job.job_id, model_id(srv.settings), tokenizer)
    if stream:
        return ServerSentEvent(_stream(srv, job, shape, include_usage))
    return await _whole(request, srv, job, shape)


@post("/v1/completions", status_code=200, exception_handlers=EXCEPTION_HANDLERS)
async def completions(request: Request) -> Response:
    return await _completion(request, chat=False)


@post("/v1/chat/completions", status_code=200, exception_handlers=EXCEPTION_HANDLERS)
async def chat_completions(request: Request) -> Response:
    return await _completion(request, chat=True)


# -- models, tokenize, detokenize --------------------------------------------------------------------


def _ready_engine(srv):
    refusal = native._unavailable(srv.worker)
    if refusal is not None:
        raise refusal
    engine = srv.worker.engine
    if engine is None:
        raise RequestError(503, "UNAVAILABLE", "the worker is shutting down; it takes no new work", retriable=True)
    return engine


@get("/v1/models", sync_to_thread=False, exception_handlers=EXCEPTION_HANDLERS)
def models(request: Request) -> Response:
    srv = native._state(request)
    engine = _ready_engine(srv)
    info = srv.worker.info
    gguf = getattr(engine, "gguf", None)
    meta = {
        "architecture": info.get("architecture"),
        "quant": info.get("quant_kind"),
        "n_ctx": srv.worker.n_ctx,
        "n_ctx_train": info.get("context_length"),
        "n_vocab": info.get("vocab_size"),
        "n_params": sum(t.n_elements for t in gguf.tensors.values()) if gguf is not None else None,
        "size": gguf.tensor_data_bytes if gguf is not None else None,
    }
    entry = {"id": model_id(srv.settings), "object": "model", "created": int(srv.created), "owned_by": OWNED_BY,
             "meta": meta}
    return Response(content={"object": "list", "data": [entry]}, status_code=200, media_type="application/json")


def _piece(tokenizer, token_id: int) -> str | list[int]:
    raw = tokenizer.decode_bytes([token_id])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


@post("/tokenize", status_code=200, exception_handlers=EXCEPTION_HANDLERS)
async def tokenize(request: Request) -> Response:
    srv = native._state(request)
    engine = _ready_engine(srv)
    body = schemas.decode(await request.body(), TokenizeRequest)
    if len(body.content) > schemas.MAX_PROMPT_CHARS:
        raise invalid("content", f"content holds {len(body.content)} characters; at most {schemas.MAX_PROMPT_CHARS}")

    def work():
        tok = engine.tokenizer
        ids = tok.encode(body.content, add_special=body.add_special, parse_special=body.parse_special)
        if body.with_pieces:
            return [{"id": i, "piece": _piece(tok, i)} for i in ids]
        return ids

    return Response(content={"tokens": await anyio.to_thread.run_sync(work)}, status_code=200,
                    media_type="application/json")


@post("/detokenize", status_code=200, exception_handlers=EXCEPTION_HANDLERS)
async def detokenize(request: Request) -> Response:
    srv = native._state(request)
    engine = _ready_engine(srv)
    body = schemas.decode(await request.body(), DetokenizeRequest)
    vocab = int(srv.worker.info.get("vocab_size") or engine.tokenizer.vocab_size)
    if len(body.tokens) > schemas.MAX_PROMPT_CHARS:
        raise invalid("tokens", f"at most {schemas.MAX_PROMPT_CHARS} tokens")
    bad = [i for i in body.tokens if not 0 <= i < vocab]
    if bad:
        raise invalid("tokens", f"token ids must be in 0..{vocab - 1}; got {bad[:5]}")
    text = await anyio.to_thread.run_sync(engine.tokenizer.decode, body.tokens)
    return Response(content={"content": text}, status_code=200, media_type="application/json")


ROUTES = [models, completions, chat_completions, tokenize, detokenize]
