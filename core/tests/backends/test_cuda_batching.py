"""Continuous batching on the CUDA backend (the batched decode graphs, backends/cuda/graph.py), on the
synthetic full-width 2-layer cuts of qwen2 / phi3 (Q4_K_M) and gpt-oss (MXFP4 experts, sliding-window
rings):
- each of 8 sequences (greedy and seeded sampling, different prompts and lengths), decoded together and
  joining / leaving at different steps, gives exactly the ids it gives alone (the kernels compute a row
  of a batched step as they compute a lone token);
- the batched tokens of greedy sequences match the reference backend's for the first tokens;
- graphs are kept across requests (the second round replays the first round's graph objects);
- KV memory returns to zero.
"""

from __future__ import annotations

import numpy as np
import pytest

from orcd_core.generation import GenerationRequest, GenerationResult, SamplingParams
from orcd_core.scheduler import Scheduler
from orcd_core.testing.cuda import load_engine, require_cuda_gpu, run_ids, synth_cut, synth_dir  # noqa: F401 (a fixture)

pytestmark = pytest.mark.gpu
cupy = require_cuda_gpu()

PARAMS = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=40, seed=1),
          SamplingParams(temperature=1.0, top_p=0.9, min_p=0.02, repetition_penalty=1.2, seed=2),
          SamplingParams(temperature=0.0, repetition_penalty=1.3), SamplingParams(temperature=0.7, seed=3),
          SamplingParams(temperature=0.0), SamplingParams(temperature=1.1, top_k=5, seed=4),
          SamplingParams(temperature=0.0, repetition_penalty=1.1, repetition_window=16)]


