"""`orcd-worker models` and `orcd-worker synth`: output, exit codes, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from orcd_core import testmodels
from orcd_core.gguf_file import open_gguf
from orcd_core.testmodels import ChecksumMismatch, DownloadError
from orcd_server.cli import main


def test_models_fetch_and_path(monkeypatch, tmp_path, capsys):
    fetched = []

    def fake_fetch(name, force=False, progress=None, on_bytes=None):
        fetched.append((name, force))
        return tmp_path / testmodels.MODELS[name].filename

    monkeypatch.setattr(testmodels, "fetch_model", fake_fetch)
    assert main(["models", "fetch"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in out] == list(testmodels.MODELS)
    assert testmodels.MODELS["qwen"].sha256 in out[0]
    assert main(["models", "fetch", "--force", "smollm2"]) == 0
    assert fetched[-1] == ("smollm2", True)
    capsys.readouterr()
    assert main(["models", "path", "qwen"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / testmodels.MODELS["qwen"].filename)


@pytest.mark.parametrize(
    "error",
    [ChecksumMismatch("/c/q.gguf", "a" * 64, "b" * 64), DownloadError("https://x/y/json: cannot connect (refused)")],
)
def test_models_errors_are_one_line(monkeypatch, capsys, error):
    def failing(name, force=False, progress=None, on_bytes=None):
        raise error

    monkeypatch.setattr(testmodels, "fetch_model", failing)
    assert main(["models", "fetch", "qwen"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(error) in err and "Traceback" not in err


def test_synth_writes_a_loadable_file(tmp_path, capsys):
    vocab = testmodels.llama_cpp_models_dir() / "ggml-vocab-gpt-2.gguf"
    out = tmp_path / "g.gguf"
    assert main(["synth", "gpt2", str(out), "--layers", "1", "--seed", "4", "--vocab", str(vocab)]) == 0
    line = capsys.readouterr().out
    assert str(out) in line and "MB/s" in line
    model = open_gguf(out)
    assert model.architecture == "gpt2" and model.metadata["gpt2.block_count"] == 1
    assert len(model.metadata["tokenizer.ggml.tokens"]) == 50257


def test_synth_errors_are_one_line(tmp_path, capsys):
    assert main(["synth", "gpt2", str(tmp_path / "missing-dir" / "x.gguf"), "--vocab", str(tmp_path / "none.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.gguf" in err
    vocab = testmodels.llama_cpp_models_dir() / "ggml-vocab-gpt-2.gguf"
    assert main(["synth", "gpt2", str(tmp_path / "missing-dir" / "x.gguf"), "--vocab", str(vocab)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err
    assert not list(Path(tmp_path).glob("**/*.tmp"))
