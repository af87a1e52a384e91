"""`orcd-worker serve` and `inspect` on hostile model files (the defects of issue 16): a non-zero exit
with one line naming the file and the field, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from gguf_builder import ARRAY, INT32, UINT64, tiny_model
from orcd_server.cli import main

from serve_helpers import free_port


@pytest.fixture(autouse=True)
def _reset_structlog():
    import structlog

    yield
    structlog.reset_defaults()


def write(tmp_path, name, arch, edit):
    b = tiny_model(arch)
    edit(b)
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(b.to_bytes())
    return path


def _fewer_rows(b):
    t = b.tensor("token_embd.weight")
    t.dims = [t.dims[0], t.dims[1] - 8]
    t.data = t.data[: t.dims[0] * t.dims[1] * 2]


# (name, arch, edit, field named in the message)
BAD = [
    ("head-count-0", "gpt-oss", lambda b: b.set("gpt-oss.attention.head_count", 0), "gpt-oss.attention.head_count"),
    ("merges-as-integers", "qwen2", lambda b: b.set("tokenizer.ggml.merges", [1, 2], ARRAY, INT32),
     "tokenizer.ggml.merges"),
    ("context-2^63", "qwen2", lambda b: b.set("qwen2.context_length", 1 << 63, UINT64), "qwen2.context_length"),
    ("embedding-rows", "llama", _fewer_rows, "token_embd.weight"),
]
# files whose header, table or counts are wrong: inspect itself refuses them
MALFORMED = [
    ("block-count-huge", "qwen2", lambda b: b.set("qwen2.block_count", (1 << 32) - 1), "qwen2.block_count"),
    ("block-count-minus-1", "qwen2", lambda b: b.set("qwen2.block_count", -1, INT32), "qwen2.block_count"),
    ("context-2^63", "qwen2", lambda b: b.set("qwen2.context_length", 1 << 63, UINT64), "qwen2.context_length"),
    ("overlap", "qwen2", lambda b: setattr(b.tensors[2], "offset", b.layout()[1]), "overlaps"),
    ("bad-magic", "phi3", lambda b: setattr(b, "magic", b"GGUZ"), "magic"),
]


@pytest.mark.parametrize("name, arch, edit, field", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_inspect_malformed_file_is_one_line_exit_1(tmp_path, capsys, name, arch, edit, field):
    path = write(tmp_path, name, arch, edit)
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"orcd-worker inspect: error: {path}: ") and field in err, err


@pytest.mark.parametrize("name, arch, edit, field", BAD, ids=[c[0] for c in BAD])
def test_inspect_reports_what_serve_would_refuse(tmp_path, capsys, name, arch, edit, field):
    """inspect runs serve's checks (plugins, config, tokenizer): a file serve refuses is not 'supported'."""
    path = write(tmp_path, name, arch, edit)
    code = main(["inspect", "--json", str(path)])
    out = capsys.readouterr()
    if code == 1:  # a value inspect reads itself (the context length) is refused outright
        assert out.err.count("\n") == 1 and field in out.err
        return
    info = json.loads(out.out)
    assert info["supported"] is False and field in info["unsupported_reason"], info["unsupported_reason"]


def test_inspect_supports_the_unmodified_tiny_models(tmp_path, capsys):
    for arch in ("qwen2", "llama", "phi3", "gpt-oss", "gpt2"):
        path = write(tmp_path, arch, arch, lambda b: None)
        assert main(["inspect", "--json", str(path)]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["supported"] is True, (arch, info["unsupported_reason"])


def test_serve_on_bad_files_exits_1_with_one_line(tmp_path):
    """The real `serve` process on each bad file (run side by side): exit 1, one stderr line naming the
    file and the field, the load error logged as MODEL_LOAD_FAILED, no traceback anywhere."""
    procs = []
    for name, arch, edit, field in BAD:
        path = write(tmp_path, name, arch, edit)
        cmd = [sys.executable, "-m", "orcd_server.cli", "serve", "--backend", "reference", "--model", str(path),
               "--port", str(free_port())]
        procs.append((path, field, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for path, field, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (path, err)
        assert err.count("\n") == 1 and err.startswith(f"orcd-worker serve: error: {path}: ") and field in err, err
        assert "Traceback" not in out + err
        logs = [json.loads(line) for line in out.splitlines()]
        assert any(line["event"] == "error" and line.get("code") == "MODEL_LOAD_FAILED" for line in logs)


def test_serve_kv_cache_cap_on_a_bad_file_is_one_line(tmp_path, capsys):
    """--kv-cache-size-mb reads the attention metadata before the engine starts: head_count_kv 0 used
    to divide by zero there."""
    path = write(tmp_path, "kv-0", "qwen2", lambda b: b.set("qwen2.attention.head_count_kv", 0))
    code = main(["serve", "--backend", "reference", "--model", str(path), "--kv-cache-size-mb", "16",
                 "--port", str(free_port())])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and str(path) in err and "head_count_kv" in err, err
