"""Structured logs (structlog): JSON lines when the output is not a terminal, readable console
lines (with a progress bar for the model load) when it is. `--log-format` overrides the choice.

Every line carries the worker's static context (`worker_id`, `model_ref`, `gpu_device`), set once
by `bind_worker`, and `job_id` inside a job (bound on the job's logger). Library logs that go
through the standard `logging` module (uvicorn) are rendered the same way.

Prompt and output text never reach the logs unless `--log-prompts` is given: `text_fields` logs a
SHA-256 prefix and the length instead.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from typing import Any, TextIO

import structlog

_WORKER_CONTEXT: dict[str, Any] = {}
PROGRESS_BAR_WIDTH = 24


def bind_worker(**context: Any) -> None:
    """Set the context every log line carries (worker_id, model_ref, gpu_device)."""
    _WORKER_CONTEXT.clear()
    _WORKER_CONTEXT.update(context)


def _add_worker_context(_logger, _method, event_dict):
    for key, value in _WORKER_CONTEXT.items():
        event_dict.setdefault(key, value)
    return event_dict


def _progress_bar(_logger, _method, event_dict):
    """Console only: draw the model-load progress as a bar in the event text."""
    if event_dict.get("event") == "model_load_progress" and "percent" in event_dict:
        percent = float(event_dict["percent"])
        filled = round(PROGRESS_BAR_WIDTH * percent / 100)
        bar = "#" * filled + "." * (PROGRESS_BAR_WIDTH - filled)
        event_dict["event"] = f"model_load_progress [{bar}] {percent:3.0f}%"
    return event_dict


def resolve_format(fmt: str | None, stream: TextIO) -> str:
    if fmt in ("json", "console"):
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


def configure_logging(fmt: str | None = None, stream: TextIO | None = None, level: int = logging.INFO) -> str:
    """Configure structlog and the standard library's root logger; returns the format used."""
    stream = stream or sys.stdout
    fmt = resolve_format(fmt, stream)
    shared: list = [
        structlog.contextvars.merge_contextvars,
        _add_worker_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer: Any = structlog.processors.JSONRenderer(ensure_ascii=False)
    else:
        shared.append(_progress_bar)
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty() if hasattr(stream, "isatty") else False)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # uvicorn's and litestar's chatter stays out; their warnings stay in
    return fmt


def get_logger(name: str = "orcd.server", **context: Any):
    return structlog.get_logger(name).bind(**context)


def text_fields(prefix: str, text: str, log_text: bool) -> dict[str, Any]:
    """`{prefix}_sha256` (first 16 hex digits) and `{prefix}_chars`; the text itself only when asked."""
    fields: dict[str, Any] = {
        f"{prefix}_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
        f"{prefix}_chars": len(text),
    }
    if log_text:
        fields[prefix] = text
    return fields
