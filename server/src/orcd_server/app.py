"""The HTTP API (Litestar): POST /execute (Server-Sent Events), POST /cancel, POST /shutdown,
GET /health, GET /metrics.

Resources live in a lifespan context on `app.state.orcd`: the job queue, the metrics, the engine
thread (which loads the model while /health already answers 503 with the progress), and an httpx
client for `--callback-url`. Handlers never touch the engine's device: /execute validates and
tokenizes (tokenization in a helper thread), enqueues a Job and streams its events; the engine
thread runs jobs one at a time. A client that disconnects cancels its job (the SSE generator's
`finally`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
import traceback
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
from litestar import Litestar, Request, get, post
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.middleware.base import DefineMiddleware
from litestar.exceptions import HTTPException
from litestar.response import Response, ServerSentEvent
from litestar.response.sse import ServerSentEventMessage
from orcd_core.errors import OrcdError
from orcd_core.generation import (
    ChatMessage,
    ContextLengthExceeded,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
)

from . import guard, schemas
from .jobs import TERMINAL_EVENTS, DuplicateJob, Job, JobQueue, QueueClosed, QueueFull
from .logging import get_logger
from .metrics import Metrics
from .schemas import RequestError, invalid
from .worker import EngineWorker

LOOP_EXECUTOR_THREADS = 1  # the event loop's default executor (lifespan)


@dataclass
class ServerSettings:
    worker_id: str
    model_ref: str  # what --model named (or the default model's path)
    gpu_device: int = 0
    backend: str = "cuda"
    max_tokens_out: int = schemas.MAX_TOKENS_LIMIT
    inference_timeout_s: float = 300.0
    queue_size: int = 16
    shutdown_timeout_s: float = 30.0  # how long a running job may go on after SIGTERM / POST /shutdown
    callback_url: str | None = None
    callback_timeout_s: float = 5.0
    log_prompts: bool = False
    ping_interval_s: float = 15.0  # SSE comment lines while a job waits or computes
    plugins: list[dict[str, Any]] = field(default_factory=list)
    model_alias: str | None = None  # the model's id in /v1 (default: the GGUF file's stem)
    api_keys: tuple[str, ...] = ()  # none: no authentication (security.py)
    cors_origins: tuple[str, ...] = ()  # none: no CORS headers
    # the request guard (guard.py): the bound host, extra Host names (--allowed-host), browser
    # origins allowed besides the worker's own (shared with the CORS option), body limits
    host: str = "127.0.0.1"
    allowed_hosts: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = guard.MAX_BODY_BYTES
    body_timeout_s: float = guard.BODY_TIMEOUT_S


class ServerState:
    """What the handlers share (app.state.orcd)."""

    def __init__(self, settings: ServerSettings, worker: EngineWorker, queue: JobQueue, metrics: Metrics, log) -> None:
        self.settings = settings
        self.worker = worker
        self.queue = queue
        self.metrics = metrics
        self.log = log
        self.started = time.monotonic()
        self.created = time.time()  # wall clock, for /v1/models' `created`
        self.http: Any = None  # httpx.AsyncClient when --callback-url is set
        self.callbacks: set[asyncio.Task] = set()
        self.loop: asyncio.AbstractEventLoop | None = None


def _state(request: Request) -> ServerState:
    return request.app.state.orcd


def _json(body: Any, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(content=body, status_code=status, headers=headers, media_type="application/json")


def _request_error_handler(_request: Request, exc: RequestError) -> Response:
    return _json(exc.body(), exc.status, exc.headers)


def _other_error_handler(request: Request, exc: Exception) -> Response:
    """Litestar's own refusals (404, 405, 413, ...) and unexpected failures, in the same error shape."""
    if isinstance(exc, HTTPException):
        default = "INVALID_REQUEST" if 400 <= exc.status_code < 500 else "INTERNAL"
        code = guard.HTTP_STATUS_CODES.get(exc.status_code, default)
        return _json({"error": {"code": code, "message": str(exc.detail)}}, exc.status_code, exc.headers)
    srv = getattr(request.app.state, "orcd", None)
    if srv is not None:
        srv.log.error("error", code="INTERNAL", path=request.url.path, message=repr(exc),
                      traceback="".join(traceback.format_exception(exc)))
    return _json({"error": {"code": "INTERNAL", "message": f"internal error: {type(exc).__name__}"}}, 500)


# -- GET /health -------------------------------------------------------------------------------------


