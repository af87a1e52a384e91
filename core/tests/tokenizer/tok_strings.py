"""Seeded generator of test strings for the tokenizer properties and the differential tests.

Each string mixes pieces drawn from classes chosen to hit the pre-tokenizers' edge cases: ASCII
words and contractions, code, digit runs, whitespace runs (spaces, tabs, CR/LF, Unicode spaces),
CJK, Hangul, Cyrillic/Greek/Arabic/Devanagari, emoji with ZWJ sequences, skin tones and flags,
combining marks, punctuation, control-token look-alikes; a few are very long.
"""

from __future__ import annotations

import random

WORDS = ["the", "The", "HELLO", "world", "naïve", "café", "résumé", "Straße", "don't", "I'M", "we'RE", "it's",
         "you'll", "they'd", "O'Neil", "x", "a", "tokenization", "GGUF", "llama.cpp", "über", "ﬁnance"]
CODE = ["def f(x):\n    return x**2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}", "if x != None and y >= 3:",
        "#include <stdio.h>", "const s = `${a}+${b}`;", "SELECT * FROM t WHERE id=42;", "<div class=\"x\">&amp;</div>",
        "λx. x + 1", "a->b->c", "i++; j--;", "0x1F, 0b1010, 1e-9", "path/to/file.py:12:3", "    ", "\t\t"]
DIGITS = ["0", "7", "42", "123", "2024", "12345", "3.14159", "1,000,000", "٣٤٥", "१२३", "①②", "¼½", "10^9"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2009", "\u200b", " \t \n\n  "]
CJK = ["中文", "你好，世界", "日本語のテキスト", "カタカナ", "ひらがな", "한국어 문장", "漢字", "繁體中文", "。，、"]
SCRIPTS = ["Привет мир", "Ελληνικά", "مرحبا بالعالم", "नमस्ते दुनिया", "שלום", "ไทย", "Tiếng Việt", "ǅemal"]
EMOJI = ["😀", "🤷\u200d♂️", "👩\u200d👩\u200d👧\u200d👦", "👍🏽", "🇫🇷", "🏳️\u200d🌈", "❤️", "🦙", "✨🚀", "1️⃣"]
COMBINING = ["e\u0301", "a\u0308\u0304", "n\u0303", "\u0301", "Z\u0335\u0321a\u0337\u0316", "ก\u0e31", "é\u0323"]
PUNCT = [".", ",", "!", "?", "...", "—", "–", "«»", "“quoted”", "‘x’", "(", ")", "[]", "{}", "''", "'", "\"", "#@$%^&*",
         "¿¡", "・", "…", "→", "©®™", "€£¥"]
SPECIAL_LOOKALIKES = ["<|im_end|>", "<|endoftext|>", "<|im_start|>", "<s>", "</s>", "<|end|>", "<|user|>",
                      "<|assistant|>", "<unk>", "[INST]", "<|eot_id|>", "<0x0A>"]

CLASSES = [WORDS, CODE, DIGITS, SPACES, CJK, SCRIPTS, EMOJI, COMBINING, PUNCT, SPECIAL_LOOKALIKES]


def generate(n: int, seed: int, long_every: int = 100, long_len: int = 6000) -> list[str]:
    """`n` strings, deterministic in `seed`; every `long_every`-th string is about `long_len` characters."""
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(n):
        target = long_len if (i % long_every == long_every - 1) else rng.choice((1, 2, 3, 5, 8, 13, 21, 40))
        parts: list[str] = []
        while sum(map(len, parts)) < target:
            cls = rng.choice(CLASSES)
            piece = rng.choice(cls)
            sep = rng.choice(("", "", " ", " ", "\n", "  "))
            parts.append(piece + sep)
        text = "".join(parts)
        if rng.random() < 0.2:
            text = " " + text
        if rng.random() < 0.1:
            text = text + rng.choice(SPACES)
        out.append(text)
    return out
