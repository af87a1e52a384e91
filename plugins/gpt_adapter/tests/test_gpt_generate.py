"""Greedy generation of gpt-oss and gpt2 through the Engine on the reference backend, on synthetic
files (orcd_core.testing.synth): finite logits, the same ids on a second run, and the greedy ids equal to the
argmax of the engine's own logits over prompt + generated ids in one prefill (so decoding with the KV
cache, past gpt-oss's sliding window of 128, agrees with a full evaluation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orcd_core.engine import Engine
from orcd_core.generation import GenerationRequest, SamplingParams
from orcd_core.plugins import load_plugins
from orcd_core.testing.synth import synthesize

N_NEW = 24


def generate(engine: Engine, request: GenerationRequest):
    gen = engine.run(engine.prepare(request))
    ids = []
    while True:
        try:
            token = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        ids.append(token.id)
    assert result.ids == ids and result.tokens_out == len(ids)
    return result


@pytest.fixture(scope="module")
def registry():
    return load_plugins()


@pytest.mark.parametrize("arch,n_prompt,vocab_hi", [("gpt-oss", 120, 199_998), ("gpt2", 40, 50_256)])
def test_greedy_generation_is_finite_and_deterministic(tmp_path: Path, registry, arch, n_prompt, vocab_hi):
    path = tmp_path / f"{arch}.gguf"
    synthesize(arch, path, size="tiny", layers=2, seed=11, registry=registry)
    engine = Engine.load(path, backend="reference", registry=registry, max_context=256)
    try:
        assert engine.architecture == arch
        # prompt ids (120 + 24 new > the window of 128): decode reads the ring-buffered SWA cache
        prompt = [int(i) for i in np.random.default_rng(11).integers(0, vocab_hi, n_prompt)]
        request = GenerationRequest(prompt_ids=tuple(prompt), max_tokens=N_NEW,
                                    sampling=SamplingParams(temperature=0.0))
        first = generate(engine, request)
        assert 0 < first.tokens_out <= N_NEW and first.finish_reason in ("length", "stop")
        if arch == "gpt-oss":  # the point of this case: decoding went past the sliding window
            assert n_prompt + first.tokens_out > 128, first.tokens_out
        assert generate(engine, request).ids == first.ids  # deterministic
        logits = engine.logits(prompt + first.ids)  # [T, V]: one prefill over prompt + generated
        assert np.isfinite(logits).all()
        assert logits[n_prompt - 1 : -1].argmax(-1).tolist() == first.ids[: len(logits) - n_prompt]
        # and through the tokenizer: a text prompt gives text, the same twice
        text = GenerationRequest(prompt="The reference backend says", max_tokens=8,
                                 sampling=SamplingParams(temperature=0.0))
        a, b = generate(engine, text), generate(engine, text)
        assert a.ids == b.ids and a.text == b.text and a.tokens_in > 0
    finally:
        engine.close()