@pytest.fixture(scope="module", params=[(a, g) for a in ("qwen2", "phi3", "gpt-oss") for g in ("tc", "q8")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def engine(request, synth_dir):
    """An engine of max batch 8 on the tensor-core GEMVs (the default) or the int8 ones
    (ORCD_DECODE_GEMV=q8: gemv_q8_t8_*, and the experts' int8 kernels)."""
    arch, gemv = request.param
    mp = pytest.MonkeyPatch()
    mp.setenv("ORCD_DECODE_GEMV", gemv)
    try:
        eng = load_engine(synth_cut(synth_dir, arch), "cuda", max_context=512, max_batch=8)
    finally:
        mp.undo()
    assert eng.device.decode_gemv == gemv
    yield eng
    eng.close()


def batch(engine, reqs, join_at):
    sched = Scheduler(engine, 8)
    seqs, out, step = {}, {}, 0
    todo = list(range(len(reqs)))
    try:
        while todo or sched.busy:
            for i in [i for i in todo if join_at[i] <= step]:
                seqs[sched.submit(engine.prepare(reqs[i]))] = i
                todo.remove(i)
            for seq, event in sched.step():
                if not hasattr(event, "index"):
                    out[seqs[seq]] = event
            step += 1
    finally:
        sched.close()
    return [out[i] for i in range(len(reqs))]


def requests(engine, n=8):
    rng = np.random.default_rng(11)
    V = int(engine.config.n_vocab)
    return [GenerationRequest(prompt_ids=tuple(rng.integers(0, V, int(rng.integers(3, 40))).tolist()),
                              max_tokens=int(rng.integers(8, 40)), sampling=PARAMS[i % len(PARAMS)])
            for i in range(n)]


def test_batched_sequences_give_the_ids_they_give_alone(engine):
    reqs = requests(engine)
    alone = [run_ids(engine, r.prompt_ids, r.max_tokens, r.sampling) for r in reqs]
    got = batch(engine, reqs, join_at=[0, 0, 0, 1, 3, 3, 7, 12])
    for i, (a, g) in enumerate(zip(alone, got)):
        assert isinstance(g, GenerationResult), (i, g)
        assert g.ids == a, f"sequence {i}: first difference at {next((k for k, (x, y) in enumerate(zip(g.ids, a)) if x != y), None)}"
    assert engine.device.memory_report()["kv_cache"] == 0


def test_batched_greedy_tokens_match_the_reference(engine, synth_dir):
    if engine.device.decode_gemv == "q8":
        pytest.skip("the int8 GEMVs round x as llama.cpp's MMVQ does: a greedy pick of these random weights' "
                    "near-flat logits may differ from the float reference's (their logits: test_int8_activation_gemv)")
    arch = engine.architecture
    ref = load_engine(engine.model_path, "reference", max_context=512)
    try:
        reqs = [GenerationRequest(prompt_ids=r.prompt_ids, max_tokens=8, sampling=SamplingParams(temperature=0.0))
                for r in requests(engine, 4)]
        want = [run_ids(ref, r.prompt_ids, 8, r.sampling) for r in reqs]
        got = batch(engine, reqs, join_at=[0, 0, 0, 0])
        for w, g in zip(want, got):
            assert g.ids == w, arch
    finally:
        ref.close()


def test_graphs_are_kept_across_requests(engine):
    """The engine's scheduler keeps its decoder, whose warm-up (GraphBatchDecoder.warm_up, at load; run
    again here: a workspace that grew in an earlier test dropped every graph) captures the graphs of
    every row count (both parities, the smallest bound of positions, greedy rows' argmax sampler and the
    full one): two rounds of short requests replay them (the same objects) and capture nothing more."""
    from orcd_core.backends.cuda.planner import SPAN_MIN

    sched = engine.scheduler
    cache = engine.model.new_kv_cache(engine.n_ctx)
    try:
        sched.warm_up(cache)
    finally:
        engine.device.free_kv_cache(cache)
    warm = dict(sched._decoder.graphs)
    assert {(B, SPAN_MIN, p, g) for B in range(1, engine.max_batch + 1) for p in (0, 1) for g in (False, True)} <= set(warm)
    rounds = []
    for _ in range(2):
        seqs = [sched.submit(engine.prepare(r)) for r in requests(engine, 4)]
        while sched.busy:
            sched.step()
        assert all(s.done for s in seqs)
        rounds.append(dict(sched._decoder.graphs))
    first, second = rounds
    assert first.keys() == second.keys() == warm.keys()
    assert all(second[k] is first[k] is warm[k] for k in first)
    assert engine.device.memory_report()["kv_cache"] == 0


def test_logprobs_of_batched_steps_are_the_step_logits_log_softmax(engine):
    """Rows asking for log-probabilities (the graph decoder then runs no step ahead, so the step's
    logits are read before the next one overwrites them): the same alone and batched, and each
    token's value is log_softmax of `Engine.logits` over the sequence up to it (a separate prefill;
    fp16 GEMMs there against the decode GEMVs, whose logits agree within relative L2 1e-2 elsewhere:
    |logits| <= 4 here, so within 0.1 in log-probability)."""
    import math

    from engine_runs import collect, run_together

    reqs = [GenerationRequest(prompt_ids=r.prompt_ids, max_tokens=6, sampling=r.sampling, logprobs=4)
            for r in requests(engine, 3)]
    alone = [collect(engine, r)[0] for r in reqs]
    for toks, want, req in zip(run_together(engine, reqs), alone, reqs):
        assert [t.id for t in toks] == [t.id for t in want]
        assert [t.logprobs for t in toks] == [t.logprobs for t in want]
        logits = engine.logits(list(req.prompt_ids) + [t.id for t in toks][:-1]).astype(np.float64)
        for i, t in enumerate(toks):
            row = logits[len(req.prompt_ids) - 1 + i]
            lse = row.max() + math.log(np.exp(row - row.max()).sum())
            assert abs(t.logprobs.logprob - (row[t.id] - lse)) <= 0.1
            assert len(t.logprobs.top) == 4
    assert engine.device.memory_report()["kv_cache"] == 0
