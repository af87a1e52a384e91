"""`orcd-worker serve`: load one model and serve it over HTTP (POST /execute streams SSE).

Arguments are checked before anything starts (one-line error, exit 1): the worker id is a UUID,
the model is readable, the GPU exists and the device number is in range, the port is free.
Start-up order: logging -> HTTP listener (answers /health 503 with the load progress) and, on the
engine thread, device context -> model load -> ready (200). SIGTERM, SIGINT and POST /shutdown:
refuse new work with 503, end waiting jobs with CANCELLED, let the running job finish until
--shutdown-timeout-sec (then CANCELLED), free device memory, exit 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from orcd_core.device import MAX_BATCH
from orcd_core.errors import OrcdError

from .. import schemas
from ..security import API_KEY_ENV, ApiKeyError, collect_keys
from ._model_args import MODEL_DEFAULT_HELP, add_model_arg

BACKENDS = ("cuda", "reference")
# The engine thread runs Python between device calls (and NumPy on the reference backend); the
# event loop needs the GIL back quickly to answer /health and /metrics while a job streams.
# CPython's default switch interval is 5 ms; each request needs several GIL hand-overs.
GIL_SWITCH_INTERVAL_S = 0.0005


class ServeArgumentError(OrcdError):
    """A `serve` argument is invalid (bad value, unreadable model, busy port, no GPU)."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP (SSE)",
        description="Load one GGUF model and serve it: POST /execute (SSE), /cancel, /shutdown, GET /health, /metrics; the OpenAI-compatible /v1/models, /v1/completions, /v1/chat/completions; /tokenize, /detokenize; /schema. See docs/http_api.md.",
    )
    # Values are parsed as strings and checked in `validate`, so a bad value is a one-line error
    # with exit code 1 (argparse's own errors exit 2).
    add_model_arg(p, f"GGUF file ({MODEL_DEFAULT_HELP})", required=False)
    p.add_argument("--worker-id", help="UUID naming this worker in logs and health (default: a new uuid4)")
    p.add_argument("--gpu-device", default="0", help="CUDA device number (default 0)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", default="8080", help="TCP port (default 8080)")
    p.add_argument("--backend", default="cuda", help="cuda (default) or reference (NumPy on the CPU; slow)")
    p.add_argument("--max-context", help="serve at most this many tokens of context (default: the model's)")
    p.add_argument("--max-tokens-out", default=str(schemas.MAX_TOKENS_LIMIT),
                   help=f"default and upper limit of max_tokens (1..{schemas.MAX_TOKENS_LIMIT})")
    p.add_argument("--inference-timeout-sec", default="300", help="a job running longer ends with INFERENCE_TIMEOUT")
    p.add_argument("--kv-cache-size-mb", help="cap the context so that its fp16 KV cache fits in this many MiB")
    p.add_argument("--max-batch", default="8",
                   help=f"jobs decoded together (continuous batching; 1..{MAX_BATCH}, default 8); VRAM is planned "
                        "for that many KV caches of the context. Above 1 the GPU decodes on its tensor cores "
                        "(fast batches, a lone stream slower); 1 gives the fastest single stream")
    p.add_argument("--queue-size", default="16", help="jobs that may wait while --max-batch run (then 429)")
    p.add_argument("--callback-url", help="POST each job's terminal event (JSON) to this URL")
    p.add_argument("--log-format", default=None, help="json or console (default: console on a terminal, else json)")
    p.add_argument("--log-prompts", action="store_true", help="log prompt and output text (default: SHA-256 + length)")
    p.add_argument("--shutdown-timeout-sec", default="30",
                   help="after SIGTERM or POST /shutdown, how long the running job may go on before it is cancelled "
                        "(its stream then ends with an `error` event, code CANCELLED, retriable); waiting jobs end "
                        "at once. A stream still running waits out the whole drain: with the default, SIGTERM can "
                        "take 30 s to exit; 0 cancels at once")
    p.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                   help="accept requests whose Host header names HOST (repeatable; '*' accepts any); always "
                        "accepted: the --host address, localhost, 127.0.0.1, [::1]")
    p.add_argument("--alias", help="the model's id in /v1/models and /v1 responses (default: the file's stem)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require `Authorization: Bearer KEY` or `X-Api-Key: KEY` on every endpoint but /health "
                        f"(repeatable; also --api-key-file and ${API_KEY_ENV})")
    p.add_argument("--api-key-file", action="append", default=[], metavar="PATH",
                   help="read API keys from a file, one a line (repeatable)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from this origin, e.g. http://localhost:3000 or * (repeatable; "
                        "default: none)")
    p.set_defaults(func=run)


