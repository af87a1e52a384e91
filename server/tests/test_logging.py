"""Structured logs: JSON lines off a terminal, console lines with a progress bar on one, no field
repeated on every line, and no prompt or output text unless --log-prompts."""

from __future__ import annotations

import hashlib
import io
import json
import time

import httpx
import pytest
import structlog
from fake_engine import FakeEngine
from orcd_server.app import ServerSettings, create_app
from orcd_server.logging import (
    DownloadProgress,
    configure_logging,
    get_logger,
    resolve_format,
    text_fields,
)
from serve_helpers import ThreadServer, collect


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _reset_structlog():
    yield
    structlog.reset_defaults()


def test_format_follows_the_terminal():
    assert resolve_format(None, io.StringIO()) == "json"
    assert resolve_format(None, _Tty()) == "console"
    assert resolve_format("json", _Tty()) == "json"


def test_json_lines_carry_only_their_own_fields():
    out = io.StringIO()
    assert configure_logging(None, out) == "json"
    get_logger("t").info("startup", worker_id="w-1", model_ref="/m.gguf", gpu_device=0)
    get_logger("t").info("ready")
    get_logger("t", job_id="j-9").info("execute_start", n_prompt_tokens=3)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["startup", "ready", "execute_start"]
    for line in lines:
        assert line["level"] == "info" and line["timestamp"].endswith("Z")
    assert set(lines[1]) == {"event", "level", "timestamp"}  # nothing bound globally
    assert set(lines[2]) == {"event", "level", "timestamp", "job_id", "n_prompt_tokens"} and lines[2]["job_id"] == "j-9"
    assert lines[0]["worker_id"] == "w-1" and lines[0]["model_ref"] == "/m.gguf"


def test_console_draws_a_progress_bar_for_the_model_load():
    out = _Tty()
    assert configure_logging(None, out) == "console"
    for percent in (0, 50, 100):
        get_logger("t").info("model_load_progress", percent=percent)
    text = out.getvalue()
    assert "[........................]   0%" in text
    assert "[############............]  50%" in text
    assert "[########################] 100%" in text


def _download(shown: DownloadProgress, total: int = 1000, chunk: int = 30) -> None:
    shown.line("Fake-1B Q4_0: downloading 0.0 MB into /cache")
    for done in range(0, total + 1, chunk):
        shown.bytes("Fake-1B Q4_0", done, total)
    shown.bytes("Fake-1B Q4_0", total, total)
    shown.line("Fake-1B Q4_0: verified")
    shown.close()


def test_download_progress_in_json_logs_every_ten_percent():
    out = io.StringIO()
    configure_logging("json", out)
    _download(DownloadProgress(out, get_logger("t")))
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    steps = [line for line in lines if line["event"] == "model_download_progress"]
    assert [line["percent"] for line in steps] == list(range(0, 101, 10))
    assert all(line["model"] == "Fake-1B Q4_0" and line["total_bytes"] == 1000 for line in steps)
    assert [line["bytes"] for line in steps][:3] == [0, 120, 210]  # the first chunk at or past each step
    fetch = [line["message"] for line in lines if line["event"] == "model_fetch"]
    assert fetch == ["Fake-1B Q4_0: downloading 0.0 MB into /cache", "Fake-1B Q4_0: verified"]
    assert lines[0]["event"] == "model_fetch" and lines[-1]["event"] == "model_fetch"


def test_download_progress_is_a_bar_on_a_terminal():
    out = _Tty()
    _download(DownloadProgress(out))
    text = out.getvalue()
    assert text.startswith("Fake-1B Q4_0: downloading 0.0 MB into /cache\n")
    assert text.endswith("\nFake-1B Q4_0: verified\n")  # the bar's line is ended before the next line
    bar = text.split("\n")[1]
    frames = bar.split("\r")[1:]
    assert frames[0] == "Fake-1B Q4_0 [........................]   0% 0.0 / 0.0 MB"
    assert frames[-1].startswith("Fake-1B Q4_0 [########################] 100%")
    # one redraw per new percent (0, 3, ..., 99 for the chunks, then 100), none for a repeated one
    assert len(frames) == len(set(frames)) == len(range(0, 1000, 30)) + 1


def test_download_progress_keeps_json_logs_json_on_a_terminal():
    out = _Tty()
    configure_logging("json", out)
    _download(DownloadProgress(out, get_logger("t"), bar=False))
    lines = [json.loads(line) for line in out.getvalue().splitlines()]  # every line is JSON: no bar
    assert [line["percent"] for line in lines if line["event"] == "model_download_progress"] == list(range(0, 101, 10))


def test_download_progress_without_a_logger_prints_lines():
    out = io.StringIO()
    _download(DownloadProgress(out), total=2_000_000, chunk=150_000)
    lines = out.getvalue().splitlines()
    assert lines[1:-1] == [f"Fake-1B Q4_0: {p}% of 2.0 MB" for p in range(0, 101, 10)]


def test_text_fields_hash_unless_asked():
    text = "秘密 prompt 🙂"
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    assert text_fields("prompt", text, False) == {"prompt_sha256": digest, "prompt_chars": len(text)}
    assert text_fields("prompt", text, True)["prompt"] == text


@pytest.mark.parametrize("log_prompts", [False, True])
def test_log_prompts_flag(log_prompts):
    loader = FakeEngine.loader()
    app = create_app(ServerSettings(worker_id="w", model_ref="fake", backend="reference", log_prompts=log_prompts),
                     loader)
    with structlog.testing.capture_logs() as logs, ThreadServer(app) as srv:
        client = httpx.Client(base_url=srv.url, timeout=30)
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the server never became healthy"
            time.sleep(0.01)
        events = collect(client, {"job_id": "lp", "prompt": "a secret prompt", "max_tokens": 3, "seed": 1})
    output = "".join(d["t"] for n, d in events if n == "token")
    start = next(line for line in logs if line["event"] == "execute_start")
    end = next(line for line in logs if line["event"] == "execute_end")
    assert start["job_id"] == end["job_id"] == "lp"
    assert start["prompt_chars"] == len("a secret prompt") and end["output_chars"] == len(output)
    assert end["output_sha256"] == hashlib.sha256(output.encode()).hexdigest()[:16]
    if log_prompts:
        assert start["prompt"] == "a secret prompt" and end["output"] == output
    else:
        assert all("a secret prompt" not in repr(line) for line in logs)
        assert "prompt" not in start and "output" not in end