@get("/health", sync_to_thread=False)
def health(request: Request) -> Response:
    """From cached state only: no engine or GPU call on this path."""
    srv = _state(request)
    worker = srv.worker
    info = worker.info
    if worker.phase in ("starting", "loading") and not worker.draining:
        status = "loading"
    elif worker.phase == "ready" and not worker.draining:
        status = "healthy"
    else:
        status = "unhealthy"
    body = {
        "status": status,
        "model": worker.model_name or info.get("model"),
        "resident": bool(info.get("resident", False)),
        "quant_kind": info.get("quant_kind"),
        "vram_bytes_used": int(info.get("vram_bytes_used") or 0),
        "tokenizer_kind": info.get("tokenizer_kind"),
        "vocab_size": info.get("vocab_size"),
        "context_length": info.get("context_length"),
        "uptime_seconds": round(time.monotonic() - srv.started, 3),
        "sm": info.get("sm"),
        "cuda_runtime_version": info.get("cuda_runtime_version"),
        "plugins": srv.settings.plugins,
        # beyond the listed fields:
        "worker_id": srv.settings.worker_id,
        "backend": info.get("backend", srv.settings.backend),
        "model_ref": srv.settings.model_ref,
        "n_ctx": worker.n_ctx,
        "load_progress": round(worker.load_percent, 1),
        "phase": "draining" if worker.draining and worker.phase == "ready" else worker.phase,
        "jobs_running": srv.queue.n_running,
        "jobs_queued": srv.queue.n_waiting,
    }
    if worker.error:
        body["error"] = worker.error
    return _json(body, 200 if status == "healthy" else 503)


# -- GET /metrics ------------------------------------------------------------------------------------


@get("/metrics", sync_to_thread=False)
def metrics(request: Request) -> Response:
    srv = _state(request)
    return Response(content=srv.metrics.render(), status_code=200, media_type=srv.metrics.content_type)


# -- POST /execute -----------------------------------------------------------------------------------


def _unavailable(worker: EngineWorker) -> RequestError | None:
    if worker.draining or worker.phase in ("stopped", "failed"):
        return RequestError(503, "UNAVAILABLE", "the worker is shutting down; it takes no new work", retriable=True)
    if worker.phase != "ready":
        return RequestError(
            503,
            "UNAVAILABLE",
            f"the model is still loading ({worker.load_percent:.0f}%)",
            headers={"Retry-After": "1"},
            retriable=True,
        )
    return None


def _count_tokens(engine) -> Callable[[str], int]:
    tokenizer = engine.tokenizer

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special=False))

    return count


def _generation_request(req: schemas.ExecuteRequest, max_tokens: int, seed: int) -> GenerationRequest:
    messages = None
    if req.messages is not None:
        messages = tuple(ChatMessage(role=m.role, content=m.content) for m in req.messages)
    return GenerationRequest(
        prompt=req.prompt,
        messages=messages,
        chat=bool(req.chat) and messages is None,  # `messages` always goes through the template
        max_tokens=max_tokens,
        stop=tuple(req.stop),
        sampling=SamplingParams(
            temperature=float(req.temperature),
            top_k=int(req.top_k),
            top_p=float(req.top_p),
            min_p=float(req.min_p),
            repetition_penalty=float(req.repetition_penalty),
            presence_penalty=float(req.presence_penalty),
            frequency_penalty=float(req.frequency_penalty),
            seed=seed,
        ),
        logprobs=req.logprobs,
    )


def _prepare(engine, request: GenerationRequest, n_ctx: int):
    """On a helper thread: tokenize (chat template), check the context. Errors -> RequestError."""
    try:
        prepared = engine.prepare(request)
    except ContextLengthExceeded as exc:
        raise RequestError(400, "CONTEXT_LENGTH_EXCEEDED", str(exc), **_context_details(exc, n_ctx)) from None
    except InvalidRequest as exc:
        field = exc.details.get("field")  # the engine's field names are the API's
        raise invalid(field if field in _REQUEST_FIELDS else None, str(exc)) from None
    except OrcdError as exc:  # chat template errors, tokenizer errors
        field = "messages" if request.messages is not None else ("chat" if request.chat else "prompt")
        raise invalid(field, str(exc)) from None
    return prepared


_REQUEST_FIELDS = set(schemas.ExecuteRequest.__struct_fields__)


