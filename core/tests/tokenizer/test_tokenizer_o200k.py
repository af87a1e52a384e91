"""gpt-oss's vocabulary (o200k_harmony) rebuilt from quicktok's ranks, checked against quicktok's own
encoder (byte-identical to tiktoken): 30 golden pairs (special tokens, multibyte text, long input)
through the tokenizer.json (`hf-json`) and the vocab GGUF (`gguf-bpe`, llama.cpp's "gpt-4o" rules);
every one of the 201,088 token byte strings equals quicktok's.

Where llama.cpp itself departs from tiktoken the GGUF path follows llama.cpp (the differential test
against llama.cpp covers it): its gpt-4o regex leaves combining marks (\\p{M}) out of the letter
classes, and it always matches the gpt-oss tokens it forces to user-defined (<|start|>, <|message|>,
<|channel|>, <|constrain|>, and <|end|>). GGUF_DIFFERS lists the golden strings where that shows.
"""

from __future__ import annotations

import time

import pytest
from tok_helpers import tokenizer_for

quicktok = pytest.importorskip("quicktok")

from orcd_core.gguf_file import open_gguf  # noqa: E402
from orcd_core.tokenizer import o200k  # noqa: E402

HARMONY = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Reasoning: medium<|end|><|start|>user<|message|>What is 2+2?<|end|>"
    "<|start|>assistant<|channel|>analysis<|message|>Simple.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>4<|return|>"
)
GOLDEN = [
    "Hello world",
    " Hello world",
    "I'M sure you'RE right, they'd've known.",
    "naïve café résumé Straße",
    "e\u0301 a\u0308 n\u0303",  # combining marks
    "Z\u0335\u0321a\u0337\u0316lgo",
    "中文字符，日本語のテキスト、한국어 문장。",
    "Привет, мир! Ελληνικά. مرحبا بالعالم. नमस्ते दुनिया",
    "emoji 👩\u200d👩\u200d👧\u200d👦 🤷\u200d♂️ 👍🏽 🇫🇷 1️⃣ 🦙",
    "12345678901234567890 3.14159 1,000,000",
    "  leading spaces\n\n\n\ttabs\r\n  trailing  ",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<div class=\"x\">&amp;</div> // path/to/file.py:12",
    "\u00a0\u3000\u2009 odd spaces \u200b zero width",
    "ALLCAPS MixedCase camelCaseWord snake_case_word",
    "¿Qué? ¡Sí! «quotes» “curly” ‘single’",
    "a" * 500,
    HARMONY,
    "<|startoftext|>Hi<|endoftext|>",
    "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>commentary to=functions.get<|constrain|>json<|message|>{}<|call|>",
    "<|reserved_200100|> and <|endofprompt|>",
    "text before <|return|> text after",
    "not special: <|im_end|> <|eot_id|> </s>",
    "<|end|>",
    "\n",
    " ",
    "The quick brown fox jumps over the lazy dog. " * 40,
    ("Lorem ipsum dolor sit amet, 中文 emoji 🦙 and code `x = y**2` " * 120).strip(),
    "ǅemal ǈubljana ﬁnance ＡＢＣ",
]
assert len(GOLDEN) == 30

GGUF_DIFFERS = {7: "Devanagari vowel signs (\\p{M}) fall outside llama.cpp's gpt-4o letter classes"}
ALIASES = {200018: b"<|reserved_200018|>"}  # tiktoken's second name for <|endofprompt|> (decoded by quicktok)


def _quicktok_ids(enc, text: str) -> list[int]:
    return enc.encode(text, allowed_special="all")


@pytest.fixture(scope="module")
def enc():
    return quicktok.get_encoding("o200k_harmony")


@pytest.fixture(scope="module")
def files():
    t0 = time.monotonic()
    gguf_path, json_path = o200k.o200k_vocab_gguf(), o200k.o200k_tokenizer_json()
    print(f"o200k files ready in {time.monotonic() - t0:.1f} s (built on first use, then cached)")
    return str(gguf_path), str(json_path)


@pytest.mark.parametrize("index", range(len(GOLDEN)))
def test_golden_pairs_hf_json(enc, files, index):
    tok = tokenizer_for(files[0], files[1])
    assert tok.kind == "hf-json"
    text = GOLDEN[index]
    assert tok.encode(text, add_special=False, parse_special=True) == _quicktok_ids(enc, text)
    assert tok.decode(_quicktok_ids(enc, text)) == text


@pytest.mark.parametrize("index", range(len(GOLDEN)))
def test_golden_pairs_gguf(enc, files, index):
    tok = tokenizer_for(files[0])
    assert tok.kind == "gguf-bpe" and tok.pre == "gpt-4o"
    text = GOLDEN[index]
    got = tok.encode(text, add_special=False, parse_special=True)
    if index in GGUF_DIFFERS:
        assert got != _quicktok_ids(enc, text), f"expected llama.cpp's deviation ({GGUF_DIFFERS[index]})"
        assert tok.decode(got) == text
    else:
        assert got == _quicktok_ids(enc, text)


def test_plain_text_keeps_control_tokens_as_text(enc, files):
    """parse_special=False: control tokens stay text; llama.cpp's user-defined ones still match."""
    tok = tokenizer_for(files[0])
    text = "a <|return|> b <|endoftext|> c"
    assert tok.encode(text, add_special=False) == enc.encode_ordinary(text)
    assert tok.token_id("<|message|>") in tok.encode("x<|message|>y", add_special=False)


def test_vocabulary_bytes_and_metadata(enc, files):
    tok = tokenizer_for(files[0])
    assert tok.vocab_size == o200k.N_VOCAB == enc.n_vocab
    for i in range(o200k.N_RANKS):
        assert tok.token_bytes(i) == enc.decode_single_token_bytes(i), i
    for i in range(o200k.N_RANKS, o200k.N_VOCAB):
        assert tok.token_bytes(i) == enc.decode_single_token_bytes(i) or ALIASES.get(i) == enc.decode_single_token_bytes(i), i
        assert enc.encode_single_token(tok.token_text(i)) == i
    assert (tok.bos_id, tok.eos_id) == (199998, 200002)
    texts = {tok.token_text(i) for i in tok.eog_ids}
    assert texts == {"<|return|>", "<|call|>", "<|endoftext|>"}  # llama.cpp drops <|end|> for o200k
    model = open_gguf(files[0])
    assert not model.tensors and model.get("tokenizer.ggml.pre") == "gpt-4o"
    assert len(model.get("tokenizer.ggml.merges")) == o200k.N_RANKS - 256
