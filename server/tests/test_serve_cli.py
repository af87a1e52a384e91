"""`orcd-worker serve` argument validation: one line on stderr, exit code 1, nothing started."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from orcd_server.cli import main
from orcd_server.commands.serve import gpu_count


@pytest.fixture(autouse=True)
def _reset_structlog():
    """main() points structlog at sys.stderr, which is pytest's capture here: undo it afterwards."""
    import structlog

    yield
    structlog.reset_defaults()


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return str(path)


CASES = [
    (["--worker-id", "not-a-uuid"], "--worker-id must be a UUID"),
    (["--worker-id", "123e4567-e89b-12d3-a456-42661417400"], "--worker-id must be a UUID"),
    (["--backend", "tpu"], "--backend must be one of cuda, reference"),
    (["--port", "0"], "--port must be between 1 and 65535"),
    (["--port", "70000"], "--port must be between 1 and 65535"),
    (["--port", "http"], "--port must be an integer"),
    (["--gpu-device", "-1"], "--gpu-device must be >= 0"),
    (["--gpu-device", "1"], "--gpu-device must be 0 with --backend reference"),
    (["--max-context", "0"], "--max-context must be >= 1"),
    (["--max-tokens-out", "0"], "--max-tokens-out must be between 1 and 2048"),
    (["--max-tokens-out", "4096"], "--max-tokens-out must be between 1 and 2048"),
    (["--inference-timeout-sec", "0"], "--inference-timeout-sec must be > 0"),
    (["--inference-timeout-sec", "nan"], "--inference-timeout-sec must be > 0"),
    (["--shutdown-timeout-sec", "-1"], "--shutdown-timeout-sec must be >= 0"),
    (["--kv-cache-size-mb", "0"], "--kv-cache-size-mb must be >= 1"),
    (["--queue-size", "0"], "--queue-size must be between 1 and 100000"),
    (["--max-batch", "9"], "--max-batch must be between 1 and 8"),
    (["--max-batch", "0"], "--max-batch must be between 1 and 8"),
    (["--callback-url", "ftp://example.org/x"], "--callback-url must be an http(s) URL"),
    (["--callback-url", "http://"], "--callback-url must be an http(s) URL"),
    (["--log-format", "xml"], "--log-format must be json or console"),
]


@pytest.mark.parametrize("extra, message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_argument_is_one_line_and_exit_1(extra, message, model, capsys):
    code = main(["serve", "--backend", "reference", "--model", model, *extra])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("orcd-worker serve: error: ")
    assert message in err


def test_unreadable_model(tmp_path, capsys):
    assert main(["serve", "--backend", "reference", "--model", str(tmp_path / "missing.gguf")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["serve", "--backend", "reference", "--model", str(tmp_path)]) == 1
    assert "not a regular file" in capsys.readouterr().err


def test_port_in_use(model, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--backend", "reference", "--model", model, "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1


def test_no_gpu_without_reference_backend_exits_1(model):
    """A real process: no traceback, one line, exit 1 (no silent CPU fallback)."""
    if gpu_count() > 0:
        args = ["--gpu-device", str(gpu_count())]
        expect = "out of range"
    else:
        args = []
        expect = "no CUDA GPU found"
    proc = subprocess.run([sys.executable, "-m", "orcd_server.cli", "serve", "--model", model, *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and expect in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_kv_cache_size_caps_the_context():
    """--kv-cache-size-mb: the most tokens whose fp16 K and V of every layer fit, from the file's
    metadata read here with gguf-py (an independent reader)."""
    import gguf
    from orcd_core.testmodels import fetch_model
    from orcd_server.commands.serve import kv_context_cap

    path = fetch_model("smollm2")
    reader = gguf.GGUFReader(path)

    def field(key):
        f = reader.fields[key]
        return int(f.parts[f.data[0]][0])

    n_layer, n_head = field("llama.block_count"), field("llama.attention.head_count")
    n_kv, n_embd = field("llama.attention.head_count_kv"), field("llama.embedding_length")
    per_token = n_layer * n_kv * 2 * (n_embd // n_head) * 2
    assert per_token == 30 * 3 * 2 * 64 * 2  # SmolLM2-135M: 30 layers, 3 KV heads of 64
    for mb in (1, 7, 64):
        assert kv_context_cap(path, mb) == (mb << 20) // per_token
        assert kv_context_cap(path, mb, n_seq=4) == ((mb << 20) // 4) // per_token  # --max-batch 4: a cache each


def test_model_that_fails_to_load_exits_1_after_logging_it(model):
    """The file is readable (argument check passes) but not a valid GGUF: the engine thread's load
    fails, the error is logged as JSON, the process prints one line and exits 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "orcd_server.cli", "serve", "--backend", "reference", "--model", model,
                           "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "GGUF version 0" in proc.stderr and "Traceback" not in proc.stderr
    import json

    logs = [json.loads(line) for line in proc.stdout.splitlines()]
    error = next(line for line in logs if line["event"] == "error")
    assert error["code"] == "MODEL_LOAD_FAILED"
    assert logs[-1]["event"] == "shutdown" and logs[-1]["exit_code"] == 1
    # the worker's context is logged once, at start-up, not repeated on every line
    assert logs[0]["event"] == "startup" and logs[0]["model_ref"] == model and logs[0]["backend"] == "reference"
    assert len(logs) >= 5, logs
    on_every_line = set.intersection(*(set(line) for line in logs))
    assert on_every_line == {"event", "level", "timestamp"}, on_every_line
    for field in ("worker_id", "model_ref", "gpu_device", "pid"):
        assert [line["event"] for line in logs if field in line] == ["startup"], field