def _context_details(exc: ContextLengthExceeded, n_ctx: int) -> dict[str, Any]:
    return {"n_prompt_tokens": exc.details.get("n_prompt_tokens"), "n_ctx": exc.details.get("n_ctx", n_ctx)}


def _prompt_text(req: schemas.ExecuteRequest) -> str:
    if req.prompt is not None:
        return req.prompt
    return msgspec.json.encode([{"role": m.role, "content": m.content} for m in req.messages or []]).decode()


@post("/execute", status_code=200)
async def execute(request: Request) -> ServerSentEvent:
    srv = _state(request)
    try:
        return await _execute(request, srv)
    except RequestError as exc:
        count_refusal(srv, exc)
        raise


def count_refusal(srv: ServerState, exc: RequestError) -> None:
    """A request refused before any work, in `orcd_requests_total{outcome}`."""
    srv.metrics.outcome({400: "invalid", 429: "overloaded", 503: "unavailable"}.get(exc.status, "invalid"))


async def _execute(request: Request, srv: ServerState) -> ServerSentEvent:
    worker = srv.worker
    refusal = _unavailable(worker)
    if refusal is not None:
        raise refusal
    req = schemas.decode(await request.body(), schemas.ExecuteRequest)
    engine = worker.engine
    if engine is None:  # closed by a shutdown since the check above
        raise RequestError(503, "UNAVAILABLE", "the worker is shutting down; it takes no new work", retriable=True)
    n_ctx = int(worker.n_ctx or 0)
    vocab_size = int(worker.info.get("vocab_size") or engine.tokenizer.vocab_size)
    schemas.validate_execute(
        req, vocab_size=vocab_size, max_tokens_out=srv.settings.max_tokens_out, count_tokens=_count_tokens(engine)
    )
    if srv.queue.get(req.job_id) is not None:
        raise invalid("job_id", f"job {req.job_id!r} is already queued or running")
    max_tokens = req.max_tokens if req.max_tokens is not None else srv.settings.max_tokens_out
    seed = req.seed if req.seed is not None else secrets.randbits(64)
    gen_request = _generation_request(req, max_tokens, seed)
    prepared = await anyio.to_thread.run_sync(_prepare, engine, gen_request, n_ctx)
    job = submit_job(srv, req.job_id, prepared, seed, _prompt_text(req))
    return _SSEBytes(_events(srv, job))


def submit_job(srv: ServerState, job_id: str, prepared, seed: int, prompt_text: str) -> Job:
    """Queue a prepared request as a job (shared by /execute and the OpenAI-compatible /v1 API, so
    both share the queue, cancellation and metrics). Raises RequestError 429 / 400 / 503."""
    worker = srv.worker
    job = Job(
        job_id=job_id,
        prepared=prepared,
        seed=seed,
        n_prompt_tokens=len(prepared.prompt_ids),
        loop=asyncio.get_running_loop(),
        log=srv.log.bind(job_id=job_id),
        prompt_text=prompt_text,
        on_terminal=lambda job, name, data: _on_terminal(srv, job, name, data),
    )
    try:
        srv.queue.submit(job)
    except QueueFull:
        retry = max(1, math.ceil((srv.queue.n_waiting + 1) * worker.mean_job_seconds))
        raise RequestError(
            429,
            "OVERLOADED",
            f"the queue is full ({srv.queue.maxsize} jobs waiting); retry later",
            headers={"Retry-After": str(retry)},
            retriable=True,
        ) from None
    except DuplicateJob:
        raise invalid("job_id", f"job {job_id!r} is already queued or running") from None
    except QueueClosed:
        raise _unavailable(worker) or RequestError(503, "UNAVAILABLE", "the worker is shutting down") from None
    return job


