"""The sampling rule of orcd_core.sampling, which every backend must reproduce id for id."""

from __future__ import annotations

import numpy as np
import pytest

from orcd_core.generation import SamplingParams
from orcd_core.sampling import apply_temperature_and_penalty, plain_greedy, sample, sorted_candidates, splitmix64, uniform

GOLDEN = 0x9E3779B97F4A7C15


def test_splitmix64_matches_the_published_sequence():
    # SplitMix64 (Steele, Lea, Flood 2014; Vigna's C reference), seed 1234567: its first outputs
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431]
    state = 1234567
    for value in expected:
        state = (state + GOLDEN) % 2**64
        assert splitmix64(state) == value


def test_uniform_is_24_bits_of_the_step_output():
    for seed, step in [(0, 0), (42, 7), (2**64 - 1, 1000)]:
        x = splitmix64((seed + (step + 1) * GOLDEN) % 2**64)
        u = uniform(seed, step)
        assert u == (x >> 40) / 2**24 and 0.0 <= u < 1.0
        assert np.float32(u) == u  # exactly representable: the CUDA kernel can use float32
    assert len({uniform(3, i) for i in range(1000)}) > 990


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = np.array([0.5, 2.0, -1.0, 2.0, 2.0], np.float32)
    assert sample(logits, SamplingParams(temperature=0)) == 1
    assert sample(logits, SamplingParams(temperature=0, seed=99), step_index=5) == 1


@pytest.mark.parametrize("params, plain", [
    (SamplingParams(temperature=0.0), True),
    (SamplingParams(temperature=-1.0, repetition_window=0, repetition_penalty=1.5), True),  # window 0: no penalty
    (SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.1), True),  # (no draw when greedy)
    (SamplingParams(temperature=0.0, repetition_penalty=1.5), False),
    (SamplingParams(temperature=0.0, frequency_penalty=2.0), False),
    (SamplingParams(temperature=0.0, presence_penalty=2.0), False),
    (SamplingParams(temperature=0.7), False),
])
def test_plain_greedy_is_the_argmax_of_the_raw_logits(params, plain):
    """plain_greedy(params) (the CUDA decode graphs' argmax-only sampler, backends/cuda/sampler.py) holds
    exactly where the rule's pick is the argmax of the logits whatever the window holds: checked on
    logits whose top id is in the window, where a penalty moves the pick."""
    assert plain_greedy(params) == plain
    rng = np.random.default_rng(5)
    picks = []
    for step in range(20):
        logits = rng.standard_normal(1000).astype(np.float32)
        top = int(np.argmax(logits))
        logits[top + 1 if top < 999 else top - 1] = logits[top] - 1e-3  # a close second
        picks.append(sample(logits, params, [top] * 3, step) == top)
    assert all(picks) if plain else not all(picks)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([2.0, -2.0, 1.0, 3.0], np.float32)
    p = SamplingParams(temperature=1.0, repetition_penalty=2.0, repetition_window=3)
    got = apply_temperature_and_penalty(logits, p, [3, 0, 0, 1, -1])  # window: last 3 = [0, 1, -1]
    np.testing.assert_array_equal(got, [1.0, -4.0, 1.0, 3.0])
    # penalty applies to the greedy choice too: 3 is penalised below 2's logit
    g = SamplingParams(temperature=0, repetition_penalty=4.0)
    assert sample(np.array([0.0, 0.0, 1.0, 3.0], np.float32), g, [3]) == 2


def test_temperature_scales_before_the_penalty():
    logits = np.array([4.0, -4.0], np.float32)
    p = SamplingParams(temperature=2.0, repetition_penalty=1.5)
    f = np.float32
    np.testing.assert_array_equal(apply_temperature_and_penalty(logits, p, [0, 1]), [f(2.0) / f(1.5), f(-2.0) * f(1.5)])


def test_frequency_and_presence_penalties_as_llama_cpp():
    """llama.cpp's penalties sampler: after the repetition penalty, each distinct id of the window,
    occurring c times, loses c * frequency + presence (float32); ids outside the window are untouched."""
    f = np.float32
    logits = np.array([2.0, -1.0, 0.5, 3.0], np.float32)
    p = SamplingParams(temperature=1.0, repetition_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.5,
                       repetition_window=4)
    got = apply_temperature_and_penalty(logits, p, [9, 0, 1, 0, 0])  # window: [0, 1, 0, 0]: 0 x3, 1 x1
    want = [f(2.0) / f(2.0) - (f(3) * f(0.25) + f(0.5)), f(-1.0) * f(2.0) - (f(1) * f(0.25) + f(0.5)), 0.5, 3.0]
    np.testing.assert_array_equal(got, np.array(want, np.float32))
    only = SamplingParams(temperature=0, presence_penalty=1.5, repetition_window=2)  # no repetition penalty
    assert sample(np.array([1.0, 0.6, 0.0], np.float32), only, [0, 2]) == 1  # 0 drops to -0.5 below 0.6


def test_sorted_candidates_top_k_keeps_lowest_ids_on_boundary_ties():
    l = np.array([1.0, 3.0, 2.0, 2.0, 2.0, 0.0], np.float32)
    assert sorted_candidates(l, 3).tolist() == [1, 2, 3]
    assert sorted_candidates(l, 0).tolist() == [1, 2, 3, 4, 0, 5]


def test_top_k_1_and_tiny_top_p_are_greedy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(500).astype(np.float32)
    best = int(np.argmax(logits))
    for step in range(20):
        assert sample(logits, SamplingParams(temperature=1.5, top_k=1, seed=step), step_index=step) == best
        assert sample(logits, SamplingParams(temperature=1.5, top_p=1e-6, seed=step), step_index=step) == best


def test_min_p_excludes_unlikely_tokens():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    p = SamplingParams(temperature=1.0, min_p=0.2, seed=1)  # keeps p >= 0.1: ids 0, 1, 2
    seen = {sample(logits, p, step_index=i) for i in range(400)}
    assert seen == {0, 1, 2}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    p = SamplingParams(temperature=1.0, top_p=0.8, seed=2)  # 0.5 + 0.3 >= 0.8: ids 0, 1
    seen = {sample(logits, p, step_index=i) for i in range(400)}
    assert seen == {0, 1}


def test_samples_follow_the_softmax():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    logits = np.log(probs).astype(np.float32) * 0.5  # temperature 0.5 restores the distribution
    p = SamplingParams(temperature=0.5, seed=12345)
    n = 4000
    counts = np.bincount([sample(logits, p, step_index=i) for i in range(n)], minlength=4)
    # binomial standard deviation at n=4000 is <= 0.008; 4 sigma
    np.testing.assert_allclose(counts / n, probs, atol=0.032)


def test_same_seed_same_ids_other_seed_other_ids():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal(1000).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=77)
    a = [sample(logits, p, step_index=i) for i in range(30)]
    assert a == [sample(logits, p, step_index=i) for i in range(30)]
    q = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=78)
    assert a != [sample(logits, q, step_index=i) for i in range(30)]


@pytest.mark.parametrize("top_k", [0, 5])
def test_sample_returns_a_valid_id(top_k):
    logits = np.full(10, -1e30, np.float32)
    logits[7] = 0.0
    assert sample(logits, SamplingParams(temperature=1.0, top_k=top_k, seed=3)) == 7
