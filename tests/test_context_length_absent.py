"""Issue 2: a file without `{arch}.context_length` gives a config whose context_length is None (and
`inspect` shows null), not a crash. Checked for every registered architecture on a tiny synthetic
file whose context-length key is renamed in place (same length, so the file stays valid)."""

from __future__ import annotations

import json

import pytest

from orcd_core import testmodels
from orcd_core.testing import synth
from orcd_core.gguf_file import open_gguf
from orcd_core.plugins import load_plugins

REGISTRY = load_plugins()
@pytest.fixture(scope="module")
def vocab():
    return testmodels.llama_cpp_models_dir() / "ggml-vocab-gpt-2.gguf"


def test_the_builtin_architectures_are_all_checked():
    assert {"qwen2", "llama", "phi3", "gpt-oss", "gpt2"} <= set(REGISTRY.architectures)


@pytest.mark.parametrize("arch", sorted(REGISTRY.architectures))
def test_config_context_length_absent_is_none(arch, vocab, tmp_path, capsys):
    path = tmp_path / f"{arch}.gguf"
    synth.synthesize(arch, path, size="tiny", layers=1, vocab=vocab, registry=REGISTRY)
    adapter = REGISTRY.architectures[arch]
    assert adapter.config(open_gguf(path)).context_length > 0  # present: read from the file
    data = path.read_bytes()
    key = f"{arch}.context_length".encode()
    assert data.count(key) == 1
    path.write_bytes(data.replace(key, key[:-1] + b"X"))
    model = open_gguf(path)
    assert model.get(f"{arch}.context_length") is None

    from orcd_server.cli import main

    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["context_length"] is None
    assert adapter.config(model).context_length is None
