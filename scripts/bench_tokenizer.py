"""Tokenizer timings: encode of a 4,000-token prompt and streamed detokenize cost per token.

    uv run python scripts/bench_tokenizer.py [VOCAB.gguf ...]

Defaults to llama.cpp's qwen2 and phi-3 vocab files (the Qwen2.5 and Phi-3 tokenizers) and the
rebuilt o200k vocab when quicktok is installed. Prompts: code (this repository's Python sources),
prose (its Markdown), and mixed multilingual text (the tests' string generator), each cut to 4,000
tokens. Reports the median and minimum wall time of `Tokenizer.encode` over 50 runs (warm BPE
cache, as for a repeated system prompt, and cold: a fresh tokenizer for every run is too slow to
load, so "cold" uses text the cache has not seen: a different 4,000-token window each run).
"""

from __future__ import annotations

import glob
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "core" / "tests" / "tokenizer"))

from tok_strings import generate  # noqa: E402

from orcd_core.gguf_file import open_gguf  # noqa: E402
from orcd_core.tokenizer import IncrementalDetokenizer, load_tokenizer  # noqa: E402

N_TOKENS = 4000
RUNS = 50


def corpora() -> dict[str, str]:
    code = "".join(Path(p).read_text(encoding="utf-8") for p in sorted(glob.glob(str(ROOT / "core/src/orcd_core/**/*.py"), recursive=True)))
    prose = "".join(Path(p).read_text(encoding="utf-8") for p in sorted(glob.glob(str(ROOT / "**/*.md"), recursive=True)))
    mixed = " ".join(generate(4000, seed=11, long_every=10**9))
    return {"code": code, "prose": prose, "mixed": mixed}


def windows(tok, corpus: str, n: int) -> list[str]:
    ids = tok.encode(corpus, add_special=False)
    out = []
    step = max(1, (len(ids) - N_TOKENS) // max(1, n))
    for k in range(n):
        chunk = ids[k * step : k * step + N_TOKENS]
        if len(chunk) < N_TOKENS:
            chunk = ids[:N_TOKENS]
        out.append(tok.decode(chunk))
    return out


def registry():
    """The installed plugins; the core's own when run from a source tree without entry points."""
    from orcd_core import builtin
    from orcd_core.plugins import default_registry, load_plugins

    reg = default_registry()
    return reg if reg.tokenizers else load_plugins(allow=(), extra_modules=[builtin])


def bench(path: str) -> None:
    t0 = time.perf_counter()
    tok = load_tokenizer(open_gguf(path), registry())
    load_s = time.perf_counter() - t0
    print(f"{Path(path).name}: {tok.kind} pre={tok.pre or '-'} vocab {tok.vocab_size}, load {load_s:.2f} s")
    for label, corpus in corpora().items():
        texts = windows(tok, corpus, RUNS)
        n_tok = len(tok.encode(texts[0], add_special=False))
        warm, cold = [], []
        for _ in range(RUNS):
            t = time.perf_counter()
            tok.encode(texts[0])
            warm.append(time.perf_counter() - t)
        for text in texts[1:]:
            t = time.perf_counter()
            tok.encode(text)
            cold.append(time.perf_counter() - t)
        ids = tok.encode(texts[0], add_special=False)
        per_tok = []
        for _ in range(5):
            det = IncrementalDetokenizer(tok)
            t = time.perf_counter()
            for i in ids:
                det.push(i)
            det.flush()
            per_tok.append((time.perf_counter() - t) / len(ids))
        print(
            f"  {label:5s} {n_tok} tokens: encode warm median {statistics.median(warm) * 1e3:.2f} ms "
            f"(min {min(warm) * 1e3:.2f}), other text median {statistics.median(cold) * 1e3:.2f} ms; "
            f"detokenize {min(per_tok) * 1e6:.2f} us/token"
        )


def main(argv: list[str]) -> None:
    paths = argv or []
    if not paths:
        from orcd_core.testmodels import llama_cpp_models_dir

        vocab = llama_cpp_models_dir()
        paths = [str(vocab / "ggml-vocab-qwen2.gguf"), str(vocab / "ggml-vocab-phi-3.gguf")]
        try:
            from orcd_core.tokenizer.o200k import o200k_vocab_gguf

            paths.append(str(o200k_vocab_gguf()))
        except Exception as exc:  # quicktok not installed
            print(f"(o200k skipped: {exc})")
    print(f"cpu count {os.cpu_count()}, python {sys.version.split()[0]}")
    for p in paths:
        bench(p)


if __name__ == "__main__":
    main(sys.argv[1:])
