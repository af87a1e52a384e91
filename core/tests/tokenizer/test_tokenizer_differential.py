"""Differential test against llama.cpp's tokenizer (llama-cpp-python 0.3.36, `vocab_only=True`).

For the two real models (Qwen2.5-Coder-0.5B: gpt2/qwen2; SmolLM2-135M: gpt2/smollm), the Phi-3 vocab
(llama/SPM) and the rebuilt gpt-oss vocab (gpt2/gpt-4o): 2,000 generated strings each (strings.py,
seed 20261122), tokenized in both of llama.cpp's modes that matter (user text: add_special=True,
parse_special=False; template output: add_special=False, parse_special=True), must give identical ids
for 100% of them; and decoding our ids must give llama_detokenize's bytes exactly (both
skip_special settings; none of these vocabularies has llama.cpp's clean-up passes on).
"""

from __future__ import annotations

import ctypes

import pytest
from tok_helpers import resolve, tokenizer_for
from tok_strings import generate

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.oracle

N_STRINGS = 2000
SEED = 20261122


def _llama(path: str):
    return llama_cpp.Llama(path, vocab_only=True, verbose=False)


def _detokenize(ll, ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
    vocab = llama_cpp.llama_model_get_vocab(ll.model)
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 16 * len(ids) + 64
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, remove_special, unparse_special)
        if n >= 0:
            return buf.raw[:n]
        size = -n + 1
    raise AssertionError("llama_detokenize did not fit")


def _o200k_path() -> str:
    pytest.importorskip("quicktok")
    from orcd_core.tokenizer.o200k import o200k_vocab_gguf

    return str(o200k_vocab_gguf())


@pytest.mark.parametrize("target", ["qwen", "smollm2", "phi-3", "o200k"])
def test_same_ids_and_text_as_llama_cpp(target):
    path = _o200k_path() if target == "o200k" else resolve(target)
    ll = _llama(path)
    tok = tokenizer_for(path)
    strings = generate(N_STRINGS, seed=SEED)
    mismatches: list[tuple] = []
    decode_mismatches: list[tuple] = []
    for s in strings:
        raw = s.encode("utf-8")
        for add_special, parse_special in ((True, False), (False, True)):
            ref = ll.tokenize(raw, add_bos=add_special, special=parse_special)
            got = tok.encode(s, add_special=add_special, parse_special=parse_special)
            if ref != got:
                mismatches.append((s, add_special, parse_special, ref[:16], got[:16]))
                continue
            for skip in (False, True):
                want = _detokenize(ll, ref, remove_special=skip, unparse_special=not skip)
                have = tok.decode_bytes(ref, skip_special=skip)
                if want != have:
                    decode_mismatches.append((s, skip, want[:60], have[:60]))
    n = 2 * len(strings)
    assert not mismatches, f"{target}: {len(mismatches)}/{n} encodings differ from llama.cpp; first: {mismatches[0]!r}"
    assert not decode_mismatches, (
        f"{target}: {len(decode_mismatches)} decodes differ from llama_detokenize; first: {decode_mismatches[0]!r}"
    )


@pytest.mark.parametrize("target", ["qwen", "phi-3"])
def test_metadata_matches_llama_cpp(target):
    path = resolve(target)
    ll = _llama(path)
    tok = tokenizer_for(path)
    vocab = llama_cpp.llama_model_get_vocab(ll.model)
    assert tok.vocab_size == llama_cpp.llama_vocab_n_tokens(vocab)
    assert tok.bos_id == llama_cpp.llama_vocab_bos(vocab)
    assert tok.eos_id == llama_cpp.llama_vocab_eos(vocab)
    eog = {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert tok.eog_ids == eog
    # every token's text as llama.cpp renders it with special=True
    for i in range(tok.vocab_size):
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(vocab, i, buf, 256, 0, True)
        assert tok.token_bytes(i) == buf.raw[:n], i
