"""Helpers for the server tests: free ports, a real uvicorn server in a thread (fake engine) or in a
subprocess (`orcd-worker serve`, real engine), and SSE collection with httpx-sse."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import httpx_sse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn serving `app` on 127.0.0.1 in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, access_log=False,
                                timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __exit__(self, *exc):
        self.stop()


class ProcessServer:
    """`orcd-worker serve ...` in a subprocess; its stdout (JSON log lines) goes to a file."""

    def __init__(self, args: list[str], log_dir: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"serve-{self.port}.log"
        self.err_path = Path(log_dir) / f"serve-{self.port}.err"
        self.args = [sys.executable, "-m", "orcd_server.cli", "serve", "--port", str(self.port), *args]
        self.proc: subprocess.Popen | None = None

    def start(self) -> ProcessServer:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.args, stdout=open(self.log_path, "wb"), stderr=open(self.err_path, "wb"), env=env)
        return self

    def wait_listening(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}: {self.stderr()}")
            try:
                httpx.get(self.url + "/health", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.02)
        raise TimeoutError("serve never listened")

    def wait_ready(self, timeout: float = 300) -> dict:
        self.wait_listening(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = httpx.get(self.url + "/health", timeout=5)
            if r.status_code == 200:
                return r.json()
            if r.json()["status"] == "unhealthy":
                raise RuntimeError(f"serve unhealthy: {r.json()}")
            time.sleep(0.05)
        raise TimeoutError("serve never became ready")

    def logs(self) -> list[dict]:
        lines = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines

    def stderr(self) -> str:
        return self.err_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def collect(client: httpx.Client, body: dict, *, on_event=None) -> list[tuple[str, dict]]:
    """POST /execute and gather (event, data) pairs until the stream ends. `on_event(name, data)`
    may return True to stop reading early (the connection is then closed)."""
    events: list[tuple[str, dict]] = []
    with httpx_sse.connect_sse(client, "POST", "/execute", json=body) as source:
        source.response.raise_for_status()
        for sse in source.iter_sse():
            if not sse.event or sse.event == "message":
                continue
            data = json.loads(sse.data)
            events.append((sse.event, data))
            if on_event is not None and on_event(sse.event, data):
                break
    return events


def tokens(events) -> list[tuple[str, int, int]]:
    return [(d["t"], d["i"], d["id"]) for name, d in events if name == "token"]


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text (`name{labels} value`)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise KeyError(key)


@contextlib.contextmanager
def timed():
    box = {}
    t0 = time.perf_counter()
    yield box
    box["s"] = time.perf_counter() - t0


def tiny_model(directory: Path, layers: int = 1) -> Path:
    """A synthetic llama-shaped GGUF (192-wide, SmolLM2's structure) with llama.cpp's SentencePiece
    test vocabulary: a token takes milliseconds on the reference backend, for the storm and soak tests."""
    from orcd_core import testmodels
    from orcd_core.testing import synth

    path = Path(directory) / f"llama-tiny-{layers}.gguf"
    if not path.exists():
        vocab = testmodels.llama_cpp_models_dir() / "ggml-vocab-llama-spm.gguf"
        synth.synthesize("llama", path, size="tiny", layers=layers, seed=16, vocab=vocab)
    return path
