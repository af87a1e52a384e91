"""Structured logs (structlog): JSON lines when the output is not a terminal, readable console
lines (with a progress bar for the model load) when it is. `--log-format` overrides the choice.
`DownloadProgress` shows the default model's download: a bar redrawn in place on a terminal, a
`model_download_progress` event (or, without a logger, a line) every 10 % elsewhere.

No field is repeated on every line: what stays the same for the worker's life (worker id, model,
device, backend, address, pid) is logged once, in the `startup` event (`serve`); a line carries its
event's own fields, its level and timestamp, and `job_id` inside a job (bound on the job's logger).
Library logs that go through the standard `logging` module (uvicorn) are rendered the same way.

Prompt and output text never reach the logs unless `--log-prompts` is given: `text_fields` logs a
SHA-256 prefix and the length instead.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from typing import Any, TextIO

import structlog

PROGRESS_BAR_WIDTH = 24
DOWNLOAD_STEP_PERCENT = 10  # off a terminal, one download progress event per this many percent


def progress_bar(percent: float) -> str:
    """`[#####...] 42%`: PROGRESS_BAR_WIDTH cells."""
    filled = round(PROGRESS_BAR_WIDTH * percent / 100)
    return f"[{'#' * filled}{'.' * (PROGRESS_BAR_WIDTH - filled)}] {percent:3.0f}%"


def _progress_bar(_logger, _method, event_dict):
    """Console only: draw the model-load and download progress as a bar in the event text."""
    event = event_dict.get("event")
    if event in ("model_load_progress", "model_download_progress") and "percent" in event_dict:
        event_dict["event"] = f"{event} {progress_bar(float(event_dict['percent']))}"
    return event_dict


class DownloadProgress:
    """The callbacks of `orcd_core.testmodels.fetch_model`: `line` (what happens) and `bytes` (how far).

    On a terminal (`stream.isatty()`) a bar on `stream`, redrawn in place at each whole percent; lines
    go above it. Elsewhere, with a structlog `log`: events `model_fetch` (`message`) and
    `model_download_progress` (`model`, `percent`, `bytes`, `total_bytes`) every DOWNLOAD_STEP_PERCENT;
    without one, plain lines on `stream`. `bar=False` forces the second form (JSON logs on a terminal).
    `close()` ends a bar that is still drawn."""

    def __init__(self, stream: TextIO, log=None, bar: bool = True):
        self.stream = stream
        self.log = log
        isatty = getattr(stream, "isatty", None)
        self.tty = bar and bool(isatty and isatty())
        self._shown = -1  # the percent last drawn or reported
        self._drawn = False  # a bar is on the current line

    def line(self, text: str) -> None:
        self.close()
        if self.log is not None:
            self.log.info("model_fetch", message=text)
        else:
            print(text, file=self.stream, flush=True)

    def bytes(self, what: str, done: int, total: int) -> None:
        if total <= 0:
            return  # the registry gave no sizes: the start and end lines are all there is
        percent = min(100, done * 100 // total)
        if self.tty:
            if percent != self._shown:
                self._shown = percent
                self.stream.write(f"\r{what} {progress_bar(percent)} {done / 1e6:,.1f} / {total / 1e6:,.1f} MB")
                self.stream.flush()
                self._drawn = True
            return
        step = percent - percent % DOWNLOAD_STEP_PERCENT
        if step <= self._shown:
            return
        self._shown = step
        if self.log is not None:
            self.log.info("model_download_progress", model=what, percent=step, bytes=done, total_bytes=total)
        else:
            print(f"{what}: {step}% of {total / 1e6:,.1f} MB", file=self.stream, flush=True)

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


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
