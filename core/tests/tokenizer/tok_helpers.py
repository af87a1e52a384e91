"""Helpers shared by the tokenizer tests: llama.cpp's vocab folder, the real test models, cached
tokenizers. (A plain module with a unique name rather than a conftest.py, so that `import` cannot pick
up another directory's conftest.)"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tok_strings.py

from orcd_core import testmodels  # noqa: E402
from orcd_core.gguf_file import open_gguf  # noqa: E402
from orcd_core.tokenizer import load_tokenizer  # noqa: E402


@functools.lru_cache(maxsize=1)
def vocab_dir() -> Path:
    try:
        return testmodels.llama_cpp_models_dir()
    except testmodels.TestModelError as exc:  # offline and not cached
        pytest.skip(f"llama.cpp's vocab folder is not available: {exc}")


def vocab_path(name: str) -> Path:
    return vocab_dir() / f"ggml-vocab-{name}.gguf"


def model_path(name: str) -> Path:
    """A real test model ("qwen", "smollm2"), fetched and verified on first use."""
    try:
        return testmodels.fetch_model(name)
    except testmodels.TestModelError as exc:
        pytest.skip(f"test model {name} is not available: {exc}")


@functools.lru_cache(maxsize=None)
def tokenizer_for(path: str, tokenizer_json: str | None = None):
    return load_tokenizer(open_gguf(path), tokenizer_json=tokenizer_json)


def vocab_tokenizer(name: str):
    return tokenizer_for(str(vocab_path(name)))


def resolve(target: str) -> str:
    """"qwen"/"smollm2" -> the real model; anything else -> llama.cpp's ggml-vocab-<name>.gguf."""
    if target in ("qwen", "smollm2"):
        return str(model_path(target))
    return str(vocab_path(target))