async def job_event_batches(srv: ServerState, job: Job) -> AsyncIterator[list[tuple[str, dict]] | None]:
    """The job's (event, data) pairs up to its terminal event, those already queued together in one
    list (the engine hands a step's events over at once; a stream that fell behind catches up in one
    write); None every ping interval while nothing happens. Leaving early (a client disconnect
    cancels the consumer) cancels the job.

    The ping interval is timed as `asyncio.timeout(ping)` around each wait would time it, with one
    timer for all the waits: a wait moves the deadline, and the timer, when it fires before it, arms
    itself again for it (a wait per engine step, each arming and cancelling a timer of its own, was
    a tenth of the event loop's work per streamed event)."""
    ping = srv.settings.ping_interval_s
    queue = job.events
    loop = asyncio.get_running_loop()
    timer: asyncio.TimerHandle | None = None
    deadline: float | None = None  # the current wait's end (loop time); None while not waiting
    waiter: asyncio.Task | None = None  # the task waiting
    expired = False
    resolution = getattr(loop, "_clock_resolution", 0.0)  # (a timer runs once due within it)

    def expire() -> None:
        nonlocal timer, expired
        timer = None
        if deadline is None:  # not waiting now: the next wait arms a timer again
            return
        if loop.time() + resolution >= deadline:
            expired = True
            waiter.cancel()
        else:
            timer = loop.call_at(deadline, expire)

    try:
        while True:
            if queue.empty():
                waiter = asyncio.current_task()
                cancelling = waiter.cancelling()
                deadline = loop.time() + ping
                if timer is None:
                    timer = loop.call_at(deadline, expire)
                try:
                    batch = [await queue.get()]
                except asyncio.CancelledError:
                    if not expired:
                        raise
                    expired = False
                    if waiter.uncancel() > cancelling:  # cancelled for another reason too
                        raise
                    yield None
                    continue
                finally:
                    deadline = None
            else:
                batch = [queue.get_nowait()]
            while batch[-1][0] not in TERMINAL_EVENTS and not queue.empty():
                batch.append(queue.get_nowait())
            yield batch
            if batch[-1][0] in TERMINAL_EVENTS:
                return
    finally:
        if timer is not None:
            timer.cancel()
        if not job.done:
            srv.worker.cancel(job.job_id, "disconnect")


async def job_events(srv: ServerState, job: Job) -> AsyncIterator[tuple[str, dict] | None]:
    """`job_event_batches` one (event, data) pair at a time."""
    async with contextlib.aclosing(job_event_batches(srv, job)) as batches:
        async for batch in batches:
            if batch is None:
                yield None
                continue
            for item in batch:
                yield item