# -- validation --------------------------------------------------------------------------------------


def _int(name: str, text: str | None, lo: int | None = None, hi: int | None = None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ServeArgumentError(f"--{name} must be an integer, got {text!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ServeArgumentError(f"--{name} must be {bounds}, got {value}")
    return value


def _float(name: str, text: str, lo: float, strict: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ServeArgumentError(f"--{name} must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < lo or (strict and value == lo):
        raise ServeArgumentError(f"--{name} must be {'>' if strict else '>='} {lo:g}, got {text}")
    return value


def gpu_count() -> int:
    """CUDA devices visible to this process (0 without CuPy, a driver, or a device)."""
    try:
        import cupy  # only the cuda backend needs it

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def check_port_free(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ServeArgumentError(f"--host {host!r} cannot be resolved: {exc.strerror}") from None
    family, _type, _proto, _canon, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(addr)
        except OSError as exc:
            raise ServeArgumentError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None


def check_model_readable(path: Path) -> None:
    if not path.exists():
        raise ServeArgumentError(f"--model {path}: no such file")
    if not path.is_file():
        raise ServeArgumentError(f"--model {path}: not a regular file")
    try:
        with open(path, "rb") as f:
            f.read(4)
    except OSError as exc:
        raise ServeArgumentError(f"--model {path}: cannot be read ({exc.strerror})") from None


def validate(args: argparse.Namespace) -> dict[str, Any]:
    """Check every argument; returns the typed values. Raises ServeArgumentError (one line)."""
    v: dict[str, Any] = {}
    if args.worker_id is None:
        v["worker_id"] = str(uuid.uuid4())
    else:
        try:
            v["worker_id"] = str(uuid.UUID(args.worker_id))
        except ValueError:
            raise ServeArgumentError(
                f"--worker-id must be a UUID (like 123e4567-e89b-12d3-a456-426614174000), got {args.worker_id!r}"
            ) from None
    if args.backend not in BACKENDS:
        raise ServeArgumentError(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    v["backend"] = args.backend
    v["gpu_device"] = _int("gpu-device", args.gpu_device, 0)
    v["port"] = _int("port", args.port, 1, 65535)
    v["max_context"] = _int("max-context", args.max_context, 1)
    v["max_tokens_out"] = _int("max-tokens-out", args.max_tokens_out, 1, schemas.MAX_TOKENS_LIMIT)
    v["inference_timeout_s"] = _float("inference-timeout-sec", args.inference_timeout_sec, 0.0, strict=True)
    v["shutdown_timeout_s"] = _float("shutdown-timeout-sec", args.shutdown_timeout_sec, 0.0, strict=False)
    v["kv_cache_size_mb"] = _int("kv-cache-size-mb", args.kv_cache_size_mb, 1)
    v["queue_size"] = _int("queue-size", args.queue_size, 1, 100_000)
    v["max_batch"] = _int("max-batch", args.max_batch, 1, MAX_BATCH)
    if args.log_format not in (None, "json", "console"):
        raise ServeArgumentError(f"--log-format must be json or console, got {args.log_format!r}")
    if args.callback_url is not None:
        parts = urlsplit(args.callback_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServeArgumentError(f"--callback-url must be an http(s) URL with a host, got {args.callback_url!r}")
    if args.model is not None:
        check_model_readable(Path(args.model))
    if v["backend"] == "cuda":
        n = gpu_count()
        if n == 0:
            raise ServeArgumentError(
                "no CUDA GPU found (CuPy and an NVIDIA driver are needed); "
                "pass --backend reference to run on the CPU (slow); the worker never falls back by itself"
            )
        if v["gpu_device"] >= n:
            raise ServeArgumentError(f"--gpu-device {v['gpu_device']} is out of range: {n} CUDA device(s) (0..{n - 1})")
    elif v["gpu_device"] != 0:
        raise ServeArgumentError("--gpu-device must be 0 with --backend reference (the CPU is one device)")
    try:
        v["api_keys"] = collect_keys(args.api_key, args.api_key_file)
    except ApiKeyError as exc:
        raise ServeArgumentError(str(exc)) from None
    for origin in args.cors_origin:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/")):
            raise ServeArgumentError(f"--cors-origin must be * or an http(s) origin like http://localhost:3000, "
                                     f"got {origin!r}")
    v["cors_origins"] = tuple(o.rstrip("/") for o in args.cors_origin)
    check_port_free(args.host, v["port"])
    return v


def kv_context_cap(model_path: Path, kv_cache_size_mb: int, registry=None, n_seq: int = 1) -> int:
    """The most tokens whose KV caches (`orcd_core.shape.kv_bytes` of the architecture's shape, as the
    worker allocates it, for each of `n_seq` jobs decoding together) fit in `kv_cache_size_mb` MiB."""
    from orcd_core.gguf_file import check_supported, open_gguf
    from orcd_core.plugins import default_registry
    from orcd_core.shape import kv_bytes, max_context_for

    model = open_gguf(model_path)
    arch = check_supported(model, registry if registry is not None else default_registry())
    if arch is None:
        raise ServeArgumentError(f"--model {model_path}: the file has no tensors (vocabulary only): nothing to run")
    shape = arch.config(model).shape()
    cap = max_context_for(shape, (kv_cache_size_mb << 20) // max(1, n_seq))
    if cap < 1:
        raise ServeArgumentError(f"--kv-cache-size-mb {kv_cache_size_mb} holds no token for each of {n_seq} jobs "
                                 f"({kv_bytes(shape, 1)} bytes for one; lower --max-batch?)")
    return int(cap)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning to log when the worker listens beyond this machine without an API key."""
    if api_key:
        return None
    name = host.strip("[]")
    try:
        loopback = ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = name.lower() == "localhost"
    if loopback:
        return None
    return (f"listening on {host} without an API key: anyone who can reach this address can run, cancel and "
            "stop jobs; bind 127.0.0.1 or set an API key")


# -- run ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    values = validate(args)

    from orcd_core.plugins import default_registry

    from ..app import ServerSettings
    from ..logging import DownloadProgress, configure_logging, get_logger

    model_ref = args.model
    log_format = configure_logging(args.log_format)
    log = get_logger("orcd.server")
    # the worker's fixed context, once (not bound to every line: docs/http_api.md, "Logs")
    log.info("startup", worker_id=values["worker_id"], model_ref=model_ref or "default", gpu_device=values["gpu_device"],
             backend=values["backend"], host=args.host, port=values["port"], pid=os.getpid(),
             python=sys.version.split()[0])
    exposure = exposure_warning(args.host, values["api_keys"])
    if exposure:
        log.warning("exposed", host=args.host, message=exposure)
    if model_ref is None:
        from orcd_core.testmodels import default_model_path

        # a bar beside console logs on a terminal, else log events (JSON lines stay JSON on a terminal too)
        shown = DownloadProgress(sys.stdout, log, bar=log_format == "console")
        try:
            model_path = default_model_path(progress=shown.line, on_bytes=shown.bytes)
        finally:
            shown.close()
        model_ref = str(model_path)
    else:
        model_path = Path(model_ref)
    max_context = values["max_context"]
    registry = default_registry()
    if values["kv_cache_size_mb"] is not None:
        cap = kv_context_cap(model_path, values["kv_cache_size_mb"], registry, n_seq=values["max_batch"])
        max_context = cap if max_context is None else min(max_context, cap)
    plugins = [{"name": p.distribution or p.name, "version": p.version} for p in registry.plugins]

    def load(progress):
        from orcd_core.engine import Engine

        return Engine.load(
            model_path,
            backend=values["backend"],
            gpu_device=values["gpu_device"],
            registry=registry,
            max_context=max_context,
            progress=progress,
            max_batch=values["max_batch"],
        )

    settings = ServerSettings(
        worker_id=values["worker_id"],
        model_ref=model_ref,
        gpu_device=values["gpu_device"],
        backend=values["backend"],
        max_tokens_out=values["max_tokens_out"],
        inference_timeout_s=values["inference_timeout_s"],
        queue_size=values["queue_size"],
        shutdown_timeout_s=values["shutdown_timeout_s"],
        callback_url=args.callback_url,
        log_prompts=bool(args.log_prompts),
        plugins=plugins,
        model_alias=args.alias,
        api_keys=values["api_keys"],
        cors_origins=values["cors_origins"],
        host=args.host,
        allowed_hosts=list(args.allowed_host),
    )
    return serve_app(settings, load, host=args.host, port=values["port"])


def listen_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _announce_when_ready(server, app, url: str, poll_s: float = 0.05) -> None:
    """Once uvicorn listens and the model is loaded: one `listening` log event and, for a person at
    the terminal, "listening on URL" on stderr. Returns silently when the worker stops first."""
    while True:
        state = getattr(app.state, "orcd", None)
        if state is not None and state.worker.stopped.is_set():
            return
        if server.started and state is not None and state.worker.ready:
            break
        time.sleep(poll_s)
    state.log.info("listening", url=url)
    print(f"orcd-worker serve: listening on {url}", file=sys.stderr, flush=True)


def serve_app(settings, load, *, host: str, port: int) -> int:
    """Run uvicorn until the engine thread has shut down; returns the exit code (0, or 1 when the
    model failed to load)."""
    import uvicorn

    from ..app import create_app

    exit_code: dict[str, int] = {}

    class _Server(uvicorn.Server):
        """SIGTERM/SIGINT start our drain (503 for new work, running job finishes) instead of
        uvicorn's immediate close; a second SIGINT forces the exit."""

        def handle_exit(self, sig: int, frame) -> None:
            # A signal handler runs between two bytecodes of the event loop's thread: hand the work
            # to the loop rather than take locks here.
            state = getattr(app.state, "orcd", None)
            if state is None or state.loop is None:
                self.should_exit = True
                return
            if state.worker.draining:
                if sig == signal.SIGINT:
                    self.force_exit = True
                    self.should_exit = True
                return
            state.loop.call_soon_threadsafe(state.worker.begin_shutdown, signal.Signals(sig).name)

    def on_exit(code: int) -> None:
        exit_code["code"] = code
        server.should_exit = True

    app = create_app(settings, load, on_exit=on_exit)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=max(5, int(settings.shutdown_timeout_s) + 5),
    )
    server = _Server(config)
    announcer = threading.Thread(target=_announce_when_ready, args=(server, app, listen_url(host, port)),
                                 name="orcd-announce", daemon=True)
    announcer.start()
    server.run()
    code = exit_code.get("code", 0)
    state = getattr(app.state, "orcd", None)
    if code != 0 and state is not None and state.worker.error:
        print(f"orcd-worker serve: error: {state.worker.error}", file=sys.stderr)
    return code
