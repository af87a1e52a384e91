"""Per-token log-probabilities (`GenerationRequest.logprobs`) on the reference backend, with tiny models
of the five architectures: each generated token's log-probability and its k likeliest alternatives are
log_softmax of the raw logits of the step that chose it, checked against `Engine.logits` over the prompt
and the tokens before it (a separate prefill of the whole sequence: the oracle), for greedy and sampled
tokens; the same alone and batched; out-of-range k refused naming the field."""

from __future__ import annotations

import math

import numpy as np
import pytest
from engine_runs import collect, run_together
from gguf_builder import ARCHITECTURES, tiny_model

from orcd_core.engine import Engine, validate_request
from orcd_core.generation import MAX_TOP_LOGPROBS, GenerationRequest, InvalidRequest, SamplingParams
from orcd_core.plugins import default_registry

# the prefill of the whole sequence and the decode steps compute the same logits up to float32 rounding
ATOL = 2e-4


@pytest.fixture(scope="module", params=ARCHITECTURES)
def engine(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("lp") / f"{request.param}.gguf"
    path.write_bytes(tiny_model(request.param, seed=5).to_bytes())
    eng = Engine.load(path, backend="reference", registry=default_registry(), max_batch=4)
    yield eng
    eng.close()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - (m + math.log(np.exp(x - m).sum()))


def _check_against_prefill(engine, prompt_ids, tokens, k):
    ids = [t.id for t in tokens]
    logits = engine.logits(list(prompt_ids) + ids[:-1])  # row i predicts position i + 1
    for i, t in enumerate(tokens):
        ref = _log_softmax(logits[len(prompt_ids) - 1 + i])
        assert t.logprobs is not None
        assert abs(t.logprobs.logprob - ref[t.id]) <= ATOL, (i, t.logprobs.logprob, ref[t.id])
        assert len(t.logprobs.top) == k
        top_ids = [j for j, _ in t.logprobs.top]
        values = [v for _, v in t.logprobs.top]
        assert values == sorted(values, reverse=True)
        np.testing.assert_allclose(values, ref[top_ids], atol=ATOL)
        # the alternatives are the k likeliest: none left out is likelier than the last one taken
        if k:
            rest = np.delete(ref, top_ids)
            assert rest.max() <= values[-1] + ATOL
            assert sum(math.exp(v) for v in values) <= 1 + 1e-6


@pytest.mark.parametrize("k", [0, 5])
def test_greedy_tokens_logprobs_are_log_softmax_of_their_steps_logits(engine, k):
    req = GenerationRequest(prompt="the one and only", max_tokens=6, sampling=SamplingParams(temperature=0),
                            logprobs=k)
    prepared = engine.prepare(req)
    tokens, result = collect(engine, req)
    assert tokens and len(tokens) == result.tokens_out
    _check_against_prefill(engine, prepared.prompt_ids, tokens, k)
    if k:  # greedy: the chosen token is the likeliest
        assert all(t.logprobs.top[0][0] == t.id for t in tokens)


def test_sampled_tokens_report_the_models_distribution_not_the_samplers(engine):
    """Temperature and filters shape the draw, not the reported log-probabilities (raw logits)."""
    req = GenerationRequest(prompt="a b c", max_tokens=6, logprobs=3,
                            sampling=SamplingParams(temperature=1.5, top_k=7, repetition_penalty=1.3, seed=9))
    prepared = engine.prepare(req)
    tokens, _ = collect(engine, req)
    _check_against_prefill(engine, prepared.prompt_ids, tokens, 3)


def test_no_logprobs_unless_asked(engine):
    tokens, _ = collect(engine, GenerationRequest(prompt="hello", max_tokens=3, sampling=SamplingParams(temperature=0)))
    assert tokens and all(t.logprobs is None for t in tokens)


def test_logprobs_are_the_same_alone_and_batched(engine):
    reqs = [GenerationRequest(prompt=p, max_tokens=5, logprobs=2, sampling=SamplingParams(temperature=t, seed=s))
            for p, t, s in (("one two", 0.0, 0), ("x y z", 0.9, 4), ("hello there", 0.0, 0))]
    alone = [collect(engine, r)[0] for r in reqs]
    for toks, want in zip(run_together(engine, reqs), alone):
        assert [t.id for t in toks] == [t.id for t in want]
        assert [t.logprobs for t in toks] == [t.logprobs for t in want]


@pytest.mark.parametrize("k", [-1, MAX_TOP_LOGPROBS + 1])
def test_out_of_range_is_refused_naming_the_field(k):
    with pytest.raises(InvalidRequest) as info:
        validate_request(GenerationRequest(prompt="x", logprobs=k))
    assert info.value.details["field"] == "logprobs"
    validate_request(GenerationRequest(prompt="x", logprobs=MAX_TOP_LOGPROBS))
