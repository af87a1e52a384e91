"""llama.cpp's own tokenizer test vectors: for each `ggml-vocab-<name>.gguf` with `.inp`/`.out` in
llama.cpp's `models/` folder (llama-cpp-python 0.3.36 sdist), our ids equal `.out` for every input,
tokenized as llama.cpp's tests/test-tokenizer-0.cpp does (add_special=False, parse_special=False).

Every vocab file of the folder must be listed in COVERED or NOT_COVERED (with the reason), so a new
file in a future llama.cpp forces a decision.
"""

from __future__ import annotations

import pytest
from tok_helpers import vocab_dir, vocab_path, vocab_tokenizer

COVERED = {
    # name: tokenizer.ggml.model / tokenizer.ggml.pre
    "qwen2": "gpt2 / qwen2",
    "qwen35": "gpt2 / qwen35",
    "phi-3": "llama (SPM)",
    "llama-spm": "llama (SPM)",
    "llama-bpe": "gpt2 / llama-bpe",
    "gpt-2": "gpt2 / gpt-2",
    "starcoder": "gpt2 / starcoder",
    "deepseek-coder": "gpt2 / deepseek-coder",
    "deepseek-llm": "gpt2 / deepseek-llm",
    "falcon": "gpt2 / falcon",
    "refact": "gpt2 / refact",
    "mpt": "gpt2 / mpt",
    "command-r": "gpt2 / command-r",
}
NOT_COVERED = {
    "bert-bge": "WordPiece vocabulary (tokenizer.ggml.model = bert): no WPM backend; not a target model",
    "gemma-4": "tokenizer.ggml.model = gemma4 (whitespace-escaped BPE without byte encoding): not supported",
    "aquila": "no .inp/.out vectors in llama.cpp's folder",
    "baichuan": "no .inp/.out vectors in llama.cpp's folder",
    "gpt-neox": "no .inp/.out vectors in llama.cpp's folder",
    "nomic-bert-moe": "no .inp/.out vectors; WordPiece/UGM-style embedding vocabulary",
}

SEP = "\n__ggml_vocab_test__\n"


def read_vectors(name: str) -> list[tuple[str, list[int]]]:
    """Parse `.inp` (inputs separated by SEP) and `.out` (one line of ids per input), as
    test-tokenizer-0.cpp does."""
    raw = vocab_path(name).with_suffix(".gguf.inp").read_bytes().decode("utf-8")
    inputs: list[str] = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(SEP, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(SEP)
    lines = vocab_path(name).with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(lines) >= len(inputs), f"{name}: {len(inputs)} inputs but {len(lines)} output lines"
    return [(text, [int(x) for x in line.split()]) for text, line in zip(inputs, lines)]


def test_every_vocab_file_is_classified():
    names = {p.name[len("ggml-vocab-") : -len(".gguf")] for p in vocab_dir().glob("ggml-vocab-*.gguf")}
    unclassified = names - set(COVERED) - set(NOT_COVERED)
    assert not unclassified, f"classify these llama.cpp vocab files in COVERED or NOT_COVERED: {sorted(unclassified)}"
    for name in COVERED:
        assert vocab_path(name).with_suffix(".gguf.inp").is_file(), name


@pytest.mark.parametrize("name", sorted(COVERED))
def test_llama_cpp_vectors(name):
    tok = vocab_tokenizer(name)
    vectors = read_vectors(name)
    assert len(vectors) >= 40
    failures = []
    for text, expected in vectors:
        got = tok.encode(text, add_special=False, parse_special=False)
        if got != expected:
            failures.append((text, expected, got))
    assert not failures, f"{name}: {len(failures)}/{len(vectors)} differ; first: {failures[0]!r}"