class _SSEBytes(ServerSentEvent):
    """Litestar's `ServerSentEvent` response (the same status and headers) whose body is `chunks`, an
    async iterator of SSE bytes, written as they come: without Litestar's per-item layers (its
    iterator wrapper, its SSE generator taking each stream's first item through the executor and
    encoding every item) between the stream and `send`."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        super().__init__(chunks)
        self.iterator = chunks


def sse_message(name: str, data: dict) -> bytes:
    """`ServerSentEventMessage(event=name, data=<data as JSON>).encode()`, byte for byte (JSON has no
    line breaks: msgspec escapes them inside strings), without its per-field regex and buffer."""
    return b"event: " + name.encode() + b"\r\ndata: " + msgspec.json.encode(data) + b"\r\n\r\n"


#: a ping: `ServerSentEventMessage(comment="ping", data=None).encode()`
SSE_PING = ServerSentEventMessage(comment="ping", data=None).encode()


async def _events(srv: ServerState, job: Job) -> AsyncIterator[bytes]:
    """The job's events as SSE bytes, those queued together in one write, a comment line for each
    ping (Litestar cancels this generator's task when the client disconnects; `aclosing` passes that
    on to `job_event_batches`)."""
    async with contextlib.aclosing(job_event_batches(srv, job)) as batches:
        async for batch in batches:
            if batch is None:
                yield SSE_PING
            else:
                yield b"".join([sse_message(name, data) for name, data in batch])


def _on_terminal(srv: ServerState, job: Job, name: str, data: dict) -> None:
    """On the event loop, once per job: POST the terminal event to --callback-url."""
    if srv.http is None or not srv.settings.callback_url:
        return
    task = asyncio.get_running_loop().create_task(_post_callback(srv, job.job_id, name, data))
    srv.callbacks.add(task)
    task.add_done_callback(srv.callbacks.discard)


async def _post_callback(srv: ServerState, job_id: str, name: str, data: dict) -> None:
    payload = {"job_id": job_id, "worker_id": srv.settings.worker_id, "event": name, "data": data}
    log = srv.log.bind(job_id=job_id)
    try:
        response = await srv.http.post(srv.settings.callback_url, json=payload)
        if response.status_code >= 400:
            log.warning("callback_failed", url=srv.settings.callback_url, status=response.status_code)
        else:
            log.info("callback_sent", url=srv.settings.callback_url, status=response.status_code)
    except Exception as exc:  # never fatal: the client got its event on the stream
        log.warning("callback_failed", url=srv.settings.callback_url, message=f"{type(exc).__name__}: {exc}")


# -- POST /cancel, POST /shutdown --------------------------------------------------------------------


@post("/cancel", status_code=202)
async def cancel(request: Request) -> Response:
    srv = _state(request)
    body = schemas.decode(await request.body(), schemas.CancelRequest)
    status = srv.worker.cancel(body.job_id, "client")
    return _json({"job_id": body.job_id, "status": status}, 202)


@post("/shutdown", status_code=202)
async def shutdown(request: Request) -> Response:
    srv = _state(request)
    started = srv.worker.begin_shutdown("POST /shutdown")
    return _json({"status": "shutting_down", "already": not started}, 202)


# -- the app -----------------------------------------------------------------------------------------


def create_app(
    settings: ServerSettings,
    loader: Callable[[Callable[[float], None]], Any],
    *,
    on_exit: Callable[[int], None] | None = None,
) -> Litestar:
    """`loader(progress)` loads the engine (on the engine thread). `on_exit(code)` is called on the
    engine thread once the engine is closed (after shutdown, or a failed load: code 1)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        log = get_logger("orcd.server")
        queue = JobQueue(settings.queue_size)
        worker_box: dict[str, EngineWorker] = {}
        metrics_ = Metrics(
            queued=lambda: queue.n_waiting,
            running=lambda: queue.n_running,
            vram_bytes=lambda: int(worker_box["w"].info.get("vram_bytes_used") or 0),
        )
        worker = EngineWorker(
            loader=loader,
            queue=queue,
            metrics=metrics_,
            log=log,
            inference_timeout_s=settings.inference_timeout_s,
            shutdown_timeout_s=settings.shutdown_timeout_s,
            log_prompts=settings.log_prompts,
            on_exit=on_exit,
        )
        worker_box["w"] = worker
        srv = ServerState(settings, worker, queue, metrics_, log)
        srv.loop = asyncio.get_running_loop()
        # The loop's default executor runs microseconds of work: Litestar's SSE response takes each
        # stream's first items through it, httpx resolves the callback host there. One thread, so the
        # process's thread count does not drift with how many streams happened to start at once.
        srv.loop.set_default_executor(ThreadPoolExecutor(max_workers=LOOP_EXECUTOR_THREADS, thread_name_prefix="orcd-loop"))
        app.state.orcd = srv
        if settings.callback_url:
            import httpx  # only needed with --callback-url

            srv.http = httpx.AsyncClient(timeout=settings.callback_timeout_s)
        worker.start()
        try:
            yield
        finally:
            worker.begin_shutdown("server exit")
            await anyio.to_thread.run_sync(worker.join, settings.shutdown_timeout_s + 30.0)
            if srv.callbacks:
                await asyncio.wait(list(srv.callbacks), timeout=settings.callback_timeout_s + 1.0)
            if srv.http is not None:
                await srv.http.aclose()

    from . import openai_api, openapi_doc  # the OpenAI-compatible API and the /schema endpoints
    from .security import ApiKeyMiddleware

    policy = guard.GuardPolicy(host=settings.host, allowed_hosts=settings.allowed_hosts,
                               allowed_origins=[*settings.allowed_origins, *settings.cors_origins],
                               max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s)

    def on_refusal(scope, status: int, _code: str) -> None:
        srv = getattr(app.state, "orcd", None)
        if srv is not None and scope.get("path") == "/execute" and scope.get("method") == "POST":
            srv.metrics.outcome("invalid")

    # the guard first (Host, Origin, content type, body limits), then the API key
    middleware = [lambda app: guard.RequestGuard(app, policy, on_refusal)]
    if settings.api_keys:
        middleware.append(DefineMiddleware(ApiKeyMiddleware, keys=settings.api_keys))
    # any request header: browser SDKs (openai-node) send their own x-stainless-* headers
    cors = CORSConfig(allow_origins=list(settings.cors_origins)) if settings.cors_origins else None
    app = Litestar(
        route_handlers=[health, metrics, execute, cancel, shutdown, *openai_api.ROUTES, *openapi_doc.ROUTES],
        request_max_body_size=settings.max_body_bytes,
        lifespan=[lifespan],
        middleware=middleware,
        cors_config=cors,
        exception_handlers={RequestError: _request_error_handler, Exception: _other_error_handler},
        state=State(),
        logging_config=None,
        openapi_config=None,
    )
    return app
