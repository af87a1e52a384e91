"""Parity of the reference backend with llama.cpp (llama-cpp-python, CPU) on the real test models:
Qwen2.5-Coder-0.5B Q4_K_M (qwen2) and SmolLM2-135M Q4_1 (llama).

Thresholds (issue 4): top-1 equal at >= 98% of positions; greedy 32-token continuations identical
for >= 7 of 8 prompts. Bit equality is not expected: llama.cpp's CPU matmuls quantize activations to
8 bits (Q8_0/Q8_K) and it runs attention in fp16, while we dequantize weights to float32. The
measured max |Δlogit| / std(logits) is printed (run with -s) and bounded loosely (< 0.5)."""

from __future__ import annotations

import numpy as np
import pytest

from orcd_core.engine import Engine
from orcd_core.generation import GenerationRequest, SamplingParams
from orcd_core.testmodels import fetch_model

pytestmark = pytest.mark.oracle

PROMPTS = [
    ("prose", "The old lighthouse keeper climbed the stairs every evening, and", False),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
    ("numbers", "1, 1, 2, 3, 5, 8, 13, 21, 34,", False),
    ("multilingual-fr", "La tour Eiffel a été construite en", False),
    ("multilingual-zh", "北京是中国的首都，也是", False),
    ("chat-capital", "What is the capital of Japan? Answer in one sentence.", True),
    ("chat-code", "Write a Python function that reverses a string.", True),
    ("chat-ru", "Переведи на английский: кошка спит на диване.", True),
]
N_CONTINUE = 32


def llama_cpp_greedy(llm, prompt: list[int], n: int, eog: set[int]) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if t in eog:
            break
        out.append(t)
        llm.eval([t])
    return out


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.fixture(scope="module", params=["smollm2", "qwen"])
def pair(request):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = fetch_model(request.param)
    engine = Engine.load(path, backend="reference", max_context=512)
    llm = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2, n_batch=512)
    yield request.param, engine, llm
    engine.close()
    llm.close()


def test_parity_real_model(pair):
    name, engine, llm = pair
    eog = set(engine.tokenizer.eog_ids)
    positions = top1_equal = 0
    ratios = []
    same_continuations = 0
    report = []
    for label, text, chat in PROMPTS:
        prompt = engine.prepare(GenerationRequest(prompt=text, chat=chat, max_tokens=N_CONTINUE)).prompt_ids
        gen = engine.run(engine.prepare(GenerationRequest(prompt=text, chat=chat, max_tokens=N_CONTINUE,
                                                          sampling=SamplingParams(temperature=0))))
        ours = list(gen)
        ours_ids = [t.id for t in ours]
        theirs_ids = llama_cpp_greedy(llm, prompt, N_CONTINUE, eog)
        same = ours_ids == theirs_ids
        same_continuations += same
        # teacher-forced logits over prompt + our continuation, both engines on the same ids
        ids = prompt + ours_ids[:-1] if ours_ids else prompt
        a, b = engine.logits(ids), llama_cpp_logits(llm, ids)
        eq = np.argmax(a, axis=1) == np.argmax(b, axis=1)
        positions += len(ids)
        top1_equal += int(eq.sum())
        r = np.abs(a - b).max(axis=1) / b.std(axis=1)
        ratios.extend(r.tolist())
        report.append(f"{name}/{label}: {len(ids)} positions, top-1 equal {eq.mean():.3f}, "
                      f"max|Δ|/std {r.max():.4f}, greedy {'==' if same else '!='} "
                      f"(first diff at {first_diff(ours_ids, theirs_ids)})")
    print("\n" + "\n".join(report))
    print(f"{name}: top-1 {top1_equal}/{positions} = {top1_equal / positions:.4f}; continuations "
          f"{same_continuations}/8; max|Δlogit|/std max {max(ratios):.4f} median {np.median(ratios):.4f}")
    assert top1_equal / positions >= 0.98
    assert same_continuations >= 7
    assert max(ratios) < 0.5


def first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


HAIKU = "Write a haiku about GPU computing"


def test_haiku_matches_llama_cpp_chat_completion(pair):
    """`orcd-worker generate --chat --prompt HAIKU --temperature 0` (the same request, run through the
    engine that command drives) == llama-cpp-python's create_chat_completion at temperature 0."""
    name, engine, llm = pair
    if name != "qwen":
        pytest.skip("the haiku check is specified for the Qwen model")
    prepared = engine.prepare(GenerationRequest(prompt=HAIKU, chat=True, max_tokens=256,
                                                sampling=SamplingParams(temperature=0)))
    llm.reset()
    response = llm.create_chat_completion(messages=[{"role": "user", "content": HAIKU}], temperature=0, max_tokens=256)
    n_prompt = response["usage"]["prompt_tokens"]
    their_prompt = [int(t) for t in llm.input_ids[:n_prompt]]
    their_ids = [int(t) for t in llm.input_ids[n_prompt : llm.n_tokens]]
    ours = run_ids(engine, prepared)
    print(f"\nhaiku ({len(ours.ids)} tokens, finish {ours.finish_reason}):\n{ours.text}")
    assert prepared.prompt_ids == their_prompt
    assert response["choices"][0]["finish_reason"] == "stop" and ours.finish_reason == "stop"
    assert ours.ids == their_ids
    assert ours.text == response["choices"][0]["message"]["content"]


def run_ids(engine, prepared):
    gen = engine.run(prepared)
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value


SYNTH_CASES = [("qwen2", 1, None), ("qwen2", 2, 3), ("llama", 1, None), ("llama", 2, 4), ("phi3", 1, None), ("phi3", 2, 3)]


@pytest.mark.parametrize("arch,seed,layers", SYNTH_CASES, ids=[f"{a}-seed{s}-{l or 2}L" for a, s, l in SYNTH_CASES])
def test_parity_synthetic(tmp_path, arch, seed, layers):
    """Synthetic files from `orcd_core.synth` (tiny widths, the real type recipe, random weights):
    relative L2 error of the logits <= 2% at every position, top-1 equal at >= 90% of positions."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from orcd_core.synth import synthesize

    path = synthesize(arch, tmp_path / f"{arch}.gguf", size="tiny", seed=seed, layers=layers).path
    engine = Engine.load(path, backend="reference", max_context=256)
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    try:
        rng = np.random.default_rng(seed)
        ids = [int(i) for i in rng.integers(0, engine.config.n_vocab, 48)]
        a, b = engine.logits(ids), llama_cpp_logits(llm, ids)
    finally:
        engine.close()
        llm.close()
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    top1 = float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
    print(f"\nsynthetic {arch} seed {seed} layers {layers or 2}: rel L2 max {rel.max():.4f} mean {rel.mean():.4f}, "
          f"top-1 {top1:.3f}")
    assert rel.max() <= 0.02
    assert top1 >= 0.90
